"""Attention over packed rows on CPU: each sample attends to itself only, and nothing is computed across samples.

A packed row holds several samples; their position ids restart at each one (data/prepare.py, `PackedCollator`).
transformers then builds a block-diagonal causal mask and PyTorch's CPU attention kernel computes every query
against every key of the row, masked ones included: a row of two samples of 128 tokens costs 256 x 256 scores
where 2 x 128 x 128 / 2 are needed. `packed_sdpa` runs the kernel once per sample instead, causal, on that
sample's slice: the same softmax over the same keys (tests/test_attention.py checks outputs and gradients against
the masked path), in theory a quarter to an eighth of the scores for two to four samples per row. On SmolLM2-135M
LoRA SFT (about two conversations per 256-token row) it took attention from 10% of a step to 7%, and it lets a
packed batch drop its padding (data/prepare.py, `PackedCollator(flatten=True)`; docs/training.md, "Speed").

It applies only where it pays and is exact: training mode, CPU, no KV cache (queries and keys the same length),
position ids that restart within a row and a mask that is exactly the block-diagonal causal mask of those
samples (checked once per forward). Everything else (generation, evaluation, CUDA, where flash-attention's
variable-length kernels do this already) goes to transformers' own sdpa path unchanged.
"""

from __future__ import annotations

import weakref

import torch

NAME = "medgpt_packed_sdpa"


def _segments(position_ids: torch.Tensor, mask: torch.Tensor | None) -> list[list[tuple[int, int]]] | None:
    """Per row, the (start, end) of each run of consecutive positions, when the rows hold more than one run and
    `mask` is exactly the block-diagonal causal mask of those runs (what transformers builds for packed rows);
    otherwise None, and the masked path runs (a mask that also hides padding or anything else is kept)."""
    if mask is None or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        return None
    rows, width = mask.shape[0], mask.shape[-1]
    if position_ids.shape[0] != rows:
        position_ids = position_ids.expand(rows, -1)
    starts = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1
    starts[:, 0] = True
    if not bool(starts[:, 1:].any()):
        return None
    seq = starts.cumsum(-1)
    expected = (seq[:, :, None] == seq[:, None, :]).tril_()
    if not torch.equal(mask[:, 0], expected):
        return None
    out = []
    for row in starts.tolist():
        cuts = [i for i, s in enumerate(row) if s] + [width]
        out.append(list(zip(cuts[:-1], cuts[1:])))
    return out


_last: tuple = (None, None)  # (weak reference to the mask, its segments): one check per forward, not per layer


def _segments_for(position_ids: torch.Tensor, mask: torch.Tensor | None):
    global _last
    ref, segments = _last
    if mask is not None and ref is not None and ref() is mask:
        return segments
    segments = _segments(position_ids, mask)
    _last = (weakref.ref(mask) if mask is not None else None, segments)
    return segments


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                **kwargs):
    """An attention function for transformers' AttentionInterface (query: batch x heads x length x dim)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    if (module.training and dropout == 0.0 and position_ids is not None and query.device.type == "cpu"
            and query.shape[2] == key.shape[2] == position_ids.shape[-1]):
        segments = _segments_for(position_ids, attention_mask)
        if segments is not None:
            # split/unbind views (their backward is one cat/stack), grouped-query heads shared, not copied
            rows = []
            for row, q, k, v in zip(segments, query.unbind(0), key.unbind(0), value.unbind(0)):
                lengths = [e - s for s, e in row]
                parts = [torch.nn.functional.scaled_dot_product_attention(
                    qs.unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0), is_causal=True, scale=scaling,
                    enable_gqa=qs.shape[0] != ks.shape[0])
                    for qs, ks, vs in zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1))]
                rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
            return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def use_packed_attention(net) -> bool:
    """Switch a model that attends with sdpa to `packed_sdpa` (same masks, so every other input runs as before);
    returns whether it uses it now. Models on another attention implementation are left as they are."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    config = getattr(net, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current != "sdpa":
        return current == NAME
    AttentionInterface.register(NAME, packed_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    net.set_attn_implementation(NAME)
    return config._attn_implementation == NAME
