"""Check digits and number shapes for the PII scrubber (medgpt/data/pii.py), which decides where each one runs.

    >>> valid_hkid("K512368(2)"), valid_tw_id("A223456781"), valid_nhs("9434765919")
    (True, True, True)

A check digit is what lets a bare number be called an identifier without a label: one random code in ten or
eleven passes, and the shapes checked here (a letter, six digits and a bracketed digit; a letter and nine digits)
are rare in clinical text. Formats: the mainland resident ID (GB 11643-1999), payment cards (Luhn), the Hong Kong
identity card, the Taiwan national ID, the Singapore NRIC/FIN, the UK NHS number and the Australian Medicare
number. Only the standard library is imported here.
"""

from __future__ import annotations

import datetime
import re

# Digits and Latin letters glued to a number make it part of a longer token (a code, a serial): not PII.
NB = r"(?<![0-9A-Za-z])"
NA = r"(?![0-9A-Za-z])"

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def id_check_char(first17: str) -> str:
    """ISO 7064 MOD 11-2 check character of a Chinese resident ID (GB 11643-1999) from its first 17 digits."""
    total = sum(int(d) * w for d, w in zip(first17, _ID_WEIGHTS))
    return "10X98765432"[total % 11]


def _real_date(year: int, month: int, day: int) -> bool:
    try:
        d = datetime.date(year, month, day)
    except ValueError:
        return False
    return datetime.date(1900, 1, 1) <= d <= datetime.date.today()


def valid_id(number: str) -> bool:
    """An 18-character resident ID with a plausible birth date and the right check character."""
    if not re.fullmatch(r"[1-9]\d{16}[0-9Xx]", number):
        return False
    if not _real_date(int(number[6:10]), int(number[10:12]), int(number[12:14])):
        return False
    return id_check_char(number[:17]) == number[17].upper()


def luhn_ok(digits: str) -> bool:
    """The Luhn (mod 10) check that every payment card number passes."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def valid_card(number: str) -> bool:
    """13-19 digits, a card-network prefix (Amex/JCB 3, Visa 4, Mastercard 5 or 2221-2720, UnionPay 6), Luhn.

    The prefix rule also spares accession numbers and timestamps, which start with 19xx/20xx."""
    digits = re.sub(r"[ -]", "", number)
    if not 13 <= len(digits) <= 19:
        return False
    if not (digits[0] in "3456" or 2221 <= int(digits[:4]) <= 2720):
        return False
    return luhn_ok(digits)


def valid_hkid(number: str) -> bool:
    """Hong Kong identity card: one or two letters, six digits, a check digit or A (mod 11, weights 9..2, a
    missing second letter counting 36): K512368(2)."""
    m = re.fullmatch(r"([A-Z]{1,2})(\d{6})\(?([0-9A])\)?", number)
    if m is None:
        return False
    letters, digits, check = m.groups()
    values = ([36] if len(letters) == 1 else []) + [ord(c) - 55 for c in letters] + [int(d) for d in digits]
    total = sum(v * w for v, w in zip(values, range(9, 1, -1)))
    return "0123456789A"[(11 - total % 11) % 11] == check


_TW_LETTERS = "ABCDEFGHJKLMNPQRSTUVXYWZIO"  # A=10 ... O=35, in the order the Ministry of the Interior assigns


def valid_tw_id(number: str) -> bool:
    """Taiwan national ID (or new-style resident certificate): a letter, 1/2 (8/9), eight digits; the letter's two
    digits and the nine that follow, weighted 1,9,8,...,1,1, sum to a multiple of 10: A223456781."""
    if not re.fullmatch(r"[A-Z][1289]\d{8}", number):
        return False
    code = _TW_LETTERS.index(number[0]) + 10
    digits = [code // 10, code % 10] + [int(d) for d in number[1:]]
    return sum(d * w for d, w in zip(digits, (1, 9, 8, 7, 6, 5, 4, 3, 2, 1, 1))) % 10 == 0


_NRIC_TABLES = {"S": "JZIHGFEDCBA", "T": "JZIHGFEDCBA", "F": "XWUTRQPNMLK", "G": "XWUTRQPNMLK"}


def valid_nric(number: str) -> bool:
    """Singapore NRIC/FIN: S/T/F/G, seven digits, a check letter (weights 2,7,6,5,4,3,2; T and G add 4): S1234567D."""
    if not re.fullmatch(r"[STFG]\d{7}[A-Z]", number):
        return False
    total = sum(int(d) * w for d, w in zip(number[1:8], (2, 7, 6, 5, 4, 3, 2))) + (4 if number[0] in "TG" else 0)
    return _NRIC_TABLES[number[0]][total % 11] == number[8]


def valid_nhs(number: str) -> bool:
    """UK NHS number: ten digits, the last 11 - (weights 10..2 sum mod 11), never 10: 943 476 5919."""
    digits = [int(c) for c in number if c.isdigit()]
    if len(digits) != 10:
        return False
    check = 11 - sum(d * w for d, w in zip(digits, range(10, 1, -1))) % 11
    return check != 10 and check % 11 == digits[9]


def valid_medicare(number: str) -> bool:
    """Australian Medicare card: first digit 2-6, eight digits weighted 1,3,7,9,1,3,7,9 give the ninth (mod 10);
    an issue number (and the person's position on the card) may follow: 2951 38471 2."""
    digits = [int(c) for c in number if c.isdigit()]
    if not 9 <= len(digits) <= 11 or not 2 <= digits[0] <= 6:
        return False
    return sum(d * w for d, w in zip(digits, (1, 3, 7, 9, 1, 3, 7, 9))) % 10 == digits[8]


# ----------------------------------------------------------------------------- shapes that are checked

HKID = re.compile(NB + r"[A-Z]{1,2}\d{6}\([0-9A]\)")  # the bracketed check digit is part of the printed form
TW_ID = re.compile(NB + r"[A-Z][1289]\d{8}" + NA)
NRIC = re.compile(NB + r"[STFG]\d{7}[A-Z]" + NA)
NHS_SPACED = re.compile(r"(?<![\w.-])\d{3} \d{3} \d{4}(?![\w.]|[ /-]\d)")  # 943 476 5919: how NHS numbers print
# After an ID label (HKID, NRIC, 身分證字號), any of these shapes, checked or not: a typo is still an identifier.
REGIONAL_ID_VALUE = r"([A-Z]{1,2}\d{6}\(?[0-9A]\)?|[A-Z][1289]\d{8}|[STFGM]\d{7}[A-Z])" + NA
MEDICARE = re.compile(r"(?<![\w.-])[2-6]\d{3} \d{5} \d(?:[ /-]\d)?(?![\w.]|[ /-]\d)")  # 2951 38471 2, as printed

# ----------------------------------------------------------------------------- phones outside the mainland

# A trunk code in brackets: (03) 9598 1234 (Australia), (02) 2755-1234 (Taiwan), (0)20 ... is left to +44 forms.
PAREN_TRUNK = re.compile(r"(?<![\w+)])\(0\d{1,3}\)[ \t]?\d{3,4}[ \t.-]?\d{4}(?![\w]|[-.]\d)")
# Verbs and short labels that introduce a number to call (打 6321 4567, call 9123 4567, Ph 9598 1234, mob ...):
# digits in groups of three or more, so a run of doses or a pH series is no phone.
CALL_LABELLED = re.compile(r"((?:拨打|撥打|致电|致電|打给|打|电联|(?i:\b(?:call|ring|text|whatsapp|ph|mob)\b\.?)))"
                           r"([ \t]*[:：]?[ \t]*)(\+?\d{2,4}(?:[ \t-]?\d{3,4}){1,3})(?![\w]|[-./:]\d)")
