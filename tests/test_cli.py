"""The command line: help, unknown commands and keys, errors without tracebacks, lazy imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from medgpt.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medgpt.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_help_imports_nothing_heavy():
    code = ("import sys; from medgpt.cli import main; main(['--help']); "
            "heavy = [m for m in ('torch', 'transformers', 'trl', 'datasets') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=60)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name, capsys):
    assert main([*name.split(), "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: medgpt {name}")
    assert "--" in out


def test_unknown_command_suggests(capsys):
    assert main(["dtaa"]) == 1
    assert "Did you mean 'data'" in capsys.readouterr().err


def test_group_without_subcommand(capsys):
    assert main(["data"]) == 1
    assert "needs a subcommand" in capsys.readouterr().err


def test_unknown_key_is_an_error_not_a_traceback():
    r = run_cli("data", "validate", "data/demo", "--data.formt", "alpaca")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "Did you mean 'data.format'" in r.stderr


def test_missing_file_is_clear():
    r = run_cli("data", "validate", "no/such/file.jsonl")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "no/such/file.jsonl" in r.stderr


def test_validate_exit_codes(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"instruction": "What is a fever?", "output": "A body temperature of 38 C or above."})
                    + "\n", encoding="utf-8")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{"instruction": \n', encoding="utf-8")
    ok = run_cli("data", "validate", str(good))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    r = run_cli("data", "validate", str(good), str(bad))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"{bad}:2:" in r.stdout


def test_convert_writes_canonical_jsonl_atomically(tmp_path):
    src = tmp_path / "alpaca.json"
    src.write_text(json.dumps([{"instruction": "发烧怎么办？", "input": "", "output": "多喝水，必要时就医。"}],
                              ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(["data", "convert", str(src), "--output", str(out)]) == 0
    rec = json.loads(out.read_text(encoding="utf-8"))
    assert rec == {"messages": [{"role": "user", "content": "发烧怎么办？"},
                                {"role": "assistant", "content": "多喝水，必要时就医。"}]}
    # refusing to clobber leaves the file as it was
    assert main(["data", "convert", str(src), "--output", str(out)]) == 1
    assert json.loads(out.read_text(encoding="utf-8")) == rec
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_convert_bad_data_writes_nothing(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]}\n',
                   encoding="utf-8")
    out = tmp_path / "out.jsonl"
    r = run_cli("data", "convert", str(src), "--output", str(out))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"{src}:1:" in r.stderr and "robot" in r.stderr
    assert not out.exists()


def test_training_start_flushes_denormals(tmp_path):
    """Denormal floats slow x86 CPU training down by a third as weights shrink; every run flushes them to zero."""
    import torch

    from medgpt.config import parse_argv
    from medgpt.stages.sft import Config
    from medgpt.train.run import start

    torch.set_flush_denormal(False)  # an earlier test in this process may have turned it on
    tiny = torch.tensor([1e-39])  # below float32's smallest normal number (1.2e-38)
    assert (tiny * 2).item() > 0
    try:
        start(parse_argv(Config, ["--output_dir", str(tmp_path / "run")]))
        assert (tiny * 2).item() == 0.0
    finally:
        torch.set_flush_denormal(True)
