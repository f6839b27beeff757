"""`medgpt data stats` and `medgpt tokenizer train` through the real CLI."""

from __future__ import annotations

from pathlib import Path

from medgpt.cli import main
from medgpt.data.commands import percentile

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "data"


def test_percentile_nearest_rank():
    values = list(range(1, 101))
    assert percentile(values, 50) == 51 and percentile(values, 99) == 99 and percentile(values, 100) == 100
    assert percentile([], 50) == 0


def test_stats_prints_percentiles_and_writes_png(tiny_llama, tmp_path, capsys):
    png = tmp_path / "len.png"
    code = main(["data", "stats", str(FIX / "sharegpt.jsonl"), str(FIX / "text.jsonl"),
                 "--model.name_or_path", str(tiny_llama), "--template", "chatml", "--output", str(png)])
    assert code == 0
    out = capsys.readouterr().out
    assert "p50" in out and "p99" in out and "sharegpt.jsonl" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # chat rows report a trained share below 100% (user turns are masked), text rows 100%
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(str(FIX))}
    assert rows[str(FIX / "text.jsonl")][-1] == "100%"
    assert int(rows[str(FIX / "sharegpt.jsonl")][-1].rstrip("%")) < 100


def test_stats_needs_a_tokenizer(capsys):
    assert main(["data", "stats", str(FIX / "text.jsonl")]) == 1
    assert "--model.name_or_path" in capsys.readouterr().err


def test_tokenizer_train_roundtrips_chinese_and_english(tmp_path):
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--data.train_files", str(ROOT / "data" / "demo" / "pretrain_zh.txt") + ","
                 + str(ROOT / "data" / "demo" / "pretrain_en.txt"), "--tokenizer.vocab_size", "800",
                 "--output_dir", str(out)]) == 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    for text in ["高血压患者每天食盐不超过5克。", "Take paracetamol at most 4 g a day; 😀 ünïcode"]:
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text
    assert len(tok) == 800
    assert tok.convert_tokens_to_ids("<|im_end|>") != tok.unk_token_id
    rendered = tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    assert (out / "config.yaml").exists()


def test_tokenizer_train_refuses_non_empty_output(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert main(["tokenizer", "train", "--data.train_files", str(FIX / "corpus.txt"), "--output_dir",
                 str(tmp_path)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "x"


# ----------------------------------------------------------------------------- validate and convert on hostile data

def _cli(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "medgpt.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_validate_reports_medicalgpt_reward_file_as_preference(capsys):
    assert main(["data", "validate", str(FIX / "medicalgpt_reward.jsonl")]) == 0
    assert f"{FIX / 'medicalgpt_reward.jsonl'}: preference, 6 records, 0 errors" in capsys.readouterr().out


def test_validate_refuses_a_named_pipe_without_opening_it(tmp_path):
    import os

    (tmp_path / "ok.jsonl").write_text('{"text": "a"}\n')
    os.mkfifo(tmp_path / "pipe.jsonl")
    r = _cli("data", "validate", str(tmp_path))  # in a subprocess: a regression would block, not pass
    assert r.returncode == 1, r.stderr
    assert f"{tmp_path / 'pipe.jsonl'}: not a regular file (a named pipe, socket or device)" in r.stdout


HOSTILE = ['{"question": "\\ud800 pain?", "answer": "a"}', '{"question": ' + "[" * 100_000 + "]" * 100_000 + "}"]


def test_validate_and_convert_report_surrogates_and_deep_nesting_by_line(tmp_path):
    src = tmp_path / "x.jsonl"
    src.write_text('{"question": "q", "answer": "a"}\n' + "\n".join(HOSTILE) + "\n")
    r = _cli("data", "validate", str(src))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"{src}:2: lone surrogate \\ud800" in r.stdout and f"{src}:3: JSON nested too deeply" in r.stdout
    r = _cli("data", "convert", str(src), "--output", str(tmp_path / "out.jsonl"))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"{src}:2: lone surrogate" in r.stderr and not (tmp_path / "out.jsonl").exists()


def test_convert_into_its_input_dir_never_reads_its_own_output(tmp_path, capsys):
    import json

    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n"
                                               for i in range(200)))
    out = tmp_path / "all.jsonl"
    for _ in range(3):
        assert main(["data", "convert", str(tmp_path), "--output", str(out), "--overwrite"]) == 0
        assert len(out.read_text().splitlines()) == 200
    (tmp_path / ".all.jsonl.medgpt-99999.abcdefgh.tmp").write_text(out.read_text())  # a killed run's temp file
    assert main(["data", "convert", str(tmp_path), "--output", str(out), "--overwrite"]) == 0
    assert len(out.read_text().splitlines()) == 200
    assert "not reading" in capsys.readouterr().out
    assert main(["data", "convert", str(out), "--output", str(out), "--overwrite"]) == 1
    assert "the only input given is the output file" in capsys.readouterr().err
