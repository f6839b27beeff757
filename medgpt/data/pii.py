"""Personal identifiers -> typed placeholders, without touching clinical text.

    medgpt data clean data/notes.jsonl --output_dir out/clean --clean.pii_types id,phone,mrn

    >>> scrub("患者张三，男，45岁，身份证号11010519491231002X，电话138-1234-5678")
    ('患者[NAME]，男，45岁，身份证号[ID]，电话[PHONE]', Counter({'NAME': 1, 'ID': 1, 'PHONE': 1}))

The HIPAA Safe Harbor identifiers that occur in text, in Chinese and English. Clinical text is full of numbers
(140/90 mmHg, 500 mg, 4 g/24 h, ICD-10 I10, visit dates, lab values), so a number is replaced only when its
shape cannot be clinical or when a label says what it is:
- ID: an 18-character resident ID with a real birth date and the right ISO 7064 MOD 11-2 check character,
  anywhere; after an ID label (身份证号, ID card, passport, 护照) any 15-18-digit or passport-shaped value, a
  typo being still an identifier. Hong Kong, Taiwan, Singapore, NHS and Medicare numbers anywhere with a right
  check digit, after their label in any shape (medgpt/data/pii_formats.py).
- BANK_CARD: 13-19 digits with a card-network prefix (3-6, or 2221-2720) passing the Luhn check; after a card
  label (银行卡号, card number) any 13-19 digits.
- PHONE: mainland mobiles and landlines with a marked-off area code, North American ((415) 555-0132,
  415-555-0132, +1 415 555 0132), international with a +country code, UK-style 0xxx xxx xxxx; after a phone
  label (电话, Tel, Fax, 传真) any 7-15 digits.
- SSN: 123-45-6789 in the valid ranges; after an SSN label also without dashes.
- EMAIL, URL, IP (IPv4 with a two-digit part, or IPv6): by shape.
- MRN, ACCOUNT, LICENSE, DEVICE, PLATE, DOB: only after a label (住院号/门诊号/就诊卡/MRN; 医保卡号/account/
  member ID/health plan; 执业证书编号/license/DEA/NPI; 序列号/serial no.; 车牌号/plate; 出生日期/出生于/DOB/born),
  and a date directly followed by 出生.
- ADDRESS: after an address label (住址/地址/家住/居住于/籍贯/Address:/lives at) when the value holds an address
  unit; a Chinese road + number (朝阳区建国路88号3栋2单元501室) or an English number + street (1420 Maple Avenue,
  Apt 3B, Springfield, IL 62704) anywhere; a labelled city, county, ZIP or 邮编.
- NAME: where the context marks a name (medgpt/data/pii_names.py), then every later mention of that name in the
  same record: scrub_record() shares the names found across all strings of one record.
Labels are kept and only the value is replaced ("住院号：[MRN]"), so the text still reads naturally.
Only the standard library is imported here.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Callable, Iterable

from medgpt.data import pii_formats as fmt
from medgpt.data.pii_formats import NA as _NA
from medgpt.data.pii_formats import NB as _NB
from medgpt.data.pii_formats import id_check_char, luhn_ok, valid_card, valid_id  # noqa: F401 (the public API)
from medgpt.data.pii_names import scrub_names, spread
from medgpt.data.text import CJK_UNIFIED as _CJK

TYPES = ("ID", "PHONE", "MRN", "EMAIL", "BANK_CARD", "DOB", "NAME", "ADDRESS", "SSN", "ACCOUNT", "LICENSE",
         "PLATE", "DEVICE", "URL", "IP")


def _digits(s: str) -> int:
    return sum(c.isdigit() for c in s)


# ----------------------------------------------------------------------------- labelled values

# Between a label and its value: "MRN#: 123", "住院号为123", "NHS number 943", "Member ID is X1".
_SEP = r"(\.?\s*(?:(?i:no\.?|number|num\.?|#)\s*)?(?:[#:：=]\s*){0,2}(?:(?:为|是|(?i:is))\s*)?)"
# 943 476 5919, 1100 2387 6541, 2951 38471 2 (digits in groups of three or more, not a value and the next number:
# "MRN 00482913 140/90" keeps its blood pressure), ZY2023001, UHC-884-201.
_CODE = (r"(\d{3}-\d{3}-\d{4}" + _NA + r"|\d{3,5}(?: \d{3,5}){1,3}(?: \d)?(?![\w]|[/.:,]\d)"
         r"|(?=[A-Za-z-]*\d)[A-Za-z0-9][A-Za-z0-9-]{2,23}" + _NA + ")")  # a word is no value: 病歷號 Chart No.: 77


def _labelled(zh: str, en: str, value: str = _CODE) -> re.Pattern:
    """label (group 1), separator (2), value (3); English labels are case-insensitive whole words."""
    return re.compile(rf"((?:{zh})|(?i:\b(?:{en})\b))" + _SEP + value)


_MRN = _labelled(r"住院病[历歷][号號]|住院[号號]|[门門][诊診][号號]|病案[号號]|病[历歷][号號]|[就急][诊診][号號]|登[记記][号號]"
                 r"|就[诊診]卡[号號]?|[门門][诊診]卡[号號]?|[诊診][疗療]卡[号號]?|健康[档檔]案[号號]|[档檔]案[号號]|[体體][检檢][编編]?[号號]",
                 r"MRN|MR|medical\s+record(?:\s+(?:no\.?|number))?|hosp(?:ital|\.)?\s+(?:no\.?|number)"
                 r"|patient\s+(?:ID|no\.?)|record\s+(?:no\.?|number)|chart(?:\s+(?:no\.?|number)|(?=\s*#))"
                 r"|NHS(?:\s+(?:no\.?|number))?|encounter\s+(?:ID|no\.?|number)|URN|UR\s+(?:no\.?|number)")
# Exam, imaging and pathology numbers: only a value with letters and digits (CT240318-0562); a bare number after
# 标本号 or 检验编号 is as often a timestamp or a batch as a patient's.
_EXAM = _labelled(r"[检檢]查[编編]?[号號]|影像[编編]?[号號]|病理[编編]?[号號]|放射[编編]?[号號]|超[声聲][编編]?[号號]", r"(?!)")
_ACCOUNT = _labelled(r"医保卡号|医保号|医保卡|社保卡号|社保号|社保卡|医疗保险号|保险号|保单号|银行账号|账号|帐号|账户|帐户",
                     r"account(?:\s+(?:no\.?|number))?|acct\.?|member\s+(?:ID|no\.?|number)|subscriber\s+ID"
                     r"|policy\s+(?:ID|no\.?|number)|(?:health\s+)?plan\s+(?:ID|no\.?|number)|insurance\s+(?:ID|no\.?|number)"
                     r"|group\s+(?:no\.?|number)|medicaid(?:\s+(?:ID|no\.?|number))?|medicare(?:\s+(?:ID|no\.?|number))?"
                     r"|beneficiary\s+(?:ID|no\.?|number)")
_LICENSE = _labelled(r"驾驶证号|驾驶证|驾照号|驾照|执业证书编号|执业证书号|执业证号|执业编号|资格证书编号|资格证号|许可证号",
                     r"(?:driver'?s\s+)?licen[cs]e(?:\s+(?:no\.?|number))?|DEA|NPI|certificate\s+(?:no\.?|number)")
_DEVICE = _labelled(r"设备序列号|序列号|设备编号|出厂编号|植入物编号",
                    r"serial(?:\s+(?:no\.?|number))?|S/N|SN|device\s+(?:ID|serial)|UDI|IMEI")
_PLATE_VALUE = (r"([京津沪渝冀豫云辽黑湘皖鲁新苏浙赣鄂桂甘晋蒙陕吉闽贵粤青藏川宁琼][A-Z][·•\s-]?[A-Z0-9]{4,6}[挂学警]?"
                r"|[A-Z0-9][A-Z0-9 -]{2,8}[A-Z0-9])" + _NA)
_PLATE = _labelled(r"车牌号码|车牌号|车牌", r"(?:licen[cs]e\s+|vehicle\s+|number\s+)?plate|vehicle\s+reg(?:istration)?"
                   r"|registration\s+(?:no\.?|number)", _PLATE_VALUE)
# Handles after an app label: 微信号liujia_1988, WeChat ID: tan.sl88 (a digit or "_" shows it is no word).
_HANDLE = _labelled(r"微信[号號]?|QQ[号號]?|支付宝[账帐]?[号號]?|[账帐][号號]|用[户戶]名",
                    r"wechat(?:\s+ID)?|skype|telegram|user\s*name|user\s+ID|handle|line\s+ID",
                    r"([A-Za-z0-9][A-Za-z0-9_.-]{3,30}[A-Za-z0-9])(?![\w@.-])")
_PASSPORT = _labelled(r"护照号码|护照号|护照|港澳通行证号?|军官证号?", r"passport", r"([A-Za-z]{0,2}\d[A-Za-z0-9]{5,12})" + _NA)
_ID_LABELLED = _labelled(r"公民身份号码|居民身份证号码|居民身份证号|居民身份证|身份证号码|身份证号|身份证",
                         r"ID\s*card|national\s+ID", r"(\d{14,17}[\dXx])(?![0-9])")  # 15-18 digits, a typo too
_REGIONAL_ID_LABELLED = _labelled(r"身[分份][證证](?:字[號号]|[號号]碼?)?|[統统]一[證证][號号]|居留[證证][號号]?",
                                  r"HKID|NRIC|FIN|IC|ID\s*card|identity\s+card|national\s+ID|ARC", fmt.REGIONAL_ID_VALUE)
_SSN_LABELLED = _labelled(r"社会安全号", r"SSN|social\s+security", r"(\d{3}[- ]?\d{2}[- ]?\d{4})(?![0-9])")
_CARD_LABELLED = _labelled(r"银行卡号|银行卡|信用卡号|卡号", r"card|credit\s+card|debit\s+card",
                           r"(\d{4}(?:[ -]?\d{4}){2,3}(?:[ -]?\d{1,4})?|\d{13,19})(?![0-9])")

_MONTHS = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)[a-z]*\.?"
_DATE = (r"(?:民[國国]\s*\d{1,3}\s*年\s*\d{1,2}\s*月(?:\s*\d{1,2}\s*[日号])?"  # the Republic of China calendar
         r"|\d{4}\s*年\s*\d{1,2}\s*月(?:\s*\d{1,2}\s*[日号])?"
         r"|\d{1,2}\s*月\s*\d{1,2}\s*[日号]"
         r"|\d{4}[-/.]\d{1,2}(?:[-/.]\d{1,2})?"
         r"|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}"
         r"|(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"
         rf"|(?i:{_MONTHS}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}})"
         rf"|(?i:\d{{1,2}}(?:st|nd|rd|th)?(?:\s+|[-/]){_MONTHS}(?:,?\s+|[-/])(?:\d{{4}}|\d{{2}}))"  # 12-Sep-1955
         rf"|(?i:{_MONTHS},?\s+\d{{4}})"
         r"|(?:18|19|20)\d{2}(?:\s*年)?)")
_DOB = re.compile(r"((?:出生日期|出生年月日|出生年月|出生时间|出生于|出生|生于|生日)"
                  r"|(?i:\bDOB\b|\bD\.O\.B\.?|\bdate\s+of\s+birth|\bbirth\s*date|\bbirthday|\bb\.|\bborn(?:\s+(?:on|in))?))"
                  r"(\s*(?:(?:出生日期|(?i:DOB|date\s+of\s+birth))\s*)?"  # a bilingual label: DOB 出生日期:
                  rf"(?:[:：]|为|是|(?i:is))?\s*)({_DATE})(?![0-9])")
_DOB_AGAIN = re.compile(rf"(\[DOB\][ \t]*[(（][ \t]*)()({_DATE})(?=[ \t]*[)）])")  # 民國60年3月15日 (1971/03/15)
_DATE_THEN_BORN = re.compile(rf"()()({_DATE})(?=\s*(?:\d{{1,2}}[:：]\d{{2}}\s*)?出生(?!缺陷))")

# ----------------------------------------------------------------------------- shapes

_ID18 = re.compile(_NB + r"[1-9]\d{16}[0-9Xx]" + _NA)
_EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
                    r"(?![A-Za-z])")
_URL_CHAR = rf"[^\s<>\"'{_CJK}\u3000-\u303f\uff01-\uff5e]"
_URL = re.compile(rf"(?i:(?<![A-Za-z])(?:https?|ftp)://|(?<![A-Za-z0-9.])www\.){_URL_CHAR}*[^\s<>\"'{_CJK}\u3000-\u303f\uff01-\uff5e.,;:!?)\]]")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IP = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\d)"
                 r"|(?<![\w:])(?:(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}|(?:[0-9A-Fa-f]{1,4}:){1,6}"
                 r"(?::[0-9A-Fa-f]{1,4}){1,6})(?![\w:])")
_SSN = re.compile(r"(?<![\w-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w]|-\d)")
_CARD = re.compile(r"(?<![0-9A-Za-z.])(?:\d{4}(?:[ -]\d{4}){2,3}(?:[ -]\d{1,4})?|\d{13,19})" + _NA)

_PHONE_END = r"(?:[ \t]*(?:转|ext\.?|x)[ \t]*\d{1,5})?(?![\w]|[-.]\d)"
_MOBILE = re.compile(r"(?<![0-9A-Za-z+])(?:(?:\+|00)86[\s-]?|\(\+?86\)\s?)?1[3-9]\d(?:[\s-]?\d{4}){2}" + _NA)
_LANDLINE = re.compile(
    r"(?<![0-9A-Za-z+])(?:"
    r"(?:\+|00)86[\s-]?\(?0?[1-9]\d{1,2}\)?[\s-]?"   # +86 10 12345678, +86-(0)755-87654321
    r"|\(0[1-9]\d{1,2}\)\s?"                          # (010)12345678
    r"|0[1-9]\d{1,2}[\s-]"                            # 010-12345678, 0755 87654321
    r")[1-9]\d{6,7}(?:\s?(?:转|-|ext\.?\s?)\d{1,5})?" + _NA)
_NANP = re.compile(r"(?<![\w+.])(?:(?:\+1[ \t.-]?|1-)\(?[2-9]\d{2}\)?[ \t.-]?[2-9]\d{2}[ \t.-]?\d{4}"   # +1 415 555 0132
                   r"|\([2-9]\d{2}\)[ \t]?[2-9]\d{2}[ \t.-]\d{4}"                                # (415) 555-0132
                   r"|[2-9]\d{2}-[2-9]\d{2}-\d{4}|[2-9]\d{2}\.[2-9]\d{2}\.\d{4})" + _PHONE_END)
# Toll-free lines (US/Canada 8XX, 800/400 in China) belong to services such as crisis lines, not to a person.
_TOLL_FREE = re.compile(r"^(?:\+1[ \t.-]?|1-)?\(?8(?:00|33|44|55|66|77|88)\b")
_INTL = re.compile(r"(?<![\w+])\+(?!86)[2-9]\d{0,2}[ \t.-]?(?:\(0\)[ \t]?)?\d{1,5}(?:[ \t.-]?\d{2,5}){1,4}" + _PHONE_END)
_UK = re.compile(r"(?<![\w+.])0\d{2,4}[ \t-]\d{3,4}[ \t-]?\d{3,4}" + _PHONE_END)
_PHONE_LABELLED = re.compile(r"((?:联系|聯絡|聯繫)?[电電]话(?:号码)?|[电電]話(?:號碼)?|手[机機](?:号码|号|號碼|號)?|座机|传真|傳真|联系方式|聯絡方式"
                             r"|(?i:\b(?:tel|phone|telephone|mobile|cell(?:\s*phone)?|fax|contact\s+number)\b\.?))"
                             r"([ \t]*(?:(?i:no\.?|number|#)[ \t]*)?[:：]?[ \t]*)(\+?[\d(][\d \t().-]{5,20}\d)" + _PHONE_END)

# ----------------------------------------------------------------------------- addresses

_PROVINCES = ("北京|天津|上海|重庆|河北|山西|辽宁|吉林|黑龙江|江苏|浙江|安徽|福建|江西|山东|河南|湖北|湖南|广东|海南|四川"
              "|贵州|云南|陕西|甘肃|青海|台湾|内蒙古|广西|西藏|宁夏|新疆|香港|澳门")
_UNIT = r"(?:省|市|自治区|特别行政区|自治州|地区|盟|新区|区|县|旗|镇|乡|街道)"
_ROAD = r"(?:路|街|大道|大街|巷|弄|胡同)"
_ZH_ROAD = re.compile(_ROAD + r"\s*\d")
_NUMBER = (r"\s*\d{1,5}(?:[-之]\d{1,5})?\s*号(?:院|楼)?"
           r"(?:\s*(?:[\dA-Za-z]{1,5}|[一二三四五六七八九十]{1,3})\s*(?:号楼|栋|幢|座|单元|层|楼|室|号|户)"
           rf"|[{_CJK}]{{0,6}}?(?:小区|花园|大厦|公寓|新村|[一二三四五六七八九十东南西北]村|[东南西北]区|园|家园|广场|中心))*")
# The first unit is a province or two characters and a unit, so the match does not start inside the word
# before it (到访上海市..., not 访上海市...); later units may be longer (沙坪坝区).
_ZH_ADDRESS = re.compile(rf"(?:(?:{_PROVINCES}){_UNIT}?|[{_CJK}]{{2}}{_UNIT})(?:[{_CJK}]{{1,4}}?{_UNIT})*"
                         rf"[{_CJK}\d]{{1,6}}?{_ROAD}{_NUMBER}|[{_CJK}]{{2,3}}{_ROAD}{_NUMBER}")
_ZH_ADDRESS_LABELLED = re.compile(
    r"((?:家庭住址|现住址|户籍地址|通讯地址|联系地址|工作地址|住址|地址|家住|居住于|居住在|住在|现住|现居于|现居|籍贯|户籍地|户籍"
    r"|出生地|发病地点|地点|住所))(\s*[:：]?\s*)([^\s，,。；;、！？!?（）()\n]{3,60})")
_ZH_PLACE_MARKS = re.compile(rf"{_UNIT}|{_ROAD}|村|号|栋|幢|楼|室|单元|小区")
_NOT_PLACES = ("本", "该", "当地", "外地", "农村", "城市", "城镇", "国外", "境外", "市区", "郊区", "院")

_EN_WORD = r"(?:[A-Z][a-z]+|[A-Z]['’][A-Z][a-z]+|Mc[A-Z][a-z]+)"
_STREET = (r"(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Place|Pl|Way|Terrace|Ter"
           r"|Parkway|Pkwy|Circle|Cir|Highway|Hwy|Square|Sq|Crescent|Close|Gardens|Row|Trail|Plaza)")
_EN_STREET_HINT = re.compile(r"\d[A-Za-z]?(?:-\d+)?[ \t]+[A-Z]")
_UK_POSTCODE = r"[A-Z]{1,2}\d[A-Z\d]?[ \t]?\d[A-Z]{2}"
_STATE = r"(?:[A-Z]{2}|VIC|NSW|QLD|TAS|ACT)(?![A-Za-z])"  # US and Australian states
# ", Springfield, IL 62704", ", Sandringham VIC 3191", ", Leeds LS6 2QT": the town, state and postcode after a street
_EN_TOWN = (rf"(?:,[ \t]*(?:{_EN_WORD}[ \t]+){{0,2}}{_EN_WORD}(?:,?[ \t]+{_STATE})?"
            rf"(?:[ \t]+(?:\d{{5}}(?:-\d{{4}})?|\d{{4}}|{_UK_POSTCODE}))?(?![\w]))?")
_EN_ADDRESS = re.compile(
    r"(?<![\w./])(?:(?:Unit|Flat|Apt|Suite|Level|Shop)[ \t]+\d{1,4}[A-Za-z]?[ \t]*[/,][ \t]*|\d{1,4}[A-Za-z]?/)?"  # Unit 12/45
    rf"\d{{1,6}}[A-Za-z]?(?:-\d{{1,6}})?[ \t]+(?:[NSEW]\.?[ \t]+)?(?:(?:{_EN_WORD}|\d{{1,3}}(?:st|nd|rd|th))[ \t]+){{1,3}}"
    rf"{_STREET}\.?(?![A-Za-z])(?:,?[ \t]*(?:Apt|Apartment|Suite|Ste|Unit|Flat|Rm|Room|#)\.?[ \t]*#?[A-Za-z0-9-]{{1,6}})?"
    + _EN_TOWN)
_PO_BOX = re.compile(r"(?<![\w])(?:P\.?[ \t]?O\.?[ \t]?Box|GPO[ \t]+Box|Locked[ \t]+Bag|Private[ \t]+Bag)[ \t]*\d{1,6}"
                     + _NA + _EN_TOWN)
_EN_ADDRESS_LABELLED = re.compile(
    r"((?i:\b(?:(?:home|current|mailing|permanent|street)\s+)?address(?:\s+is)?|\b(?:lives|living|resides|residing)"
    r"\s+at))([ \t]*[:：]?[ \t]*)([^\n;]{4,120}?)(?=[ \t]*(?:[\n;]|$)|\.(?:\s|$)|,?[ \t]+(?:and|with|but)[ \t]"
    r"|,?[ \t]*(?i:phone|tel|cell|mobile|fax|e-?mail|DOB|MRN)\b)")
_PLACE_LABELLED = re.compile(r"((?:邮编|邮政编码)|(?i:\b(?:city|town|county|zip(?:\s*code)?|postal\s+code|postcode)\b))"
                             rf"([ \t]*[:：]?[ \t]*)(\d{{5,6}}(?:-\d{{4}})?{_NA}|{_UK_POSTCODE}|[A-Z][a-z]+(?:[ \t][A-Z][a-z]+){{0,2}})")


# ----------------------------------------------------------------------------- replacers

_PLACEHOLDER = re.compile(r"\[[A-Z_]+\]")


def _sub(pattern: re.Pattern, kind: str, keep: Callable[[re.Match], bool] | None, counts: Counter,
         text: str, value_group: int = 0) -> str:
    """Replace `pattern` matches (only `value_group` of them, the rest kept) with [kind] when `keep` agrees.

    A value that cuts through a placeholder an earlier rule wrote is left alone ("[ADDRESS] 2" may become one
    placeholder, never "[ADDRESS[ADDRESS]")."""
    placed = [(p.start(), p.end()) for p in _PLACEHOLDER.finditer(text)] if "[" in text else []

    def repl(m: re.Match) -> str:
        if keep is not None and not keep(m):
            return m.group(0)
        s, e = m.span(value_group)
        if any(a < e and s < b and not (s <= a and b <= e) for a, b in placed):
            return m.group(0)
        counts[kind] += 1
        if not value_group:
            return f"[{kind}]"
        start, end = m.start(value_group) - m.start(), m.end(value_group) - m.start()
        whole = m.group(0)
        return whole[:start] + f"[{kind}]" + whole[end:]
    return pattern.sub(repl, text)


def _has_digit(m: re.Match) -> bool:
    return any(c.isdigit() for c in m.group(3))


# Each scrubber first looks for what any match needs (a label, "@", seven digits in a row) with cheap
# substring tests, so the full patterns only run on the few strings that could hold that identifier.
_SEVEN_DIGITS = re.compile(r"\d{3}[\s.-]?\d{4}")
_DOTTED = re.compile(r"\d\.\d{1,3}\.\d")
_MRN_HINTS = ("住院", "门诊", "門診", "病案", "病历", "病歷", "就诊", "就診", "急诊", "急診", "登记号", "登記號", "诊疗卡",
              "診療卡", "档案号", "檔案號", "体检", "體檢")
_EXAM_HINTS = ("检查", "檢查", "影像", "病理", "放射", "超声", "超聲")
_HANDLE_HINTS = ("微信", "QQ", "支付宝", "账号", "帐号", "賬號", "帳號", "用户名", "用戶名")
_HANDLE_WORDS = ("wechat", "skype", "telegram", "username", "user name", "user id", "handle", "line id")
_ACCOUNT_HINTS = ("医保", "社保", "保险", "保单", "账", "帐")
_ACCOUNT_WORDS = ("account", "acct", "member", "plan id", "plan no", "plan number", "policy", "insurance", "medicaid",
                  "medicare", "group no", "group number", "group #", "beneficiary", "subscriber")
_LICENSE_HINTS = ("驾驶证", "驾照", "执业", "资格证", "许可证")
_LICENSE_WORDS = ("licen", "dea ", "dea#", "dea:", "npi", "certificate")
_MRN_WORDS = ("mrn", "mr#", "mr #", "medical record", "record no", "record number", "record #", "hospital no",
              "hospital number", "hosp", "patient id", "patient no", "chart", "nhs", "encounter", "urn", "ur no", "ur number")
_DEVICE_WORDS = ("serial", "s/n", "sn:", "sn ", "sn#", "device id", "device serial", "udi", "imei")


def _scrub_url(text, low, counts):
    return _sub(_URL, "URL", None, counts, text) if ("://" in text or "www." in low) else text


def _scrub_email(text, low, counts):
    return _sub(_EMAIL, "EMAIL", None, counts, text) if "@" in text else text


def _scrub_ip(text, low, counts):
    if not (_DOTTED.search(text) or "::" in text or text.count(":") >= 7):
        return text
    # 4.2.1.3 is a section number; an address has a two-digit part (8.8.8.8 is not caught without a label)
    def keep(m):
        return ":" in m.group(0) or "ip" in low or any(len(p) > 1 for p in m.group(0).split("."))

    return _sub(_IP, "IP", keep, counts, text)


def _scrub_mrn(text, low, counts):
    if any(k in text for k in _MRN_HINTS) or any(k in low for k in _MRN_WORDS):
        text = _sub(_MRN, "MRN", lambda m: _has_digit(m) and len(re.sub(r"\W", "", m.group(3))) >= 5, counts, text,
                    3)  # 5+: a record number, not a service line such as NHS 111
    if any(k in text for k in _EXAM_HINTS):
        text = _sub(_EXAM, "MRN", lambda m: _has_digit(m) and re.search("[A-Za-z]", m.group(3)), counts, text, 3)
    return text


def _scrub_account(text, low, counts):
    if any(k in text for k in _ACCOUNT_HINTS) or any(k in low for k in _ACCOUNT_WORDS):
        text = _sub(_ACCOUNT, "ACCOUNT", _has_digit, counts, text, 3)
    if any(k in text for k in _HANDLE_HINTS) or any(k in low for k in _HANDLE_WORDS):
        text = _sub(_HANDLE, "ACCOUNT", lambda m: _has_digit(m) or "_" in m.group(3), counts, text, 3)
    return text


def _scrub_license(text, low, counts):
    if not (any(k in text for k in _LICENSE_HINTS) or any(k in low for k in _LICENSE_WORDS)):
        return text
    return _sub(_LICENSE, "LICENSE", _has_digit, counts, text, 3)


def _scrub_device(text, low, counts):
    if not (any(k in text for k in ("序列号", "编号")) or any(k in low for k in _DEVICE_WORDS)):
        return text
    return _sub(_DEVICE, "DEVICE", lambda m: _has_digit(m) and len(m.group(3)) >= 4, counts, text, 3)


def _scrub_plate(text, low, counts):
    if not ("车牌" in text or "plate" in low or "registration" in low or "vehicle" in low):
        return text
    return _sub(_PLATE, "PLATE", _has_digit, counts, text, 3)


def _scrub_dob(text, low, counts):
    if not ("出生" in text or "生于" in text or "生日" in text
            or any(k in low for k in ("dob", "d.o.b", "birth", "born", "b."))):
        return text
    text = _sub(_DOB, "DOB", None, counts, text, 3)
    if "[DOB]" in text:  # the same date again, in another calendar or format, in brackets right after it
        text = _sub(_DOB_AGAIN, "DOB", None, counts, text, 3)
    return _sub(_DATE_THEN_BORN, "DOB", None, counts, text, 3) if "出生" in text else text


def _scrub_ssn(text, low, counts):
    if "ssn" in low or "social" in low or "社会安全" in text:
        text = _sub(_SSN_LABELLED, "SSN", None, counts, text, 3)
    return _sub(_SSN, "SSN", None, counts, text) if "-" in text else text


def _scrub_id(text, low, counts):
    if "身份" in text or "id card" in low or "national id" in low:
        text = _sub(_ID_LABELLED, "ID", None, counts, text, 3)
    if any(k in text for k in ("护照", "通行证", "军官证")) or "passport" in low:
        text = _sub(_PASSPORT, "ID", None, counts, text, 3)
    text = _scrub_regional_id(text, low, counts)
    if not _SEVEN_DIGITS.search(text):
        return text
    return _sub(_ID18, "ID", lambda m: valid_id(m.group(0)), counts, text)


_REGIONAL_HINT = re.compile(r"[A-Z]\d{6}|\d{3} \d")
_REGIONAL_LABELS = ("hkid", "nric", "fin", "ic", "id", "arc")


def _scrub_regional_id(text, low, counts):
    """Hong Kong, Taiwan, Singapore, NHS and Medicare numbers: after a label in any shape, else with a check digit."""
    if not _REGIONAL_HINT.search(text):
        return text
    if any(k in text for k in ("身分", "身份", "證號", "证号")) or any(k in low for k in _REGIONAL_LABELS):
        text = _sub(_REGIONAL_ID_LABELLED, "ID", None, counts, text, 3)
    checked = ((fmt.HKID, fmt.valid_hkid), (fmt.TW_ID, fmt.valid_tw_id), (fmt.NRIC, fmt.valid_nric),
               (fmt.NHS_SPACED, fmt.valid_nhs), (fmt.MEDICARE, fmt.valid_medicare))
    for pattern, valid in checked:
        text = _sub(pattern, "ID", lambda m, valid=valid: valid(m.group(0)), counts, text)
    return text


def _scrub_card(text, low, counts):
    if "卡" in text or "card" in low:
        text = _sub(_CARD_LABELLED, "BANK_CARD", None, counts, text, 3)
    return _sub(_CARD, "BANK_CARD", lambda m: valid_card(m.group(0)), counts, text)


def _scrub_phone(text, low, counts):
    text = _sub(_MOBILE, "PHONE", None, counts, text)
    text = _sub(_LANDLINE, "PHONE", None, counts, text)
    text = _sub(_NANP, "PHONE", lambda m: not _TOLL_FREE.search(m.group(0)), counts, text)
    text = _sub(_INTL, "PHONE", lambda m: 8 <= _digits(m.group(0)) <= 15, counts, text) if "+" in text else text
    text = _sub(_UK, "PHONE", lambda m: 10 <= _digits(m.group(0)) <= 12, counts, text)
    text = _sub(fmt.PAREN_TRUNK, "PHONE", None, counts, text) if "(0" in text else text
    text = _sub(_PHONE_LABELLED, "PHONE", lambda m: 7 <= _digits(m.group(3)) <= 15, counts, text, 3)
    return _sub(fmt.CALL_LABELLED, "PHONE", lambda m: 7 <= _digits(m.group(3)) <= 15, counts, text, 3)


def _zh_place(m: re.Match) -> bool:
    value = m.group(3)
    return bool(_ZH_PLACE_MARKS.search(value)) and not value.startswith(_NOT_PLACES) and "[" not in value


def _en_place(m: re.Match) -> bool:
    value = m.group(3).strip()
    return not value.startswith("[") and (_digits(value) > 0 or bool(re.search(f"[{_CJK}]", value)))


def _scrub_address(text, low, counts):
    if any(k in text for k in ("住", "地址", "籍贯", "户籍", "出生地", "地点")):
        text = _sub(_ZH_ADDRESS_LABELLED, "ADDRESS", _zh_place, counts, text, 3)
    if "号" in text and _ZH_ROAD.search(text):
        text = _sub(_ZH_ADDRESS, "ADDRESS", None, counts, text)
    if any(c.isdigit() for c in text) and _EN_STREET_HINT.search(text):
        text = _sub(_EN_ADDRESS, "ADDRESS", None, counts, text)
    if any(k in low for k in ("box", "bag")):
        text = _sub(_PO_BOX, "ADDRESS", None, counts, text)
    if any(k in low for k in ("address", "lives at", "living at", "resides at", "residing at")):
        text = _sub(_EN_ADDRESS_LABELLED, "ADDRESS", _en_place, counts, text, 3)
    if any(k in low for k in ("city", "town", "county", "zip", "postal", "postcode", "邮编", "邮政")):
        text = _sub(_PLACE_LABELLED, "ADDRESS", lambda m: _digits(m.group(3)) or re.search("[:：]", m.group(2)),
                    counts, text, 3)
    return text


# Shapes that contain digits of their own (URLs, emails) go first; then labelled values, so a labelled number is
# named for what it is (住院号 13812345678 is an MRN); IDs before cards and phones, because an ID's digits would
# otherwise be read as one of those; phones before addresses, whose labelled values run to the next punctuation;
# addresses before names (the Dr of "12 Oak Dr" is no title).
_ORDER = (("URL", _scrub_url), ("EMAIL", _scrub_email), ("IP", _scrub_ip), ("MRN", _scrub_mrn),
          ("ACCOUNT", _scrub_account), ("LICENSE", _scrub_license), ("DEVICE", _scrub_device),
          ("PLATE", _scrub_plate), ("DOB", _scrub_dob), ("SSN", _scrub_ssn), ("ID", _scrub_id),
          ("BANK_CARD", _scrub_card), ("PHONE", _scrub_phone), ("ADDRESS", _scrub_address))


_NO_DIGITS = ("URL", "EMAIL", "ADDRESS")  # the other identifiers all hold a digit: text without one skips them
_SEVEN = ("BANK_CARD", "PHONE")  # these hold seven digits in a row (one separator allowed)


@functools.lru_cache(maxsize=64)
def _parse(names: tuple[str, ...] | None) -> tuple[str, ...]:
    if names is None:
        return TYPES
    names = tuple(str(t).strip().upper() for t in names if str(t).strip())
    if "ALL" in names:
        return TYPES
    unknown = [n for n in names if n not in TYPES]
    if unknown:
        raise ValueError(f"unknown PII type(s) {', '.join(unknown)}; known: {', '.join(t.lower() for t in TYPES)}")
    return tuple(dict.fromkeys(names))


def parse_types(types: Iterable[str] | None) -> tuple[str, ...]:
    """Type names (any case; 'all' or None for every type) -> canonical names; ValueError for unknown ones."""
    return _parse(None if types is None else tuple(types))


def _scrub_text(text: str, wanted: tuple[str, ...], counts: Counter, names: set) -> str:
    if len(text) < 5:  # the shortest identifier, a@b.cn, has 6 characters
        return text
    low = text.lower()
    digits = any(c.isdigit() for c in text)
    seven = digits and _SEVEN_DIGITS.search(text) is not None
    for kind, fn in _ORDER:
        if kind in wanted and (digits or kind in _NO_DIGITS) and (seven or kind not in _SEVEN):
            text = fn(text, low, counts)
    return scrub_names(text, counts, names) if "NAME" in wanted else text


def _walk(obj, fn):
    """`fn` applied to every string inside obj (dicts and lists, any nesting); keys and non-strings untouched."""
    if isinstance(obj, str):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _walk(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_walk(v, fn) for v in obj]
    return obj


def scrub_record(record, types: Iterable[str] | None = None):
    """Every string of one record scrubbed -> (new record, Counter of replacements).

    A name found in one string is replaced in all of them: a chat whose user says "我叫李秀英" and whose
    assistant answers "李秀英您好" loses both. `record` is a string, a dict or a list, any nesting."""
    wanted = parse_types(types)
    counts: Counter = Counter()
    names: set = set()
    record = _walk(record, lambda s: _scrub_text(s, wanted, counts, names))
    if names:
        record = _walk(record, lambda s: spread(s, names, counts))
    return record, counts


def scrub(text: str, types: Iterable[str] | None = None) -> tuple[str, Counter]:
    """Replace personal identifiers in `text` with [TYPE] placeholders -> (new text, Counter of replacements).

    `types` picks among TYPES (case-insensitive); None means all of them. A name found once is replaced at every
    mention in the text; use scrub_record() to share that across the strings of one record."""
    return scrub_record(text, types)
