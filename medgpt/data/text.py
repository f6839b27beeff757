"""Text helpers every layer above data/ may use: which script a text is written in, the natural-language text of a
canonical record."""

from __future__ import annotations

import re
import unicodedata

CJK_UNIFIED = "\u4e00-\u9fff"  # the unified ideographs: what Chinese names and labels are written in
CJK = "\u3400-\u4dbf" + CJK_UNIFIED + "\uf900-\ufaff"  # + extension A and compatibility ideographs
SPACELESS = "\u3040-\u30ff" + CJK + "\uac00-\ud7af"  # kana, ideographs, hangul: scripts written without spaces
_CJK = re.compile(f"[{CJK}]")
_UNITS = re.compile(rf"[{SPACELESS}]|[^\W_{SPACELESS}]+")


def has_cjk(text: str) -> bool:
    """Whether the text holds a Chinese character (what --data.lang / --eval.lang call zh)."""
    return bool(_CJK.search(text))


def units(text: str) -> list[str]:
    """One unit per character of a spaceless script, one per (case-folded) word otherwise, after NFKC: what
    ROUGE-L compares and the length and repetition rewards count, so Chinese and English weigh alike."""
    return _UNITS.findall(unicodedata.normalize("NFKC", text).casefold())


def record_parts(rec: dict) -> list[str]:
    """The natural-language strings of a canonical record (roles and answer letters left out)."""
    parts: list[str] = []
    for key in ("text", "question"):
        if isinstance(rec.get(key), str):
            parts.append(rec[key])
    parts += list(rec.get("options", {}).values())
    for key in ("messages", "prompt", "chosen", "rejected"):
        parts += [m["content"] for m in rec.get(key, ())]
    if isinstance(rec.get("answer"), str) and "options" not in rec:
        parts.append(rec["answer"])
    return parts


def record_text(rec: dict) -> str:
    """A record's strings one per line, whatever its kind: what tokenizer training, length statistics, dedup and
    contamination checks read."""
    return "\n".join(record_parts(rec))
