"""Canonical records -> tokenized `datasets.Dataset`s that trainers consume.

Validation happens before this (see validate.load_records), so every record here is well formed. These
functions only tokenize, and report what they had to drop and why.
"""

from __future__ import annotations

from typing import Iterable

from medgpt.data.templates import IGNORE_INDEX, encode
from medgpt.utils import MedGPTError, log


def chat_dataset(records: list[dict], template, tokenizer, max_length: int, what: str = "train"):
    """Records with `messages` -> Dataset(input_ids, labels); conversations too long to keep one whole
    exchange are dropped and counted (they would train nothing)."""
    from datasets import Dataset

    rows, dropped = [], 0
    for rec in records:
        enc = encode(rec["messages"], template, tokenizer, max_length=max_length)
        if enc is None:
            dropped += 1
            continue
        rows.append({"input_ids": enc.input_ids, "labels": enc.labels})
    if dropped:
        log(f"{what}: dropped {dropped} of {len(records)} conversations whose first exchange is longer than "
            f"--train.max_length {max_length} (raise it to keep them)")
    if not rows:
        raise MedGPTError(f"{what}: no conversation fits in --train.max_length {max_length} tokens. "
                          f"Raise --train.max_length.")
    n_trained = sum(sum(1 for x in r["labels"] if x != IGNORE_INDEX) for r in rows)
    n_total = sum(len(r["input_ids"]) for r in rows)
    log(f"{what}: {len(rows)} conversations, {n_total:,} tokens, {n_trained:,} trained ({n_trained / n_total:.0%})")
    return Dataset.from_list(rows)


def text_blocks(texts: Iterable[str], tokenizer, block_size: int):
    """Continued-pretraining blocks: documents joined with EOS, cut into `block_size` pieces (the tail that
    does not fill a block is dropped). Yields lists of ids, so a corpus never has to fit in memory."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise MedGPTError("this tokenizer has no eos token, so documents cannot be separated. Set one in its "
                          "tokenizer_config.json (eos_token).")
    buf: list[int] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
            ids = [tokenizer.bos_token_id] + ids
        buf.extend(ids)
        buf.append(eos)
        while len(buf) >= block_size:
            yield buf[:block_size]
            buf = buf[block_size:]
