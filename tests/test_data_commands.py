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
