"""Okapi BM25 over bilingual tokens: the keyword half of `medgpt rag` retrieval.

    medgpt rag search --rag.index_dir outputs/rag/index "高血压 诊断标准"

Tokens: Latin-script words are lowercased, with a light plural fold ("doses" -> "dose", "therapies" ->
"therapy") so a query and a leaflet that differ only in number still match. Function words ("the", "what",
"的", "什么") are dropped: in a small knowledge base their idf is not low enough to keep a question's "what is
the" from outscoring its one content word. Chinese runs are cut by jieba in
search mode (`lcut_for_search`: "高血压" gives both "高血压" and "血压", so a query for either matches). Without
jieba (it is in the `rag` extra), Chinese runs become overlapping character bigrams — the classic CJK fallback.
The index records which tokenizer built it; queries must be cut the same way.

Score of document d for query q (Robertson/Sparck Jones with the Lucene idf, which is never negative):

    score(q, d) = sum over distinct terms t of q:  idf(t) * tf(t,d) * (k1 + 1) / (tf(t,d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t)      = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

N documents, df(t) documents containing t, |d| tokens in d, avgdl the mean |d|; k1 = 1.5 saturates repeated
terms, b = 0.75 normalizes for length.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter

import numpy as np

from medgpt.data.text import CJK as _CJK

# Lucene's English stop set plus question words; a few Chinese particles and question words.
STOPWORDS = set("""a an and are as at be but by for if in into is it no not of on or such that the their then there
these they this to was will with what which who whom how when why do does did i me my you your can could should
would am been has have had""".split()) | set("""的 了 是 吗 呢 吧 啊 么 什么 怎么 怎样 如何 哪些 为什么 请问 一下""".split())
_TOKEN = re.compile(rf"([{_CJK}]+)|([^\W_{_CJK}]+)")
_CJK_CHAR = re.compile(f"[{_CJK}]")


def language(text: str) -> str:
    """"zh" when at least a fifth of the text's letters are Chinese characters (a Chinese question that names
    a drug in English is still Chinese), else "en"."""
    letters = [c for c in text if c.isalnum()]
    cjk = sum(1 for c in letters if _CJK_CHAR.match(c))
    return "zh" if letters and cjk * 5 >= len(letters) else "en"


def jieba_available() -> bool:
    try:
        import jieba  # noqa: F401
    except ImportError:
        return False
    return True


def default_tokenizer() -> str:
    return "jieba" if jieba_available() else "bigram"


def _fold(word: str) -> str:
    """Light English plural folding; short words and -ss/-us/-is endings are left alone."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


_jieba = None


def _cut(run: str) -> list[str]:
    global _jieba
    if _jieba is None:
        import jieba

        jieba.setLogLevel(logging.WARNING)  # no "Building prefix dict..." on every command
        _jieba = jieba
    return [t for t in _jieba.lcut_for_search(run) if t.strip()]


def tokenize(text: str, tokenizer: str = "jieba") -> list[str]:
    """BM25 tokens of mixed Chinese/English text; `tokenizer` is "jieba" or "bigram" (Chinese runs only)."""
    tokens: list[str] = []
    for cjk, word in _TOKEN.findall(text.lower()):
        if word:
            tokens.append(_fold(word))
        elif tokenizer == "jieba":
            tokens += _cut(cjk)
        else:
            tokens += [cjk] if len(cjk) == 1 else [cjk[i:i + 2] for i in range(len(cjk) - 1)]
    return [t for t in tokens if t not in STOPWORDS]


class BM25:
    """An inverted index over tokenized documents; `scores(query_tokens)` gives one score per document."""

    def __init__(self, docs: list[list[str]], k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        self.n = len(docs)
        self.lengths = np.array([len(d) for d in docs], dtype=np.float32)
        self.avgdl = float(self.lengths.mean()) if self.n and self.lengths.sum() else 1.0
        postings: dict[str, tuple[list[int], list[int]]] = {}
        for i, doc in enumerate(docs):
            for term, tf in Counter(doc).items():
                ids, tfs = postings.setdefault(term, ([], []))
                ids.append(i)
                tfs.append(tf)
        self.postings = {t: (np.array(ids, dtype=np.int64), np.array(tfs, dtype=np.float32))
                         for t, (ids, tfs) in postings.items()}

    def idf(self, term: str) -> float:
        df = len(self.postings[term][0]) if term in self.postings else 0
        return math.log(1.0 + (self.n - df + 0.5) / (df + 0.5))

    def scores(self, query: list[str]) -> np.ndarray:
        out = np.zeros(self.n, dtype=np.float32)
        norm = self.k1 * (1.0 - self.b + self.b * self.lengths / self.avgdl)
        for term in dict.fromkeys(query):  # each distinct query term once
            if term not in self.postings:
                continue
            ids, tf = self.postings[term]
            out[ids] += self.idf(term) * tf * (self.k1 + 1.0) / (tf + norm[ids])
        return out
