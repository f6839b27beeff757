"""train/speed.py: the compact LM head changes no loss or gradient; tokens and MFU are counted from real batches."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BatchEncoding

from medgpt.data.prepare import PackedCollator
from medgpt.train import speed


def _loss_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch, fused_lm_head=True)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compact_head_scores_only_trained_positions_and_changes_nothing(tiny_llama, monkeypatch):
    from transformers import AutoModelForCausalLM
    from trl.trainer import utils as trl_utils
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    add_fused_lm_head(model)
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :15] = -100  # 9 of 24 positions train, as in a chat batch
    batch = {"input_ids": ids, "labels": labels}
    monkeypatch.setattr(trl_utils, "_use_triton", trl_utils._use_triton)  # restored after the test
    full_loss, full_grads = _loss_and_grads(model, batch)

    seen = []
    chunked = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply",
                        lambda hidden, *a: seen.append(hidden.shape[0]) or chunked(hidden, *a))
    assert speed.compact_lm_head() and speed.compact_lm_head()  # idempotent
    compact_loss, compact_grads = _loss_and_grads(model, batch)
    assert seen == [2 * 9]  # only the positions whose next token trains reach the head (was 2 x 23)
    torch.testing.assert_close(compact_loss, full_loss, rtol=1e-5, atol=1e-6)
    assert compact_grads.keys() == full_grads.keys() and full_grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(compact_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_batch_tokens_reads_every_batch_shape():
    packed = PackedCollator(0, real_tokens=True)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7],
                                                   "seq_lengths": [3]}, {"input_ids": [5], "labels": [5]}])
    assert speed.batch_tokens(packed) == (4, 2)  # padding is not a real token; the first token never trains
    padded = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1, 0]] * 2),
              "labels": torch.tensor([[-100, 1, 1, -100]] * 2)}
    assert speed.batch_tokens(padded) == (6, 4)
    # transformers' own collators (DataCollatorForSeq2Seq, DataCollatorWithPadding) hand over a BatchEncoding,
    # which is a Mapping but not a dict
    assert speed.batch_tokens(BatchEncoding(padded)) == (6, 4)
    pairs = {"input_ids": torch.ones(2, 3), "attention_mask": torch.ones(2, 3), "completion_mask": torch.tensor(
        [[0, 1, 1], [0, 0, 1]])}
    assert speed.batch_tokens(pairs) == (6, 3)
    assert speed.batch_tokens([{"prompt": "x"}]) is None


def test_throughput_skips_the_first_step_and_counts_flops():
    meter = speed.Throughput({"body": 100, "head": 10, "attention": 1}, peak=1e3)
    meter.add((50, 5), 1)  # first step: not counted
    meter.step_done()
    assert meter.summary() == {}
    meter.step_done()
    meter.end = meter.start + 3.0
    assert meter.summary() == {"seconds_per_step": 3.0, "speed_steps": 1}  # no batch read (GRPO's prompts)
    meter.add((40, 20), 2)
    meter.step_done()
    meter.end = meter.start + 4.0
    s = meter.summary()
    assert s["seconds_per_step"] == 2.0
    assert s["tokens_per_second"] == 10 and s["trained_tokens_per_second"] == 5
    flops = 40 * (100 + 1 * 20) + 20 * 10  # mean row 20 tokens
    assert s["model_gflops_per_second"] == round(flops / 4 / 1e9, 2) and s["mfu"] == round(flops / 4 / 1e3, 4)


def test_model_flops_of_lora_and_full(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    full = speed.model_flops(model)
    head = model.get_output_embeddings().weight.numel()
    assert full["head"] == 6 * head
    model.requires_grad_(False)
    frozen = speed.model_flops(model)
    assert frozen["head"] == 4 * head and frozen["body"] * 6 == full["body"] * 4
    assert full["attention"] == 6 * model.config.num_hidden_layers * model.config.hidden_size


@pytest.mark.parametrize("packing", ["true", "false"])
def test_sft_reports_tokens_per_second_and_mfu(tiny_llama, tmp_path, packing, monkeypatch):
    from medgpt.cli import main

    rows = []
    collate = PackedCollator.__call__
    monkeypatch.setattr(PackedCollator, "__call__", lambda self, ex: rows.append(self.flatten) or collate(self, ex))
    out = tmp_path / "out"
    assert main(["sft", "--model.name_or_path", str(tiny_llama), "--data.train_files",
                 "data/demo/sft_sharegpt.jsonl", "--data.max_samples", "24", "--template", "chatml",
                 "--train.max_length", "128", "--train.max_steps", "3", "--train.batch_size", "2",
                 "--train.peak_seconds", "0.05", "--sft.packing", packing, "--output_dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tokens_per_second"] > metrics["trained_tokens_per_second"] > 0
    assert 0 < metrics["mfu"] < 1 and metrics["peak_gflops"] > 0 and metrics["speed_steps"] == 2
    if packing == "true":  # on CPU, a batch of packed rows is one padding-free row (model/attention.py)
        assert rows and all(rows)


def test_matmul_peak_is_what_the_machine_sustains_not_dragged_down_by_a_stall(monkeypatch):
    import time

    device = torch.device("cpu")
    steady = speed.matmul_peak.__wrapped__(device, torch.float32, 0.3, n=128)  # not the per-process cache
    matmul, calls = torch.matmul, []

    def stalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            time.sleep(0.2)  # another process took the cores for two thirds of the window
        return matmul(*args, **kwargs)

    monkeypatch.setattr(torch, "matmul", stalled)
    # the mean over the window would be about a third of the steady rate
    assert speed.matmul_peak.__wrapped__(device, torch.float32, 0.3, n=128) > 0.5 * steady
