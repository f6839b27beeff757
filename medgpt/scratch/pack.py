"""Pack text corpora into flat token files for from-scratch pretraining (the format: medgpt/scratch/memmap.py).

    medgpt pack data/demo/pretrain_zh.txt data/demo/pretrain_en.txt --model.name_or_path out/tokenizer \
        --output_dir out/packed --pack.num_proc 4

Recipe: check options -> load tokenizer (dtype, EOS) -> stream documents -> tokenize in batches (optionally in
worker processes, document order kept) -> append every document + EOS to <split>.bin and its start offset to
<split>.idx.npy, hashing the bytes as they go -> rename the finished files -> write meta.json LAST.

Why it is safe to kill: everything is written to hidden temp files in the output dir and renamed at the end,
and meta.json (the only thing a reader trusts, see memmap.load_meta) is written after the renames, atomically.
A run that dies at any point leaves no meta.json, so nothing can train on a half-written corpus; with --overwrite,
the earlier corpus stays whole and readable until the new one is complete, and the next run removes the temp
files of a killed one (utils.remove_stale_temps).

Memory stays bounded whatever the corpus size: records are streamed (`iter_canonical`), at most
2 x num_proc batches of `--pack.batch_docs` documents are in flight, and each batch is written as it arrives.

Choices:
- Text records are packed. Chat and preference files are refused by the data layer with a message naming
  the file: flattening conversations into plain text would silently drop their roles and template, which is
  `medgpt sft`'s business. To pack conversations deliberately (instruction data mixed into the last,
  annealing phase of pretraining, as MiniCPM does), name a chat template with --pack.chat_template: each
  conversation is rendered with it as one document, and its special tokens (<|im_start|>, ...) stay special.
- The val split is decided per document by a keyed hash of its text (`--pack.seed`), so it is reproducible,
  needs no shuffling or second pass, and identical documents always land in the same split (no leakage of
  duplicates from train into val). When the hash leaves one split empty on a small corpus, the last document
  of the other split moves over, so val_fraction > 0 always gives a val split (given two documents).
  With --data.eval_files, those files are the val split instead (whole, in order; no hashing).
- Special-token strings that occur inside a document (a literal "<|endoftext|>" in web text) are tokenized as
  plain text: the only EOS in a packed corpus is the one `pack` appends after each document.
- Tokenization uses the fast tokenizer's Rust batch call directly (what `tokenizer(texts)` does inside,
  without building attention masks), so `pack` and the tokenizer agree id for id.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import deque
from contextlib import closing
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Iterator, Literal, Optional

import numpy as np

from medgpt.args import DataArgs, ModelArgs
from medgpt.config import arg, section
from medgpt.outdir import claim
from medgpt.utils import temp_file


@dataclass
class PackArgs:
    val_fraction: float = arg(0.01, "Share of documents in the val split, picked by a hash of each document "
                              "(reproducible; duplicates share a split). 0: no val split.", min=0, below=1)
    dtype: Literal["auto", "uint16", "uint32"] = arg(
        "auto", "Token dtype of the .bin files: auto picks uint16 when the vocabulary has at most 65,536 ids "
        "(half the disk and I/O), else uint32.")
    num_proc: int = arg(1, "Tokenizer worker processes. Document order is kept: the output is byte-identical "
                        "for any value.", min=1)
    batch_docs: int = arg(1000, "Documents tokenized (and written) per batch.", min=1)
    chat_template: Optional[str] = arg(
        None, "Pack chat data instead of text: each conversation rendered with this template (a name, or "
        "`tokenizer` for the tokenizer's own) is one document, special tokens kept. For an annealing phase.")
    seed: int = arg(0, "Key of the document hash that picks val documents; another seed draws another split.",
                    min=0, max=2**32 - 1)


@dataclass
class Config:
    data: DataArgs = section(DataArgs, "Text to pack: text records (.txt split by --data.text_mode, jsonl "
                             "with a text field, parquet, ...); --data.eval_files, if given, become the val "
                             "split. Chat and preference data are refused.")
    model: ModelArgs = section(ModelArgs, "--model.name_or_path: the tokenizer (a tokenizer or model dir).")
    pack: PackArgs = section(PackArgs)
    output_dir: str = arg("", "Where <split>.bin, <split>.idx.npy and meta.json go.")
    overwrite: bool = arg(False, "Write into a non-empty output_dir (an existing packed corpus there is replaced).")


# ----------------------------------------------------------------------------- tokenizing (also in workers)

class Encoder:
    """Texts -> (tokens with an EOS after each document, tokens per document, is-val flag per document).

    Picklable (the Rust tokenizer pickles as its JSON), so worker processes get an identical copy.
    """

    def __init__(self, backend, eos_id: int, dtype: str, vocab_size: int, val_fraction: float, seed: int,
                 special: bool = False):
        self.eos, self.dtype, self.vocab = eos_id, np.dtype(dtype).newbyteorder("<"), vocab_size
        self.special = special  # rendered conversations: their special-token strings are special tokens
        # Blake2b keyed with the seed; hash values below the threshold go to val.
        self.threshold = int(val_fraction * 2 ** 64)
        self.key = str(seed).encode()[:64]
        self._set_tokenizer(backend.to_str())  # a private copy: the settings below must not leak to the caller

    def _set_tokenizer(self, spec: str) -> None:
        from tokenizers import Tokenizer

        self.spec, self.tok = spec, Tokenizer.from_str(spec)
        # What tokenizer(texts) does when asked for neither truncation nor padding (a tokenizer.json may
        # carry both), and "<|endoftext|>" inside a text is text, not a separator.
        self.tok.no_truncation()
        self.tok.no_padding()
        self.tok.encode_special_tokens = not getattr(self, "special", False)
        self._encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)  # fast: no offsets

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("tok", "_encode")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._set_tokenizer(self.spec)

    def is_val(self, text: str) -> bool:
        h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=self.key).digest()
        return int.from_bytes(h, "little") < self.threshold

    def __call__(self, texts: list[str], val: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`val`: the texts come from --data.eval_files, so all of them go to val."""
        ids = [e.ids for e in self._encode(texts, add_special_tokens=False)]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(chain.from_iterable(ids), dtype=np.uint32, count=int(lengths.sum()))
        flat = np.insert(flat, np.cumsum(lengths), self.eos)  # EOS after each document, in one vectorized pass
        lengths += 1
        if flat.size and int(flat.max()) >= self.vocab:  # len(tokenizer) undercounting would corrupt a uint16 file
            from medgpt.utils import MedGPTError

            raise MedGPTError(f"the tokenizer produced id {int(flat.max())}, outside its vocabulary of {self.vocab} "
                              "(len(tokenizer)); its files disagree. Re-save it with save_pretrained.")
        is_val = (np.full(len(texts), val) if val or not self.threshold
                  else np.fromiter((self.is_val(t) for t in texts), dtype=bool, count=len(texts)))
        return flat.astype(self.dtype), lengths, is_val


_WORKER: Encoder | None = None


def _init_worker(encoder: Encoder) -> None:
    import signal

    global _WORKER
    # Ctrl-C is the parent's to handle (it cancels the pool and cleans up); a worker interrupted while holding
    # the task queue's lock would hang the shutdown instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # num_proc processes already use the cores
    _WORKER = encoder
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    # A parent killed outright (SIGKILL, SIGTERM) cannot stop its pool; without this the workers would wait on
    # the task queue forever.
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _encode_in_worker(batch: tuple[list[str], bool]):
    return _WORKER(*batch)


def encoded_batches(batches: Iterator[tuple[list[str], bool]], encoder: Encoder, num_proc: int) -> Iterator[tuple]:
    """encoder(batch) for every batch, in order; with num_proc > 1 in a pool, at most 2 x num_proc in flight.

    (Pool.imap would read the whole input ahead of the workers: not bounded memory on a huge corpus.)
    """
    if num_proc <= 1:
        yield from (encoder(*batch) for batch in batches)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from medgpt.utils import MedGPTError

    # spawn, not fork: the parent may hold threads (tokenizers, torch) that a forked child would inherit broken.
    # An executor, not a Pool: a worker killed by the OS (out of memory) fails the run instead of hanging it.
    pool = ProcessPoolExecutor(num_proc, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                               initargs=(encoder,))
    try:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.submit(_encode_in_worker, batch))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BaseException as e:
        # Failed, interrupted, or the consumer stopped early: the workers' results are no longer wanted, and
        # waiting for them could hang on a second Ctrl-C. (terminate_workers is Python 3.14's public spelling.)
        terminate = getattr(pool, "terminate_workers", None)
        if terminate is not None:
            terminate()
        else:
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        if isinstance(e, BrokenProcessPool):
            raise MedGPTError(f"a tokenizer worker process died (killed by the system, often for lack of memory). "
                              f"Retry with fewer --pack.num_proc ({num_proc}) or a smaller --pack.batch_docs."
                              ) from None
        raise
    pool.shutdown(wait=True)


# ----------------------------------------------------------------------------- writing

class SplitWriter:
    """Appends documents to hidden temp files in `out`; `commit` renames them to <split>.bin / .idx.npy."""

    def __init__(self, out: Path, split: str, dtype: str):
        self.out, self.split, self.dtype = out, split, dtype
        self.tokens = self.documents = 0
        self.sha = hashlib.sha256()
        self.tmp: list[str] = []
        self.bin = self._temp(f"{split}.bin")
        self.idx = self._temp(f"{split}.idx")  # raw uint64 offsets; the .npy header is added at the end

    def _temp(self, name: str):
        fd, path = temp_file(self.out, name)
        self.tmp.append(path)
        return os.fdopen(fd, "wb")

    def write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        if not len(lengths):
            return
        starts = self.tokens + np.concatenate(([0], np.cumsum(lengths[:-1])))
        data = memoryview(np.ascontiguousarray(tokens)).cast("B")
        self.bin.write(data)
        self.sha.update(data)
        self.idx.write(starts.astype("<u8").tobytes())
        self.tokens += int(lengths.sum())
        self.documents += len(lengths)

    def finish(self) -> dict:
        """Close the temp files (the .npy is built now: its header needs the document count)."""
        for f in (self.bin, self.idx):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        npy = self._temp(f"{self.split}.idx.npy")
        with npy, open(self.tmp[1], "rb") as raw:
            np.lib.format.write_array_header_1_0(npy, {"descr": "<u8", "fortran_order": False,
                                                       "shape": (self.documents,)})
            while chunk := raw.read(1 << 24):
                npy.write(chunk)
            npy.flush()
            os.fsync(npy.fileno())
        return {"file": f"{self.split}.bin", "tokens": self.tokens, "documents": self.documents,
                "sha256": self.sha.hexdigest()}

    def commit(self) -> None:
        umask = os.umask(0)
        os.umask(umask)
        for tmp, name in ((self.tmp[0], f"{self.split}.bin"), (self.tmp[2], f"{self.split}.idx.npy")):
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; a corpus is usually shared
            claim(self.out, name)
            os.replace(tmp, self.out / name)
        self.abort()  # the raw offsets file

    def abort(self) -> None:
        for f in (self.bin, self.idx):
            f.close()
        for path in self.tmp:
            Path(path).unlink(missing_ok=True)


def _batches(records: Iterator[dict], size: int, skipped: list[int], val: bool) -> Iterator[tuple[list[str], bool]]:
    def texts():
        for rec in records:
            if rec["text"].strip():
                yield rec["text"]
            else:
                skipped[0] += 1  # an empty document would pack as a lone EOS
    it = texts()
    while batch := list(islice(it, size)):
        yield batch, val


def _renderer(name: str, tokenizer):
    """messages -> the conversation as the template renders it for training (bos included, as `sft` does)."""
    from medgpt.data.templates import get_template_for, render_text

    template = get_template_for(name, tokenizer)
    return lambda messages: render_text(messages, template, tokenizer)


def _check(cfg: Config) -> None:
    from medgpt.utils import MedGPTError

    p, d = cfg.pack, cfg.data
    if not d.train_files:
        raise MedGPTError("no text to pack. Add --data.train_files FILES (files, globs or directories).")
    if d.eval_split:
        raise MedGPTError("pack holds documents out of --data.train_files with --pack.val_fraction (by a hash of "
                          "each document, so it streams); use that instead of --data.eval_split.")
    if not 0 <= p.val_fraction < 1:
        raise MedGPTError(f"--pack.val_fraction {p.val_fraction} must be in [0, 1), e.g. 0.01.")
    if p.num_proc < 1 or p.batch_docs < 1:
        raise MedGPTError(f"--pack.num_proc ({p.num_proc}) and --pack.batch_docs ({p.batch_docs}) must be >= 1.")


def _checked_tokenizer(cfg: Config):
    """(tokenizer, vocabulary size, id dtype), or a MedGPTError: pack needs a fast tokenizer with an EOS token,
    and ids that fit the dtype."""
    from medgpt.model.load import load_tokenizer
    from medgpt.scratch.memmap import dtype_for
    from medgpt.utils import MedGPTError

    tokenizer = load_tokenizer(cfg.model)
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "backend_tokenizer", None) is None:
        raise MedGPTError(f"pack needs a fast tokenizer (a tokenizer.json); {cfg.model.name_or_path} loads as "
                          f"{type(tokenizer).__name__}. Save it as a PreTrainedTokenizerFast, or train one with "
                          "`medgpt tokenizer train`.")
    if tokenizer.eos_token_id is None:
        raise MedGPTError(f"the tokenizer {cfg.model.name_or_path} has no EOS token, and pack puts one after every "
                          "document so the model learns where texts end. Set eos_token in its "
                          "tokenizer_config.json, or train one with `medgpt tokenizer train`.")
    vocab = len(tokenizer)
    dtype = dtype_for(vocab) if cfg.pack.dtype == "auto" else cfg.pack.dtype
    if np.iinfo(dtype).max < vocab - 1:
        raise MedGPTError(f"--pack.dtype {dtype} holds ids up to {np.iinfo(dtype).max}, but the tokenizer "
                          f"{cfg.model.name_or_path} has {vocab} tokens. Use --pack.dtype uint32 (or auto).")
    return tokenizer, vocab, dtype


def _write_all(results, writers: dict, bar) -> dict:
    """Write every encoded batch to its split; the last document of each split is held back (returned) so that
    it can still move to the other split if the hash left that one empty (see the module docstring)."""
    held: dict[str, np.ndarray | None] = {s: None for s in writers}
    for tokens, lengths, is_val in results:
        ends = np.cumsum(lengths)
        for split in writers:
            sel = is_val if split == "val" else ~is_val
            picked = np.flatnonzero(sel)
            if not picked.size:
                continue
            if held[split] is not None:
                writers[split].write(held[split], np.array([len(held[split])]))
            last = picked[-1]
            held[split] = tokens[ends[last] - lengths[last]:ends[last]].copy()
            sel = sel.copy()
            sel[last] = False
            if sel.any():
                writers[split].write(tokens[np.repeat(sel, lengths)], lengths[sel])
        bar.update(int(ends[-1]))
        bar.set_postfix(docs=f"{sum(w.documents for w in writers.values()):,}", refresh=False)
    return held


def _flush_held(held: dict, writers: dict, fraction: float) -> None:
    """Write the held-back documents; when the hash left a split empty (a tiny corpus), one moves over first."""
    if fraction > 0:
        n_train, n_val = (writers[s].documents + (held[s] is not None) for s in ("train", "val"))
        if n_train == 0 and held["val"] is not None:  # train first: a one-document corpus still trains
            held["train"], held["val"] = held["val"], None
        elif n_val == 0 and n_train >= 2:
            held["val"], held["train"] = held["train"], None
    for split, doc in held.items():
        if doc is not None:
            writers[split].write(doc, np.array([len(doc)]))


def run(cfg: Config) -> int:
    """Tokenize text corpora into <split>.bin + <split>.idx.npy + meta.json (EOS after every document)."""
    from tqdm.auto import tqdm

    from medgpt.config import save_config
    from medgpt.data.validate import iter_canonical
    from medgpt.outdir import abandon, mark_complete, prepare_output_dir
    from medgpt.scratch.memmap import FORMAT, META
    from medgpt.utils import MedGPTError, is_main_process, write_json

    # Everything that can be refused is refused before any output exists.
    _check(cfg)
    tokenizer, vocab, dtype = _checked_tokenizer(cfg)
    # With --overwrite, an earlier corpus here stays whole and readable until the new one is complete: the new
    # files are written as temp files and only replace the old ones at the end (commit).
    out = prepare_output_dir(cfg.output_dir, cfg.overwrite, command="pack")

    p, d = cfg.pack, cfg.data
    fraction = 0.0 if d.eval_files else p.val_fraction  # eval_files, when given, are the val split
    encoder = Encoder(tokenizer.backend_tokenizer, tokenizer.eos_token_id, dtype, vocab, fraction, p.seed,
                      special=p.chat_template is not None)
    skipped = [0]
    render = _renderer(p.chat_template, tokenizer) if p.chat_template else None

    def batches(files: list[str], val: bool):
        records = iter_canonical(files, "chat" if render else "text", format=d.format, columns=d.columns,
                                 encoding=d.encoding, text_mode=d.text_mode, max_samples=d.max_samples,
                                 purpose="pack")
        if render:
            records = ({"text": render(r["messages"])} for r in records)
        return _batches(records, p.batch_docs, skipped, val)

    splits = ["train", "val"] if fraction > 0 or d.eval_files else ["train"]
    writers: dict[str, SplitWriter] = {}
    try:
        writers = {s: SplitWriter(out, s, dtype) for s in splits}
        # The last document of each split is held back until the next batch (or the end), so that one can move
        # to the other split if the hash left that empty (tiny corpora): see the module docstring.
        start = time.perf_counter()
        todo = chain(batches(d.train_files, False), batches(d.eval_files, True) if d.eval_files else ())
        bar = tqdm(unit="tok", unit_scale=True, desc="pack", disable=not is_main_process(), mininterval=1.0)
        with closing(encoded_batches(todo, encoder, p.num_proc)) as results, bar:
            held = _write_all(results, writers, bar)
        _flush_held(held, writers, fraction)
        elapsed = time.perf_counter() - start
        if writers["train"].documents == 0:
            raise MedGPTError(f"no text in {', '.join(d.train_files)}: every record was empty"
                              f"{f' ({skipped[0]} blank documents)' if skipped[0] else ''}. Check the files, "
                              "--data.text_mode, or --data.columns (which field holds the text).")
        infos = {s: w.finish() for s, w in writers.items() if w.documents}
        claim(out, META, "config.yaml")
        (out / META).unlink(missing_ok=True)  # from here until the new meta.json, the dir is no readable corpus
        for s in infos:
            writers[s].commit()
        for s, w in writers.items():
            if s not in infos:
                w.abort()
    except BaseException:
        for w in writers.values():
            w.abort()
        abandon()  # a dir this run created holds nothing worth keeping
        raise

    src = cfg.model.name_or_path
    meta = {"format": FORMAT, "dtype": dtype, "vocab_size": vocab, "eos_token_id": tokenizer.eos_token_id,
            "tokenizer": str(Path(src).resolve()) if Path(src).is_dir() else src,
            "val_fraction": fraction, "seed": p.seed, "splits": infos}
    save_config(cfg, out / "config.yaml")
    write_json(out / META, meta)  # last: its presence means every file it names is complete
    mark_complete(out)  # an earlier corpus's files that this one did not replace (its val split, say) go now

    _log_packed(infos, dtype, elapsed, p.num_proc, skipped[0], out, fraction)
    return 0


def _log_packed(infos: dict, dtype: str, elapsed: float, num_proc: int, skipped: int, out: Path,
                fraction: float) -> None:
    from medgpt.scratch.memmap import META
    from medgpt.utils import log

    total = sum(i["tokens"] for i in infos.values())
    itemsize = np.dtype(dtype).itemsize
    log(f"packed {sum(i['documents'] for i in infos.values())} documents, {total:,} tokens ({dtype}) in "
        f"{elapsed:.2f}s: {total / max(elapsed, 1e-9):,.0f} tokens/s with {num_proc} process(es)"
        f"{f'; skipped {skipped} blank documents' if skipped else ''}")
    for s, i in infos.items():
        log(f"  {s:<5} {i['documents']:>10,} documents {i['tokens']:>14,} tokens {i['tokens'] * itemsize:>14,} bytes"
            f"  {out / i['file']}")
    if fraction > 0 and "val" not in infos:
        log("  no val split: the corpus has a single document, which went to train")
    log(f"  meta  {out / META}")
