"""Text helpers every layer above data/ may use: which script a text is written in."""

from __future__ import annotations

import re

CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs: extension A, unified, compatibility
_CJK = re.compile(f"[{CJK}]")


def has_cjk(text: str) -> bool:
    """Whether the text holds a Chinese character (what --data.lang / --eval.lang call zh)."""
    return bool(_CJK.search(text))
