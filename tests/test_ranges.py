"""Config values are range-checked where they are read (flags and YAML alike), from `arg(..., min=, max=, above=,
below=)` metadata; every numeric field of every command declares a range or says it has none."""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from dataclasses import dataclass
from typing import Optional, Union

import pytest

from medgpt.args import TrainArgs
from medgpt.cli import COMMANDS, main
from medgpt.config import arg, check_range, iter_fields, parse_argv, section
from medgpt.utils import MedGPTError


def fails(capsys, *argv: str) -> str:
    """Run the CLI, expect a clean refusal (exit != 0, no traceback) and return its message."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code != 0, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("argv, needle", [
    (["sft", "--train.batch_size", "0"], "--train.batch_size 0: must be at least 1 (per-device batch size)."),
    (["sft", "--train.batch_size", "-1"], "--train.batch_size -1: must be at least 1"),
    (["sft", "--train.learning_rate", "-1e-5"], "--train.learning_rate -1e-5: must be above 0"),
    (["sft", "--train.gradient_accumulation_steps", "0"], "--train.gradient_accumulation_steps 0: must be at least 1"),
    (["sft", "--train.warmup", "-1"], "--train.warmup -1: must be at least 0"),
    (["sft", "--train.logging_steps", "0"], "--train.logging_steps 0: must be at least 1"),
    (["sft", "--sft.neftune_noise_alpha", "-5"], "--sft.neftune_noise_alpha -5: must be at least 0"),
    (["serve", "--serve.port", "99999"], "--serve.port 99999: must be at least 0 and at most 65535"),
    (["webui", "--webui.port", "0"], "--webui.port 0: must be at least 1 and at most 65535"),
    (["sft", "--data.eval_split", "1.5"], "--data.eval_split 1.5: must be at least 0 and below 1"),
    (["sft", "--data.max_samples", "-1"], "--data.max_samples -1: must be at least 1"),
    (["sft", "--finetune.lora_dropout", "1"], "must be at least 0 and below 1"),
    (["chat", "--gen.top_p", "0"], "--gen.top_p 0: must be above 0 and at most 1"),
    (["chat", "--gen.temperature", "-0.1"], "--gen.temperature -0.1: must be at least 0"),
    (["grpo", "--grpo.num_generations", "1"], "--grpo.num_generations 1: must be at least 2"),
    (["dpo", "--dpo.loss_weights", "1,-1"], "--dpo.loss_weights 1,-1: must be at least 0"),
    (["sft", "--train.learning_rate", "nan"], "must be above 0"),
    (["sft", "--train.num_epochs", "-1"], "--train.num_epochs -1: must be at least 0"),
])
def test_out_of_range_flag_is_a_clear_error(capsys, argv, needle):
    assert needle in fails(capsys, *argv)


def test_zero_epochs_without_max_steps_is_refused(capsys):
    """num_epochs 0 with max_steps -1 used to "succeed" and save an untrained adapter."""
    err = fails(capsys, "sft", "--train.num_epochs", "0")
    assert "--train.num_epochs 0 with --train.max_steps -1" in err and "untrained" in err


def test_sentinels_and_cross_field_values_stay_valid():
    from medgpt.serve.api import Config as ServeConfig
    from medgpt.stages.sft import Config as SFTConfig

    cfg = parse_argv(SFTConfig, ["--train.max_steps", "-1", "--train.num_epochs", "0.5"])
    assert cfg.train.max_steps == -1
    cfg = parse_argv(SFTConfig, ["--train.max_steps", "5", "--train.num_epochs", "0", "--train.warmup", "0",
                                 "--train.save_total_limit", "0", "--data.eval_split", "0"])
    assert cfg.train.max_steps == 5 and cfg.train.num_epochs == 0
    assert parse_argv(ServeConfig, ["--serve.port", "0"]).serve.port == 0  # an ephemeral port is supported
    assert parse_argv(SFTConfig, ["--data.max_samples", "none"]).data.max_samples is None


def test_yaml_value_gets_the_same_check_naming_the_file(tmp_path, capsys):
    y = tmp_path / "run.yaml"
    y.write_text("train:\n  batch_size: 0\n")
    err = fails(capsys, "sft", y)
    assert f"train.batch_size: 0 in {y}: must be at least 1" in err
    # a flag that overrides the bad YAML value wins; an error about the flag does not blame the file
    assert parse_argv(importlib.import_module("medgpt.stages.sft").Config,
                      [str(y), "--train.batch_size", "2"]).train.batch_size == 2
    err = fails(capsys, "sft", y, "--train.batch_size", "-3")
    assert "--train.batch_size -3: must be at least 1" in err and str(y) not in err


def test_cross_field_hook_runs_for_yaml_too(tmp_path, capsys):
    y = tmp_path / "run.yaml"
    y.write_text("train:\n  num_epochs: 0\n")
    assert "the run would train nothing" in fails(capsys, "sft", y)


def test_help_shows_the_range(capsys):
    assert main(["sft", "--help"]) == 0
    assert "[int, at least 1; default: 4]" in capsys.readouterr().out


@dataclass
class Inner:
    p: float = arg(0.5, "A share.", min=0, below=1)
    ks: list[int] = arg(factory=list, help="Sizes.", min=1)
    n: Optional[int] = arg(None, "Count.", min=1)


@dataclass
class Toy:
    inner: Inner = section(Inner)


def test_check_range_on_a_toy_config():
    assert parse_argv(Toy, ["--inner.p", "0", "--inner.ks", "1,2"]).inner.ks == [1, 2]
    with pytest.raises(MedGPTError, match=r"--inner.p 1: must be at least 0 and below 1 \(a share\)"):
        parse_argv(Toy, ["--inner.p", "1"])
    with pytest.raises(MedGPTError, match=r"--inner.ks 1,0: must be at least 1 \(sizes\)"):
        parse_argv(Toy, ["--inner.ks", "1,0"])
    assert parse_argv(Toy, ["--inner.n", "none"]).inner.n is None  # an unset optional is never out of range
    with pytest.raises(MedGPTError, match="--inner.n 0: must be at least 1"):
        parse_argv(Toy, ["--inner.n", "0"])


# ----------------------------------------------------------------------------- every numeric field has a range

def _numeric(tp) -> bool:
    """int or float, also inside Optional[...] or list[...]."""
    if tp in (int, float):
        return True
    if typing.get_origin(tp) in (Union, types.UnionType, list):
        return any(_numeric(a) for a in typing.get_args(tp) if a is not type(None))
    return False


def _command_configs():
    seen = {}
    for name, cmd in COMMANDS.items():
        cls = getattr(importlib.import_module(cmd.module), cmd.config)
        seen.setdefault(cls, name)
    return seen


def _resolved_default(cls, key: str):
    """The default a command really gets (a section's factory may set its own), None for required fields."""
    try:
        value = dataclasses.asdict(cls())
    except TypeError:
        return None
    for part in key.split("."):
        value = value[part]
    return value


def test_every_numeric_field_declares_a_range_or_none():
    """A numeric key added without `min=`/`max=`/`above=`/`below=` (or `unbounded=True`) fails here, naming it."""
    missing, bad_defaults = [], []
    for cls, name in _command_configs().items():
        for key, f, tp in iter_fields(cls):
            if not _numeric(tp):
                continue
            if not (f.metadata.get("range") or f.metadata.get("unbounded")):
                missing.append(f"medgpt {name}: --{key}")
                continue
            try:  # the default itself (after a section's factory) must be in range
                check_range(_resolved_default(cls, key), f, key, _resolved_default(cls, key))
            except MedGPTError as e:
                bad_defaults.append(str(e))
    assert not missing, "numeric config keys without a declared range: " + ", ".join(missing)
    assert not bad_defaults, bad_defaults


def test_train_args_validate_is_the_cross_field_hook():
    with pytest.raises(MedGPTError, match="train nothing"):
        TrainArgs(num_epochs=0).validate()
    TrainArgs(num_epochs=0, max_steps=3).validate()
