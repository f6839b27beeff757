"""Packing: best-fit rows, position ids per sample, and no attention across packed samples."""

from __future__ import annotations

import torch
from datasets import Dataset

from medgpt.data.prepare import PackedCollator, pack


def _ds(lengths):
    rows = []
    for k, n in enumerate(lengths):
        ids = [10 + k] * n
        rows.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return Dataset.from_list(rows)


def test_pack_best_fit_keeps_every_token():
    ds = _ds([7, 5, 4, 3, 2, 1])
    packed = pack(ds, max_length=8)
    assert all(len(r) <= 8 for r in packed["input_ids"])
    assert sorted(t for r in packed["input_ids"] for t in r) == sorted(t for r in ds["input_ids"] for t in r)
    assert len(packed) == 3  # 22 tokens need at least 3 rows of 8
    for row in packed:
        assert sum(row["seq_lengths"]) == len(row["input_ids"])


def test_collator_positions_and_labels():
    batch = PackedCollator(pad_token_id=0)([{"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5],
                                             "seq_lengths": [3, 2]},
                                            {"input_ids": [6, 7], "labels": [6, 7]}])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    # first token of every sample is never a target; padding is never a target
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100, 7, -100, -100, -100]]
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]
    assert "attention_mask" not in batch and batch["use_cache"] is False


def test_packed_logits_equal_separate_logits(tiny_llama):
    """The proof that packing is padding-free *and* isolation-preserving: each sample's logits inside a packed
    row equal its logits when run alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    a, b, c = [5, 6, 7, 8, 9], [11, 12, 13], [20, 21, 22, 23]
    batch = PackedCollator(pad_token_id=0)([{"input_ids": a + b, "labels": a + b, "seq_lengths": [5, 3]},
                                            {"input_ids": c, "labels": c}])
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for row, start, ids in ((0, 0, a), (0, 5, b), (1, 0, c)):
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(packed[row, start:start + len(ids)], alone, atol=1e-5, rtol=1e-5)
        # and the isolation really comes from the position ids: with a KV cache transformers ignores them
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits
        assert not torch.allclose(leaky[0, 5:8], model(input_ids=torch.tensor([b])).logits[0], atol=1e-4)


def test_fit_records_counts_shortened_and_dropped_then_refuses_nothing(capsys):
    """The one drop policy of every stage: rows kept in order, shortened and dropped counted in the log, an error
    (not an empty dataset) when nothing fits."""
    import pytest

    from medgpt.data.prepare import fit_records
    from medgpt.utils import MedGPTError

    fits = {1: ({"n": 1}, ""), 2: ({"n": 2}, "shortened"), 3: (None, ""), 4: ({"n": 4}, "shortened")}
    rows = fit_records([1, 2, 3, 4], fits.get, what="train", unit="pairs", limits="--train.max_length 64")
    assert rows == [{"n": 1}, {"n": 2}, {"n": 4}]
    out = capsys.readouterr().out
    assert "train: 2 of 4 pairs lost their oldest prompt turns to fit --train.max_length 64" in out
    assert "train: dropped 1 of 4 pairs that do not fit --train.max_length 64" in out
    with pytest.raises(MedGPTError, match="eval: none of the 2 pairs fits --train.max_length 64. Raise it."):
        fit_records([3, 3], fits.get, what="eval", unit="pairs", limits="--train.max_length 64")
