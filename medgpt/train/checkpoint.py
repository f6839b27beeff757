"""The checkpoint and loop kit of our own training loops (scratch/pretrain.py, train/ppo.py); the TRL stages use
the Trainer's own, through train/run.py's callback. One format for both, so resume behaves the same:

    checkpoint-N/   the models (`save_models(dir)`: safetensors or an adapter), optimizer.pt, scheduler.pt (when
                    the loop has one), rng_state.pth (python, numpy, torch, cuda), trainer_state.json (the loop's
                    own state), and .complete, written last: a checkpoint without it was cut short and
                    `--resume` skips it (train/run.py resume_checkpoint). Only the newest `keep` complete ones stay.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from medgpt.outdir import claim
from medgpt.train.run import COMPLETE, completed_checkpoints
from medgpt.utils import MedGPTError, atomic_write, is_main_process, write_json


def rng_state() -> dict:
    import torch

    np_state = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(rng: dict) -> None:
    import torch

    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in rng["python"]))
    if rng.get("numpy"):
        np.random.set_state((rng["numpy"][0], np.array(rng["numpy"][1], dtype=np.uint32), *rng["numpy"][2:]))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_checkpoint(out: Path, step: int, save_models: Callable[[Path], None], optimizer, state: dict, keep: int,
                    scheduler=None) -> Path:
    """Write checkpoint-`step` (see the module docstring) and drop the oldest complete ones beyond `keep`."""
    import torch

    ckpt = out / f"checkpoint-{step}"
    claim(out, ckpt.name)  # before writing: a kill mid-save leaves a checkpoint --resume may remove
    shutil.rmtree(ckpt, ignore_errors=True)
    ckpt.mkdir(parents=True)
    save_models(ckpt)
    torch.save(optimizer.state_dict(), ckpt / "optimizer.pt")
    if scheduler is not None:
        torch.save(scheduler.state_dict(), ckpt / "scheduler.pt")
    torch.save(rng_state(), ckpt / "rng_state.pth")
    write_json(ckpt / "trainer_state.json", state)
    with atomic_write(ckpt / COMPLETE) as f:  # last: a run killed before this line left no resumable checkpoint
        f.write(str(step))
    done = completed_checkpoints(out)
    for old in done[:max(0, len(done) - max(keep, 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return ckpt


def load_checkpoint(ckpt: Path, optimizer, device, scheduler=None) -> dict:
    """Optimizer, scheduler and RNGs of checkpoint-N back into this run's objects; returns the loop's state (the
    models are the caller's: `load_weights`)."""
    import torch

    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(ckpt / "rng_state.pth", weights_only=True))
    return json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))


def load_weights(model, path: Path) -> None:
    """Load what `save_pretrained` wrote into `path` back into the same (already built) model, exactly: an
    adapter into its PEFT model, else every safetensors shard; weights of another model are refused."""
    from safetensors.torch import load_file

    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"), adapter_name="default")
        return
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise MedGPTError(f"checkpoint {path} has no model*.safetensors, so it cannot be resumed. Delete it (or its "
                          f"{COMPLETE} marker) to resume from an earlier one.")
    weights = {k: v for f in files for k, v in load_file(f).items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise MedGPTError(f"checkpoint {path} was written by a different model (missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}). Resume with the same --model.* (and --arch.*) options.")


def tensorboard(train_args, out: Path):
    """A SummaryWriter under <out>/runs/<time> when --train.tensorboard is on (rank 0), else None."""
    if not (train_args.tensorboard and is_main_process()):
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "runs" / time.strftime("%Y%m%d-%H%M%S")))


def add_scalars(writer, prefix: str, values: dict, step: int) -> None:
    """Every number of `values` (but `step`) as `<prefix>/<key>`; nothing without a writer."""
    if writer is None:
        return
    for k, v in values.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
            writer.add_scalar(f"{prefix}/{k}", v, step)
