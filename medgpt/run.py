"""A training run's lifecycle, shared by every stage as plain functions: start, trainer arguments, checkpoints
that resume safely, and the artifacts every output dir holds (weights, tokenizer, config.yaml, metrics.json,
loss.png, TensorBoard logs under runs/).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from medgpt.config import save_config, to_dict
from medgpt.utils import MedGPTError, atomic_write, is_main_process, log, prepare_output_dir, write_json

COMPLETE = ".complete"  # written into checkpoint-N once everything in it is on disk


# ----------------------------------------------------------------------------- start

def start(cfg) -> Path:
    """Prepare the output dir, seed everything, save and print the resolved config."""
    import torch
    from transformers import set_seed

    # Tiny numbers (denormals, < 1.2e-38) are computed in slow microcode on x86 CPUs; as training shrinks weights,
    # gradients and Adam's moments they appear, and CPU training slows down by a third (the demo pretrain went
    # from 10k to 6.5k tokens/s within 400 steps; benchmarks/cpu_denormals.py: 1.43x, same loss). Flushing them
    # to zero keeps the first speed. The flag is per thread and torch's worker threads inherit it when they are
    # created, so it is set here, before any model work starts them.
    torch.set_flush_denormal(True)
    # Only rank 0 judges whether the dir is empty: the others could already see its config.yaml and refuse.
    # When rank 0 refuses, the launcher (torchrun, accelerate) stops the other ranks.
    out = prepare_output_dir(cfg.output_dir, cfg.overwrite or not is_main_process(), getattr(cfg, "resume", False))
    set_seed(cfg.train.seed)
    if is_main_process():
        if cfg.overwrite and not getattr(cfg, "resume", False):
            # The overwritten run's checkpoints must not be resumed from later, nor rotated against this run's.
            for old in sorted(out.glob("checkpoint-*")):
                if old.is_dir():
                    log(f"--overwrite: removing {old.name} of the earlier run")
                    shutil.rmtree(old, ignore_errors=True)
        save_config(cfg, out / "config.yaml")
        log(json.dumps(to_dict(cfg), ensure_ascii=False, indent=1))
    return out


def count_parameters(model) -> tuple[int, int]:
    total = trainable = 0
    for p in model.parameters():
        n = p.numel()
        if hasattr(p, "quant_storage") or p.__class__.__name__ == "Params4bit":
            n *= 2  # 4-bit weights pack two values per byte
        total += n
        if p.requires_grad:
            trainable += n
    return total, trainable


def log_parameters(model) -> None:
    total, trainable = count_parameters(model)
    log(f"parameters: {total:,} total, {trainable:,} trainable ({100 * trainable / max(total, 1):.2f}%)")


# ----------------------------------------------------------------------------- trainer arguments

def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def precision(name: str) -> dict[str, bool]:
    """bf16/fp16 flags for the Trainer: `auto` uses bf16 when the GPU has it, fp16 on older GPUs, fp32 on CPU."""
    import torch

    if name == "auto":
        if not torch.cuda.is_available():
            return {"bf16": False, "fp16": False}
        name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if name in ("bf16", "fp16") and not torch.cuda.is_available():
        raise MedGPTError(f"--train.precision {name} needs a GPU; this machine has none. Use auto or fp32.")
    return {"bf16": name == "bf16", "fp16": name == "fp16"}


def trainer_kwargs(train, out: Path, has_eval: bool = False) -> dict[str, Any]:
    """The TrainingArguments every stage shares, from our TrainArgs (stages add their own fields)."""
    eval_steps = train.eval_steps if has_eval and train.eval_steps > 0 else None
    if not _cuda() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torchrun on CPU-only machines: without this, accelerate trains independent copies instead of DDP/gloo.
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    return dict(
        output_dir=str(out),
        max_steps=train.max_steps,
        num_train_epochs=train.num_epochs,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup if train.warmup < 1 else int(train.warmup),
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.eval_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        activation_checkpointing=train.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if train.gradient_checkpointing else None,
        seed=train.seed,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if train.save_steps > 0 else "no",
        save_steps=train.save_steps if train.save_steps > 0 else 500,
        save_total_limit=train.save_total_limit,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        report_to=["tensorboard"] if train.tensorboard else [],  # written to <output_dir>/runs/
        dataloader_num_workers=train.num_workers,
        dataloader_pin_memory=_cuda(),
        remove_unused_columns=False,
        disable_tqdm=not is_main_process(),
        ddp_find_unused_parameters=False,
        **precision(train.precision),
    )


# ----------------------------------------------------------------------------- checkpoints

def completed_checkpoints(out: Path) -> list[Path]:
    ckpts = [p for p in out.glob("checkpoint-*") if p.is_dir() and (p / COMPLETE).exists()]
    return sorted(ckpts, key=lambda p: int(p.name.split("-")[-1]))


def resume_checkpoint(cfg, out: Path) -> str | None:
    """The last complete checkpoint when --resume is set; half-written ones (a kill mid-save) are removed."""
    if not getattr(cfg, "resume", False):
        return None
    done = completed_checkpoints(out)
    if is_main_process():
        for p in out.glob("checkpoint-*"):
            if p.is_dir() and p not in done:
                log(f"removing incomplete checkpoint {p.name} (the run stopped while writing it)")
                shutil.rmtree(p, ignore_errors=True)
    if not done:
        log(f"--resume: no complete checkpoint in {out}; starting from the beginning")
        return None
    log(f"resuming from {done[-1]}")
    return str(done[-1])


def checkpoint_callback():
    """Marks checkpoint-N complete after the Trainer has written all of it (weights, optimizer, RNG, state)."""
    from transformers import TrainerCallback

    class MarkComplete(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # every rank has written its shards
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if ckpt.is_dir():
                    (ckpt / COMPLETE).write_text(str(state.global_step))
            return control

    return MarkComplete()


# ----------------------------------------------------------------------------- artifacts

def save_artifacts(trainer, tokenizer, out: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """Final weights (safetensors) + tokenizer with its chat template + metrics.json + loss.png."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in getattr(model, "peft_config", {}):
        # TRL's frozen copy of the starting adapter (the DPO/KTO/GRPO/RLOO reference) is not part of the result;
        # checkpoints keep it, so --resume still has its reference.
        model.delete_adapter("ref")
    trainer.save_model(str(out))
    if is_main_process():
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        history = trainer.state.log_history
        metrics = {k: v for k, v in metrics.items() if _jsonable(v)}
        metrics["global_step"] = trainer.state.global_step
        write_json(out / "metrics.json", metrics)
        plot_loss(history, out / "loss.png")
        log(f"saved model, tokenizer, metrics.json and loss.png to {out}")
    return metrics


def _jsonable(v) -> bool:
    return isinstance(v, (int, float, str, bool)) and not (isinstance(v, float) and not math.isfinite(v))


def plot_loss(history: list[dict], path: Path, keys: tuple[str, ...] = ("loss", "eval_loss")) -> None:
    """Loss curves from the Trainer's log history (training loss and, when evaluated, eval loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for key in keys:
        pts = [(h["step"], h[key]) for h in history if key in h and "step" in h]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3, label=key)
            drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(path.parent.name)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend()
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
