"""sft: 2 steps on the tiny model, full / LoRA / QLoRA / packing; the saved tokenizer carries the template."""

from __future__ import annotations

import pytest

from stagekit import FIXTURES, QUICK, assert_all_changed, assert_artifacts, run_stage

DATA = f"{FIXTURES}/sharegpt.jsonl,{FIXTURES}/alpaca.json,{FIXTURES}/openai.jsonl"


@pytest.mark.parametrize("ft", ["full", "lora"])
def test_sft_trains_and_saves(ft, tiny_llama, tmp_path, tracked):
    out = tmp_path / "out"
    run_stage("sft", "--model.name_or_path", tiny_llama, "--data.train_files", DATA, "--finetune.type", ft,
              "--template", "chatml", "--output_dir", out, *QUICK)
    assert_all_changed(tracked)
    metrics = assert_artifacts(out, adapter=ft == "lora")
    assert metrics["global_step"] == 2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert "{% generation %}" in tok.chat_template or "generation" in tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_sft_packing_qwen2(tiny_qwen2, tmp_path, tracked):
    out = tmp_path / "out"
    run_stage("sft", "--model.name_or_path", tiny_qwen2, "--data.train_files", DATA, "--finetune.type", "full",
              "--template", "chatml", "--sft.packing", "true", "--output_dir", out, *QUICK)
    assert_all_changed(tracked)
    assert_artifacts(out, adapter=False)


def test_sft_qlora(tiny_llama, tmp_path, tracked):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "out"
    run_stage("sft", "--model.name_or_path", tiny_llama, "--data.train_files", DATA, "--finetune.type", "qlora",
              "--template", "chatml", "--output_dir", out, *QUICK)
    assert_all_changed(tracked)
    assert_artifacts(out, adapter=True)
