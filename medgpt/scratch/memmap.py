"""Packed pretraining corpora: flat token files read through np.memmap (written by `medgpt pack`).

A packed dir holds, per split (`train`, `val`):
    <split>.bin        every document's token ids followed by EOS, back to back (uint16 when the vocabulary
                       fits in 65,536 ids (0..65535), else uint32), little-endian
    <split>.idx.npy    uint64 start offset of every document in <split>.bin
and one `meta.json`:
    {"format": "medgpt-bin/1", "dtype": "uint16", "vocab_size": 6400, "eos_token_id": 0,
     "tokenizer": "<path or hub id>", "splits": {"train": {"file": "train.bin", "tokens": N, "documents": D,
     "sha256": "..."}, "val": {...}}}

Batches are random windows read through a *fresh* memmap each time (as nanoGPT does): a long-lived memmap
keeps every page it touched in the process's memory accounting, which on a corpus of tens of GB looks like a leak.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medgpt.utils import MedGPTError

FORMAT = "medgpt-bin/1"
META = "meta.json"


def is_packed_dir(path: str | Path) -> bool:
    return (Path(path) / META).is_file()


def dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"


def load_meta(path: str | Path, check_size: bool = True) -> dict:
    """meta.json of a packed dir, checked against the files on disk (a clear error for any mismatch)."""
    root = Path(path)
    meta_path = root / META
    if not meta_path.is_file():
        raise MedGPTError(f"{root} is not a packed corpus (no {META}). Create one with `medgpt pack`.")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MedGPTError(f"{meta_path}:{e.lineno}: not valid JSON ({e.msg}). Re-run `medgpt pack`.") from None
    if meta.get("format") != FORMAT or meta.get("dtype") not in ("uint16", "uint32"):
        raise MedGPTError(f"{meta_path}: unknown format {meta.get('format')!r} / dtype {meta.get('dtype')!r}; "
                          f"expected {FORMAT} with uint16 or uint32. Re-run `medgpt pack`.")
    itemsize = np.dtype(meta["dtype"]).itemsize
    splits = meta.get("splits")
    if not isinstance(splits, dict) or not splits or not all(
            isinstance(i, dict) and isinstance(i.get("file"), str) and isinstance(i.get("tokens"), int)
            for i in splits.values()):
        raise MedGPTError(f"{meta_path}: 'splits' must map each split to {{\"file\": ..., \"tokens\": N, ...}}; "
                          f"got {splits!r:.200}. Re-run `medgpt pack`.")
    for split, info in splits.items():
        f = root / info["file"]
        if not f.is_file():
            raise MedGPTError(f"{meta_path}: split '{split}' names {f.name}, which is missing. Re-run `medgpt pack`.")
        if check_size and f.stat().st_size != info["tokens"] * itemsize:
            raise MedGPTError(
                f"{f}: {f.stat().st_size} bytes, but {META} says {info['tokens']} {meta['dtype']} tokens "
                f"({info['tokens'] * itemsize} bytes). The file was truncated or packed with other settings; "
                f"re-run `medgpt pack`.")
    return meta


def open_split(path: str | Path, split: str, meta: dict | None = None) -> np.memmap:
    meta = meta or load_meta(path)
    if split not in meta["splits"]:
        raise MedGPTError(f"{path} has no '{split}' split (it has: {', '.join(meta['splits'])}).")
    info = meta["splits"][split]
    return np.memmap(Path(path) / info["file"], dtype=meta["dtype"], mode="r", shape=(info["tokens"],))


def check_block(path: str | Path, split: str, block_size: int, meta: dict | None = None) -> None:
    meta = meta or load_meta(path)
    n = meta["splits"].get(split, {}).get("tokens", 0)
    if n <= block_size:
        raise MedGPTError(f"{path}: the '{split}' split holds {n} tokens, not more than one context of "
                          f"{block_size}. Pack more text, or lower --train.max_length.")


def random_windows(path: str | Path, split: str, block_size: int, batch_size: int, rng: np.random.Generator,
                   meta: dict | None = None):
    """(x, y) int64 tensors of shape [batch, block]: random windows, y shifted by one token."""
    import torch

    data = open_split(path, split, meta)  # fresh memmap per batch, see the module docstring
    # A window needs block_size + 1 tokens (x and y shifted by one): the last start is len - block_size - 1.
    starts = rng.integers(0, len(data) - block_size, size=batch_size)
    x = np.stack([data[s:s + block_size].astype(np.int64) for s in starts])
    y = np.stack([data[s + 1:s + 1 + block_size].astype(np.int64) for s in starts])
    del data
    return torch.from_numpy(x), torch.from_numpy(y)
