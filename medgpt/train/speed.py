"""Training speed: what every trainer stage measures (tokens/s, MFU) and the one CPU fix of TRL's loss path.

Throughput. `instrument(trainer)` counts the tokens of every training batch as the Trainer hands it to the model:
real tokens (not padding) and trained tokens (those with a label, or a completion token of a preference pair).
tokens/s, trained tokens/s and MFU go into every logged line (progress bar, TensorBoard) and into metrics.json.
The clock starts after the first optimizer step (lazy initialisation, thread pools and allocator warm-up are not
training speed) and stops at the last one.

MFU = model FLOPs per second / this machine's matmul peak (`matmul_peak`, measured at the start in the training
dtype, --train.peak_seconds; a CPU has no datasheet peak). Model FLOPs count only work the step needs
(PaLM, appendix B, https://arxiv.org/abs/2204.02311), per real token:
  - each weight a token multiplies through: 2 FLOPs forward, 2 for the input gradient, 2 more for the weight
    gradient when that weight trains (so 6N for full fine-tuning, 4N for the frozen base under LoRA);
  - the output head only at trained positions (its logits are needed nowhere else; see below);
  - attention: 6 x layers x hidden x the mean sequence length (causal: a token attends to half its sequence on
    average; a packed row's samples attend only to themselves, model/attention.py, so a sample is the sequence).

Compact head on CPU. TRL computes the loss through a fused, chunked LM head that scores only the positions whose
label trains, but only on Triton devices (elsewhere it scores every position, to keep tile shapes fixed for
compilers). On CPU there is nothing to recompile, and the head is a large share of a small model: SmolLM2-135M
has a 49k-word vocabulary (28M of its 135M weights) and the fused head recomputes the logits in its backward, so
scoring every position of a batch where 43% of the tokens train is about a fifth of the step.
`compact_lm_head()` makes TRL score only the trained positions on CPU too; the loss and the gradients are the same
(tests/test_speed.py).
"""

from __future__ import annotations

import time
import types
from collections.abc import Mapping
from functools import lru_cache

from medgpt.utils import log

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- the compact head


def compact_lm_head() -> bool:
    """Score only trained positions in TRL's fused LM head on CPU as well (see the module docstring). TRL decides
    with `trl.trainer.utils._use_triton(device)` where it builds the head's input; the kernels choose Triton or
    torch with their own module's function, which stays untouched. Returns whether the patch is in place (False
    when this TRL has no such hook: nothing changes then)."""
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:
        return False
    original = getattr(trl_utils, "_use_triton", None)
    if original is None:
        return False
    if getattr(original, "medgpt_compact", False):
        return True

    def compact(device) -> bool:
        return device.type == "cpu" or original(device)

    compact.medgpt_compact = True
    trl_utils._use_triton = compact
    return True


# ----------------------------------------------------------------------------- the peak


@lru_cache(maxsize=None)
def matmul_peak(device, dtype, seconds: float, n: int = 2048) -> float:
    """FLOP/s of a [n x n] @ [n x n] matmul in `dtype`, measured for about `seconds` on this machine (once per
    process and setting: a pipeline's stages share it)."""
    import torch

    gen = torch.Generator(device).manual_seed(0)  # its own generator: training's RNG streams stay untouched
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=gen) for _ in range(2))
    c = torch.empty(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.matmul(a, b, out=c)  # warm-up: kernel choice, thread pool
    sync()
    chunk = 20 if device.type == "cuda" else 1  # GPU launches are asynchronous: sync per chunk, not per matmul
    times, start = [], time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        for _ in range(chunk):
            torch.matmul(a, b, out=c)
        sync()
        times.append((time.perf_counter() - t) / chunk)
    # the median matmul: what the machine sustains, not dragged down by a stray interruption
    return 2 * n ** 3 / sorted(times)[len(times) // 2]


def measured_peak(device, dtype, seconds: float) -> float | None:
    """This machine's matmul peak in FLOP/s (what MFU is measured against), or None when not measured."""
    peak = matmul_peak(device, dtype, float(seconds)) if seconds > 0 else None
    if peak:
        log(f"matmul peak on this machine: {peak / 1e9:,.1f} GFLOP/s ({dtype}, {device.type})")
    return peak


# ----------------------------------------------------------------------------- model FLOPs


def model_flops(model) -> dict[str, int]:
    """The FLOPs of one real token through the body, of one trained token through the head, and the attention
    factor (times the mean row length), for the model as it trains (full or with a frozen base)."""
    head = model.get_output_embeddings()
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    embed_ids = {id(p) for p in model.get_input_embeddings().parameters()}
    body = head_flops = 0
    for p in model.parameters():
        if id(p) in embed_ids and id(p) not in head_ids or p.dim() < 2:
            continue  # an embedding lookup, a norm or a bias: no matmul
        n = p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)  # 4-bit: two weights per byte
        flops = n * (6 if p.requires_grad else 4)
        if id(p) in head_ids:
            head_flops += flops
        else:
            body += flops
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers, hidden = getattr(cfg, "num_hidden_layers", 0), getattr(cfg, "hidden_size", 0)
    return {"body": body, "head": head_flops, "attention": 6 * layers * hidden}


# ----------------------------------------------------------------------------- counting


def batch_tokens(inputs) -> tuple[int, int] | None:
    """(real, trained) tokens of one batch as a trainer receives it; None for a batch this cannot read (the
    prompts GRPO/RLOO generate from)."""
    if not isinstance(inputs, Mapping) or "input_ids" not in inputs and "chosen_input_ids" not in inputs:
        return None
    real = inputs.get("real_tokens")  # PackedCollator: rows carry no attention mask
    if real is None:
        masks = [v for k, v in inputs.items() if k.endswith("attention_mask") and hasattr(v, "sum")]
        ids = [v for k, v in inputs.items() if k.endswith("input_ids") and hasattr(v, "numel")]
        real = sum(int(m.sum()) for m in masks) if masks else sum(int(x.numel()) for x in ids)
    if "completion_mask" in inputs:
        trained = int(inputs["completion_mask"].sum())
    else:
        labels = [v for k, v in inputs.items() if k.endswith("labels") and hasattr(v, "ne")]
        trained = sum(int(x[:, 1:].ne(IGNORE_INDEX).sum()) for x in labels)
    return int(real), trained


class Throughput:
    """Tokens counted per optimizer step; speeds over the steps after the first (see the module docstring)."""

    def __init__(self, flops: dict[str, int], peak: float | None):
        self.flops, self.peak = flops, peak
        self.real = self.trained = self.rows = self.row_tokens = 0
        self.start: float | None = None
        self.end: float | None = None
        self.steps = 0

    def add(self, counts: tuple[int, int] | None, rows: int) -> None:
        if counts is None or self.start is None:
            return  # the first step warms up; it is not counted
        self.real += counts[0]
        self.trained += counts[1]
        self.rows += rows

    def step_done(self) -> None:
        now = time.perf_counter()
        self.steps += 1
        if self.start is None:
            self.start = now
        self.end = now

    def summary(self) -> dict[str, float]:
        """seconds_per_step; tokens_per_second, trained_tokens_per_second, mfu (with the peak and FLOPs it is based
        on) unless no batch could be read (the prompts GRPO/RLOO generate from); {} before two steps."""
        seconds = (self.end or 0) - (self.start or 0)
        if seconds <= 0:
            return {}
        per_step = {"seconds_per_step": round(seconds / (self.steps - 1), 3), "speed_steps": self.steps - 1}
        if not self.real:
            return per_step
        mean_row = self.real / max(self.rows, 1)
        flops = self.real * (self.flops["body"] + self.flops["attention"] * mean_row) + \
            self.trained * self.flops["head"]
        out = {"tokens_per_second": round(self.real / seconds, 1),
               "trained_tokens_per_second": round(self.trained / seconds, 1),
               "model_gflops_per_second": round(flops / seconds / 1e9, 2), **per_step}
        if self.peak:
            out |= {"mfu": round(flops / seconds / self.peak, 4), "peak_gflops": round(self.peak / 1e9, 1)}
        return out


def instrument(trainer, peak_seconds: float) -> Throughput:
    """Count every training batch of `trainer` and add the speeds to its logs (see the module docstring). Batches
    from PackedCollator carry `real_tokens` and `real_samples`, taken out before the model sees them."""
    import torch
    from transformers import TrainerCallback

    model = trainer.model
    param = next(model.parameters())
    dtype = torch.bfloat16 if trainer.args.bf16 else torch.float16 if trainer.args.fp16 else param.dtype
    meter = Throughput(model_flops(model), measured_peak(param.device, dtype, peak_seconds))
    training_step, prediction_step, log_fn = trainer.training_step, trainer.prediction_step, trainer.log

    def counted_training_step(self, model, inputs, *args, **kwargs):
        counts = batch_tokens(inputs)
        if isinstance(inputs, Mapping):
            inputs.pop("real_tokens", None)
            rows = inputs.pop("real_samples", None) or \
                next((len(v) for k, v in inputs.items() if k.endswith("input_ids")), 0)
            meter.add(counts, rows)
        return training_step(model, inputs, *args, **kwargs)

    def uncounted_prediction_step(self, model, inputs, *args, **kwargs):
        if isinstance(inputs, Mapping):
            inputs.pop("real_tokens", None)
            inputs.pop("real_samples", None)
        return prediction_step(model, inputs, *args, **kwargs)

    def log_with_speed(self, logs, *args, **kwargs):
        if "loss" in logs:
            speed = meter.summary()
            logs.update({k: speed[k] for k in ("tokens_per_second", "trained_tokens_per_second", "mfu",
                                               "seconds_per_step") if k in speed})
        return log_fn(logs, *args, **kwargs)

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            meter.step_done()

    trainer.training_step = types.MethodType(counted_training_step, trainer)
    trainer.prediction_step = types.MethodType(uncounted_prediction_step, trainer)
    trainer.log = types.MethodType(log_with_speed, trainer)
    trainer.add_callback(StepClock())
    return meter
