"""A command deletes or replaces only what it can prove it wrote (medgpt/outdir.py).

The fuzz part drives every command that writes an output dir into folders that hold a user's files, with no
flag, --overwrite and --resume, and checks that every foreign file is byte-identical afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medgpt.cli import main
from medgpt.outdir import MARKER, abandon, check_complete, claim, mark_complete, prepare_output_dir, read_marker
from medgpt.utils import MedGPTError, atomic_write, remove_stale_temps

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "data"
DEMO = ROOT / "data" / "demo"
CHAT = f"{FIX}/sharegpt.jsonl,{FIX}/alpaca.json"
PAIRS = f"{FIX}/preference.jsonl,{FIX}/hh.jsonl"
QUICK = ["--train.max_steps", "1", "--train.warmup", "0", "--train.batch_size", "2", "--train.save_steps", "0",
         "--train.max_length", "128", "--train.tensorboard", "false"]
CHATML = ["--template", "chatml"]

# What a user keeps in a folder: names that collide with ours, checkpoint-like dirs, hidden files.
FOREIGN = {
    "README.md": b"# my scans\n", "config.yaml": b"mine: true\n", "metrics.json": b'{"auc": 0.91}\n',
    "checkpoint-mine/weights.bin": b"\x00\x01", "checkpoint-2024-scans/scan.dcm": b"DICM",
    "checkpoint-7/notes.txt": b"not a trainer checkpoint", "results.csv": b"id,auc\n1,0.9\n", ".hidden": b"x",
    "meta.json": b'{"format": 1}\n',
}


def _plant(d: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _commands(tiny_llama, tiny_llama_cls, tokenizer_dir, lora_adapter) -> dict[str, list]:
    m = ["--model.name_or_path", tiny_llama]
    return {
        "pt": ["pt", *m, "--data.train_files", DEMO / "pretrain_en.txt", "--data.max_samples", "4", *QUICK],
        "sft": ["sft", *m, "--data.train_files", CHAT, *QUICK, *CHATML],
        "rm": ["rm", "--model.name_or_path", tiny_llama_cls, "--data.train_files", PAIRS, *QUICK, *CHATML],
        "dpo": ["dpo", *m, "--data.train_files", PAIRS, *QUICK, *CHATML],
        "orpo": ["orpo", *m, "--data.train_files", PAIRS, *QUICK, *CHATML],
        "simpo": ["simpo", *m, "--data.train_files", PAIRS, *QUICK, *CHATML],
        "kto": ["kto", *m, "--data.train_files", PAIRS, *QUICK, *CHATML],
        **{rl: [rl, *m, "--data.train_files", FIX / "prompt.jsonl", "--reward.functions", "length", *QUICK, *CHATML,
               "--train.batch_size", "4", "--train.max_length", "512"] for rl in ("grpo", "rloo", "ppo")},
        "merge": ["merge", *m, "--model.adapter", lora_adapter],
        "tokenizer train": ["tokenizer", "train", "--data.train_files", DEMO / "pretrain_en.txt",
                            "--tokenizer.vocab_size", "300"],
        "tokenizer extend": ["tokenizer", "extend", "--model.name_or_path", tokenizer_dir, "--extend.words",
                             DEMO / "pretrain_en.txt"],
        "pack": ["pack", "--model.name_or_path", tokenizer_dir, "--data.train_files", DEMO / "pretrain_en.txt"],
        "data clean": ["data", "clean", FIX / "sharegpt.jsonl"],
        "eval": ["eval", *m, "--template", "chatml", "--only_cpu", "--eval.mcq_files", DEMO / "mcq.jsonl",
                 "--eval.max_samples", "2"],
    }


@pytest.fixture(scope="module")
def lora_adapter(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adapter") / "out"
    assert main([str(a) for a in ["sft", "--model.name_or_path", tiny_llama, "--data.train_files", CHAT,
                                  "--finetune.type", "lora", *QUICK, *CHATML, "--output_dir", out]]) == 0
    return out


@pytest.mark.slow  # 16 commands x 3 flags, each refused before training: ~30 s
def test_no_command_touches_a_folder_it_did_not_write(tiny_llama, tiny_llama_cls, tokenizer_dir, lora_adapter,
                                                       tmp_path, capsys):
    commands = _commands(tiny_llama, tiny_llama_cls, tokenizer_dir, lora_adapter)
    for name, argv in commands.items():
        for flag in ((), ("--overwrite",), ("--resume",)):
            if flag == ("--resume",) and name in ("merge", "tokenizer train", "tokenizer extend", "pack",
                                                  "data clean", "eval"):
                continue  # these have no --resume
            d = tmp_path / f"{name.replace(' ', '_')}{''.join(flag)}"
            d.mkdir()
            _plant(d, FOREIGN)
            before = _snapshot(d)
            code = main([str(a) for a in [*argv, "--output_dir", d, *flag]])
            err = capsys.readouterr().err
            assert code == 1, f"medgpt {name} {flag} wrote into a folder it did not write"
            assert "medgpt did not write what it holds" in err and "Traceback" not in err, (name, flag, err)
            assert _snapshot(d) == before, f"medgpt {name} {flag} changed a user's file"
            assert not (d / MARKER).exists()


@pytest.mark.slow
def test_user_files_in_a_medgpt_output_survive_overwrite_and_resume(tiny_llama, tmp_path, capsys):
    """Files a user adds to a medgpt output later are left alone; ones that clash are refused, not replaced."""
    out = tmp_path / "out"
    sft = ["sft", "--model.name_or_path", tiny_llama, "--data.train_files", CHAT, *QUICK, *CHATML, "--output_dir", out]
    sft = [str(a) for a in sft]
    assert main(sft) == 0
    mine = {"notes.txt": b"my notes", "plots/auc.png": b"\x89PNG"}
    _plant(out, mine)
    for flag in (["--overwrite"], ["--resume", "--train.max_steps", "2"]):
        assert main(sft + flag) == 0
        assert {k: v for k, v in _snapshot(out).items() if k in mine} == mine
    for clash in ("checkpoint-2024-scans/scan.dcm", "checkpoint-9/x", "model.safetensors"):
        _plant(out, {clash: b"user"})
        before = _snapshot(out)
        for flag in (["--overwrite"], ["--resume"]):
            assert main(sft + flag) == 1
            assert "medgpt did not write there" in capsys.readouterr().err
            assert _snapshot(out) == before
        (out / clash).unlink()
        (out / clash).parent.rmdir() if (out / clash).parent != out else None


# ----------------------------------------------------------------------------- the marker itself

def test_a_new_dir_is_marked_and_a_foreign_dir_refused(tmp_path):
    out = prepare_output_dir(tmp_path / "a", command="sft")
    m = read_marker(out)
    assert m["tool"] == "medgpt" and m["command"] == "sft" and m["entries"] == [] and not m["complete"]
    foreign = tmp_path / "b"
    foreign.mkdir()
    (foreign / "scan.dcm").write_bytes(b"DICM")
    for kw in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(MedGPTError, match=r"not empty, and medgpt did not write what it holds \(scan.dcm"):
            prepare_output_dir(foreign, **kw)
    assert [p.name for p in foreign.iterdir()] == ["scan.dcm"]
    empty = tmp_path / "c"  # an empty folder is taken
    empty.mkdir()
    assert read_marker(prepare_output_dir(empty)) is not None


def test_a_forged_or_broken_marker_proves_nothing(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "data.csv").write_text("x")
    for text in ("{", '{"tool": "other", "entries": ["data.csv"]}', '{"tool": "medgpt"}', "[]"):
        (d / MARKER).write_text(text)
        with pytest.raises(MedGPTError, match="medgpt did not write"):
            prepare_output_dir(d, overwrite=True)
        assert (d / "data.csv").read_text() == "x"


def test_overwrite_keeps_the_earlier_result_until_the_new_one_is_complete(tmp_path):
    out = prepare_output_dir(tmp_path / "o", command="sft")
    claim(out, "model.safetensors", "checkpoint-4")
    (out / "model.safetensors").write_bytes(b"old")
    (out / "checkpoint-4").mkdir()
    mark_complete(out)
    (out / "notes.txt").write_text("mine")
    prepare_output_dir(out, overwrite=True, command="sft")
    assert not (out / "checkpoint-4").exists()  # would be resumed from or rotated against the new run's
    assert (out / "model.safetensors").read_bytes() == b"old"  # a failed new run costs nothing
    with pytest.raises(MedGPTError, match="unfinished `medgpt sft` output"):
        check_complete(out)
    claim(out, "adapter_model.safetensors")
    (out / "adapter_model.safetensors").write_bytes(b"new")
    mark_complete(out)
    assert not (out / "model.safetensors").exists()  # the earlier run's, not written again: gone now
    assert (out / "notes.txt").read_text() == "mine" and (out / "adapter_model.safetensors").exists()
    check_complete(out)


def test_a_failed_run_leaves_no_dir_and_an_existing_empty_dir_stays(tmp_path):
    new, existing = tmp_path / "new", tmp_path / "existing"
    existing.mkdir()
    for d in (new, existing):
        out = prepare_output_dir(d, command="sft")
        claim(out, "config.yaml")
        (out / "config.yaml").write_text("x")
    abandon()
    assert not new.exists()
    assert existing.is_dir() and not any(existing.iterdir())


def test_an_earlier_run_that_saved_nothing_is_explained_and_replaced(tmp_path, capsys):
    out = prepare_output_dir(tmp_path / "o", command="sft")
    claim(out, "config.yaml")
    (out / "config.yaml").write_text("x")  # then killed before its first checkpoint
    prepare_output_dir(out, command="sft")
    assert "stopped before saving anything" in capsys.readouterr().out
    claim(out, "checkpoint-2")
    (out / "checkpoint-2").mkdir()  # this one got further: not silently replaced
    with pytest.raises(MedGPTError, match="not empty.*--overwrite.*--resume"):
        prepare_output_dir(out, command="sft")


def test_stale_temp_files_of_dead_processes_go_and_nothing_else(tmp_path):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    files = {f".all.jsonl.medgpt-{dead}.ab12cd34.tmp": False, f".all.jsonl.medgpt-{os.getpid()}.ab12cd34.tmp": True,
             ".all.jsonl.ab12cd34.tmp": True, "all.jsonl.medgpt-1.ab12cd34.tmp": True, "keep.tmp": True}
    for name in files:
        (tmp_path / name).write_text("x")
    with atomic_write(tmp_path / "all.jsonl") as f:  # each atomic write cleans up after a killed one
        f.write("{}\n")
    assert {n: (tmp_path / n).exists() for n in files} == files
    assert remove_stale_temps(tmp_path) == []


def test_a_killed_final_save_is_refused_by_merge_and_load(tiny_llama, tmp_path, capsys):
    """A kill during the final save used to leave an adapter and a 0-byte training_args.bin that merge took."""
    out = tmp_path / "out"
    argv = [str(a) for a in ["sft", "--model.name_or_path", tiny_llama, "--data.train_files", CHAT,
                             "--finetune.type", "lora", *QUICK, *CHATML, "--output_dir", out]]
    assert main(argv) == 0
    marker = json.loads((out / MARKER).read_text())
    marker["complete"] = False  # as the marker stands while the final save is being written
    (out / MARKER).write_text(json.dumps(marker))
    (out / "training_args.bin").write_bytes(b"")
    assert main(["merge", "--model.adapter", str(out), "--output_dir", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert "unfinished `medgpt sft` output" in err and "--resume" in err
    assert not (tmp_path / "m").exists()
    assert main(["eval", "--model.name_or_path", str(tiny_llama), "--model.adapter", str(out), "--output_dir",
                 str(tmp_path / "e"), "--eval.mcq_files", str(DEMO / "mcq.jsonl")]) == 1
    assert "unfinished" in capsys.readouterr().err


def test_a_run_that_fails_after_its_checks_leaves_no_config_only_dir(tmp_path, capsys):
    """It used to leave an output dir holding only config.yaml (the model path failed to load after start)."""
    out = tmp_path / "out"
    code = main(["sft", "--model.name_or_path", str(tmp_path / "no-such-model"), "--data.train_files", CHAT,
                 "--template", "chatml", "--output_dir", str(out)])
    assert code == 1 and "does not exist" in capsys.readouterr().err
    assert not out.exists()
