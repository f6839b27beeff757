"""Knowledge-base QA in `medgpt eval`: does retrieval find the right leaflet, and does the answer cite it?

    medgpt rag index data/demo/knowledge --rag.index_dir /tmp/kb
    medgpt eval --model.name_or_path DIR --eval.rag_files data/demo/heldout/rag_questions.jsonl \
        --rag.index_dir /tmp/kb [--eval.rag_without true]

A question is `{"question": str, "source": "hypertension.md", "lang"?: "en"|"zh"}`: `source` is the file name of
the one document that holds the answer. Each question goes through the same path as `medgpt rag ask`
(rag/answer.py `fit_augment`: the top `--rag.top_k` passages that fit the context, numbered, in the prompt); then

    rag/hit_rate          share of questions whose source file is among the passages put into the prompt
    rag/hit_at_1          share whose best passage comes from it
    rag/cited_right_rate  share of answers that cite it: a [n] marker pointing at one of its passages, or its
                          file name written out (rag/answer.py `cited_files`)

With `--eval.rag_without true` the model also answers each question without passages, side by side in
`predictions/rag-<file>.jsonl`, to read what the knowledge base changes.
"""

from __future__ import annotations

from pathlib import PurePath

from medgpt.data.readers import read_parsed
from medgpt.utils import MedGPTError


def _question(obj: dict) -> dict:
    question, source = obj.get("question"), obj.get("source")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("'question' must be a non-empty string")
    if not isinstance(source, str) or not source.strip():
        raise ValueError("'source' must be the file name of the document that answers it, e.g. hypertension.md")
    lang = obj.get("lang")
    if lang is not None and not isinstance(lang, str):
        raise ValueError("'lang' must be a string such as en or zh")
    return {"question": question.strip(), "source": PurePath(source.strip()).name, "lang": lang}


def read_questions(path: str, max_samples: int | None = None) -> list[dict]:
    """The questions of one file, or a MedGPTError listing the bad records as file:line."""
    return read_parsed(path, _question, "RAG question", 'A record is {"question": ..., "source": "leaflet.md", '
                       '"lang"?: "en"}.', max_samples)


def check_sources(questions: list[dict], index, path: str) -> None:
    """Refuse questions whose source file is not in the index: their hit rate would be 0 whatever retrieval does."""
    indexed = {PurePath(c["source"]).name for c in index.chunks}
    missing = sorted({q["source"] for q in questions} - indexed)
    if missing:
        raise MedGPTError(f"{path}: source file(s) not in the index: {', '.join(missing)}. Index them with "
                          f"`medgpt rag index` or fix the 'source' names (the file name, e.g. hypertension.md).")


def judge(question: dict, sources: list[dict], answer: str | None) -> dict:
    """Retrieval hit, hit at 1 and (with an answer) whether the answer cites the question's source file."""
    from medgpt.rag.answer import cited_files

    files = [PurePath(s["source"]).name for s in sources]
    row = {"hit": question["source"] in files, "hit_at_1": bool(files) and files[0] == question["source"]}
    if answer is not None:
        cited = cited_files(answer, sources)
        row.update(cited=cited, cited_right=question["source"] in cited)
    return row


def tally(rows: list[dict]) -> dict:
    """rag/questions, rag/hit_rate, rag/hit_at_1 and (when answers were judged) rag/cited_right_rate."""
    n = len(rows)
    out = {"rag/questions": n, "rag/hit_rate": sum(r["hit"] for r in rows) / n,
           "rag/hit_at_1": sum(r["hit_at_1"] for r in rows) / n}
    if rows and "cited_right" in rows[0]:
        out["rag/cited_right_rate"] = sum(r["cited_right"] for r in rows) / n
        out["rag/cited_any_rate"] = sum(bool(r["cited"]) for r in rows) / n
    return out
