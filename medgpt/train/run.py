"""A training run's lifecycle, shared by every stage as plain functions: start, trainer arguments, checkpoints
that resume safely, and the artifacts every output dir holds (weights, tokenizer, config.yaml, metrics.json,
loss.png, TensorBoard logs under runs/).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

from medgpt.config import save_config, to_dict
from medgpt.data.prepare import FIT_COUNTS
from medgpt.outdir import claim, final_save, owns, prepare_output_dir
from medgpt.utils import MedGPTError, atomic_write, is_main_process, log, write_json

COMPLETE = ".complete"  # written into checkpoint-N once everything in it is on disk
CHECKPOINT = re.compile(r"checkpoint-\d+")


# ----------------------------------------------------------------------------- start

def start(cfg, command: str = "") -> Path:
    """Prepare the output dir, seed everything, save and print the resolved config."""
    import torch
    from transformers import set_seed

    # Tiny numbers (denormals, < 1.2e-38) are computed in slow microcode on x86 CPUs; as training shrinks weights,
    # gradients and Adam's moments they appear, and CPU training slows down by a third (the demo pretrain went
    # from 10k to 6.5k tokens/s within 400 steps; benchmarks/cpu_denormals.py: 1.43x, same loss). Flushing them
    # to zero keeps the first speed. The flag is per thread and torch's worker threads inherit it when they are
    # created, so it is set here, before any model work starts them.
    torch.set_flush_denormal(True)
    # Only rank 0 judges the dir (outdir.prepare_output_dir); when it refuses, the launcher (torchrun,
    # accelerate) stops the other ranks. --overwrite removes only what an earlier medgpt run wrote there.
    command = command or type(cfg).__module__.rsplit(".", 1)[-1]
    out = prepare_output_dir(cfg.output_dir, cfg.overwrite, getattr(cfg, "resume", False), command)
    set_seed(cfg.train.seed)
    FIT_COUNTS.clear()  # what the data path truncates or drops in this run goes into its metrics.json
    if is_main_process():
        claim(out, "config.yaml", "runs", "README.md")  # runs/: TensorBoard; README.md: the model card of a save
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

def _checkpoints(out: Path) -> list[Path]:
    """checkpoint-N dirs of this output that a medgpt run recorded as its own (outdir.claim), by step."""
    ckpts = [p for p in out.glob("checkpoint-*") if CHECKPOINT.fullmatch(p.name) and p.is_dir() and owns(out, p.name)]
    return sorted(ckpts, key=lambda p: int(p.name.split("-")[-1]))


def completed_checkpoints(out: Path) -> list[Path]:
    return [p for p in _checkpoints(out) if (p / COMPLETE).exists()]


def resume_checkpoint(cfg, out: Path) -> str | None:
    """The last complete checkpoint when --resume is set; half-written ones (a kill mid-save) are removed."""
    if not getattr(cfg, "resume", False):
        return None
    done = completed_checkpoints(out)
    if is_main_process():
        for p in _checkpoints(out):
            if p not in done:
                log(f"removing incomplete checkpoint {p.name} (the run stopped while writing it)")
                shutil.rmtree(p, ignore_errors=True)
    if not done:
        log(f"--resume: no complete checkpoint in {out}; starting from the beginning")
        return None
    log(f"resuming from {done[-1]}")
    return str(done[-1])


def train(trainer, cfg, out: Path):
    """trainer.train(), resuming from the last complete checkpoint with --resume.

    A checkpoint taken at the last step (max_steps reached) is restored, not resumed: the Trainer would train one
    step past max_steps from it (it checks for the end only after a step)."""
    from transformers import TrainerState
    from transformers.trainer_utils import TrainOutput

    from medgpt.model.attention import use_packed_attention
    from medgpt.train.speed import compact_lm_head, instrument

    compact_lm_head()
    use_packed_attention(trainer.model)
    trainer.medgpt_speed = instrument(trainer, cfg.train.peak_seconds)
    ckpt = resume_checkpoint(cfg, out)
    state_file = Path(ckpt or "") / "trainer_state.json"
    if ckpt and state_file.is_file():
        state = TrainerState.load_from_json(str(state_file))
        last = cfg.train.max_steps if cfg.train.max_steps > 0 else state.max_steps  # this run's, else that run's
        if last and state.global_step >= last:
            log(f"{Path(ckpt).name} is the last step ({state.global_step} of max_steps {last}): "
                f"restoring it, nothing left to train")
            trainer._load_from_checkpoint(ckpt)
            trainer.state = state
            losses = [h["loss"] for h in state.log_history if "loss" in h]
            train_loss = sum(losses) / len(losses) if losses else float("nan")
            return TrainOutput(state.global_step, train_loss, {"train_loss": train_loss})
    return trainer.train(resume_from_checkpoint=ckpt)


def checkpoint_callback():
    """Marks checkpoint-N complete after the Trainer has written all of it (weights, optimizer, RNG, state)."""
    from transformers import TrainerCallback

    class MarkComplete(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            # Recorded before the Trainer writes it, so a kill mid-save leaves a checkpoint --resume may remove.
            if control.should_save and state.is_world_process_zero:
                claim(args.output_dir, f"checkpoint-{state.global_step}")
            return control

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
    """Final weights (safetensors) + tokenizer with its chat template + metrics.json + loss.png (final_save)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in getattr(model, "peft_config", {}):
        # TRL's frozen copy of the starting adapter (the DPO/KTO/GRPO/RLOO reference) is not part of the result;
        # checkpoints keep it, so --resume still has its reference.
        model.delete_adapter("ref")
    speed = trainer.medgpt_speed.summary() if hasattr(trainer, "medgpt_speed") else {}
    metrics = {**data_metrics(), **speed, **{k: v for k, v in metrics.items() if _jsonable(v)}}
    metrics["global_step"] = trainer.state.global_step
    with final_save(out) as staging:
        trainer.accelerator.wait_for_everyone()  # rank 0 has made the staging dir
        trainer.save_model(str(staging))
        if is_main_process():
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            write_json(staging / "metrics.json", metrics)
            plot_loss(trainer.state.log_history, staging / "loss.png", title=out.name)
        trainer.accelerator.wait_for_everyone()  # every rank's shards are in it
    log(f"saved model, tokenizer, metrics.json and loss.png to {out}")
    return metrics


def data_metrics() -> dict[str, int]:
    """What fitting the records to max_length took in this run (data/prepare.FIT_COUNTS): train_records_truncated,
    train_records_dropped, ... (0 when nothing happened: a key present and 0 says nothing was lost)."""
    kinds = ("truncated", "shortened", "cut_short", "dropped")
    return {f"train_records_{k}": 0 for k in kinds} | dict(FIT_COUNTS)


def _jsonable(v) -> bool:
    return isinstance(v, (int, float, str, bool)) and not (isinstance(v, float) and not math.isfinite(v))


def plot_loss(history: list[dict], path: Path, keys: tuple[str, ...] = ("loss", "eval_loss"),
              title: str | None = None) -> None:
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
    ax.set_title(title or path.parent.name)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend()
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
