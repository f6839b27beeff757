"""Text helpers every layer above data/ may use: which script a text is written in, the natural-language text of a
canonical record."""

from __future__ import annotations

import re

CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs: extension A, unified, compatibility
_CJK = re.compile(f"[{CJK}]")


def has_cjk(text: str) -> bool:
    """Whether the text holds a Chinese character (what --data.lang / --eval.lang call zh)."""
    return bool(_CJK.search(text))


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
