"""Pretraining on packed corpora with a plain, nanoGPT-style loop: `medgpt pt` with --model.init (from scratch),
packed dirs in --data.train_files, or a --pt.phases curriculum.

    medgpt pt configs/tiny/pt_scratch.yaml --model.name_or_path out/tokenizer --output_dir out/pt

Recipe: check the packed dirs and the curriculum -> tokenizer (must match the packs) -> start the run -> build a
random-init model (or load a pretrained one) -> AdamW -> loop: LR from the schedule, gradient accumulation over
random windows, clip, step; log, eval, checkpoint -> save a standard HF model dir.

Tokenizer: with --model.init, --model.name_or_path names the TOKENIZER (the output of `medgpt tokenizer train`,
or any model dir, of which only the tokenizer is read); left empty, the tokenizer recorded in the first packed
dir's meta.json is used. The packs' vocab_size and EOS id must match it. A model from scratch trains fully
(--finetune.* does not apply). Without --model.init, --model.name_or_path is a pretrained model as usual
(continued pretraining on packed data, full or LoRA).

Data: a micro-batch is --train.batch_size random windows of --train.max_length tokens from the train split of
one packed dir, drawn by the current phase's weights, through a fresh memmap each time (medgpt.scratch.memmap).
Without --pt.phases the train dirs form one phase weighted by their token counts, lasting --train.max_steps, or
--train.num_epochs x (train tokens / tokens per step) when max_steps is -1. Schedules and phases:
medgpt.scratch.schedule (the WSD decay normally coincides with the last, "anneal", phase).

Eval (every --train.eval_steps and at the end): consecutive windows of the `val` split of every training dir
that has one (or of --data.eval_files), at most --pt.eval_windows each; eval_loss is their token-weighted mean
and perplexity = exp(eval_loss); with several dirs each also gets eval_loss/<dir name>.

Speed: tokens/s over training steps only (eval, saving and the first step's warm-up excluded). MFU = FLOPs per
token (medgpt.scratch.model.flops_per_token) x tokens/s / a matmul peak measured at start on this machine in the
training dtype (--train.peak_seconds; nothing is cached across runs): a datasheet peak does not exist for a CPU
and is rarely reached by any real matmul on a GPU.

metrics.json: train_loss and initial_loss (mean loss of the last and the first logging window), eval_loss,
initial_eval_loss (the untrained model's, measured before step 1 of a fresh run),
perplexity, tokens_seen, tokens_per_second, flops_per_token, peak_gflops, mfu, parameters, global_step.

Checkpoints (every --train.save_steps): checkpoint-N holds the model (safetensors), the tokenizer, optimizer.pt,
rng_state.pth and trainer_state.json (step, tokens seen, the data RNG, history); `.complete` is written last.
--resume continues from the last complete one exactly: the same batches, LR and weights as an unbroken run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medgpt.scratch import memmap
from medgpt.scratch.schedule import (
    SCHEDULES,
    Phase,
    decay_steps,
    lr_multiplier,
    parse_phases,
    phase_index,
    phase_start,
    sample_source,
    total_steps,
    warmup_steps,
)
from medgpt.train import checkpoint as ckpt_kit
from medgpt.train.run import final_save, plot_loss, precision
from medgpt.train.speed import measured_peak
from medgpt.utils import MedGPTError, is_main_process, log, write_json


@dataclass
class Plan:
    phases: list[Phase]
    total: int                  # optimizer steps in the whole run
    metas: dict[str, dict]      # every packed dir used (train and eval) -> its meta.json
    eval_dirs: list[str]
    schedule: str


def plan(cfg) -> Plan:
    """Check the packed data, curriculum and options (meta.json files only: seconds, before anything loads)."""
    data, train, block = cfg.data, cfg.train, cfg.train.max_length
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise MedGPTError("pretraining on packed corpora runs in one process; launch it without torchrun/accelerate "
                          "(raise --train.batch_size or --train.gradient_accumulation_steps to use more tokens).")
    if data.eval_split > 0 or data.streaming:
        raise MedGPTError("--data.eval_split and --data.streaming do not apply to packed corpora: they are always "
                          "read from disk, and `medgpt pack` already holds out the `val` split. Drop those options.")
    if cfg.model.init and cfg.model.adapter:
        raise MedGPTError("--model.adapter cannot go on a model built from scratch (--model.init): drop one of them.")
    precision(train.precision)  # bf16 on a machine without a GPU fails here, before anything is written
    if train.precision == "fp16":
        raise MedGPTError("--train.precision fp16 needs loss scaling, which this loop does not do; use bf16 (GPUs "
                          "since Ampere) or fp32 (auto picks bf16 where the GPU has it, else fp32).")
    schedule = "warmup_stable_decay" if train.lr_scheduler == "auto" else train.lr_scheduler
    if schedule not in SCHEDULES:
        raise MedGPTError(f"--train.lr_scheduler {train.lr_scheduler!r} is not available for pretraining on packed "
                          f"corpora; use auto (= warmup_stable_decay) or one of: {', '.join(SCHEDULES)}.")
    if cfg.pt.phases:
        if data.train_files:
            raise MedGPTError("both --pt.phases and --data.train_files are set. With phases, each phase names its "
                              "own packed dirs: drop --data.train_files (or drop the phases).")
        phases = parse_phases(cfg.pt.phases, memmap.is_packed_dir)
        if train.max_steps > 0 and train.max_steps != total_steps(phases):
            raise MedGPTError(f"--train.max_steps {train.max_steps} disagrees with the phases, which sum to "
                              f"{total_steps(phases)} steps. Drop --train.max_steps (the phases decide) or fix "
                              f"their steps.")
        dirs = list(dict.fromkeys(d for p in phases for d in p.data))
    else:
        if not data.train_files:
            raise MedGPTError("no training data given. Add --data.train_files PACKED_DIR (made by `medgpt pack`), "
                              "or a curriculum in --pt.phases.")
        bad = [p for p in data.train_files if not memmap.is_packed_dir(p)]
        if bad:
            raise MedGPTError(f"{bad[0]} is not a packed corpus (no meta.json). Training from scratch (or mixing "
                              f"with packed dirs) reads corpora packed by `medgpt pack`: pack it first. Text files "
                              f"train a pretrained model, without --model.init.")
        phases, dirs = [], list(dict.fromkeys(data.train_files))
    metas = {d: memmap.load_meta(d) for d in dirs}
    for d in dirs:
        memmap.check_block(d, "train", block, metas[d])

    if data.eval_files:
        for d in data.eval_files:
            if not memmap.is_packed_dir(d):
                raise MedGPTError(f"--data.eval_files {d} is not a packed corpus (no meta.json); with packed "
                                  f"training data, eval reads the `val` split of packed dirs.")
            metas.setdefault(d, memmap.load_meta(d))
            memmap.check_block(d, "val", block, metas[d])
        eval_dirs = list(dict.fromkeys(data.eval_files))
    else:
        eval_dirs = []
        for d in dirs:
            val = metas[d]["splits"].get("val", {}).get("tokens", 0)
            if val > block:
                eval_dirs.append(d)
            elif val:  # a small corpus: train on it anyway, without the eval it cannot give
                log(f"warning: {d}: the val split holds {val} tokens, not more than one context of {block}; it is "
                    f"left out of eval (pack with a larger --pack.val_fraction to evaluate it)")

    if not phases:
        per_step = train.batch_size * train.gradient_accumulation_steps * block
        tokens = sum(metas[d]["splits"]["train"]["tokens"] for d in dirs)
        steps = train.max_steps if train.max_steps > 0 else math.ceil(train.num_epochs * tokens / per_step)
        if steps <= 0:
            raise MedGPTError("no training steps: set --train.max_steps N (or a positive --train.num_epochs).")
        phases = [Phase("train", steps, {d: float(metas[d]["splits"]["train"]["tokens"]) for d in dirs})]
    if cfg.model.init:
        from medgpt.scratch.model import check_arch

        check_arch(cfg.arch)
        context = cfg.arch.max_position_embeddings or block
        if context < block:
            raise MedGPTError(f"--train.max_length {block} is longer than the model's context "
                              f"--arch.max_position_embeddings {context}. Raise the context or lower max_length.")
    return Plan(phases, total_steps(phases), metas, eval_dirs, schedule)


def check_vocab(tokenizer, metas: dict[str, dict], source: str) -> None:
    """The packs must have been made with this tokenizer: same vocabulary size, same EOS between documents."""
    sizes = {len(tokenizer), tokenizer.vocab_size}
    for d, meta in metas.items():
        if meta.get("vocab_size") not in sizes or meta.get("eos_token_id") != tokenizer.eos_token_id:
            raise MedGPTError(
                f"{d} was packed with a tokenizer of {meta.get('vocab_size')} tokens and EOS id "
                f"{meta.get('eos_token_id')} ({meta.get('tokenizer') or 'unknown'}), but the tokenizer here "
                f"({source}) has {len(tokenizer)} tokens and EOS id {tokenizer.eos_token_id}: its ids would mean "
                f"other words. Pack the corpus again with this tokenizer (`medgpt pack`), or pass the tokenizer it "
                f"was packed with to --model.name_or_path.")


def tokenizer_source(cfg, p: Plan) -> str:
    if cfg.model.name_or_path:
        return cfg.model.name_or_path
    first = next(iter(p.metas))
    recorded = p.metas[first].get("tokenizer")
    if not recorded:
        raise MedGPTError(f"no tokenizer given and {first}/meta.json records none. Add --model.name_or_path "
                          f"TOKENIZER_DIR (the tokenizer the corpus was packed with).")
    return recorded


def cross_entropy(model, x, y, amp, reduction: str = "mean"):
    import torch.nn.functional as F

    with amp:
        logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction=reduction)


def evaluate(model, p: Plan, block: int, batch_size: int, max_windows: int, device, amp) -> dict[str, float]:
    """{"eval_loss", "perplexity"} (+ "eval_loss/<dir>" with several dirs) over consecutive val windows."""
    import torch

    model.eval()
    out, total, count = {}, 0.0, 0
    with torch.no_grad():
        for d in p.eval_dirs:
            data = memmap.open_split(d, "val", p.metas[d])
            n = min((len(data) - 1) // block, max_windows)
            loss = 0.0
            for i in range(0, n, batch_size):
                rows = range(i, min(i + batch_size, n))
                x = np.stack([data[j * block:(j + 1) * block] for j in rows]).astype(np.int64)
                y = np.stack([data[j * block + 1:(j + 1) * block + 1] for j in rows]).astype(np.int64)
                loss += cross_entropy(model, torch.from_numpy(x).to(device), torch.from_numpy(y).to(device), amp,
                                      reduction="sum").item()
            del data
            out[f"eval_loss/{Path(d).name or d}"] = loss / (n * block)
            total, count = total + loss, count + n * block
    model.train()
    if len(p.eval_dirs) == 1:
        out = {}
    out["eval_loss"] = total / count
    out["perplexity"] = math.exp(out["eval_loss"]) if out["eval_loss"] < 700 else float("inf")
    return out


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(out: Path, model, tokenizer, optimizer, state: dict, rng, keep: int) -> None:
    """checkpoint-N (train/checkpoint.py): weights, tokenizer, optimizer, RNGs, the loop state and the data
    sampler's position."""
    def save_models(ckpt: Path) -> None:
        model.save_pretrained(ckpt)
        tokenizer.save_pretrained(ckpt)

    ckpt_kit.save_checkpoint(out, state["step"], save_models, optimizer,
                             {**state, "data_rng": rng.bit_generator.state}, keep)


def load_checkpoint(ckpt: Path, model, optimizer, rng, device) -> dict:
    """Weights, optimizer, RNGs and the loop state of checkpoint-N, back into the objects of this run."""
    ckpt_kit.load_weights(model, ckpt)
    state = ckpt_kit.load_checkpoint(ckpt, optimizer, device)
    rng.bit_generator.state = state.pop("data_rng")
    return state


# ----------------------------------------------------------------------------- the run

def build(cfg, tokenizer, context: int):
    """A random-init model from --model.init + --arch.*, or the pretrained --model.name_or_path."""
    from medgpt.scratch.model import build_model, model_config

    if not cfg.model.init:
        from medgpt.model.load import load_model

        return load_model(cfg.model, cfg.finetune, gradient_checkpointing=cfg.train.gradient_checkpointing,
                          vocab_size=len(tokenizer))
    config = model_config(cfg.model.init, cfg.arch, vocab_size=len(tokenizer), context=context,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id)
    model = build_model(config, cfg.train.seed)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def describe(model, n: dict, flops: int) -> None:
    c = model.config
    tied = n["matmul"] == n["total"]
    log(f"model: {c.model_type}, {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads "
        f"({c.num_key_value_heads} kv), vocab {c.vocab_size}: {n['total']:,} parameters, embedding {n['embedding']:,} "
        f"= {100 * n['embedding'] / n['total']:.1f}%{' (tied with the output head)' if tied else ''}; "
        f"{flops / 1e6:.2f} MFLOPs per trained token")


def ready_model(cfg, tokenizer, src: str):
    """(model on its device in train mode, device, dtype, autocast context, parameter counts, FLOPs per token)."""
    import torch

    from medgpt.scratch.model import flops_per_token, parameter_counts

    train, block = cfg.train, cfg.train.max_length
    if cfg.model.init:
        log(f"from scratch: a random-init {cfg.model.init}; tokenizer from {src}")
        if train.learning_rate < 1e-4:
            log(f"warning: --train.learning_rate {train.learning_rate} is a fine-tuning rate; small models trained "
                f"from scratch usually peak around 1e-3.")
    model = build(cfg, tokenizer, context=cfg.arch.max_position_embeddings or block)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    bf16 = precision(train.precision)["bf16"]  # auto on a GPU without bf16 gives fp16: trained in fp32 here
    dtype = torch.bfloat16 if bf16 else torch.float32
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
    counts = parameter_counts(model)
    flops = flops_per_token(counts["matmul"], model.config.num_hidden_layers, model.config.hidden_size, block)
    describe(model, counts, flops)
    return model, device, dtype, amp, counts, flops


def eval_into(state: dict, step: int, model, p: Plan, cfg, device, amp, writer=None) -> str:
    """Evaluate on the val splits, append to the history (and TensorBoard); the line to print."""
    ev = evaluate(model, p, cfg.train.max_length, cfg.train.eval_batch_size, cfg.pt.eval_windows, device, amp)
    state["history"].append({"step": step, **ev})
    ckpt_kit.add_scalars(writer, "eval", {k.removeprefix("eval_"): v for k, v in ev.items()}, step)
    return f"step {step}: eval loss {ev['eval_loss']:.4f}, perplexity {ev['perplexity']:.2f}"


def adamw(model, train, device):
    """(trained parameters, AdamW) with weight decay on matrices only: biases and norm gains are few and decaying
    them only hurts (nanoGPT)."""
    import torch

    params = [q for q in model.parameters() if q.requires_grad]
    groups = [{"params": [q for q in params if q.dim() >= 2], "weight_decay": train.weight_decay},
              {"params": [q for q in params if q.dim() < 2], "weight_decay": 0.0}]
    return params, torch.optim.AdamW(groups, lr=train.learning_rate, betas=(0.9, 0.95), eps=1e-8,
                                     fused=device.type == "cuda")


def train_step(forward, optimizer, params, phase, metas, rng, train, device, amp) -> float:
    """One optimizer step over gradient_accumulation_steps micro-batches drawn from the phase's mix; the loss."""
    import torch

    accum, block = train.gradient_accumulation_steps, train.max_length
    loss = torch.zeros((), device=device)
    for _ in range(accum):
        d = sample_source(phase, rng)
        x, y = memmap.random_windows(d, "train", block, train.batch_size, rng, metas[d])
        micro = cross_entropy(forward, x.to(device), y.to(device), amp)
        (micro / accum).backward()
        loss += micro.detach() / accum
    if train.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()  # .item() waits for the GPU, so the caller's step time is real


def pretrain(cfg) -> int:
    """From-scratch / packed-data pretraining; see the module docstring."""
    p = plan(cfg)  # data first: a bad dir or phase fails in seconds, before the model loads
    from medgpt.model.load import load_tokenizer
    from medgpt.train import run as R

    src = tokenizer_source(cfg, p)
    tokenizer = load_tokenizer(dataclasses.replace(cfg.model, name_or_path=src))
    check_vocab(tokenizer, p.metas, src)

    import torch
    from tqdm.auto import tqdm

    train, block = cfg.train, cfg.train.max_length
    out = R.start(cfg)
    model, device, dtype, amp, counts, flops = ready_model(cfg, tokenizer, src)

    params, optimizer = adamw(model, train, device)
    rng = np.random.default_rng(train.seed)
    resume = R.resume_checkpoint(cfg, out)
    state = load_checkpoint(Path(resume), model, optimizer, rng, device) if resume else \
        {"step": 0, "tokens": 0, "history": []}
    forward = torch.compile(model) if cfg.pt.compile else model
    peak = measured_peak(device, dtype, cfg.train.peak_seconds)
    writer = ckpt_kit.tensorboard(train, out)

    total, accum = p.total, train.gradient_accumulation_steps
    warm, decay = warmup_steps(train.warmup, total), decay_steps(cfg.pt.decay_fraction, total)
    per_step = train.batch_size * accum * block
    log(f"{total} steps of {per_step:,} tokens ({total * per_step:,} in all); lr {p.schedule}: warmup {warm}, "
        f"peak {train.learning_rate:g}" + (f", decay over the last {decay} to {cfg.pt.min_lr_ratio:g} x peak"
                                           if p.schedule == "warmup_stable_decay" else ""))
    if p.eval_dirs and state["step"] == 0:
        # The untrained model's val loss (about ln(vocab)): the start the curve and metrics.json measure against.
        log(eval_into(state, 0, model, p, cfg, device, amp))
    bar = tqdm(total=total, initial=state["step"], desc="pt", unit="step", disable=not is_main_process())
    current, window, ran, timed_tokens, timed_seconds, started = None, [], 0, 0, 0.0, time.time()
    while state["step"] < total:
        step = state["step"] + 1
        i = phase_index(p.phases, step)
        if i != current:
            current, first = i, phase_start(p.phases, i)
            bar.write(f"phase {i + 1}/{len(p.phases)} '{p.phases[i].name}': steps {first + 1}-"
                      f"{first + p.phases[i].steps} of {total}, data "
                      + ", ".join(f"{d} x{w:g}" for d, w in p.phases[i].data.items()))
        lr = train.learning_rate * lr_multiplier(step, total, warm, decay, cfg.pt.min_lr_ratio, p.schedule)
        for g in optimizer.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        window.append(train_step(forward, optimizer, params, p.phases[i], p.metas, rng, train, device, amp))
        seconds = time.perf_counter() - t0
        state["step"], state["tokens"] = step, state["tokens"] + per_step
        ran += 1
        if ran > 1 or step == total:  # the session's first step carries warm-up costs: not timed
            timed_tokens, timed_seconds = timed_tokens + per_step, timed_seconds + seconds
        tps = timed_tokens / timed_seconds if timed_seconds else per_step / seconds
        bar.update(1)
        bar.set_postfix(loss=f"{window[-1]:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")

        if step % max(train.logging_steps, 1) == 0 or step == total:
            rec = {"step": step, "loss": sum(window) / len(window), "learning_rate": lr, "tokens": state["tokens"],
                   "tokens_per_second": tps, "phase": p.phases[i].name, **({"mfu": flops * tps / peak} if peak else {})}
            window = []
            state["history"].append(rec)
            bar.write(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in rec.items()}))
            ckpt_kit.add_scalars(writer, "train", {**rec, "phase": i}, step)
        if p.eval_dirs and ((train.eval_steps > 0 and step % train.eval_steps == 0) or step == total):
            bar.write(eval_into(state, step, model, p, cfg, device, amp, writer))
        if train.save_steps > 0 and step % train.save_steps == 0 and is_main_process():
            save_checkpoint(out, model, tokenizer, optimizer, state, rng, train.save_total_limit)
    bar.close()
    if writer:
        writer.close()

    if p.eval_dirs and not any("eval_loss" in h for h in state["history"]):
        eval_into(state, state["step"], model, p, cfg, device, amp)  # resumed at the end: eval is still due
    tps = timed_tokens / timed_seconds if timed_seconds else None
    save_final(out, model, tokenizer, state, final_metrics(state, flops, counts, tps, peak, time.time() - started))
    return 0


def save_final(out: Path, model, tokenizer, state: dict, metrics: dict) -> None:
    """The model, tokenizer, trainer_state.json, metrics.json (finite values) and loss.png, all at once."""
    if not is_main_process():
        return
    with final_save(out) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_json(staging / "trainer_state.json", state)
        write_json(staging / "metrics.json", {k: v for k, v in metrics.items() if v is not None and
                                              not (isinstance(v, float) and not math.isfinite(v))})
        plot_loss(state["history"], staging / "loss.png", title=out.name)
    log(f"saved the model, tokenizer, metrics.json, trainer_state.json and loss.png to {out}")


def final_metrics(state: dict, flops: int, counts: dict, tps: float | None, peak: float | None,
                  runtime: float) -> dict:
    """metrics.json of a pretraining run: last and first losses, the last eval, throughput and MFU."""
    history = state["history"]
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    start = next((h["eval_loss"] for h in evals if h["step"] == 0), None)
    evals = [h for h in evals if h["step"] > 0] or evals
    metrics = {"train_loss": losses[-1] if losses else None, "initial_loss": losses[0] if losses else None,
               "initial_eval_loss": start,
               **{k: v for k, v in (evals[-1] if evals else {}).items() if k != "step"},
               "tokens_seen": state["tokens"], "tokens_per_second": tps, "flops_per_token": flops,
               "parameters": counts["total"], "embedding_parameters": counts["embedding"],
               "global_step": state["step"], "train_runtime": runtime}
    if peak:
        metrics["peak_gflops"] = peak / 1e9
        if tps:
            metrics["mfu"] = flops * tps / peak
            log(f"{tps:,.0f} tokens/s; MFU {100 * metrics['mfu']:.1f}% of measured matmul peak "
                f"{peak / 1e9:,.1f} GFLOP/s ({flops / 1e6:.2f} MFLOPs per token)")
    return metrics
