"""Personal names for the PII scrubber (medgpt/data/pii.py): where the context marks a name, and every later
mention of a name once it is found.

A name is only replaced where something says it is one: a label (姓名：, Patient:, Emergency contact:), a title
(Mr./Dr./Prof., 先生/女士/医生 after a surname), a kin word (丈夫王磊, his wife, Mary Smith), a self-introduction
(我叫, my name is) or the opening of a note (John Smith is a 67-year-old man; 王建国，男，58岁). Chinese names must
start with a common surname and not with a clinical word (患者高热, 患者余同前). The names found are then replaced
everywhere in the same record (`spread`), so "Smith reported..." and "王建国诉..." later on go too.
"""

from __future__ import annotations

import functools
import re
from collections import Counter

# The ~120 most common surnames (about nine in ten people), single and compound.
SURNAMES = set("王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾萧田董袁潘蒋蔡余杜叶程苏魏吕丁"
               "任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦傅方邹熊孟秦邱江尹薛闫阎段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃"
               "武戴莫孔汤向常温康施文牛樊葛邢安齐易乔伍庞颜倪庄聂章鲁岳翟殷詹申欧耿关兰焦俞左柳甘祝包宁尚"
               "符舒阮柯纪梅童凌毕单季裴霍涂成苗谷盛曲翁冉骆蓝路游辛靳管柴蒙鲍华喻祁蒲房滕屈饶解牟艾尤阳"
               "时穆农司卓古吉缪简车项连芦麦褚娄窦戚岑景党宫费卜冷晏席卫米柏宗瞿桂全佟应臧闵苟邬边卞姬师")
COMPOUND = ("欧阳", "司马", "上官", "诸葛", "东方", "皇甫", "尉迟", "公孙", "慕容", "令狐", "长孙", "夏侯", "司徒")
# Words that follow 患者 and start with a surname character: clinical words, not names.
NOT_NAMES = ("高热", "高烧", "高血", "高龄", "高危", "高度", "高峰", "黄疸", "周身", "周围", "全身", "全天", "常规",
             "常有", "严重", "明显", "平素", "平时", "尚可", "尚好", "尚未", "曾经", "曾有", "曾因", "曾于", "曾患", "于是",
             "于今", "何时", "程度", "康复", "安静", "安全", "余同", "余无", "余未", "方可", "方面", "左侧", "单侧",
             "苏醒", "易怒", "易感", "连续", "关节", "关于", "费用", "任何", "包括", "文化", "时常", "时有", "时间",
             "成年", "成人", "管理", "白天", "白细", "向来", "夏季", "万一", "毛发", "陈述", "陈旧", "史料", "应用",
             "应该", "应当", "应及", "车祸", "路上", "经济", "经过", "经常", "宫颈", "宫内", "宫缩", "卫生", "全部",
             "师傅", "家属", "简单", "古代", "吉利", "华法", "江湖", "石膏", "金属", "龙头", "司机", "游泳", "季节",
             "冷汗", "冷静", "甘油", "童年", "祝福", "宁可", "季度", "单位", "上述", "上午", "上肢", "上腹", "左上",
             "左下", "右上", "包块", "项目", "温度", "温和", "景象", "尤其", "全麻", "党员", "米饭", "柏油", "边缘",
             "席间", "戚属", "管道", "段落", "谷氨", "孔隙", "岳父", "岳母", "庞大", "申请", "齐全", "乔迁", "双侧",
             "体健", "健在", "同意", "陪同", "签字", "要求", "表示", "拒绝", "商议", "知情", "理解", "代诉")

_CJK = "\u4e00-\u9fff"
_UP, _LO = "A-ZÀ-ÖØ-Þ", "a-zß-öø-ÿ"
# One capitalised name word: Smith, Lopez-Hart, O'Connor, McDonald, Müller.
_WORD = (rf"(?:[{_UP}][{_LO}]{{0,2}}[{_UP}][{_LO}]+|[{_UP}]['’][{_UP}][{_LO}]+"
         rf"|[{_UP}][{_LO}]+(?:-[{_UP}][{_LO}]+)?)")
# Capitalised words that open sentences and headings: never a name, nor a later part of one.
EN_NOT_NAMES = {
    "Male", "Female", "Man", "Woman", "Boy", "Girl", "Adult", "Child", "Infant", "Baby", "Unknown", "Anonymous",
    "None", "Not", "No", "Yes", "The", "A", "An", "He", "She", "They", "This", "That", "It", "His", "Her", "Our",
    "Presents", "Presented", "Complains", "Reports", "Reported", "Denies", "History", "Age", "Sex", "Gender",
    "Patient", "Name", "Redacted", "Withheld", "Admitted", "Discharged", "Elderly", "Pregnant", "Hospital",
    "Clinic", "Center", "Centre", "Medical", "Health", "Care", "Emergency", "Department", "General", "Internal",
    "Medicine", "Surgery", "University", "Plan", "Please", "Call", "Take", "Thank", "Thanks", "Hello", "Hi", "Dear",
    "Start", "Stop", "Continue", "Follow", "Return", "Seen", "See", "Contact", "Family", "Social", "Past", "Review",
    "Assessment", "Impression", "Diagnosis", "Procedure", "Course", "Discharge", "Admission", "Daily", "Type",
    "Stage", "Grade", "Level", "Ward", "Room", "Bed", "Unit", "Note", "Notes", "Today", "Yesterday", "Tomorrow",
    "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "January", "February", "March",
    "April", "May", "June", "July", "August", "September", "October", "November", "December", "Will", "Can",
    "Should", "Would", "Must", "And", "Or", "But", "With", "Without", "For", "From", "Of", "In", "On", "At", "To",
    "By", "As", "If", "When", "Then", "Also", "Alert", "Oriented", "Stable", "Well", "Good", "Fair", "Poor",
    "Healthy", "Alive", "Deceased", "Hypertension", "Diabetes", "Cancer", "Asthma", "Jr", "Sr", "MD", "Phd",
    "Mr", "Mrs", "Ms", "Miss", "Mx", "Dr", "Prof", "Professor", "Coronary", "Artery", "Disease", "Heart",
    "Failure", "Kidney", "Renal", "Liver", "Breast", "Lung", "Colon", "Colorectal", "Prostate", "Ovarian", "Chronic",
    "Acute", "Stroke", "Dementia", "Myocardial", "Atrial", "Syndrome", "Disorder", "Multiple", "Major", "Bipolar",
    "Hepatitis", "Tuberculosis", "Obesity", "Sudden", "Leukemia", "Lymphoma", "Died", "Living",
}
_STOP = "|".join(sorted(EN_NOT_NAMES, key=len, reverse=True))
_NEXT = rf"[ \t]+(?!(?:{_STOP})(?![{_LO}]))"  # the next word of a name, not a word that opens a sentence
_EN_NAME = rf"{_WORD}(?:[ \t]+[{_UP}]\.)?(?:{_NEXT}{_WORD}){{0,2}}"           # one to three words
_EN_NAME2 = rf"{_WORD}(?:[ \t]+[{_UP}]\.)?(?:{_NEXT}{_WORD}){{1,2}}"          # two or three words
_END = rf"(?![{_UP}{_LO}])(?!['’][{_UP}])"  # a whole word; Smith's is Smith
_TITLE = r"(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Professor)"
_KIN = (r"(?:wife|husband|son|daughter|mother|father|sister|brother|partner|spouse|fianc[eé]e?|grandson|"
        r"granddaughter|grandmother|grandfather|niece|nephew|guardian|aunt|uncle|cousin|caregiver|carer)")

# ----------------------------------------------------------------------------- Chinese

_ZH_LABEL = re.compile(r"((?:患者|病人|患儿|母亲|父亲|家属|联系人|居民|产妇|配偶|监护人)?姓名\s*[:：]?\s*)"
                       rf"([{_CJK}·]{{2,4}}?|[A-Z][a-z'’-]+(?:[ \t]+[A-Z][a-z'’-]+){{0,2}})"
                       rf"(?=性别|年龄|[男女]|[^{_CJK}·A-Za-z]|$)")
# A name after a word that introduces a person, ended by what ends a name: punctuation, a gender, an age, a verb.
_ZH_CONTEXT = re.compile(
    r"((?:患者|病人|患儿|伤者|产妇|孕妇|家属|紧急联系人|联系人|监护人|来访者|陪护|配偶|丈夫|妻子|爱人|父亲|母亲|"
    r"儿子|女儿|爸爸|妈妈|其子|其女|其妻|其夫|之子|之女|我叫|名叫|主刀医生|主治医生|主治医师|经治医生|管床医生|"
    r"麻醉医师|麻醉医生|会诊医师|转诊医生|签约医生|责任护士|医生签名|医师签名|记录者|记录人)\s*[:：]?\s*)"
    rf"([{_CJK}]{{2,3}}?)(?=[，,、（()）\s。；;：:！!？?]|[男女]|\d{{1,3}}\s*岁|今年|诉|因|于|独居|电话|手机|联系|代诉|陪同|"
    r"签字|同意|$)")
_ZH_OPENING = re.compile(rf"(?<![{_CJK}])([{_CJK}]{{2,3}})(?=[，,、\s]*[男女][，,、\s]*\d{{1,3}}\s*岁)")
_ZH_TITLES = r"(?=先生|女士|小姐|太太|医生|医师|大夫|主任|教授|护士|老师)"
_ZH_FULL_TITLED = re.compile(rf"(?:(?<![{_CJK}])|(?<=[的给和与请由致及]))([{_CJK}]{{2,3}}){_ZH_TITLES}")
# A surname alone before a title (张先生, 李医生); not a word that ends in one (主任医师, 向医生咨询, 其余医生).
# Surname characters that are mostly function words (应在医生指导下, 及时联系医生, 向医生咨询, 其余医生).
_FUNCTION_SURNAMES = set("向应时全管成余经常和同将及")
_ZH_SURNAME_TITLED = re.compile(rf"(?<![主副分])([{''.join(sorted(SURNAMES - _FUNCTION_SURNAMES))}]){_ZH_TITLES}")
_EN_AFTER_ZH = re.compile(rf"((?:患者|病人|患儿|姓名)\s*[:：]?\s*)({_EN_NAME2}){_END}")
_ROMANISED = re.compile(rf"(\[NAME\][ \t]*[（(]?[ \t]*)({_EN_NAME2}){_END}(?![ \t]*[:：])")

# ----------------------------------------------------------------------------- English

_EN_TITLED = re.compile(rf"((?<![A-Za-z]){_TITLE}\.?[ \t]+)({_EN_NAME}){_END}")
_STRONG_LABELS = (r"patient(?:'s)?\s+(?:full\s+)?name|(?<![A-Za-z] )(?<![A-Za-z])name|member|emergency\s+contact|"
                  r"contact(?:\s+person)?|next\s+of\s+kin|NOK|guardian|caregiver|spouse|informant|attending"
                  r"(?:\s+physician)?|physician|surgeon|assistant|prescriber|(?:ordering\s+)?provider|referring\s+"
                  r"(?:physician|doctor|provider)|PCP|primary\s+care\s+(?:physician|provider)|(?:electronically\s+)?"
                  r"signed(?:\s+by)?|dictated\s+by|seen\s+by|referred\s+by")
_EN_LABELLED = re.compile(rf"((?i:\b(?:{_STRONG_LABELS}))[ \t]*[:：][ \t]*(?:(?:his|her|the)[ \t]+)?(?:{_KIN}[, \t]+)?"
                          rf"(?:{_TITLE}\.?[ \t]+)?)({_EN_NAME}|[{_CJK}]{{2,4}}(?=[^{_CJK}]|$)){_END}")
# Weak labels (Patient: Male, 45) need two name words.
_EN_WEAK = re.compile(rf"((?i:\b(?:patient|child|client|resident|re))[ \t]*[:：][ \t]*)"
                      rf"({_EN_NAME2}|[{_CJK}]{{2,4}}(?=[^{_CJK}]|$)){_END}")
_EN_KIN = re.compile(rf"((?<![A-Za-z])(?i:{_KIN})(?:,[ \t]*|[ \t]+))({_EN_NAME2}){_END}")
_EN_SELF = re.compile(rf"((?<![A-Za-z])(?i:my\s+name\s+is|I'm|I\s+am|this\s+is)[ \t]+)({_EN_NAME2}){_END}")
_EN_LOWER_PATIENT = re.compile(rf"((?<![A-Za-z])(?:patient|pt|client)[ \t]+)({_EN_NAME2}){_END}")
_AGE = r"\d{1,3}[- ](?:year|yr|month|week|day)s?[- ]old"
_EN_OPENING = re.compile(rf"(?<![{_UP}{_LO}'’.])({_EN_NAME2})(?=,?[ \t]+(?:is|was)[ \t]+an?[ \t]+{_AGE}"
                         rf"|,[ \t]+an?[ \t]+{_AGE}|,[ \t]+\d{{1,3}}[ \t]*(?:y/?o|yo|[MF])\b"
                         rf"|[ \t]*\([ \t]*\d{{1,3}}[ \t]*(?:y/?o|yo|[MF])?[ \t]*[,)])")


_ZH_CONTEXT_HINT = re.compile(r"患|病人|伤者|产妇|孕妇|家属|联系人|监护人|来访者|陪护|配偶|丈夫|妻子|爱人|父亲|母亲|儿子|女儿|爸爸"
                              r"|妈妈|其[子女妻夫]|之[子女]|叫|医生|医师|护士|记录")
_ZH_TITLE_HINT = re.compile(r"先生|女士|小姐|太太|医生|医师|大夫|主任|教授|护士|老师")
_LABEL_WORDS = ("name", "member", "contact", "kin", "nok", "guardian", "caregiver", "spouse", "informant", "attending",
                "physician", "surgeon", "assistant", "prescriber", "provider", "pcp", "signed", "dictated", "seen by",
                "referred by")
_KIN_WORDS = ("wife", "husband", "son", "daughter", "mother", "father", "sister", "brother", "partner", "spouse",
              "fianc", "grand", "niece", "nephew", "guardian", "aunt", "uncle", "cousin", "caregiver", "carer")
_AGE_HINT = re.compile(r"[(,][ \t]*\d{1,3}[ \t]*(?:y|[MF])")


def _zh_name(name: str) -> bool:
    if "某" in name:  # 王某, 李某某: already de-identified
        return False
    if not (name[0] in SURNAMES or name[:2] in COMPOUND):
        return False
    return not name.startswith(NOT_NAMES)


def _zh_titled(name: str) -> bool:
    """A full name before a title: not a phrase such as 应在 (医生) or 联系 (医生)."""
    return _zh_name(name) and name[0] not in _FUNCTION_SURNAMES and not set(name[1:]) & set("在找系联请让到看问去由为的了")


def _en_name(name: str) -> bool:
    return name.split()[0] not in EN_NOT_NAMES


def _any_name(name: str) -> bool:
    return _zh_name(name) if re.match(f"[{_CJK}]", name) else _en_name(name)


def _replace(pattern: re.Pattern, keep, text: str, counts: Counter, found: set, group: int = 2) -> str:
    def repl(m: re.Match) -> str:
        name = m.group(group)
        if not keep(name):
            return m.group(0)
        counts["NAME"] += 1
        found.add(name)
        start, end = m.start(group) - m.start(), m.end(group) - m.start()
        return m.group(0)[:start] + "[NAME]" + m.group(0)[end:]
    return pattern.sub(repl, text)


def scrub_names(text: str, counts: Counter, found: set) -> str:
    """Names where the context marks them -> [NAME]; each name replaced is added to `found`."""
    # Each pattern runs only when the words it needs are in the text: most strings hold none of them.
    low, colon = text.lower(), ":" in text or "：" in text
    if "姓名" in text:
        text = _replace(_ZH_LABEL, lambda n: "某" not in n and n not in EN_NOT_NAMES, text, counts, found)
    if _ZH_CONTEXT_HINT.search(text):
        text = _replace(_ZH_CONTEXT, _zh_name, text, counts, found)
        text = _replace(_EN_AFTER_ZH, _en_name, text, counts, found)
    if "岁" in text:
        text = _replace(_ZH_OPENING, _zh_name, text, counts, found, 1)
    if _ZH_TITLE_HINT.search(text):
        text = _replace(_ZH_FULL_TITLED, _zh_titled, text, counts, found, 1)
        text = _replace(_ZH_SURNAME_TITLED, lambda n: True, text, counts, set(), 1)  # one character: not spread
    if not re.search("[A-Z]", text):
        return text
    if any(t in text for t in ("Mr", "Ms", "Miss", "Mx", "Dr", "Prof")):
        text = _replace(_EN_TITLED, _en_name, text, counts, found)
    if colon and any(k in low for k in _LABEL_WORDS):
        text = _replace(_EN_LABELLED, _any_name, text, counts, found)
    if colon and any(k in low for k in ("patient", "child", "client", "resident", "re:")):
        text = _replace(_EN_WEAK, _any_name, text, counts, found)
    if any(k in low for k in _KIN_WORDS):
        text = _replace(_EN_KIN, _en_name, text, counts, found)
    if any(k in low for k in ("name is", "i'm", "i am", "this is")):
        text = _replace(_EN_SELF, _en_name, text, counts, found)
    if any(k in text for k in ("patient", "pt ", "client")):
        text = _replace(_EN_LOWER_PATIENT, _en_name, text, counts, found)
    if "[NAME]" in text:
        text = _replace(_ROMANISED, _en_name, text, counts, found)
    if "old" in low or _AGE_HINT.search(text):
        text = _replace(_EN_OPENING, _en_name, text, counts, found, 1)
    return text


@functools.lru_cache(maxsize=256)
def _mentions(names: frozenset) -> re.Pattern | None:
    """One pattern for every mention of the names: Chinese names as they are, Latin names whole or by any part
    (Smith for John Smith), as whole words."""
    terms = set()
    for name in names:
        if re.search(f"[{_CJK}]", name):
            terms.add(name)
            continue
        terms.add(" ".join(name.split()))
        terms.update(w for w in name.split() if len(w) > 1 and not w.endswith(".") and w not in EN_NOT_NAMES)
    if not terms:
        return None
    alts = "|".join(re.escape(t) for t in sorted(terms, key=len, reverse=True))
    return re.compile(rf"(?<![{_UP}{_LO}])(?:{alts})(?![{_UP}{_LO}])")


def spread(text: str, names: set, counts: Counter) -> str:
    """Every further mention in `text` of a name found anywhere in the record -> [NAME]."""
    pattern = _mentions(frozenset(names))
    if pattern is None:
        return text
    text, n = pattern.subn("[NAME]", text)
    counts["NAME"] += n
    return text
