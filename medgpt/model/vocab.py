"""Vocabulary changes: grow a model's embedding table to match a tokenizer with added tokens.

New rows start at the mean of the existing rows (not random): a new token then begins as an "average" token,
which keeps the first steps' loss close to the old model's instead of spiking (Hewitt, "Initializing New Word
Embeddings for Pretrained Language Models", 2021). `init_rows` lets a caller seed rows from better sources,
such as the mean of the sub-tokens a new word used to be split into.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch


@torch.no_grad()
def resize_embeddings(model, new_size: int, init_rows: Mapping[int, Sequence[int]] | None = None) -> int:
    """Resize input (and untied output) embeddings to `new_size` rows; returns the number of rows added.

    init_rows: {new_id: [old ids]} -> that new row is the mean of those old rows (input and output tables).
    """
    old_size = model.get_input_embeddings().weight.shape[0]
    if new_size <= old_size:
        return 0
    model.resize_token_embeddings(new_size, mean_resizing=False)
    tables = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != tables[0].data_ptr():
        tables.append(out.weight)
    for w in tables:
        mean = w[:old_size].float().mean(dim=0)
        w[old_size:] = mean.to(w.dtype)
        for new_id, old_ids in (init_rows or {}).items():
            if old_ids:
                w[new_id] = w[list(old_ids)].float().mean(dim=0).to(w.dtype)
    model.config.vocab_size = new_size
    return new_size - old_size
