"""Retrieval-augmented prompts with numbered passages: what `medgpt rag ask` (and later serve/webui) sends.

    messages, sources = augment([{"role": "user", "content": "扑热息痛一天最多吃多少？"}], index, top_k=5)
    reply = engine.chat(messages, gen)
    print(reply.text); print(format_sources(sources))

The last user message is the query. It is rewritten into: an instruction to answer only from the passages and
cite them as [n] (in Chinese when the question is mostly Chinese), the numbered passages `[n] file:line
(heading)` with their text, then the question. Earlier turns stay as they were. `sources` lists the same
passages as dicts (n, source, line, heading, score, text, where) for printing or returning over an API.
`fit_augment` drops the weakest passages until the prompt and the answer fit the model's context.
`citations(answer)` reads the [n] markers an answer uses; `cited_files(answer, sources)` the files it cites.
`KnowledgeArgs` is the `--rag.*` section of `medgpt serve` and `medgpt webui`; `load_knowledge` opens its index.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePath
from typing import Literal, Optional

from medgpt.config import arg
from medgpt.rag.bm25 import language
from medgpt.rag.index import Hit

INSTRUCTION = {
    "en": ("Answer the question using only the numbered passages below. After each statement, cite the passage it "
           "comes from as [n]. If the passages do not contain the answer, say that the knowledge base does not "
           "cover it. This is not a substitute for a doctor's advice."),
    "zh": ("请仅根据下面编号的资料回答问题，并在每句话后用 [n] 标注所依据的资料编号。"
           "如果资料中没有答案，请说明知识库未涵盖该问题。回答仅供参考，不能代替医生的诊疗意见。"),
}
LABELS = {"en": ("Passages", "Question", "Sources"), "zh": ("资料", "问题", "来源")}


def source_dict(n: int, hit: Hit) -> dict:
    return {"n": n, "source": hit.source, "line": hit.line, "heading": hit.heading, "score": hit.score,
            "text": hit.text, "where": hit.where}


def build_prompt(question: str, hits: list[Hit], lang: Optional[str] = None) -> str:
    """The user turn the model sees: instruction, numbered passages, question."""
    lang = lang or language(question)
    passages_label, question_label, _ = LABELS[lang]
    colon = "：" if lang == "zh" else ": "
    blocks = []
    for n, hit in enumerate(hits, 1):
        head = f"[{n}] {hit.where}" + (f" ({hit.heading})" if hit.heading else "")
        blocks.append(f"{head}\n{hit.text}")
    return (f"{INSTRUCTION[lang]}\n\n{passages_label}{colon.strip()}\n\n" + "\n\n".join(blocks)
            + f"\n\n{question_label}{colon}{question}")


def _last_user(messages: list[dict]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            return i
    raise ValueError("augment needs a conversation with a user message")


def augment(messages: list[dict], index, top_k: int = 5, *, hits: Optional[list[Hit]] = None,
            mode: str = "hybrid") -> tuple[list[dict], list[dict]]:
    """`(messages_with_context, sources)`: the last user message answered from the index's top_k passages.

    `hits` skips the search (e.g. fewer of the same passages). With no passage found, the messages come back
    unchanged and sources is empty.
    """
    at = _last_user(messages)
    question = messages[at]["content"]
    if hits is None:
        hits = index.search(question, top_k, mode=mode)
    if not hits:
        return [dict(m) for m in messages], []
    out = [dict(m) for m in messages]
    out[at]["content"] = build_prompt(question, hits)
    return out, [source_dict(n, h) for n, h in enumerate(hits, 1)]


def fit_augment(engine, messages: list[dict], index, top_k: int, max_new_tokens: int,
                mode: str = "hybrid") -> tuple[list[dict], list[dict]]:
    """`augment`, keeping only as many of the best passages as fit the engine's context with room for the
    answer; the last one left is cut short when even it alone does not fit."""
    question = messages[_last_user(messages)]["content"]
    hits = index.search(question, top_k, mode=mode)
    budget = engine.max_context - max_new_tokens

    def fits(candidate: list[Hit]) -> tuple[bool, list[dict], list[dict]]:
        msgs, sources = augment(messages, index, hits=candidate)
        return len(engine.prompt_ids(msgs)) <= budget, msgs, sources

    for n in range(len(hits), 0, -1):
        ok, msgs, sources = fits(hits[:n])
        if ok:
            return msgs, sources
    if hits:
        best = hits[0]
        text = best.text
        while len(text) > 40:
            text = text[: len(text) // 2]
            ok, msgs, sources = fits([Hit(text + "…", best.source, best.line, best.score, best.heading)])
            if ok:
                return msgs, sources
    return augment(messages, index, hits=[])  # nothing fits: the engine reports the over-long question itself


def format_sources(sources: list[dict], lang: str = "en") -> str:
    """`Sources:` then one `[n] file:line (heading)` line per passage."""
    colon = "：" if lang == "zh" else ":"
    lines = [f"{LABELS[lang][2]}{colon}"]
    lines += [f"[{s['n']}] {s['where']}" + (f" ({s['heading']})" if s.get("heading") else "") for s in sources]
    return "\n".join(lines)


# Markers as models write them: [2], [1, 3], [1][2], [1-3], full-width 【2】 and ［2］.
_MARKER = re.compile(r"[\[【［]\s*(\d+(?:\s*(?:[,，、;；-]|–)\s*\d+)*)\s*[\]】］]")


def citations(answer: str) -> list[int]:
    """The passage numbers an answer cites by [n] markers, in order of first use, each once ([1-3] is 1, 2, 3)."""
    found: list[int] = []
    for m in _MARKER.finditer(answer):
        for part in re.split(r"\s*[,，、;；]\s*", m.group(1)):
            ends = [int(x) for x in re.split(r"\s*[-–]\s*", part)]
            numbers = range(ends[0], ends[-1] + 1) if len(ends) == 2 and 0 < ends[1] - ends[0] < 20 else ends
            found += [n for n in numbers if n not in found]
    return found


def cited_files(answer: str, sources: list[dict]) -> list[str]:
    """The file names (no directory) an answer cites: those of the passages its [n] markers point to, and any
    source file it names itself (`hypertension.md`, as in a copied `Sources:` list). Unknown numbers are ignored."""
    by_n = {s["n"]: PurePath(s["source"]).name for s in sources}
    files = [by_n[n] for n in citations(answer) if n in by_n]
    low = answer.lower()
    files += [name for name in by_n.values() if name.lower() in low]
    return list(dict.fromkeys(files))


# ------------------------------------------------------------------------------- serve / webui

@dataclass
class KnowledgeArgs:
    """`--rag.*` of `medgpt serve` and `medgpt webui`: answer chat messages from a knowledge-base index."""
    index_dir: Optional[str] = arg(None, "A `medgpt rag index` dir: answer chat requests from its passages with "
                                   "numbered citations. None: off.")
    top_k: int = arg(4, "Passages put into each prompt (fewer when they do not fit the model's context).", min=1)
    mode: Literal["hybrid", "bm25", "dense"] = arg(
        "hybrid", "hybrid: BM25 + dense fused by reciprocal rank (BM25 alone when the index has no embeddings).")


def load_knowledge(rag: KnowledgeArgs):
    """The Index of `--rag.index_dir` (None when it is not set), checked by one search.

    Called at start, before the model loads: a missing or damaged index, `--rag.mode dense` on an index without
    embeddings, or an embedder that cannot load fails in a second instead of on the first question.
    """
    if not rag.index_dir:
        return None
    from medgpt.rag.index import Index
    from medgpt.utils import MedGPTError

    if rag.top_k < 1:
        raise MedGPTError(f"--rag.top_k must be at least 1, not {rag.top_k} (leave --rag.index_dir unset for no "
                          f"knowledge base).")
    index = Index.load(rag.index_dir)
    index.search("warm up", 1, mode=rag.mode)  # loads the embedder of a hybrid/dense index now
    return index
