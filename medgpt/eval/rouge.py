"""ROUGE-L F1 between a generated answer and a reference answer (Lin 2004, https://aclanthology.org/W04-1013/).

    medgpt eval --model.name_or_path DIR --eval.qa_files data/heldout/qa.jsonl   # chat records: last reply = ref

Units: each CJK character is one unit (Chinese has no spaces, so ROUGE on Chinese is character-level), and each
run of letters or digits is one word (English is word-level); text is NFKC-normalised and case-folded first, and
punctuation and spaces are dropped. Mixed text is both at once: "血压140/90 mmHg" -> 血 压 140 90 mmhg.

    LCS = longest common subsequence of the two unit lists
    P = LCS / len(answer), R = LCS / len(reference), F1 = 2PR / (P + R)   (0 when either side is empty)
"""

from __future__ import annotations

from medgpt.data.text import units


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence: the classic dynamic programme, one row at a time."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1 of an answer against one reference, in [0, 1]."""
    hyp, ref = units(answer), units(reference)
    lcs = lcs_length(hyp, ref)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(hyp), lcs / len(ref)
    return 2 * p * r / (p + r)
