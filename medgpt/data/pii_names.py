"""Personal names for the PII scrubber (medgpt/data/pii.py): where the context marks a name, and every later
mention of a name once it is found.

A name is only replaced where something says it is one: a label (姓名：, Patient:, Emergency contact:), a role or
signature (审核者：, 护士签名：, Dictated by), a title (Mr./Dr./Prof., 先生/女士/医生 or 阿姨/老伯 after a surname), a
kin word (丈夫王磊, his wife, Mary Smith, 刘建华的女儿), a self-introduction (我叫, my name is, goes by), the opening
of a note (John Smith is a 67-year-old man; 王建国，男，58岁) or a name just found (林美惠 (LIN, MEI-HUI)).
Traditional characters (陳先生, 護士簽名) count as their simplified forms. Chinese names must
start with a common surname and not with a clinical word (患者高热, 患者余同前). The names found are then replaced
everywhere in the same record (`spread`), so "Smith reported..." and "王建国诉..." later on go too.
"""

from __future__ import annotations

import functools
import re
from collections import Counter

from medgpt.data.text import CJK_UNIFIED as _CJK

# The ~120 most common surnames (about nine in ten people), single and compound.
SURNAMES = set("王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾萧田董袁潘蒋蔡余杜叶程苏魏吕丁"
               "任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦傅方邹熊孟秦邱江尹薛闫阎段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃"
               "武戴莫孔汤向常温康施文牛樊葛邢安齐易乔伍庞颜倪庄聂章鲁岳翟殷詹申欧耿关兰焦俞左柳甘祝包宁尚"
               "符舒阮柯纪梅童凌毕单季裴霍涂成苗谷盛曲翁冉骆蓝路游辛靳管柴蒙鲍华喻祁蒲房滕屈饶解牟艾尤阳"
               "时穆农司卓古吉缪简车项连芦麦褚娄窦戚岑景党宫费卜冷晏席卫米柏宗瞿桂全佟应臧闵苟邬边卞姬师")
COMPOUND = ("欧阳", "司马", "上官", "诸葛", "东方", "皇甫", "尉迟", "公孙", "慕容", "令狐", "长孙", "夏侯", "司徒")
# Traditional forms (Hong Kong, Taiwan) of the surnames and label characters that differ: 陳先生, 護士簽名.
_TRAD = dict(zip(*[iter(
    "张張刘劉陈陳杨楊黄黃赵趙吴吳孙孫马馬郑鄭罗羅谢謝许許韩韓冯馮邓鄧萧蕭蒋蔣叶葉苏蘇吕呂卢盧钟鍾谭譚陆陸贾賈韦韋邹鄒"
    "闫閆阎閻龙龍贺賀顾顧龚龔万萬钱錢严嚴汤湯庞龐颜顏庄莊聂聶鲁魯欧歐关關兰蘭纪紀单單涂塗骆駱蓝藍鲍鮑华華饶饒缪繆"
    "连連芦蘆窦竇党黨费費卫衛宫宮邬鄔边邊师師宁寧乔喬齐齊温溫阳陽诸諸东東迟遲长長"
    "检檢验驗报報审審复複对對记記录錄书書经經责責诊診术術会會转轉签簽约約执執开開护護级級带帶随隨访訪负負医醫"
    "药藥处處调調发發属屬儿兒亲親妈媽爷爺妇婦伤傷联聯监監爱愛门門号號话話电電机機岁歲员員")] * 2))
_SIMPLE = str.maketrans({t: s for s, t in _TRAD.items()})
SURNAMES |= {_TRAD[c] for c in SURNAMES if c in _TRAD}


def _alts(words: str) -> str:
    """An alternation of words, each also in its traditional form, as literals (which re scans for fast)."""
    variants = {v for w in words.split("|") for v in (w, "".join(_TRAD.get(c, c) for c in w))}
    return "|".join(sorted(variants, key=len, reverse=True))


def _hint(words: str) -> re.Pattern:
    """A quick test for any of the words, simplified or traditional."""
    return re.compile(_alts(words))


def _tc(words: str) -> str:
    """A regex alternation of simplified words -> one that also matches their traditional forms (医生 -> [医醫]生)."""
    return "".join(f"[{c}{_TRAD[c]}]" if c in _TRAD else c for c in words)


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
    # roles, services and states that follow a kin word or a signature label (seen by Charge Nurse, wife Informed)
    "Nurse", "Nursing", "Charge", "Staff", "Team", "Service", "Services", "Pharmacy", "Pharmacist", "Resident",
    "Intern", "Attending", "Consultant", "Registrar", "Physician", "Doctor", "Practitioner", "Worker", "Ambulance",
    "Police", "Paramedic", "Paramedics", "Triage", "Primary", "Wound", "Speech", "Physical", "Occupational",
    "Respiratory", "Infectious", "Orthopaedic", "Orthopedic", "Bedside", "Smoker", "Nonsmoker", "Adopted",
    "Estranged", "Updated", "Informed", "Notified", "Aware", "Present", "Absent", "Unavailable", "Lupus", "Okay",
    "Positive", "Negative", "Is", "Was", "Has", "Had",
}
# Word endings of diseases, specialties and adjectives, never of a name: Arthritis, Cardiology, Diabetic.
_NOT_NAME_END = re.compile(r"(?:itis|oma|osis|[ae]mia|pathy|algia|plegia|ectomy|otomy|olog(?:y|ist)|iatr(?:y|ics|ist)"
                           r"|therap(?:y|ist)|[ae]tic|otic|sive|tive|ism|ation|ition)$")
_STOP = "|".join(sorted(EN_NOT_NAMES, key=len, reverse=True))
# The next word of a name: one space away (a wider gap separates header columns: "Name: Ann Lee    Member ID"), and
# not a word that opens a sentence.
_NEXT = rf"[ \t](?!(?:{_STOP})(?![{_LO}]))"
_INITIALS = rf"(?:[{_UP}]\.[ \t]?){{0,2}}"  # S. Patel, J. R. Smith
_EN_NAME = rf"{_INITIALS}{_WORD}(?:[ \t][{_UP}]\.)?(?:{_NEXT}{_WORD}){{0,2}}"    # one to three words
_EN_NAME2 = rf"{_WORD}(?:[ \t][{_UP}]\.)?(?:{_NEXT}{_WORD}){{1,2}}"            # two or three words
# Header style: JOHNSON, TYRONE M / LIN, MEI-HUI / CHAN Tai Man (an upper-case surname, then the given names).
_EN_CAPS = (r"[A-Z]{2,}(?:[-'’][A-Z]{2,})?,[ \t]*[A-Z]{2,}(?:-[A-Z]{2,})?(?:[ \t]+[A-Z]\.?)?(?![A-Za-z])"
            rf"|[A-Z]{{2,}}(?:[ \t]+{_WORD}){{1,2}}(?![A-Za-z])")
_CAPS_NOT_NAMES = {"ED", "ER", "ICU", "OR", "NA", "TBD", "PCP", "GP", "RN", "MD", "DO", "NP", "PA", "ID", "NO", "HX",
                   "DX", "CC", "HPI", "ROS", "PMH", "BP", "HR", "DOB", "MRN", "SEX", "AGE", "AND", "THE", "NOT"}
_GIVEN_TOO = {"Man", "May", "June", "April", "August", "Will"}
_END = rf"(?![{_UP}{_LO}])(?!['’][{_UP}])"  # a whole word; Smith's is Smith
_TITLE = r"(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Professor)"
_KIN = (r"(?:(?:wife|husband|son|daughter|mother|father|sister|brother|partner|spouse|fianc[eé]e?|grandson|"
        r"granddaughter|grandmother|grandfather|grandparent|niece|nephew|guardian|aunt|uncle|cousin|caregiver|carer|"
        r"girlfriend|boyfriend|friend|neighbou?r|roommate|flatmate|housemate|mum|mom|dad|stepmother|stepfather|"
        r"stepson|stepdaughter)(?:-in-law)?)")

# ----------------------------------------------------------------------------- Chinese

_FOREIGN = rf"[{_CJK}]{{1,6}}·[{_CJK}]{{1,8}}(?:·[{_CJK}]{{1,8}})?"  # a transliterated name: 迈克尔·特纳
_ZH_LABEL = re.compile(r"((?:患者|病人|患儿|母亲|父亲|家属|联系人|居民|产妇|配偶|监护人)?姓名\s*[:：]?\s*)"
                       rf"([{_CJK}·]{{2,4}}?|[A-Z][a-z'’-]+(?:[ \t]+[A-Z][a-z'’-]+){{0,2}})"
                       rf"(?=性别|年龄|[男女]|[^{_CJK}·A-Za-z]|$)")
_ZH_END = (r"(?=[，,、（()）\s。；;：:！!？?]|[男女]|\d{1,3}\s*岁|今年|诉|因|于|独居|电话|手机|联系|代诉|陪同|"
           r"签字|同意|$)")
_ZH_KIN = ("丈夫|妻子|爱人|老公|老婆|媳妇|儿媳|女婿|父亲|母亲|爸爸|妈妈|儿子|女儿|哥哥|姐姐|弟弟|妹妹|孙子|外孙女|外孙|孙女|"
           "侄子|侄女|外甥女|外甥|爷爷|奶奶|外公|外婆|姥姥|姥爷|舅舅|姑姑|男友|女友|男朋友|女朋友")
# A name after a word that introduces a person, ended by what ends a name: punctuation, a gender, an age, a verb.
_ZH_CONTEXT = re.compile(
    "((?:" + _alts("患者|病人|患儿|伤者|产妇|孕妇|家属|紧急联系人|联系人|监护人|来访者|陪护|配偶|" + _ZH_KIN + "|其子|其女|其妻|"
                 "其夫|之子|之女|我叫|名叫|主刀医生|主治医生|主治医师|经治医生|管床医生|麻醉医师|麻醉医生|会诊医师|转诊医生|"
                 "签约医生|责任护士|医生签名|医师签名|记录者|记录人") + r")\s*[:：]?\s*)"
    rf"({_FOREIGN}|[{_CJK}]{{2,3}}?){_ZH_END}")
# A role before a colon (审核者：, 报告医师：, 护士签名：, 主刀：, 一助：): a name follows. Not a bare section heading
# (诊断：房颤, 检查：...), so a role word needs its 医师/护士/者 unless it only ever names a person (主刀, 审核).
_ZH_ROLE = re.compile(
    "((?:" + _tc("(?:送检|报告|审核|复核|核对|检验|记录|书写|主治|经治|管床|责任|主管|值班|接诊|首诊|主诊|主刀|麻醉|手术|会诊|"
                 "转诊|签约|执行|操作|申请|开单|诊断|检查|护理|巡回|器械|上级|带教|随访|负责|配药|发药|处方|审方|调配)"
                 "(?:医生|医师|护士|护师|药师|技师|者|人)|审核|复核|主刀|[一二三]助|术者|助手|护士长|"
                 "(?:医生|医师|护士|患者|家属|病人)?(?:签名|签字)人?") + r")\s*[:：]\s*)"
    rf"({_FOREIGN}|[{_CJK}]{{2,3}}?)(?=[，,、（()）\s。；;：:！!？?]|\d|$)")
# A name before 的女儿 (我是12床刘建华的女儿) or after a bed number and before a gender or age (12床刘建华，男).
_ZH_KIN_AFTER = re.compile(rf"(?:(?<![{_CJK}])|(?<=[是叫床给和与请由致及为找]))([{_CJK}]{{2,3}})(?=[的之](?:{_tc(_ZH_KIN)}|家属))")
_ZH_OPENING = re.compile(rf"(?:(?<![{_CJK}])|(?<=床))([{_CJK}]{{2,3}})(?=[，,、\s]*[男女][，,、\s]*\d{{1,3}}\s*[岁歲])")
_ZH_TITLES = "(?=" + _tc("先生|女士|小姐|太太|医生|医师|大夫|主任|教授|护士|老师") + ")"
_ZH_FULL_TITLED = re.compile(rf"(?:(?<![{_CJK}])|(?<=[的给和与请由致及]))([{_CJK}]{{2,3}}){_ZH_TITLES}")
# A surname alone before a title (张先生, 李医生); not a word that ends in one (主任医师, 向医生咨询, 其余医生).
# Surname characters that are mostly function words (应在医生指导下, 及时联系医生, 向医生咨询, 其余医生).
_FUNCTION_SURNAMES = set("向应时全管成余经常和同将及")
_SURNAME_CLASS = "".join(sorted(SURNAMES - _FUNCTION_SURNAMES))
# After another character only where a name can follow it (找张医生, 今天李医生查房), so 可以涂医生推荐的药膏 stays.
_ZH_SURNAME_TITLED = re.compile(rf"(?:(?<![{_CJK}])|(?<=[的和与给请找让叫是跟向对嘱由及陪问见天日午晚早说称位名询系诉知谢]))"
                                rf"([{_SURNAME_CLASS}]){_ZH_TITLES}")
# A surname before a kinship address (张阿姨, 宋老伯): at the start of a phrase, so 门卫大爷 and 保安大叔 keep theirs.
_ZH_ELDER = re.compile(rf"(?:(?<![{_CJK}])|(?<=[的和与给请找让叫是跟向对嘱由及陪问见]))([{_SURNAME_CLASS}])"
                       "(?=" + _tc("阿姨|老伯|伯伯|大爷|大妈|大娘|大叔|大姐|大哥|阿婆|婆婆|奶奶|爷爷|老太|老先生|叔叔|伯母|阿伯") + ")")
_EN_AFTER_ZH = re.compile("((?:" + _tc("患者|病人|患儿|姓名|" + _ZH_KIN) + rf")\s*[:：]?\s*)({_EN_NAME2}){_END}")
_ROMANISED = re.compile(rf"(\[NAME\][ \t]*[（(]?[ \t]*)({_EN_NAME2}){_END}(?![ \t]*[:：])")
# The same person again right after a name: 林美惠 (LIN, MEI-HUI), Michael Turner（迈克尔·特纳）, CHAN Tai Man 陳大文,
# Harold Brennan ("Hal").
_ALIAS_PAREN = re.compile(rf"(\[NAME\][ \t]*[（(][ \t]*)({_FOREIGN}|[{_CJK}]{{2,4}}|{_EN_CAPS})(?=[ \t]*[)）])")
_ALIAS_ZH = re.compile(rf"(\[NAME\][ \t]+)([{_CJK}]{{2,4}})(?=[ \t]*(?:[\n,，。;；)）]|$)|[ \t]{{2}})")  # not 关系：
_ALIAS_QUOTED = re.compile(rf"(\[NAME\][ \t]*[（(]?[ \t]*[\"“'‘])({_WORD})(?=[\"”'’])")

# ----------------------------------------------------------------------------- English

_EN_TITLED = re.compile(rf"((?<![A-Za-z]){_TITLE}\.?[ \t]+)({_EN_NAME}){_END}")
_NAME_LABEL = (r"(?:patient|member|client|subscriber|insured|resident|parent|guardian|legal|full|preferred)(?:'s)?\s+"
               r"(?:full\s+|legal\s+)?name|(?<![A-Za-z] )(?<![A-Za-z])name")  # not Brand name:, Drug name:
_BY = (r"(?:electronically\s+)?(?:signed|dictated|transcribed|reviewed|verified|authored|approved|countersigned|"
       r"attested|interpreted|reported|examined|seen|referred|performed)\s+by")
_STRONG_LABELS = (_NAME_LABEL + r"|member|emergency\s+contact|contact(?:\s+person)?|next\s+of\s+kin|NOK|guardian|"
                  r"caregiver|spouse|informant|attending(?:\s+physician)?|physician|surgeon|assistant|prescriber|"
                  r"(?:ordering\s+)?provider|referring\s+(?:physician|doctor|provider|clinician)|PCP|"
                  r"primary\s+care\s+(?:physician|provider)|consultant|registrar|pharmacist|midwife|author|scribe|"
                  r"interpreter|witness|(?:electronically\s+)?signed|" + _BY)
_EN_LABELLED = re.compile(rf"((?i:\b(?:{_STRONG_LABELS}))[ \t]*[:：][ \t]*(?:(?:his|her|the)[ \t]+)?(?:{_KIN}[, \t]+)?"
                          rf"(?:{_TITLE}\.?[ \t]+)?)({_EN_NAME}|[{_CJK}]{{2,4}}(?=[^{_CJK}]|$)){_END}")
# Signature verbs without a colon (Dictated by Anna Lee) need two name words or a title.
_EN_BY = re.compile(rf"((?i:\b{_BY})[ \t]+(?:{_TITLE}\.?[ \t]+)?)({_EN_NAME2}){_END}")
# Weak labels (Patient: Male, 45; Nurse: Good Morning) need two name words.
_EN_WEAK = re.compile(rf"((?i:\b(?:patient|pt|child|client|resident|re|nurse|RN))[ \t]*[:：][ \t]*)"
                      rf"({_EN_NAME2}|[{_CJK}]{{2,4}}(?=[^{_CJK}]|$)){_END}")
_EN_CAPS_LABELLED = re.compile(rf"((?i:\b(?:{_NAME_LABEL}|patient|pt))[ \t]*(?:姓名[ \t]*)?[:：][ \t]*|姓名[ \t]*[:：]?[ \t]*)"
                               rf"({_EN_CAPS})")
_EN_KIN = re.compile(rf"((?<![A-Za-z])(?i:{_KIN})(?:,[ \t]*|[ \t]+))({_EN_NAME2}|[{_CJK}]{{2,4}}(?![{_CJK}])){_END}")
# One name word after a kin word when a possessive or the start of a sentence makes it a person and the name ends
# there (her husband Frank at ..., Daughter Janet (Tel ...)), or in brackets (Mum (Siobhan)).
_KIN_START = r"(?:\A|(?<=\n)|(?<=[.;:!?(][ \t])|(?<=[.;:!?(][ \t]{2})|(?i:(?<![A-Za-z])(?:his|her|their|my|your|our|pt'?s|patient'?s)[ \t]+))"
_KIN_ONE_END = (r"(?=[ \t]*(?:[,;(（]|\.(?:\s|$)|\n|$|(?:at|and|is|was|who|has|had|will|would|can|called|came|phoned|"
                r"rang|visited|contactable|reachable|present|here|says|said|states|reports|brought|lives|in|on|to)\b))")
_EN_KIN_ONE = re.compile(rf"({_KIN_START}(?i:{_KIN})(?:,[ \t]*|[ \t]+))({_WORD}){_END}{_KIN_ONE_END}")
_EN_KIN_PAREN = re.compile(rf"((?<![A-Za-z])(?i:{_KIN})[ \t]*[(（][ \t]*)({_WORD})(?=[ \t]*[)）])")
# Parents: Michelle and Kevin Chen -> both; the first alone is a name only because of the second.
_EN_PAIR = re.compile(rf"((?<![A-Za-z])(?i:parents|guardians|contacts|{_KIN}s?)[ \t]*[:：,]?[ \t]*)({_WORD})"
                      rf"([ \t]+(?:and|&)[ \t]+)({_EN_NAME2}){_END}")
_EN_NICK = re.compile(r"((?i:\b(?:goes\s+by|prefers\s+to\s+be\s+called|likes\s+to\s+be\s+called|nicknamed|"
                      rf"known\s+to\s+(?:family|friends)\s+as|preferred\s+name))[ \t]*[:：]?[ \t]*[\"“']?)({_WORD}){_END}")
_EN_SELF = re.compile(rf"((?<![A-Za-z])(?i:my\s+name\s+is|I'm|I\s+am|this\s+is)[ \t]+)({_EN_NAME2}){_END}")
_EN_LOWER_PATIENT = re.compile(rf"((?<![A-Za-z])(?:patient|pt|client)[ \t]+)({_EN_NAME2}){_END}")
_AGE = r"\d{1,3}[- ](?:year|yr|month|week|day)s?[- ]old"
_YO = r"\d{1,3}[ \t]*(?:y/?o|yo|y\.o\.?)(?![A-Za-z])"
_EN_OPENING = re.compile(rf"(?<![{_UP}{_LO}'’.])({_EN_NAME2})(?=,?[ \t]+(?:is|was)[ \t]+an?[ \t]+{_AGE}"
                         rf"|,[ \t]+an?[ \t]+(?:{_AGE}|{_YO})|,[ \t]+(?:{_YO}|\d{{1,3}}[ \t]*[MF]\b)"
                         rf"|[ \t]*\([ \t]*\d{{1,3}}[ \t]*(?:y/?o|yo|[MF])?[ \t]*[,)])")
# One word in apposition with an age: "Thank you for seeing Bev, a 76 y.o. lady".
_EN_OPENING_ONE = re.compile(rf"(?<![{_UP}{_LO}'’.])({_WORD})(?=,[ \t]+an?[ \t]+(?:{_AGE}|{_YO}))")


_ZH_CONTEXT_HINT = _hint("患|病人|伤者|产妇|孕妇|家属|联系人|监护人|来访者|陪护|配偶|其子|其女|其妻|其夫|之子|之女|叫|医生|"
                         "医师|护士|记录|床|" + _ZH_KIN)
_ZH_ROLE_HINT = re.compile(r"[者人生师師士刀助核名字长長][ \t]*[:：]")
_ZH_TITLE_HINT = _hint("先生|女士|小姐|太太|医生|医师|大夫|主任|教授|护士|老师")
_ZH_ELDER_HINT = _hint("阿姨|阿婆|阿伯|老伯|老太|伯伯|伯母|大爷|大妈|大娘|大叔|大姐|大哥|婆婆|奶奶|爷爷|叔叔")
_LABEL_WORDS = ("name", "member", "contact", "kin", "nok", "guardian", "caregiver", "spouse", "informant", "attending",
                "physician", "surgeon", "assistant", "prescriber", "provider", "pcp", "signed", "dictated", "scribed",
                "reviewed", "verified", "authored", "approved", "attested", "interpreted", "reported by", "examined",
                "seen by", "referred by", "performed by", "consultant", "registrar", "pharmacist", "midwife", "author", "scribe", "interpreter", "witness",
                "clinician")
# Run on the lower-cased text, without (?i) or a leading \b, so re can scan for the first letters.
_KIN_HINT = re.compile(rf"(?<![a-z])(?:{_KIN}|parents|guardians|contacts)")
_BY_HINT = re.compile(r"(?<![a-z])(?:signed|dictated|transcribed|reviewed|verified|authored|approved|countersigned|"
                      r"attested|interpreted|reported|examined|seen|referred|performed)\s+by")
_AGE_HINT = re.compile(r"[(,][ \t]*\d{1,3}[ \t]*(?:y|[MF])")


def _zh_name(name: str) -> bool:
    if "·" in name:  # 迈克尔·特纳: a transliterated name, found only where the context says it is one
        return True
    if "某" in name:  # 王某, 李某某: already de-identified
        return False
    name = name.translate(_SIMPLE)
    if not (name[0] in SURNAMES or name[:2] in COMPOUND):
        return False
    return not name.startswith(NOT_NAMES)


def _zh_titled(name: str) -> bool:
    """A full name before a title: not a phrase such as 应在 (医生) or 联系 (医生)."""
    return _zh_name(name) and name[0] not in _FUNCTION_SURNAMES and not set(name[1:]) & _NOT_GIVEN


# Characters that make "X医生" a phrase, not a name: 方便医生, 严格按医生, 及时告诉医生, 请遵医生.
_NOT_GIVEN = set("在找系联请让到看问去由为的了按便遵听告诉帮给跟对向被把要需及和与等时后前位名些个格重谨照依以涂用服吃喝擦敷贴")


def _en_name(name: str) -> bool:
    words = [w.strip(".,") for w in name.split() if len(w.strip(".,")) > 1] or [""]  # initials aside: A. Okafor
    return words[0] not in EN_NOT_NAMES and not any(_NOT_NAME_END.search(w) for w in words)


def _caps_name(name: str) -> bool:
    """JOHNSON, TYRONE M / CHAN Tai Man: no word an acronym (ED Physician) or a word that is never a name (a given
    name after the upper-case surname may be one that also opens sentences: Tai Man, May Ling)."""
    for w in re.findall(r"[A-Za-z'’-]+", name):
        if len(w) > 1 and (w in _CAPS_NOT_NAMES or _NOT_NAME_END.search(w.lower())
                           or (w.isupper() or w not in _GIVEN_TOO) and w.title() in EN_NOT_NAMES):
            return False
    return True


def _any_name(name: str) -> bool:
    if re.match(f"[{_CJK}]", name):
        return _zh_name(name)
    return _caps_name(name) if re.match(r"[A-Z]{2,}(?![a-z])", name) else _en_name(name)


def _replace(pattern: re.Pattern, keep, text: str, counts: Counter, found: set, groups: tuple = (2,)) -> str:
    """Each match of `pattern` whose name groups all pass `keep` -> those groups replaced by [NAME] and added to
    `found`; the rest of the match (the label, the title) kept."""
    def repl(m: re.Match) -> str:
        names = [m.group(g) for g in groups]
        if not all(keep(n) for n in names):
            return m.group(0)
        counts["NAME"] += len(names)
        found.update(names)
        out, last = [], m.start()
        for g in groups:
            out += [m.string[last:m.start(g)], "[NAME]"]
            last = m.end(g)
        return "".join(out) + m.string[last:m.end()]
    return pattern.sub(repl, text)


def _scrub_zh(text: str, counts: Counter, found: set) -> str:
    if "姓名" in text:
        text = _replace(_ZH_LABEL, lambda n: "某" not in n and n not in EN_NOT_NAMES, text, counts, found)
    if _ZH_ROLE_HINT.search(text):
        text = _replace(_ZH_ROLE, _zh_name, text, counts, found)
    if _ZH_CONTEXT_HINT.search(text):
        text = _replace(_ZH_CONTEXT, _zh_name, text, counts, found)
        text = _replace(_ZH_KIN_AFTER, _zh_titled, text, counts, found, (1,))
        text = _replace(_EN_AFTER_ZH, _en_name, text, counts, found)
    if "岁" in text or "歲" in text:
        text = _replace(_ZH_OPENING, _zh_name, text, counts, found, (1,))
    if _ZH_TITLE_HINT.search(text):
        text = _replace(_ZH_FULL_TITLED, _zh_titled, text, counts, found, (1,))
        text = _replace(_ZH_SURNAME_TITLED, lambda n: True, text, counts, set(), (1,))  # one character: not spread
    if _ZH_ELDER_HINT.search(text):
        text = _replace(_ZH_ELDER, lambda n: True, text, counts, set(), (1,))
    return text


def _scrub_en(text: str, counts: Counter, found: set) -> str:
    low, colon = text.lower(), ":" in text or "：" in text
    if any(t in text for t in ("Mr", "Ms", "Miss", "Mx", "Dr", "Prof")):
        text = _replace(_EN_TITLED, _en_name, text, counts, found)
    if colon and any(k in low for k in _LABEL_WORDS):
        text = _replace(_EN_LABELLED, _any_name, text, counts, found)
    if _BY_HINT.search(low):
        text = _replace(_EN_BY, _en_name, text, counts, found)
    if colon and any(k in low for k in ("patient", "pt", "child", "client", "resident", "re:", "nurse", "rn")):
        text = _replace(_EN_WEAK, _any_name, text, counts, found)
    if (colon and any(k in low for k in ("name", "patient", "pt")) or "姓名" in text) and re.search("[A-Z]{2}", text):
        text = _replace(_EN_CAPS_LABELLED, _caps_name, text, counts, found)
    if _KIN_HINT.search(low):
        text = _replace(_EN_PAIR, _en_name, text, counts, found, (2, 4))
        text = _replace(_EN_KIN, _any_name, text, counts, found)
        text = _replace(_EN_KIN_ONE, _en_name, text, counts, found)
        text = _replace(_EN_KIN_PAREN, _en_name, text, counts, found)
    if any(k in low for k in ("goes by", "called", "nicknamed", "known to", "preferred name")):
        text = _replace(_EN_NICK, _en_name, text, counts, found)
    if any(k in low for k in ("name is", "i'm", "i am", "this is")):
        text = _replace(_EN_SELF, _en_name, text, counts, found)
    if any(k in text for k in ("patient", "pt ", "client")):
        text = _replace(_EN_LOWER_PATIENT, _en_name, text, counts, found)
    if "old" in low or "y.o" in low or _AGE_HINT.search(text):
        text = _replace(_EN_OPENING, _en_name, text, counts, found, (1,))
        text = _replace(_EN_OPENING_ONE, _en_name, text, counts, found, (1,))
    return text


def _scrub_aliases(text: str, counts: Counter, found: set) -> str:
    """The same person named again right after a name: romanised, in characters, in capitals, a quoted nickname."""
    text = _replace(_ROMANISED, _en_name, text, counts, found)
    text = _replace(_ALIAS_PAREN, _any_name, text, counts, found)
    text = _replace(_ALIAS_ZH, _zh_titled, text, counts, found)
    return _replace(_ALIAS_QUOTED, _en_name, text, counts, found)


def scrub_names(text: str, counts: Counter, found: set) -> str:
    """Names where the context marks them -> [NAME]; each name replaced is added to `found`."""
    # Each pattern runs only when the words it needs are in the text: most strings hold none of them.
    if re.search(f"[{_CJK}]", text):
        text = _scrub_zh(text, counts, found)
    if re.search("[A-Z]", text):
        text = _scrub_en(text, counts, found)
    return _scrub_aliases(text, counts, found) if "[NAME]" in text else text


@functools.lru_cache(maxsize=256)
def _mentions(names: frozenset) -> re.Pattern | None:
    """One pattern for every mention of the names: Chinese names as they are, Latin names whole or by any part
    (Smith for John Smith, Johnson and JOHNSON for JOHNSON, TYRONE), as whole words."""
    terms = set()
    for name in names:
        if re.search(f"[{_CJK}]", name):
            terms.add(name)
            continue
        terms.add(" ".join(name.split()))
        words = [w for w in re.split(r"[\s,]+", name) if len(w) > 1 and not w.endswith(".")]
        words += [w.title() for w in words if w.isupper()]
        terms.update(w for w in words if w not in EN_NOT_NAMES)
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
