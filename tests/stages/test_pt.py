"""pt: 2 steps on the tiny model (full, LoRA, streaming), perplexity in metrics, blocks, clear refusals."""

from __future__ import annotations

import math

import pytest
from stagekit import DEMO, FIXTURES, QUICK, assert_all_changed, assert_artifacts, run_stage

from medgpt.cli import main


def fails(capsys, *argv) -> str:
    """Run a command that must be refused; return its error message."""
    assert main([str(a) for a in argv]) == 1
    return capsys.readouterr().err


def check_perplexity(metrics: dict) -> None:
    assert math.isfinite(metrics["eval_loss"]) and math.isfinite(metrics["perplexity"])
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))


@pytest.mark.parametrize("ft", ["full", "lora"])
def test_pt_trains_and_saves(ft, tiny_llama, tmp_path, tracked):
    out = tmp_path / "out"
    run_stage("pt", "--model.name_or_path", tiny_llama, "--data.train_files", DEMO / "pretrain_en.txt",
              "--data.max_samples", 60, "--data.eval_split", 0.2, "--finetune.type", ft, "--output_dir", out, *QUICK)
    assert_all_changed(tracked)
    metrics = assert_artifacts(out, adapter=ft == "lora")
    assert metrics["global_step"] == 2
    check_perplexity(metrics)


def test_pt_streaming(tiny_qwen2, tmp_path, tracked):
    out = tmp_path / "out"
    run_stage("pt", "--model.name_or_path", tiny_qwen2, "--data.train_files", DEMO / "pretrain_zh.txt",
              "--data.streaming", "true", "--data.eval_files", FIXTURES / "corpus.txt", "--finetune.type", "full",
              "--output_dir", out, *QUICK, "--train.max_length", 16)
    assert_all_changed(tracked)
    metrics = assert_artifacts(out, adapter=False)
    assert metrics["global_step"] == 2
    check_perplexity(metrics)


def test_blocks_are_full_and_joined_with_eos(tokenizer):
    from medgpt.stages.pt import blocks_dataset

    texts = ["Hypertension is high blood pressure.", "高血压是常见的慢性病。", "The kidneys filter blood."]
    ds = blocks_dataset(texts, tokenizer, 8, "train", "--data.train_files")
    stream = []
    for t in texts:
        stream += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert all(len(b) == 8 for b in ds["input_ids"])
    assert sum(ds["input_ids"], []) == stream[:8 * len(ds)]  # in order; only the tail shorter than a block is cut


def test_pt_refuses_streaming_without_max_steps(tiny_llama, tmp_path, capsys):
    err = fails(capsys, "pt", "--model.name_or_path", tiny_llama, "--data.train_files", DEMO / "pretrain_en.txt",
                "--data.streaming", "true", "--output_dir", tmp_path / "out")
    assert "--train.max_steps" in err and "stream" in err


@pytest.mark.parametrize("streaming", ["false", "true"])
def test_pt_refuses_corpus_smaller_than_a_block(streaming, tiny_llama, tmp_path, capsys):
    err = fails(capsys, "pt", "--model.name_or_path", tiny_llama, "--data.train_files", FIXTURES / "corpus.txt",
                "--data.streaming", streaming, "--output_dir", tmp_path / "out", *QUICK)
    assert "fewer than one block of --train.max_length 256 tokens" in err
    assert "the corpus has" in err and "--data.train_files" in err


@pytest.mark.parametrize("streaming", ["false", "true"])
def test_pt_refuses_chat_data(streaming, tiny_llama, tmp_path, capsys):
    # Chat records do not turn into text (which role's words? which template?): the user must say what they mean.
    err = fails(capsys, "pt", "--model.name_or_path", tiny_llama, "--data.train_files", FIXTURES / "sharegpt.jsonl",
                "--data.streaming", streaming, "--output_dir", tmp_path / "out", *QUICK)
    assert "pt needs text records {text}" in err and "holds chat records" in err
    assert "Traceback" not in err
