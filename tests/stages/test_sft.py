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


def test_sft_grows_embeddings_for_added_tokens(tiny_llama, tmp_path, tracked):
    """A tokenizer with tokens the model lacks: rows are added (mean-initialised) and train under LoRA."""
    import shutil

    from safetensors import safe_open
    from transformers import AutoTokenizer

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    tok = AutoTokenizer.from_pretrained(base)
    n_old = len(tok)
    tok.add_tokens(["高血压", "二甲双胍"])
    tok.save_pretrained(base)
    out = tmp_path / "out"
    run_stage("sft", "--model.name_or_path", base, "--data.train_files", DATA, "--finetune.type", "lora",
              "--template", "chatml", "--output_dir", out, *QUICK)
    assert_all_changed(tracked)
    assert any("embed_tokens" in n for n in tracked["after"]), "embeddings must train when the vocab grew"
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        emb = [k for k in f.keys() if "embed_tokens" in k]
        assert emb and f.get_tensor(emb[0]).shape[0] == n_old + 2


def test_resize_embeddings_mean_init(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    from medgpt.model.vocab import resize_embeddings

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    w = model.get_input_embeddings().weight
    n = w.shape[0]
    expected_mean = w.detach().mean(0).clone()
    expected_sub = w.detach()[[5, 9]].mean(0).clone()
    assert resize_embeddings(model, n + 3, init_rows={n + 2: [5, 9]}) == 3
    w = model.get_input_embeddings().weight
    assert torch.allclose(w[n], expected_mean) and torch.allclose(w[n + 1], expected_mean)
    assert torch.allclose(w[n + 2], expected_sub)
    assert model.get_output_embeddings().weight.shape[0] == n + 3 and model.config.vocab_size == n + 3
    assert resize_embeddings(model, n) == 0  # never shrinks


def test_sft_gradient_checkpointing_and_neftune(tiny_llama, tmp_path, tracked):
    out = tmp_path / "out"
    run_stage("sft", "--model.name_or_path", tiny_llama, "--data.train_files", DATA, "--finetune.type", "lora",
              "--template", "chatml", "--train.gradient_checkpointing", "true", "--sft.neftune_noise_alpha", "5",
              "--output_dir", out, *QUICK)
    assert_all_changed(tracked)
    assert_artifacts(out, adapter=True)
