"""model/attention.py: per-sample attention over packed rows gives the masked path's loss and gradients, runs
only where it is exact, and a flattened (padding-free) batch trains exactly like the padded one."""

from __future__ import annotations

import pytest
import torch

from medgpt.data.prepare import PackedCollator
from medgpt.model import attention


def _model(path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
    return model.train()


def _packed_batch(flatten=False):
    g = torch.Generator().manual_seed(1)
    rows = []
    for lengths in ([5, 9, 3], [12], [4, 4, 6]):
        ids = torch.randint(3, 200, (sum(lengths),), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids, "seq_lengths": lengths})
    return PackedCollator(0, real_tokens=True, flatten=flatten)(rows)


def _loss_and_grads(model, batch):
    model.zero_grad()
    batch = {k: v for k, v in batch.items() if k not in ("real_tokens", "real_samples")}
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    assert a[1].keys() == b[1].keys() and a[1]
    for name, grad in a[1].items():
        torch.testing.assert_close(b[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture()
def calls(monkeypatch):
    """The segments each per-sample attention call covered (empty when the masked path ran)."""
    seen = []
    segments = attention._segments
    monkeypatch.setattr(attention, "_segments", lambda p, m: seen.append(r := segments(p, m)) or r)
    return seen


def test_per_sample_attention_matches_the_masked_path(tiny_llama, calls):
    model = _model(tiny_llama)
    batch = _packed_batch()
    masked = _loss_and_grads(model, batch)
    assert attention.use_packed_attention(model) and attention.use_packed_attention(model)  # idempotent
    assert model.config._attn_implementation == attention.NAME
    per_sample = _loss_and_grads(model, batch)
    _assert_same(masked, per_sample)
    # one check per forward (not per layer); the padding of the short rows is its own block
    assert calls == [[[(0, 5), (5, 14), (14, 17)], [(0, 12), (12, 17)], [(0, 4), (4, 8), (8, 14), (14, 17)]]]


def test_a_flattened_batch_trains_like_the_padded_one(tiny_llama):
    model = _model(tiny_llama)
    attention.use_packed_attention(model)
    padded, flat = _packed_batch(), _packed_batch(flatten=True)
    assert flat["input_ids"].shape == (1, 43) and padded["input_ids"].shape == (3, 17)
    assert flat["real_tokens"] == padded["real_tokens"] == 43 and flat["real_samples"] == padded["real_samples"] == 7
    assert flat["position_ids"][0].tolist() == [*range(5), *range(9), *range(3), *range(12), *range(4), *range(4),
                                               *range(6)]
    assert (flat["labels"] != -100).sum() == (padded["labels"] != -100).sum() == 43 - 7
    _assert_same(_loss_and_grads(model, padded), _loss_and_grads(model, flat))


def test_other_inputs_take_the_masked_path(tiny_llama, calls):
    model = _model(tiny_llama)
    attention.use_packed_attention(model)
    ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(2))
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]] * 2)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # a padding mask beside restarting positions: the mask decides, as in transformers
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=pos, attention_mask=mask).logits
        model.config._attn_implementation = "sdpa"
        ref = model(input_ids=ids, position_ids=pos, attention_mask=mask).logits
    torch.testing.assert_close(out, ref)
    assert calls and all(c is None for c in calls)
    model.config._attn_implementation = attention.NAME
    calls.clear()
    model.eval()  # generation and evaluation never take the per-sample path
    with torch.no_grad():
        model(input_ids=ids, position_ids=pos)
    assert calls == []


def test_other_attention_implementations_are_left_alone(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="eager")
    assert not attention.use_packed_attention(model) and model.config._attn_implementation == "eager"
