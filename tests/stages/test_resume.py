"""Resume after `kill -9`: only complete checkpoints count, half-written ones are removed, training ends on time.

The first run is a real subprocess killed with SIGKILL (no Python cleanup, exactly like an OOM kill or a lost
node). A wrapper patches Trainer.training_step before calling the CLI so that the run stalls once it is past
step 4: the test kills it reliably after checkpoint-4 is complete and before it can finish, without any hook
in medgpt.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from stagekit import FIXTURES, run_stage

from medgpt.outdir import claim
from medgpt.train.run import COMPLETE

DATA = f"{FIXTURES}/sharegpt.jsonl,{FIXTURES}/alpaca.json,{FIXTURES}/openai.jsonl"
ROOT = Path(__file__).resolve().parents[2]

# `python -c STALL N argv...`: the real CLI with argv, except that every training step after global step N
# sleeps for a minute (the test kills the run long before that).
STALL = """
import sys, time
import transformers
step = transformers.Trainer.training_step
def stall(self, *a, **k):
    if self.state.global_step >= int(sys.argv[1]):
        time.sleep(60)
    return step(self, *a, **k)
transformers.Trainer.training_step = stall
from medgpt.cli import main
sys.exit(main(sys.argv[2:]))
"""


def sft_args(model, out, *extra) -> list[str]:
    return ["sft", "--model.name_or_path", str(model), "--data.train_files", DATA, "--finetune.type", "full",
            "--template", "chatml", "--output_dir", str(out), "--train.max_steps", "8", "--train.save_steps", "2",
            "--train.save_total_limit", "2", "--train.warmup", "0", "--train.batch_size", "2",
            "--train.max_length", "128", "--train.logging_steps", "1", "--train.tensorboard", "false", *extra]


def wait_for(path: Path, proc: subprocess.Popen, log_file: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {path} appeared:\n"
                                 f"{log_file.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.02)


def count_steps(monkeypatch) -> list[int]:
    from transformers import Trainer

    calls: list[int] = []
    original = Trainer.training_step

    def counted(self, *args, **kwargs):
        calls.append(self.state.global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", counted)
    return calls


@pytest.mark.slow  # a real subprocess (imports torch/transformers/trl again): ~10 s
def test_resume_after_kill9(tiny_llama, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log_file = tmp_path / "first-run.log"  # a file, not a pipe: a full pipe would block the run
    with open(log_file, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-c", STALL, "4", *sft_args(tiny_llama, out)], env=env,
                                stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_for(out / "checkpoint-4" / COMPLETE, proc, log_file)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "metrics.json").exists()

    # A newer checkpoint the kill interrupted mid-write: a partial file and no completion marker.
    for late in out.glob("checkpoint-*"):
        if int(late.name.split("-")[1]) > 4:
            shutil.rmtree(late)
    partial = out / "checkpoint-6"
    claim(out, partial.name)  # as the run does before it writes a checkpoint
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 100)

    steps = count_steps(monkeypatch)
    run_stage(*sft_args(tiny_llama, out, "--resume"))
    log = capsys.readouterr().out
    assert "removing incomplete checkpoint checkpoint-6" in log
    assert f"resuming from {out / 'checkpoint-4'}" in log
    assert steps == [4, 5, 6, 7], f"expected to train steps 5..8 only, got global steps {steps}"

    assert (partial / COMPLETE).exists(), "checkpoint-6 was not rewritten by the resumed run"
    assert (partial / "model.safetensors").stat().st_size > 1000, "the half-written weights are still there"
    state = json.loads((partial / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    final = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    assert final["global_step"] == 8 and final["max_steps"] == 8
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 8
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]  # save_total_limit


def test_resume_on_empty_dir_starts_from_scratch(tiny_llama, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    steps = count_steps(monkeypatch)
    run_stage(*sft_args(tiny_llama, out, "--resume", "--train.max_steps", "2", "--train.save_steps", "0"))
    assert "no complete checkpoint" in capsys.readouterr().out
    assert steps == [0, 1]
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 2


def test_non_empty_output_dir_is_refused(tiny_llama, tmp_path, capsys):
    from medgpt.cli import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("from an earlier run")
    for flag in ((), ("--overwrite",), ("--resume",)):  # the flags act on medgpt outputs only
        assert main(sft_args(tiny_llama, out, *flag)) == 1
        err = capsys.readouterr().err
        assert "medgpt did not write what it holds (notes.txt" in err and "Choose a new" in err
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # nothing written


def test_overwrite_drops_the_earlier_runs_checkpoints(tiny_llama, tmp_path, monkeypatch, capsys):
    """Otherwise a later --resume could continue the overwritten run (its checkpoint-100 outranks ours)."""
    out = tmp_path / "out"
    run_stage(*sft_args(tiny_llama, out, "--train.max_steps", "1", "--train.save_steps", "0"))
    stale = out / "checkpoint-100"
    claim(out, stale.name)  # an earlier run of ours that got further
    stale.mkdir(parents=True)
    (stale / COMPLETE).write_text("100")
    run_stage(*sft_args(tiny_llama, out, "--overwrite", "--train.max_steps", "2"))
    assert "removing its checkpoint-100 now" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]

    steps = count_steps(monkeypatch)
    run_stage(*sft_args(tiny_llama, out, "--resume", "--train.max_steps", "4"))
    assert f"resuming from {out / 'checkpoint-2'}" in capsys.readouterr().out
    assert steps == [2, 3]


def test_resume_at_max_steps_trains_no_extra_step(tiny_llama, tmp_path, monkeypatch, capsys):
    """The last checkpoint is the end of training: --resume used to train one step past max_steps from it."""
    out = tmp_path / "out"
    run_stage(*sft_args(tiny_llama, out, "--train.max_steps", "4", "--train.save_steps", "2"))
    before = json.loads((out / "metrics.json").read_text())
    steps = count_steps(monkeypatch)
    run_stage(*sft_args(tiny_llama, out, "--resume", "--train.max_steps", "4", "--train.save_steps", "2"))
    assert "nothing left to train" in capsys.readouterr().out
    assert steps == []
    after = json.loads((out / "metrics.json").read_text())
    assert after["global_step"] == before["global_step"] == 4
