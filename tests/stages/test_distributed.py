"""Multi-process training: `torchrun --nproc_per_node 2 -m medgpt.cli sft` on CPU (gloo), and the shipped
`accelerate launch` configs (DDP, DeepSpeed ZeRO-2/3, FSDP) parsed the way `accelerate launch` parses them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from stagekit import FIXTURES

ROOT = Path(__file__).resolve().parents[2]
DATA = f"{FIXTURES}/sharegpt.jsonl,{FIXTURES}/alpaca.json,{FIXTURES}/openai.jsonl"  # 7 conversations
ACCELERATE = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


@pytest.mark.slow  # two fresh processes import torch/transformers/trl: ~20-40 s on 2 cores
def test_torchrun_two_processes_on_cpu(tiny_llama, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           # No ACCELERATE_USE_CPU here: medgpt sets it itself on CPU-only machines, so the two processes
           # form a real gloo data-parallel group (checked below: each sees half the data).
           "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "medgpt.cli", "sft", "--model.name_or_path", str(tiny_llama), "--data.train_files", DATA,
           "--finetune.type", "full", "--template", "chatml", "--output_dir", str(out),
           "--train.max_steps", "2", "--train.batch_size", "1", "--train.warmup", "0", "--train.save_steps", "0",
           "--train.max_length", "128", "--train.logging_steps", "1", "--train.tensorboard", "false"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 2
    # 7 conversations, 2 ranks x batch 1 = 2 per step: 4 steps per epoch (one process alone would need 7).
    assert metrics["epoch"] == pytest.approx(0.5), "the two processes did not share the data (no DDP?)"

    weights = [p.relative_to(out) for p in out.rglob("*.safetensors")]
    assert weights == [Path("model.safetensors")], weights  # written once, by rank 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).chat_template

    # medgpt's own lines (medgpt.utils.log) come from rank 0 only
    for line in ("parameters: ", "saved model, tokenizer, metrics.json", '"output_dir": '):
        assert log.count(line) == 1, f"{line!r} printed {log.count(line)} times:\n{log[-3000:]}"


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_configs_parse_as_accelerate_launch_does(path, monkeypatch):
    """Each file loads through `accelerate launch`'s own validation and yields the plugin it promises."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    assert not path.read_text().startswith("# medgpt"), "tests/test_config.py would treat it as a medgpt config"
    monkeypatch.chdir(ROOT)  # the DeepSpeed JSON paths are relative to the repo root, like the documented commands
    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    assert args.num_processes > 1 and defaults.num_machines == 1

    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(
            list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else []))
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    for k, v in env.items():
        monkeypatch.setenv(k, v)

    if path.stem.startswith("deepspeed_zero"):
        from accelerate.utils import DeepSpeedPlugin

        stage = int(path.stem[-1])
        ds_file = ROOT / defaults.deepspeed_config["deepspeed_config_file"]
        assert json.loads(ds_file.read_text())["zero_optimization"]["stage"] == stage
        plugin = DeepSpeedPlugin()  # raises when the accelerate config and the JSON disagree
        assert plugin.zero_stage == stage
        assert plugin.deepspeed_config["bf16"]["enabled"] == "auto"  # filled from --train.precision
        if stage == 3:
            assert plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    elif path.stem == "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and "FULL_STATE_DICT" in str(plugin.state_dict_type)
        assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    else:
        assert path.stem == "ddp" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
        assert str(defaults.distributed_type).endswith("MULTI_GPU")


def test_accelerate_configs_shipped():
    assert {p.stem for p in ACCELERATE} >= {"ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"}


def test_training_guide_names_existing_files():
    """Every configs/... path in docs/training.md exists (the guide's commands can be pasted as they are)."""
    text = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    paths = set(re.findall(r"\bconfigs/[\w./-]+\.(?:yaml|json)\b", text))
    assert paths, "docs/training.md names no config files"
    missing = sorted(p for p in paths if not (ROOT / p).is_file())
    assert not missing, f"docs/training.md names missing files: {missing}"
