"""The knowledge-base index: build, save, load and search passages (`medgpt rag index` / `search` / `ask`).

    index = Index.load("outputs/rag/index")
    for hit in index.search("paracetamol maximum dose", k=5):
        print(hit.score, hit.where, hit.heading, hit.text)

On disk (`--rag.index_dir`), written as a whole into a temporary directory that then replaces the old one, so a
crash never leaves a half-written index behind. Replacing deletes, so it happens only to a directory that provably
holds an index and nothing else (`claim`): any other file in it, or a meta.json of another tool, stops the command.
- chunks.jsonl     one passage per line: source file, line (PDF: page; docx: paragraph), heading, text, and its
                   BM25 tokens (heading tokens counted twice: a title boost; stored so loading never re-runs the
                   Chinese segmenter, and BM25 statistics are rebuilt from them at load in milliseconds)
- meta.json        its identity ("kind": "medgpt-rag-index", format), the settings that shaped the chunks (chunk
                   size, overlap, tokenizer, embedder, encoding), and every document with its sha256: re-indexing
                   reuses the chunks and embeddings of unchanged documents and only reads new or changed ones
- embeddings.npy   float32 [passages, dim] unit vectors, only with --rag.embedder

Search is hybrid when the index has embeddings: BM25 and dense cosine rankings (top 50 each, or 4 x k) are fused
by reciprocal rank fusion, score(d) = sum over rankings of 1 / (60 + rank(d)) (Cormack et al. 2009). RRF needs
no score normalization: BM25 scores are unbounded and query-dependent, cosines are not, and ranks compare fine.
Without embeddings, search is BM25 and the score is the BM25 score. all-MiniLM-L6-v2 is English-only, so hybrid
search ranks Chinese queries by BM25 alone with it (rag/dense.py). On 32 bilingual questions over the demo leaflets
(18 English, 14 Chinese; right leaflet first): BM25 15/18 + 13/14, dense 16/18 + 5/14, and this hybrid 16/18 +
13/14 (docs/rag.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from medgpt.rag.bm25 import BM25, default_tokenizer, jieba_available, tokenize
from medgpt.rag.chunk import chunk_segments
from medgpt.rag.loaders import find_documents, load_document
from medgpt.utils import MedGPTError, log, pid_alive

KIND, FORMAT = "medgpt-rag-index", 2  # format 2 = format 1 + "kind"; both load
CHUNKS, META, EMBEDDINGS = "chunks.jsonl", "meta.json", "embeddings.npy"
INDEX_FILES = frozenset({CHUNKS, META, EMBEDDINGS})
_FORMAT1_KEYS = {"format", "settings", "n_chunks", "embedding_dim", "created", "docs"}
_SHOWN = 8
RRF_K = 60
HEADING_WEIGHT = 2
MODES = ("hybrid", "bm25", "dense")


@dataclass
class Hit:
    text: str
    source: str
    line: int
    score: float
    heading: str = ""

    @property
    def where(self) -> str:
        """`file:line` (the line is a page for PDF files, a paragraph for .docx)."""
        return f"{self.source}:{self.line}"


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def passage_text(chunk: dict) -> str:
    """What the embedder sees: the heading path, then the passage (a section title names its topic)."""
    return f"{chunk['heading']}\n{chunk['text']}" if chunk.get("heading") else chunk["text"]


def passage_tokens(chunk: dict, tokenizer: str) -> list[str]:
    """What BM25 sees: the heading's tokens HEADING_WEIGHT times (a title field boost, as in BM25F), then the
    passage's. A query word in the section title says more about the passage than one in passing."""
    return tokenize(chunk.get("heading", ""), tokenizer) * HEADING_WEIGHT + tokenize(chunk["text"], tokenizer)


def _why(path: str, e: Exception) -> str:
    """`path: reason` for a document that cannot be read (most reasons already start with the path)."""
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return reason if reason.startswith(path) else f"{path}: {reason}"


def _nothing_read(paths: list[str], skipped: list[str], empty: int) -> None:
    """Raise why no passage came out: every document empty, or none could be read (name the first few)."""
    if not skipped:
        raise MedGPTError(f"no text found in {', '.join(paths)}: every document is empty. Index documents that "
                          f"contain text (a scanned PDF needs OCR first).")
    shown = "; ".join(why.rstrip(".") for why in skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
    raise MedGPTError(f"no document could be read ({len(skipped)} unreadable, {empty} empty): {shown}. Fix these "
                      f"files (the log lists them all), then index again.")


# ------------------------------------------------------------------------------------------- ownership

def index_format(meta) -> Optional[int]:
    """The format of a meta.json that `medgpt rag index` wrote, else None. Format 1 predates the "kind" key; it is
    recognised by its exact key set (a `medgpt pack` meta.json also says format 1, with other keys)."""
    if not isinstance(meta, dict):
        return None
    if meta.get("kind") == KIND and isinstance(meta.get("format"), int):
        return meta["format"]
    return 1 if meta.get("format") == 1 and set(meta) == _FORMAT1_KEYS else None


def _our_files(d: Path) -> tuple[list[str], Optional[int]]:
    """(names in `d` that an index never holds, the format of its meta.json or None when it is not ours)."""
    foreign = sorted(p.name for p in d.iterdir() if p.name not in INDEX_FILES or p.is_symlink() or not p.is_file())
    try:
        meta = json.loads((d / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = None
    return foreign, index_format(meta)


def _names(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def claim(directory: str | os.PathLike) -> bool:
    """True when `directory` holds an index this command wrote and nothing else, False when it is absent or empty;
    anything else raises. The index dir is replaced whole, and a command deletes only what it can prove it wrote."""
    d = Path(directory)
    fix = ("Nothing was changed. Choose another --rag.index_dir: a new or empty directory, or an index that "
           "`medgpt rag index` wrote (an index directory is replaced whole on every run).")
    if d.is_symlink():
        raise MedGPTError(f"--rag.index_dir {d} is a symbolic link, which replacing the index would replace. Nothing "
                          f"was changed. Point --rag.index_dir at the directory it links to.")
    if not d.exists():
        return False
    if not d.is_dir():
        raise MedGPTError(f"--rag.index_dir {d} exists and is not a directory. {fix}")
    if not any(d.iterdir()):
        return False
    foreign, fmt = _our_files(d)
    if fmt is None:
        what = (f"its {META} was not written by `medgpt rag index`" if (d / META).exists()
                else f"it has no {META}")
        files = f"; it holds {_names(foreign)}" if foreign else ""
        raise MedGPTError(f"--rag.index_dir {d} is not a medgpt knowledge-base index ({what}{files}). {fix}")
    if foreign:
        raise MedGPTError(f"--rag.index_dir {d} holds an index and also files that are not part of it "
                          f"({_names(foreign)}); replacing the index would delete them. {fix} Or move those files "
                          f"out of {d}.")
    return True


def check_apart(index_dir: str | os.PathLike, docs: list[str], paths: list[str]) -> None:
    """Refuse an index dir that is, contains or lies inside a document path (`docs`: the user's specs, `paths`:
    the files they name): replacing the index would delete documents, and the next run would index the index."""
    d = Path(index_dir).resolve()
    for spec in [s for s in docs if os.path.isdir(s)] + list(paths):
        p = Path(spec).resolve()
        how = ("is" if p == d else "lies inside" if p in d.parents else "contains" if d in p.parents else None)
        if how:
            raise MedGPTError(f"--rag.index_dir {index_dir} {how} the document path {spec}: the index directory is "
                              f"replaced whole on every run, which would delete documents, and the next run would "
                              f"index the index itself. Nothing was changed. Choose an --rag.index_dir outside the "
                              f"documents, e.g. outputs/rag/index.")


def clean_leftovers(index_dir: str | os.PathLike) -> list[str]:
    """Remove what a killed run left beside the index: `.NAME.medgpt-PID.XXXXXXXX.tmp` (older medgpt:
    `.NAME.XXXXXXXX.tmp`) and `.NAME.old-PID`, only when that process is gone and the dir holds index files only."""
    d = Path(index_dir)
    if not d.parent.is_dir():
        return []
    own = re.compile(rf"\.{re.escape(d.name)}\.(?:(?:medgpt-(\d+)\.)?[a-z0-9_]{{8}}\.tmp|old-(\d+))")
    removed = []
    for p in sorted(d.parent.iterdir()):
        m = own.fullmatch(p.name)
        pid = m and (m.group(1) or m.group(2))
        if not m or p.is_symlink() or not p.is_dir() or (pid and (int(pid) == os.getpid() or pid_alive(int(pid)))):
            continue
        if all(f.name in INDEX_FILES and f.is_file() and not f.is_symlink() for f in p.iterdir()):
            shutil.rmtree(p)
            removed.append(p.name)
    return removed


class Index:
    """Passages + BM25 (+ embeddings); see the module doc."""

    def __init__(self, chunks: list[dict], meta: dict, embeddings: Optional[np.ndarray] = None):
        self.chunks, self.meta, self.embeddings = chunks, meta, embeddings
        settings = meta["settings"]
        self.tokenizer = settings["tokenizer"]
        self.bm25 = BM25([c["tokens"] for c in chunks], k1=settings["k1"], b=settings["b"])
        self._embedder = None
        self._lock = threading.Lock()
        tokenize("预热", self.tokenizer)  # load jieba's dictionary now (~0.7 s), not inside the first search

    def __len__(self) -> int:
        return len(self.chunks)

    # ------------------------------------------------------------------------------------------------ build

    @classmethod
    def build(cls, docs: list[str], chunk_chars: int = 300, chunk_overlap: int = 1, embedder: Optional[str] = None,
              previous: Optional["Index"] = None, batch_size: int = 32,
              encoding: str = "auto") -> tuple["Index", dict]:
        """Index the documents that `docs` (files, directories, globs) name; `(index, stats)`.

        With `previous` (the index being replaced) built with the same settings, unchanged documents (same path
        and sha256) keep their chunks and embeddings. A document that cannot be read is skipped with a warning
        that says why; only when no document yields text does the build fail. stats: docs, reused, indexed,
        empty, unreadable, removed, chunks, unchanged (True when nothing differs from `previous`).
        """
        from medgpt.rag.dense import embedder_name

        paths = find_documents(docs)
        settings = {"chunk_chars": chunk_chars, "chunk_overlap": chunk_overlap, "tokenizer": default_tokenizer(),
                    "embedder": embedder_name(embedder) if embedder else None, "k1": 1.5, "b": 0.75,
                    "heading_weight": HEADING_WEIGHT, "encoding": encoding}
        same = previous is not None and previous.meta["settings"] == settings
        old_docs = {d["path"]: d for d in previous.meta["docs"]} if same else {}
        old_rows: dict[str, list[int]] = {}
        for i, c in enumerate(previous.chunks if same else []):
            old_rows.setdefault(c["source"], []).append(i)

        chunks: list[dict] = []
        vectors: list[Optional[np.ndarray]] = []
        doc_meta, stats = [], {"docs": len(paths), "reused": 0, "indexed": 0, "empty": 0, "unreadable": 0}
        skipped: list[str] = []
        for path in paths:
            try:
                digest = file_sha256(path)
                old = old_docs.get(path)
                if old is None or old["sha256"] != digest:
                    pieces = chunk_segments(load_document(path, encoding), chunk_chars, chunk_overlap)
            except (MedGPTError, OSError) as e:
                skipped.append(_why(path, e))
                log(f"warning: skipped {skipped[-1]}")
                stats["unreadable"] += 1
                continue
            if old is not None and old["sha256"] == digest:
                rows = old_rows.get(path, [])
                chunks += [previous.chunks[i] for i in rows]
                vectors += [previous.embeddings[i] if previous.embeddings is not None else None for i in rows]
                doc_meta.append(old)
                stats["reused"] += 1
                continue
            if not pieces:
                log(f"warning: {path} has no text; skipped (a scanned PDF needs OCR first)")
                stats["empty"] += 1
                continue
            for p in pieces:
                chunk = {"source": path, "line": p.line, "heading": p.heading, "text": p.text}
                chunk["tokens"] = passage_tokens(chunk, settings["tokenizer"])
                chunks.append(chunk)
                vectors.append(None)
            doc_meta.append({"path": path, "sha256": digest, "bytes": os.path.getsize(path), "chunks": len(pieces)})
            stats["indexed"] += 1
        if not chunks:
            _nothing_read(paths, skipped, stats["empty"])
        stats["removed"] = len(set(old_docs) - {d["path"] for d in doc_meta})
        stats["chunks"] = len(chunks)
        stats["unchanged"] = same and stats["indexed"] == stats["removed"] == stats["empty"] == stats["unreadable"] == 0

        embeddings = None
        if embedder:
            todo = [i for i, v in enumerate(vectors) if v is None]
            if todo:
                from medgpt.rag.dense import Embedder

                t0 = time.perf_counter()
                new = Embedder(embedder).encode([passage_text(chunks[i]) for i in todo], batch_size)
                log(f"embedded {len(todo)} passages in {time.perf_counter() - t0:.1f}s")
                for j, i in enumerate(todo):
                    vectors[i] = new[j]
            embeddings = np.stack(vectors).astype(np.float32)
        meta = {"kind": KIND, "format": FORMAT, "settings": settings, "n_chunks": len(chunks),
                "embedding_dim": int(embeddings.shape[1]) if embeddings is not None else None,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "docs": doc_meta}
        return cls(chunks, meta, embeddings), stats

    # ---------------------------------------------------------------------------------------- save / load

    def save(self, directory: str | os.PathLike) -> None:
        """Write the index into `directory` as a whole (temp dir + rename): never half-written. The directory
        it replaces must be absent, empty, or an index and nothing else (`claim`)."""
        out = Path(directory)
        claim(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.medgpt-{os.getpid()}.", suffix=".tmp", dir=out.parent))
        try:
            with open(tmp / CHUNKS, "w", encoding="utf-8") as f:
                for c in self.chunks:
                    f.write(json.dumps(c, ensure_ascii=False) + "\n")
            if self.embeddings is not None:
                np.save(tmp / EMBEDDINGS, self.embeddings)
            (tmp / META).write_text(json.dumps(self.meta, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
            if out.exists():
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.replace(out, old)
                try:
                    os.replace(tmp, out)
                except BaseException:
                    os.replace(old, out)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Index":
        d = Path(directory)
        how = f"build it with `medgpt rag index DOCS --rag.index_dir {d}`"
        if not (d / META).exists():
            raise MedGPTError(f"no knowledge-base index in {d} (no {META}); {how}.")
        try:
            meta = json.loads((d / META).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise MedGPTError(f"the index in {d} is damaged ({type(e).__name__}: {e}); re-{how}.") from None
        fmt = index_format(meta)
        if fmt is None:
            raise MedGPTError(f"{d} is not a medgpt knowledge-base index (its {META} was not written by `medgpt rag "
                              f"index`); point --rag.index_dir at an index, or build one with `medgpt rag index DOCS "
                              f"--rag.index_dir NEW_DIR`.")
        if fmt not in (1, FORMAT):
            raise MedGPTError(f"the index in {d} has format {fmt}, this medgpt reads 1 and {FORMAT}; re-{how}.")
        try:
            with open(d / CHUNKS, encoding="utf-8") as f:
                chunks = [json.loads(line) for line in f if line.strip()]
            embeddings = np.load(d / EMBEDDINGS) if meta["settings"].get("embedder") else None
            n_chunks, tokenizer = meta["n_chunks"], meta["settings"]["tokenizer"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise MedGPTError(f"the index in {d} is damaged ({type(e).__name__}: {e}); re-{how}.") from None
        if len(chunks) != n_chunks or (embeddings is not None and len(embeddings) != len(chunks)):
            raise MedGPTError(f"the index in {d} is inconsistent ({len(chunks)} passages, meta.json says "
                              f"{n_chunks}); re-{how}.")
        if tokenizer == "jieba" and not jieba_available():
            raise MedGPTError(f"the index in {d} was built with jieba (Chinese word segmentation), which is not "
                              f"installed here: pip install 'medgpt[rag]', or re-{how}.")
        return cls(chunks, meta, embeddings)

    # ---------------------------------------------------------------------------------------------- search

    def embedder(self):
        """The index's own embedder, loaded on first use (queries must be embedded by the model that built it)."""
        with self._lock:
            if self._embedder is None:
                from medgpt.rag.dense import Embedder

                self._embedder = Embedder(self.meta["settings"]["embedder"])
            return self._embedder

    def _hit(self, i: int, score: float) -> Hit:
        c = self.chunks[i]
        return Hit(c["text"], c["source"], int(c["line"]), float(score), c.get("heading", ""))

    def search(self, query: str, k: int = 5, mode: str = "hybrid") -> list[Hit]:
        """The k best passages for `query`, best first. mode: hybrid (BM25 alone when the index has no
        embeddings, or for a Chinese query with the English-only all-MiniLM-L6-v2), bm25, or dense."""
        from medgpt.rag.dense import covers

        if mode not in MODES:
            raise MedGPTError(f"unknown search mode '{mode}'; use one of {', '.join(MODES)}.")
        has_dense = self.embeddings is not None
        if mode == "dense" and not has_dense:
            raise MedGPTError("this index has no embeddings; rebuild it with --rag.embedder DIR for dense search, "
                              "or search with --rag.mode bm25.")
        if k <= 0 or not self.chunks:
            return []
        depth = max(4 * k, 50)
        rankings: list[list[tuple[int, float]]] = []
        if mode in ("hybrid", "bm25"):
            scores = self.bm25.scores(tokenize(query, self.tokenizer))
            order = np.argsort(-scores, kind="stable")[:depth]
            rankings.append([(int(i), float(scores[i])) for i in order if scores[i] > 0])
        # Hybrid leaves out an English-only embedder for a Chinese query: it would only add noise to BM25.
        if has_dense and (mode == "dense" or (mode == "hybrid" and covers(self.meta["settings"]["embedder"], query))):
            sims = self.embeddings @ self.embedder().encode([query])[0]
            order = np.argsort(-sims, kind="stable")[:depth]
            rankings.append([(int(i), float(sims[i])) for i in order])
        if len(rankings) == 1:
            return [self._hit(i, s) for i, s in rankings[0][:k]]
        fused: dict[int, float] = {}
        for ranking in rankings:
            for rank, (i, _) in enumerate(ranking, 1):
                fused[i] = fused.get(i, 0.0) + 1.0 / (RRF_K + rank)
        best = sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        return [self._hit(i, s) for i, s in best]
