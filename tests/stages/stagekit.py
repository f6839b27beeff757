"""Helpers for stage tests (imported by test modules as `stagekit`): run a command in-process, snapshot
trainable parameters around training, check the artifacts every output dir must hold."""

from __future__ import annotations

import json
import math
from pathlib import Path

from medgpt.cli import main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"
DEMO = Path(__file__).resolve().parents[2] / "data" / "demo"

# Fast, deterministic settings shared by every 2-step stage test: no warmup (step 1 must already move the
# weights), no intermediate checkpoints, tiny batches.
QUICK = ["--train.max_steps", "2", "--train.warmup", "0", "--train.learning_rate", "1e-2", "--train.batch_size", "2",
         "--train.save_steps", "0", "--train.logging_steps", "1", "--train.max_length", "256"]


def run_stage(*argv: str) -> None:
    code = main([str(a) for a in argv])
    assert code == 0, f"medgpt {' '.join(map(str, argv))} exited {code}"


def _tracked(monkeypatch):
    """Records every trainable parameter before and after Trainer.train (HF, TRL and our own trainers)."""
    from transformers import Trainer

    snaps: dict[str, dict] = {}
    original = Trainer.train

    def train(self, *args, **kwargs):
        snaps["before"] = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        result = original(self, *args, **kwargs)
        snaps["after"] = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        return result

    monkeypatch.setattr(Trainer, "train", train)
    return snaps


def assert_all_changed(snaps: dict) -> None:
    before, after = snaps["before"], snaps["after"]
    assert before, "no trainable parameters"
    unchanged = [n for n in before if (before[n] == after[n]).all()]
    assert not unchanged, f"{len(unchanged)} of {len(before)} trainable parameters did not change: {unchanged[:5]}"


def assert_artifacts(out: Path, adapter: bool, weights: str = "model.safetensors") -> dict:
    out = Path(out)
    names = {p.name for p in out.iterdir()}
    need = {"config.yaml", "metrics.json", "loss.png", "tokenizer_config.json", "runs"}
    need |= {"adapter_model.safetensors", "adapter_config.json"} if adapter else {weights, "config.json"}
    assert need <= names, f"missing artifacts: {need - names}"
    assert not any(n.endswith((".bin", ".pt", ".pth")) and n != "training_args.bin" for n in names)
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["train_loss"]), metrics
    assert list((out / "runs").rglob("events.out.tfevents.*")), "no TensorBoard log"
    return metrics
