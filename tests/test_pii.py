"""The PII scrubber (medgpt/data/pii.py): a table of identifiers that must go, and clinical text that must stay."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from medgpt.data.pii import (
    TYPES,
    id_check_char,
    luhn_ok,
    parse_types,
    scrub,
    scrub_record,
    valid_card,
    valid_id,
)

VALID_ID = "11010519491231002X"  # the worked example of GB 11643-1999
VALID_ID_DIGIT = "440304199001011233"  # check digit computed by hand below


def test_id_check_char_known_answers():
    assert id_check_char(VALID_ID[:17]) == "X"
    # 4*7+4*9+0*10+3*5+0*8+4*4+1*2+9*1+9*6+0*3+0*7+1*9+0*10+1*5+1*8+2*4+3*2 = 196; 196 % 11 = 9 -> "10X98765432"[9]
    assert id_check_char(VALID_ID_DIGIT[:17]) == "3"
    assert valid_id(VALID_ID) and valid_id(VALID_ID.lower()) and valid_id(VALID_ID_DIGIT)
    assert not valid_id("110105194912310021")  # wrong check character
    assert id_check_char("11010519491331002") == "1"
    assert not valid_id("110105194913310021")  # month 13, though its check character is right
    assert not valid_id("110105290001010011")  # born in 2900


def test_luhn_known_answers():
    assert luhn_ok("4111111111111111") and luhn_ok("79927398713")  # Visa test number; Wikipedia's example
    assert not luhn_ok("4111111111111112") and not luhn_ok("79927398710")
    assert valid_card("6250 9410 0652 8599") and valid_card("378282246310005")  # UnionPay, Amex test numbers
    assert not valid_card("1234567812345670")  # Luhn-valid, but no card network starts with 1
    assert luhn_ok("1234567812345670")


# (text, expected text, expected counts)
REPLACED = [
    # resident ID: valid check character replaced, in any context
    (f"身份证号：{VALID_ID}，", "身份证号：[ID]，", {"ID": 1}),
    (f"ID {VALID_ID_DIGIT} on file", "ID [ID] on file", {"ID": 1}),
    ("身份证号码为110105491231002", "身份证号码为[ID]", {"ID": 1}),  # old 15-digit form, labelled
    # mobiles in several formats
    ("电话13812345678", "电话[PHONE]", {"PHONE": 1}),
    ("手机：138-1234-5678。", "手机：[PHONE]。", {"PHONE": 1}),
    ("call 138 1234 5678 now", "call [PHONE] now", {"PHONE": 1}),
    ("+86 139 0000 1111", "[PHONE]", {"PHONE": 1}),
    ("联系方式+8615912345678或0086-18600001111", "联系方式[PHONE]或[PHONE]", {"PHONE": 2}),
    ("(+86)17712345678", "[PHONE]", {"PHONE": 1}),
    # landlines
    ("科室电话010-62345678", "科室电话[PHONE]", {"PHONE": 1}),
    ("0755-87654321转123", "[PHONE]", {"PHONE": 1}),
    ("(021)62345678", "[PHONE]", {"PHONE": 1}),
    ("Tel: +86 10 62345678.", "Tel: [PHONE].", {"PHONE": 1}),
    ("0571 87654321", "[PHONE]", {"PHONE": 1}),
    # hospital record numbers, the label kept
    ("住院号：ZY2023001，", "住院号：[MRN]，", {"MRN": 1}),
    ("门诊号 123456", "门诊号 [MRN]", {"MRN": 1}),
    ("病案号:A-20230915", "病案号:[MRN]", {"MRN": 1}),
    ("住院号为20230001", "住院号为[MRN]", {"MRN": 1}),
    ("MRN: 00123456.", "MRN: [MRN].", {"MRN": 1}),
    ("mrn#884422", "mrn#[MRN]", {"MRN": 1}),
    ("Medical record no. 7788990", "Medical record no. [MRN]", {"MRN": 1}),
    ("Medical Record Number: AB123456", "Medical Record Number: [MRN]", {"MRN": 1}),
    ("住院号 13812345678", "住院号 [MRN]", {"MRN": 1}),  # labelled: an MRN, not a phone
    # emails
    ("邮箱zhang.san@hospital.com.cn。", "邮箱[EMAIL]。", {"EMAIL": 1}),
    ("write to dr_li+clinic@163.com", "write to [EMAIL]", {"EMAIL": 1}),
    # bank cards: Luhn-valid with a network prefix
    ("卡号6250941006528599", "卡号[BANK_CARD]", {"BANK_CARD": 1}),
    ("card 4111 1111 1111 1111 expires", "card [BANK_CARD] expires", {"BANK_CARD": 1}),
    ("Amex 3782-822463-10005", "Amex 3782-822463-10005", {}),  # not in 4-digit groups: left alone
    # dates of birth, only when marked
    ("出生日期：1980年5月3日", "出生日期：[DOB]", {"DOB": 1}),
    ("出生年月:1975-03，", "出生年月:[DOB]，", {"DOB": 1}),
    ("生日 1990.01.02", "生日 [DOB]", {"DOB": 1}),
    ("DOB: 03/12/1975;", "DOB: [DOB];", {"DOB": 1}),
    ("Date of birth: March 3, 1975.", "Date of birth: [DOB].", {"DOB": 1}),
    ("born on 3 March 1975", "born on [DOB]", {"DOB": 1}),
    # names, where the context marks them
    ("患者张三，男，45岁", "患者[NAME]，男，45岁", {"NAME": 1}),
    ("患者：李四，女", "患者：[NAME]，女", {"NAME": 1}),
    ("患者王小明男，60岁", "患者[NAME]男，60岁", {"NAME": 1}),
    ("患儿刘洋（男，5岁）", "患儿[NAME]（男，5岁）", {"NAME": 1}),
    ("病人赵敏、", "病人[NAME]、", {"NAME": 1}),
    ("姓名：王小明 性别：男", "姓名：[NAME] 性别：男", {"NAME": 1}),
    ("姓名:欧阳娜娜性别女", "姓名:[NAME]性别女", {"NAME": 1}),
    ("患者欧阳修，", "患者[NAME]，", {"NAME": 1}),
    ("Patient: John Smith, 54", "Patient: [NAME], 54", {"NAME": 1}),
    ("Patient name: Mary Jones", "Patient name: [NAME]", {"NAME": 1}),
    ("Name: Robert Brown\nAge: 60", "Name: [NAME]\nAge: 60", {"NAME": 1}),
    ("the patient, Mrs. Jane Doe, was admitted", "the patient, Mrs. [NAME], was admitted", {"NAME": 1}),
    ("Patient Mr. Wang reports", "Patient Mr. [NAME] reports", {"NAME": 1}),
    ("Patient: Mr. Smith", "Patient: Mr. [NAME]", {"NAME": 1}),
    ("转诊患者李建国", "转诊患者[NAME]", {"NAME": 1}),
    # names: titled, labelled, kin, self-introduced, opening a note; a name found once goes everywhere in the text
    ("Mr. John Smith was seen today. Smith reported chest pain.",
     "Mr. [NAME] was seen today. [NAME] reported chest pain.", {"NAME": 2}),
    ("Dr. Li reviewed the CT.", "Dr. [NAME] reviewed the CT.", {"NAME": 1}),
    ("Prof. Chen asked Mrs. O'Brien to return.", "Prof. [NAME] asked Mrs. [NAME] to return.", {"NAME": 2}),
    ("See Dr. Smith's guideline (Smith et al., 2019).", "See Dr. [NAME]'s guideline ([NAME] et al., 2019).",
     {"NAME": 2}),
    ("患者王建国，男，60岁。王建国诉胸闷2天。", "患者[NAME]，男，60岁。[NAME]诉胸闷2天。", {"NAME": 2}),
    ("王建国，男，58岁，因胸痛入院", "[NAME]，男，58岁，因胸痛入院", {"NAME": 1}),
    ("家属李梅（女儿）签字", "家属[NAME]（女儿）签字", {"NAME": 1}),
    ("联系人：赵强，电话13800001111", "联系人：[NAME]，电话[PHONE]", {"NAME": 1, "PHONE": 1}),
    ("刘先生今日复诊", "[NAME]先生今日复诊", {"NAME": 1}),
    ("请咨询孙医生", "请咨询[NAME]医生", {"NAME": 1}),
    ("尊敬的许丽华女士：", "尊敬的[NAME]女士：", {"NAME": 1}),
    ("出院医嘱（主治医师：林建华）", "出院医嘱（主治医师：[NAME]）", {"NAME": 1}),
    ("Emergency contact: wife, Mary Jones", "Emergency contact: wife, [NAME]", {"NAME": 1}),
    ("Her husband, David Park, called.", "Her husband, [NAME], called.", {"NAME": 1}),
    ("Sarah Connor is a 45-year-old woman with asthma.", "[NAME] is a 45-year-old woman with asthma.", {"NAME": 1}),
    ("my name is Tom Baker and I have a cough", "my name is [NAME] and I have a cough", {"NAME": 1}),
    ("Attending: Dr. Rajesh Patel", "Attending: Dr. [NAME]", {"NAME": 1}),
    ("患者 Patient: 黄丽 Huang Li", "患者 Patient: [NAME] [NAME]", {"NAME": 2}),
    # street addresses and labelled places
    ("住址：北京市朝阳区建国路88号3栋2单元501室，", "住址：[ADDRESS]，", {"ADDRESS": 1}),
    ("家住江苏省南京市鼓楼区中山路100号", "家住[ADDRESS]", {"ADDRESS": 1}),
    ("送至武汉市洪山区珞喻路1037号急诊", "送至[ADDRESS]急诊", {"ADDRESS": 1}),
    ("籍贯湖南省邵阳市隆回县，", "籍贯[ADDRESS]，", {"ADDRESS": 1}),
    ("Lives at 742 Evergreen Terrace, Springfield, OR 97403.", "Lives at [ADDRESS].", {"ADDRESS": 1}),
    ("Address: 10 Downing Street, London SW1A 2AA", "Address: [ADDRESS]", {"ADDRESS": 1}),
    ("ZIP: 94110", "ZIP: [ADDRESS]", {"ADDRESS": 1}),
    ("邮编：210008", "邮编：[ADDRESS]", {"ADDRESS": 1}),
    ("City: Boston", "City: [ADDRESS]", {"ADDRESS": 1}),
    # dates of birth in the forms that leaked
    ("出生于1985年3月", "出生于[DOB]", {"DOB": 1}),
    ("born December 12, 1973", "born [DOB]", {"DOB": 1}),
    ("DOB: 12/03/1973", "DOB: [DOB]", {"DOB": 1}),
    ("于2020年2月3日出生", "于[DOB]出生", {"DOB": 1}),
    ("Birthdate 1990-01-02", "Birthdate [DOB]", {"DOB": 1}),
    # phones outside mainland formats
    ("(415) 555-0132", "[PHONE]", {"PHONE": 1}),
    ("call +1 415-555-0132.", "call [PHONE].", {"PHONE": 1}),
    ("+44 20 7946 0958", "[PHONE]", {"PHONE": 1}),
    ("415.555.0132", "[PHONE]", {"PHONE": 1}),
    ("020 7946 0958", "[PHONE]", {"PHONE": 1}),
    ("Fax: 555-0199", "Fax: [PHONE]", {"PHONE": 1}),
    ("传真：62345678", "传真：[PHONE]", {"PHONE": 1}),
    # record, account, license, device, plate numbers after their labels
    ("MRN#: 00123456", "MRN#: [MRN]", {"MRN": 1}),
    ("就诊卡：12345678", "就诊卡：[MRN]", {"MRN": 1}),
    ("就诊卡号 A0098", "就诊卡号 [MRN]", {"MRN": 1}),
    ("NHS number 943 476 5919", "NHS number [MRN]", {"MRN": 1}),
    ("医保卡号：1234567890", "医保卡号：[ACCOUNT]", {"ACCOUNT": 1}),
    ("Member ID: ABC123456", "Member ID: [ACCOUNT]", {"ACCOUNT": 1}),
    ("Health plan ID: UHC-884-201-337", "Health plan ID: [ACCOUNT]", {"ACCOUNT": 1}),
    ("执业证书编号：110430000012345", "执业证书编号：[LICENSE]", {"LICENSE": 1}),
    ("DEA #: AB1234563", "DEA #: [LICENSE]", {"LICENSE": 1}),
    ("序列号：PJN123456H", "序列号：[DEVICE]", {"DEVICE": 1}),
    ("serial no. 412938", "serial no. [DEVICE]", {"DEVICE": 1}),
    ("车牌号：京A12345", "车牌号：[PLATE]", {"PLATE": 1}),
    ("License plate: 8XYZ123", "License plate: [PLATE]", {"PLATE": 1}),
    # IDs after a label even with a wrong check digit; passports; SSNs; labelled cards; URLs; IPs
    ("身份证号440106198503124535", "身份证号[ID]", {"ID": 1}),
    ("身份证号：110105194912310021", "身份证号：[ID]", {"ID": 1}),
    ("Passport no. E12345678", "Passport no. [ID]", {"ID": 1}),
    ("SSN 123-45-6789", "SSN [SSN]", {"SSN": 1}),
    ("ssn: 123456789", "ssn: [SSN]", {"SSN": 1}),
    ("银行卡号：6222021000123456791", "银行卡号：[BANK_CARD]", {"BANK_CARD": 1}),
    ("see https://example.org/p/123.", "see [URL].", {"URL": 1}),
    ("发票见www.example.com/x。", "发票见[URL]。", {"URL": 1}),
    ("logged from 192.168.1.20", "logged from [IP]", {"IP": 1}),
    ("2001:db8::8a2e:370:7334", "[IP]", {"IP": 1}),
    # names after a role or signature label, in kinship and bed phrases, before a kinship address, as aliases
    ("护士签名：王晓燕", "护士签名：[NAME]", {"NAME": 1}),
    ("审核者：陈立新　检验者：李娜", "审核者：[NAME]　检验者：[NAME]", {"NAME": 2}),
    ("报告医师：孙浩 2024-03-01", "报告医师：[NAME] 2024-03-01", {"NAME": 1}),
    ("主刀：赵刚　一助：钱文博", "主刀：[NAME]　一助：[NAME]", {"NAME": 2}),
    ("我是8床周建平的女儿", "我是8床[NAME]的女儿", {"NAME": 1}),
    ("有事找我老公陈志强，", "有事找我老公[NAME]，", {"NAME": 1}),
    ("李阿姨今天血压平稳", "[NAME]阿姨今天血压平稳", {"NAME": 1}),
    ("嘱刘大爷低盐饮食", "嘱[NAME]大爷低盐饮食", {"NAME": 1}),
    ("陳先生的太太", "[NAME]先生的太太", {"NAME": 1}),  # traditional surname
    ("患者：Anna Müller（安娜·穆勒），女", "患者：[NAME]（[NAME]），女", {"NAME": 2}),
    ("Name 姓名: WONG Siu Ming 黃小明", "Name 姓名: [NAME] [NAME]", {"NAME": 2}),
    ("Name: SMITH, JOHN A", "Name: [NAME]", {"NAME": 1}),
    ("Patient: 陈美玲 (CHEN, MEI-LING)", "Patient: [NAME] ([NAME])", {"NAME": 2}),
    ("Signed: Dr. A. Okafor", "Signed: Dr. [NAME]", {"NAME": 1}),
    ("Dictated by Anna Lee, MD", "Dictated by [NAME], MD", {"NAME": 1}),
    ("Pt: Maria Lopez-Garcia | DOB 1/2/1980", "Pt: [NAME] | DOB [DOB]", {"NAME": 1, "DOB": 1}),
    ("Member name: Carol P. Nguyen    Member ID: X1234567", "Member name: [NAME]    Member ID: [ACCOUNT]",
     {"NAME": 1, "ACCOUNT": 1}),
    ("Nurse: Helen Grant", "Nurse: [NAME]", {"NAME": 1}),
    ("Lives with his wife Joan at home.", "Lives with his wife [NAME] at home.", {"NAME": 1}),
    ("Daughter Ruth (mobile) will visit.", "Daughter [NAME] (mobile) will visit.", {"NAME": 1}),
    ("Dad (Tom) stayed overnight.", "Dad ([NAME]) stayed overnight.", {"NAME": 1}),
    ("Parents: Laura and Mark Davis", "Parents: [NAME] and [NAME]", {"NAME": 2}),
    ("Brought in by boyfriend Jamal Carter.", "Brought in by boyfriend [NAME].", {"NAME": 1}),
    ('Patient: Robert Hughes ("Bob"). Bob is well.', 'Patient: [NAME] ("[NAME]"). [NAME] is well.', {"NAME": 3}),
    ("She goes by Liz.", "She goes by [NAME].", {"NAME": 1}),
    ("Thanks for seeing Margo, a 81 y.o. woman", "Thanks for seeing [NAME], a 81 y.o. woman", {"NAME": 1}),
    # Hong Kong, Taiwan, Singapore, UK and Australian numbers: labelled in any shape, else with their check digit
    ("HKID: Y123456(3)", "HKID: [ID]", {"ID": 1}),
    ("ID K512368(2) on file", "ID [ID] on file", {"ID": 1}),
    ("copy of K512368(2)", "copy of [ID]", {"ID": 1}),
    ("身分證字號：B123456789", "身分證字號：[ID]", {"ID": 1}),
    ("ID A223456781", "ID [ID]", {"ID": 1}),
    ("NRIC S1234567D", "NRIC [ID]", {"ID": 1}),
    ("她的 NRIC 是 S4512345F", "她的 NRIC 是 [ID]", {"ID": 1}),  # wrong check letter, but labelled
    ("FIN: G1234567X", "FIN: [ID]", {"ID": 1}),
    ("NHS 943 476 5919 noted", "NHS [MRN] noted", {"MRN": 1}),
    ("ref 943 476 5919", "ref [ID]", {"ID": 1}),
    ("Medicare No. 2951 38471 2", "Medicare No. [ACCOUNT]", {"ACCOUNT": 1}),
    ("card 2951 38471 2 seen", "card [ID] seen", {"ID": 1}),
    ("身份证号：3201021988051742（待核对）", "身份证号：[ID]（待核对）", {"ID": 1}),  # 16 digits: a typo, labelled
    # record numbers: grouped digits, more labels, exam numbers with letters, app handles
    ("就诊卡号 1100 2387 6541", "就诊卡号 [MRN]", {"MRN": 1}),
    ("门诊号 123456 140/90 mmHg", "门诊号 [MRN] 140/90 mmHg", {"MRN": 1}),  # the next number is no part of it
    ("Chart #: PED-44871", "Chart #: [MRN]", {"MRN": 1}),
    ("URN 2049981", "URN [MRN]", {"MRN": 1}),
    ("hosp no. K0987123", "hosp no. [MRN]", {"MRN": 1}),
    ("Hospital No.: HN23019847", "Hospital No.: [MRN]", {"MRN": 1}),
    ("病歷號 Chart No.：7788123", "病歷號 Chart No.：[MRN]", {"MRN": 1}),
    ("检查号：CT240318-0562", "检查号：[MRN]", {"MRN": 1}),
    ("病理号：P2024-00123", "病理号：[MRN]", {"MRN": 1}),
    ("体检编号：TJ20240412087", "体检编号：[MRN]", {"MRN": 1}),
    ("急诊号：JZ2407030193", "急诊号：[MRN]", {"MRN": 1}),
    ("微信号liujia_1988，", "微信号[ACCOUNT]，", {"ACCOUNT": 1}),
    ("WeChat ID: tan_sl88", "WeChat ID: [ACCOUNT]", {"ACCOUNT": 1}),
    # dates of birth in other calendars and formats; phones and addresses in other formats
    ("出生日期 DOB：民國60年3月15日 (1971/03/15)", "出生日期 DOB：[DOB] ([DOB])", {"DOB": 2}),
    ("DOB 出生日期: 12-Sep-1955", "DOB 出生日期: [DOB]", {"DOB": 1}),
    ("Tel 電話: 9123 4567", "Tel 電話: [PHONE]", {"PHONE": 1}),
    ("也可以打 6321 4567 找护士", "也可以打 [PHONE] 找护士", {"PHONE": 1}),
    ("Ph: (03) 9598 1234", "Ph: [PHONE]", {"PHONE": 1}),
    ("电话：(02) 2755-1234", "电话：[PHONE]", {"PHONE": 1}),
    ("Unit 12/45 Beach Rd, Sandringham VIC 3191", "[ADDRESS]", {"ADDRESS": 1}),
    ("PO Box 218, Brighton VIC 3186", "[ADDRESS]", {"ADDRESS": 1}),
    ("318 W 47th St Apt 12C, New York, NY 10036", "[ADDRESS]", {"ADDRESS": 1}),
    # several at once
    (f"患者张三，男，45岁，身份证{VALID_ID}，电话13812345678，住院号：A123456",
     "患者[NAME]，男，45岁，身份证[ID]，电话[PHONE]，住院号：[MRN]", {"NAME": 1, "ID": 1, "PHONE": 1, "MRN": 1}),
]


@pytest.mark.parametrize("text, expected, counts", REPLACED, ids=[r[0][:24] for r in REPLACED])
def test_identifiers_replaced(text, expected, counts):
    out, found = scrub(text)
    assert out == expected
    assert found == Counter(counts)


LEFT_ALONE = [
    "110105194912310021",                      # ID with a wrong check digit, unlabelled
    "110105194913310021",                      # right check digit, impossible birth date (month 13)
    "4111111111111112",                         # card number failing Luhn
    "检验编号 20230915123456",                   # a long accession number / timestamp
    "标本号 1234567，复查编号 7654321",
    "血压140/90 mmHg，心率88次/分",
    "BP 140/90 mmHg, HR 88 bpm, SpO2 98%",
    "阿莫西林 500 mg，每日3次，口服7天",
    "尿蛋白定量 4 g/24 h",
    "2023年5月3日入院，ICD-10编码I10，出院诊断E11.9",
    "Admitted on 2023-05-03; ICD-10 code E11.9; follow-up 2023/06/01.",
    "随访日期：2023-05-03",
    "WBC 12.5×10^9/L, PLT 135×10^9/L, Hb 98 g/L",
    "血钠 135-145 mmol/L，血钾 3.5-5.5 mmol/L",
    "eGFR 60 mL/min/1.73 m²，肌酐 133 μmol/L",
    "HbA1c 7.0%，空腹血糖 6.1 mmol/L",
    "0.9%氯化钠注射液 250 ml + 胰岛素 4 U",
    "剂量 0.5-1 mg/kg，最大 1,000,000 U",
    "QT 间期 440 ms，PR 间期 0.16 s",
    "In 1998 the WHO revised the criteria; by 2019, 463 million adults had diabetes.",
    "患者出现胸痛3小时。",
    "患者主诉：头痛伴恶心。",
    "患者自述乏力，食欲下降。",
    "患者高热，体温39.5℃。",
    "患者男性，65岁。",
    "患者家属，请注意。",
    "患者无发热，无咳嗽。",
    "患者于2020年确诊糖尿病。",
    "患者余同前。",
    "患者陈述，近期体重下降。",
    "患者病情稳定，予出院。",
    "患者王某，男，50岁",                        # already de-identified
    "姓名：某某",
    "the patient presents with chest pain",
    "Patient: 65-year-old male with chest pain",
    "Patient: Male, 45",
    "Brand name: Lipitor (atorvastatin)",
    "See the guideline (Smith et al., 2019).",  # a citation: nothing marks Smith as a person
    "Call 120 or 911 in an emergency.",
    "用药时间 08:00、12:00、18:00",
    "对于大多数非妊娠成人2型糖尿病患者，HbA1c 目标 <7.0%",
    # number-heavy clinical text: vitals, visit dates and times, codes, doses, ranges, scores, versions
    "血压 140/90 mmHg，心率 72 次/分，体温 36.5℃，呼吸 18 次/分",
    "复查时间：2024-03-15 09:30；下次随访 2024/04/15",
    "ICD-10: I10, E11.9, N18.3; ICD-9 250.00",
    "Metoprolol 25 mg PO BID; lisinopril 10 mg daily; atorvastatin 40 mg qhs",
    "Glucose 151-200 mg/dL: 2 units; 201-250 mg/dL: 4 units; 251-300 mg/dL: 6 units",
    "See section 4.2.1.3 of the guideline.",
    "FEV1 2.1 L (65%), FVC 3.4 L, FEV1/FVC 0.62",
    "Na 138, K 4.1, Cl 101, HCO3 24, BUN 18, Cr 1.1, Glu 110",
    "Medication times: 08:00, 12:30:45, 18:00",
    "PHQ-9 21, GAD-7 15, MoCA 24/30",
    "Accession 23-306-00871, specimen 20230915-0032",
    "Hb 12.3 g/dL on 2023.05.03",
    "Admitted 03/04/2023, discharged 03/09/2023.",
    "INR 2.5 (target 2.0-3.0), warfarin 3 mg/5 mg alternate days",
    "NYHA II, EF 35%, LVEDD 62 mm, NT-proBNP 1850 pg/mL",
    "Cardiac output 5.2 L/min; CI 2.8 L/min/m2; PCWP 18 mmHg",
    "白细胞 12.5×10^9/L，中性粒细胞 85.2%，CRP 120 mg/L，PCT 2.5 ng/mL",
    "住院第3天，床号12床，门诊随访",
    "出生体重3250 g，出生后1分钟Apgar 9分",
    "born at 32 weeks, birth weight 1.8 kg",
    "Take 2 Tablets Daily with food.",
    # words around names and places that are not names or places
    "患者母亲高血压病史，父亲体健",
    "患者家属同意手术，签字",
    "向医生咨询用药",
    "主任医师查房：考虑冠心病",
    "请写下症状，方便医生了解病情。",  # once read as a name before 医生
    "严格按医生的要求服药，不要自行停药。",
    "冲凉水后，可以涂医生或药师推荐的烫伤药膏。",
    "Call NHS 111 or your GP if you are unsure.",  # a service number, not an NHS number
    "SAMHSA National Helpline: 1-800-662-4357 (free, 24/7).",  # toll-free helplines are no one's phone
    "全国心理援助热线 400-161-9995，24小时。",
    "急诊科医生建议住院",
    "其余医生意见一致",
    "应在医生指导下使用",
    "如有不适，应及时联系医生。",
    "应找医生评估",
    "患者居住于本市，务农",
    "家住农村，务农",
    "Mother: breast cancer at 52. Father: MI at 60.",
    "Family history: mother Type 2 diabetes, father Coronary Artery Disease.",
    "Patient Health Questionnaire (PHQ-9) score 12",
    "In 2019, Smith et al. reported a 12% reduction.",
    "He lives at home with his wife.",
    "000-12-3456",                              # not a valid SSN area
    # near misses of the rules for role labels, kinship words, regional numbers, labels and grouped digits
    "早高峰期间血压升高，高峰血药浓度出现在2小时",
    "主任医师查房，主治医师：同意目前治疗",
    "诊断：房颤，高血压3级",                       # a section heading, not a role: 房 is also a surname
    "检查：血常规、肝功能；记录：患者安静入睡；随访：3个月后复查",
    "予甘露醇125ml q8h，12床甘露醇已停，12床患者高热",
    "审核：已完成。医生：谢谢您的配合。护士：好的，请稍等。",
    "门卫大爷送来，保安大叔陪同",
    "患者的女儿陪同，全体家属同意，安抚家属情绪",
    "史蒂文斯·约翰逊综合征，米勒·费希尔综合征",  # transliterated eponyms: no context marks a person
    "ICD-10: I48.0, E11.9; ICD-11 5A11; LOINC 2345-7, SNOMED 38341003",
    "Accession 23-306-00871, specimen S2023-04411, lot AB1234",
    "病理号码待回报，影像所见：右肺结节，检查号为空",
    "Medicare covers 80%; Medicare Part B; NHS guidance 2023; Chart review 2024 showed",
    "A223456780, S1234567A, K512368(3), 943 476 5918",  # check digits that fail, unlabelled
    "CC: Chest Pain x 2 days",
    "Nurse: Okay, I'll check. Nurse: Good Morning",
    "mother Diabetic, father Hypertensive, sister Lupus, brother Asthma",
    "Family history: mother (Type 2 DM), father (Deceased). Mother: Rheumatoid Arthritis",
    "seen by Physical Therapy and Speech Language Pathology; referred by Primary Care",
    "Dictated by Interventional Radiology",
    "Patient: COPD Exacerbation. Patient: UNKNOWN Male. Name: ED Physician",
    "Brand name: LIPITOR, ATORVASTATIN",
    "the condition is known as Parkinson's disease; he goes by bus to dialysis",
    "pH 7.35 7.40 7.38 on serial gases; call 911 or 120",
    "打胰岛素 12 10 10 14u，每天打 1000 单位",
    "Unit 12 of the ward, bed 4; Box 2: score 3; PO 500 mg BID",
    "WeChat group for diabetes education; 微信扫码挂号",
    "Lives with her husband and son. The patient's son, who lives nearby, visits.",
    "Parents: Alive and Well. Parents: Diabetes and Hypertension. Mum (Diabetic)",
]


@pytest.mark.parametrize("text", LEFT_ALONE, ids=[t[:24] for t in LEFT_ALONE])
def test_clinical_text_unchanged(text):
    assert scrub(text) == (text, Counter())


def test_types_pick_what_is_scrubbed():
    text = f"患者张三，电话13812345678，身份证{VALID_ID}"
    out, found = scrub(text, ["phone"])
    assert out == f"患者张三，电话[PHONE]，身份证{VALID_ID}" and found == Counter({"PHONE": 1})
    out, found = scrub(text, ["ID", "name"])
    assert out == "患者[NAME]，电话13812345678，身份证[ID]"
    assert parse_types(None) == TYPES == parse_types(["all"])
    with pytest.raises(ValueError, match="unknown PII type.*PASSPORT"):
        parse_types(["passport"])


def test_empty_and_short_text():
    assert scrub("") == ("", Counter())
    assert scrub("ok") == ("ok", Counter())


def test_a_name_found_in_one_field_is_scrubbed_in_all():
    """A record is scrubbed as a whole: the assistant's "李秀英您好" goes because the user said "我叫李秀英"."""
    chat = {"id": 7, "messages": [
        {"role": "user", "content": "我叫李秀英，今年63岁，血压150/100怎么办？"},
        {"role": "assistant", "content": "李秀英您好，血压150/100 mmHg偏高，建议复诊。"},
        {"role": "user", "content": "Thanks. My doctor is Dr. Osei."},
        {"role": "assistant", "content": "Osei can adjust the dose."}]}
    out, found = scrub_record(chat)
    assert [m["content"] for m in out["messages"]] == [
        "我叫[NAME]，今年63岁，血压150/100怎么办？", "[NAME]您好，血压150/100 mmHg偏高，建议复诊。",
        "Thanks. My doctor is Dr. [NAME].", "[NAME] can adjust the dose."]
    assert out["id"] == 7 and out["messages"][0]["role"] == "user" and found == Counter({"NAME": 4})
    # an earlier field loses a name found only in a later one; another record shares nothing
    out, _ = scrub_record(["Smith called back.", "Patient: John Smith"])
    assert out == ["[NAME] called back.", "Patient: [NAME]"]
    assert scrub_record(["Smith called back."]) == (["Smith called back."], Counter())
    assert scrub_record({"n": 1, "x": None}) == ({"n": 1, "x": None}, Counter())


def test_data_clean_scrubs_records_as_a_whole():
    """`medgpt data clean` goes through scrub_record, so later bare mentions go too (the web UI and server logs keep
    calling scrub() per string)."""
    from medgpt.data.clean import scrub_obj

    counts = Counter()
    rec = {"conversations": [{"from": "human", "value": "患者王建国，男，70岁，头晕。"},
                             {"from": "gpt", "value": "王建国需要复查血压。"}]}
    out = scrub_obj(rec, parse_types(None), counts)
    assert [t["value"] for t in out["conversations"]] == ["患者[NAME]，男，70岁，头晕。", "[NAME]需要复查血压。"]
    assert counts == Counter({"NAME": 2})


def _benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "pii_recall.py"
    spec = importlib.util.spec_from_file_location("pii_recall", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_recall_and_precision_stay_high():
    """The labelled notes of benchmarks/pii_notes.jsonl: recall and precision >= 95%, every medical fact kept."""
    bench = _benchmark()
    notes = [json.loads(line) for line in bench.NOTES.read_text(encoding="utf-8").splitlines()]
    assert len(notes) >= 40
    r = bench.evaluate(notes)
    found, total = sum(r["found"].values()), sum(r["total"].values())
    real, spans = sum(r["true"].values()), sum(r["spans"].values())
    assert total >= 150 and found / total >= 0.95, r["misses"]
    assert real / spans >= 0.95, r["false_positives"]
    assert r["facts_kept"] == r["facts_total"]
    assert all(r["spans"][t] == r["true"][t] for t in TYPES if t != "NAME"), r["false_positives"]


@pytest.mark.parametrize("name, min_recall, min_precision", [("pii_notes_heldout", 0.95, 0.98),
                                                             ("pii_notes_heldout2", 0.72, 0.96)])
def test_held_out_sets_do_not_regress(name, min_recall, min_precision):
    """heldout (tuned on after its blind run) and heldout2 (blind, never tuned on): floors just under today's
    99.6% / 100% and 75.7% / 98.2%, and every medical fact kept."""
    bench = _benchmark()
    notes = [json.loads(line) for line in (bench.NOTES.parent / f"{name}.jsonl").read_text("utf-8").splitlines()]
    r = bench.evaluate(notes)
    assert sum(r["found"].values()) / sum(r["total"].values()) >= min_recall
    assert sum(r["true"].values()) / sum(r["spans"].values()) >= min_precision
    assert r["facts_kept"] == r["facts_total"]
