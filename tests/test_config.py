"""Config loading: YAML defaults, flag overrides, type checks, unknown keys, shipped YAML files."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import pytest
import yaml

from medgpt.config import arg, format_help, leaf_keys, parse_argv, save_config, section
from medgpt.utils import MedGPTError

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Train:
    max_steps: int = arg(-1, "steps")
    learning_rate: float = arg(1e-4, "lr")
    packing: bool = arg(False, "pack")


@dataclass
class Data:
    train_files: list[str] = arg(factory=list, help="files")
    columns: dict[str, str] = arg(factory=dict, help="mapping")
    max_samples: Optional[int] = arg(None, "cap")


@dataclass
class Cfg:
    train: Train = section(Train)
    data: Data = section(Data)
    template: str = arg("chatml", "template")
    mode: Literal["full", "lora"] = arg("lora", "mode")
    overwrite: bool = arg(False, "overwrite")


def test_defaults():
    cfg = parse_argv(Cfg, [])
    assert cfg.train.max_steps == -1 and cfg.data.train_files == [] and cfg.template == "chatml"


def test_yaml_then_flags_win(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  max_steps: 10\n  learning_rate: 3e-4\ntemplate: qwen\ndata:\n  columns: {prompt: q}\n")
    cfg = parse_argv(Cfg, [str(y), "--train.max_steps", "2", "--template=llama3"])
    assert cfg.train.max_steps == 2
    assert cfg.train.learning_rate == pytest.approx(3e-4)  # YAML's "3e-4" is a string to PyYAML; coerced
    assert cfg.template == "llama3"
    assert cfg.data.columns == {"prompt": "q"}


def test_types_lists_maps_bools_none():
    cfg = parse_argv(Cfg, ["--data.train_files", "a.jsonl,b.json", "--data.columns", "prompt=question,response=answer",
                           "--overwrite", "--train.packing", "false", "--data.max_samples", "none", "--mode", "full"])
    assert cfg.data.train_files == ["a.jsonl", "b.json"]
    assert cfg.data.columns == {"prompt": "question", "response": "answer"}
    assert cfg.overwrite is True and cfg.train.packing is False
    assert cfg.data.max_samples is None and cfg.mode == "full"


def test_positional_fills_list():
    cfg = parse_argv(Cfg, ["a.jsonl", "b.txt", "--train.max_steps", "1"], positional="data.train_files")
    assert cfg.data.train_files == ["a.jsonl", "b.txt"]


@pytest.mark.parametrize("argv, needle", [
    (["--train.max_step", "2"], "Did you mean 'train.max_steps'"),
    (["--trian.max_steps", "2"], "Did you mean 'train.max_steps'"),
    (["--train.max_steps", "two"], "'train.max_steps': 'two' is not a valid int"),
    (["--mode", "half"], "not one of: full, lora"),
    (["--train.packing=maybe"], "use true or false"),
    (["--train.packing", "maybe"], "unexpected argument 'maybe'"),
    (["--data.columns", "prompt"], "k=v pairs"),
    (["--train.max_steps"], "needs a value"),
    (["stray"], "unexpected argument 'stray'"),
])
def test_errors_are_clear(argv, needle):
    with pytest.raises(MedGPTError, match=re.escape(needle)):
        parse_argv(Cfg, argv)


def test_unknown_yaml_key_names_file(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  learning_rat: 1\n")
    with pytest.raises(MedGPTError, match=r"unknown config key 'train.learning_rat' \(in .*c.yaml\).*learning_rate"):
        parse_argv(Cfg, [str(y)])


def test_bad_yaml_gives_line(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  max_steps: 2\n bad: [\n")
    with pytest.raises(MedGPTError, match=r"c.yaml:\d+: this config file is not valid YAML"):
        parse_argv(Cfg, [str(y)])


def test_save_config_roundtrip(tmp_path):
    cfg = parse_argv(Cfg, ["--train.max_steps", "3", "--data.columns", "a=b"])
    save_config(cfg, tmp_path / "config.yaml")
    again = parse_argv(Cfg, [str(tmp_path / "config.yaml")])
    assert again == cfg
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind


def test_help_lists_every_key_with_doc():
    text = format_help(Cfg, "x")
    for key in leaf_keys(Cfg):
        assert f"--{key}" in text


@dataclass
class Phased:
    train: Train = field(default_factory=lambda: Train(max_steps=7), metadata={"help": "a shaped section"})
    phases: list[dict[str, Any]] = arg(factory=list, help="phases")


def test_help_shows_a_section_factory_default_and_lists_of_mappings_roundtrip(tmp_path):
    """A command may shape a shared section's defaults (pt: lr_scheduler auto); --help shows what it gets.
    A list of mappings (pt.phases) comes from YAML whole and saves back to the same value."""
    assert "default: 7]" in format_help(Phased, "x")
    y = tmp_path / "c.yaml"
    y.write_text("phases:\n  - {name: a, steps: 2, data: {d1: 0.5, d2: 1}}\n  - {name: b, steps: 1, data: {d2: 1}}\n")
    cfg = parse_argv(Phased, [str(y)])
    assert cfg.train.max_steps == 7
    assert cfg.phases == [{"name": "a", "steps": 2, "data": {"d1": 0.5, "d2": 1}},
                          {"name": "b", "steps": 1, "data": {"d2": 1}}]
    save_config(cfg, tmp_path / "saved.yaml")
    assert parse_argv(Phased, [str(tmp_path / "saved.yaml")]) == cfg
    flags = parse_argv(Phased, ["--train.learning_rate", "0.5"])  # other keys keep the shaped default
    assert flags.train.max_steps == 7 and flags.train.learning_rate == 0.5


# ----------------------------------------------------------------------------- shipped YAML files

def shipped_yaml() -> list[Path]:
    # configs/accelerate/ holds `accelerate launch --config_file` files, not medgpt configs (tested in
    # tests/stages/test_distributed.py)
    return sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "accelerate" not in p.relative_to(ROOT).parts)


@pytest.mark.parametrize("path", shipped_yaml(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_yaml_loads_through_its_command(path):
    """Each YAML starts with the command that runs it; that command's config must accept every key."""
    import importlib

    from medgpt.cli import resolve

    first = path.read_text(encoding="utf-8").splitlines()[0]
    m = re.match(r"#\s*medgpt\s+(.+)", first)
    assert m, f"{path} must start with '# medgpt <command> {path.relative_to(ROOT)} ...'"
    words = m.group(1).split()
    found = resolve(words)
    assert found, f"{path}: unknown command in its first line: {first}"
    name, cmd, rest = found
    config_cls = getattr(importlib.import_module(cmd.module), cmd.config)
    parse_argv(config_cls, [str(path)], positional=cmd.positional)
    assert isinstance(yaml.safe_load(path.read_text(encoding="utf-8")), dict)
