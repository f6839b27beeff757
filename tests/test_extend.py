"""tokenizer extend: mined words, one token per added word, round trips, mean-initialised rows, LoRA on new rows."""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from functools import lru_cache
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "stages"))
from stagekit import QUICK, _tracked, assert_all_changed, assert_artifacts, run_stage  # noqa: E402

from medgpt.config import parse_argv  # noqa: E402
from medgpt.scratch.extend import (  # noqa: E402
    Config,
    _most_frequent_casing,  # noqa: E402
    count_candidates,
    run,
    select_words,
)
from medgpt.utils import MedGPTError  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "data"
DEMO = Path(__file__).parents[1] / "data" / "demo"
MIXED = ("高血压患者服用二甲双胍和paracetamol。Patients with hypertension (hypertension) take Paracetamol;"
         "\nhypertension\t 高血压  blood pressure，blood pressure 150/95 mmHg。")


def corpus() -> list[str]:
    """Four target words in varied contexts: every context word occurs < 10 times, each target >= 12 times."""
    who = ["老人", "病人", "孕妇", "儿童", "男士", "女士", "职员", "农民"]
    verb = ["确诊", "发现", "预防", "治疗", "关注", "检查", "询问", "讨论"]
    tail = ["需要长期管理", "应当定期复查", "可以控制病情", "不要随意停药", "注意饮食清淡", "坚持适量运动",
            "记录每日读数", "避免过度劳累"]
    subj = ["Older adults", "Many women", "Some men", "Young people", "Office workers", "Most farmers",
            "Several nurses", "Busy parents"]
    pred = ["often ignore", "rarely notice", "should monitor", "can control", "must treat", "may develop"]
    use = ["prefer", "tolerate", "receive", "avoid", "need", "trust"]
    lines = []
    for i in range(30):
        lines.append(f"{who[i % 8]}{verb[(3 * i) % 8]}高血压，{tail[i % 8]}。")
        lines.append(f"{who[(i + 3) % 8]}{verb[(5 * i) % 8]}二甲双胍，{tail[(i + 2) % 8]}。")
        lines.append(f"{subj[i % 8]} {pred[i % 6]} hypertension; {subj[(i + 5) % 8]} {use[i % 6]} metformin.")
    lines += [f"(hypertension) {i}" for i in range(12)]
    lines += [f"Hypertension {i}" for i in range(6)]
    return lines


@pytest.fixture(scope="module")
def words_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("words") / "terms.txt"
    # GBK on purpose: Chinese word lists often are; comments and blank lines are skipped.
    p.write_bytes("# 医学词表\n\n高血压\n二甲双胍\n对乙酰氨基酚\nparacetamol\nblood pressure\n高血压\n".encode("gbk"))
    return p


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_text("\n".join(corpus()) + "\n", encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def extended(tmp_path_factory, tiny_llama, words_file, corpus_file) -> tuple[Path, Path]:
    """(base, out): the tiny Llama with a chat template, and that model extended with list + mined words."""
    from transformers import AutoTokenizer

    from medgpt.data.templates import apply_template

    base = tmp_path_factory.mktemp("base") / "model"
    shutil.copytree(tiny_llama, base)
    tok = AutoTokenizer.from_pretrained(base)
    apply_template(tok, "chatml")
    tok.save_pretrained(base)
    out = tmp_path_factory.mktemp("extended") / "out"
    run_stage("tokenizer", "extend", corpus_file, "--model.name_or_path", base, "--extend.words", words_file,
              "--extend.num_words", "5", "--extend.min_count", "10", "--data.eval_files",
              f"{DEMO}/pretrain_zh.txt,{DEMO}/pretrain_en.txt", "--output_dir", out)
    return base, out


def test_mining_finds_the_frequent_words(tokenizer):
    n_tokens = lru_cache(maxsize=None)(lambda s: len(tokenizer(s, add_special_tokens=False).input_ids))
    counts = _most_frequent_casing(count_candidates(corpus()))
    picked = select_words(counts, n_tokens, num_words=4, min_count=10)
    assert {"高血压", "二甲双胍", " hypertension", "hypertension", " metformin"} <= set(picked)
    # Pieces of picked words gain nothing once the word is a token; the rarer casing is not kept.
    assert not {"高血", "血压", "二甲", "甲双胍", "二甲双", "Hypertension"} & set(picked)
    # The word list's forms count as taken: mining does not add them again, nor their pieces.
    again = select_words(counts, n_tokens, num_words=4, min_count=10, taken=["高血压", "二甲双胍"])
    assert not {"高血压", "二甲双胍", "血压", "甲双胍"} & set(again) and " hypertension" in again


def test_mining_weighs_the_words_a_token_would_cut(tokenizer):
    n_tokens = lru_cache(maxsize=None)(lambda s: len(tokenizer(s, add_special_tokens=False).input_ids))
    # A one-token word such as " because": adding "ecause" would split it into " b" + "ecause".
    word = next(t for t in (tokenizer.decode([i]) for i in range(300, 1024))
                if t.startswith(" ") and t[1:].isalpha() and len(t) >= 6 and n_tokens(t[2:]) > 1)
    inner = word[2:]
    assert select_words(Counter({inner: 20}), n_tokens, 5, 10) == [inner]
    assert select_words(Counter({inner: 20, word: 50 * n_tokens(inner)}), n_tokens, 5, 10) == []


def test_extend_tokenizer_from_word_list(tokenizer_dir, words_file, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    run_stage("tokenizer", "extend", "--model.name_or_path", tokenizer_dir, "--extend.words", words_file,
              "--output_dir", out)
    old, new = AutoTokenizer.from_pretrained(tokenizer_dir), AutoTokenizer.from_pretrained(out)
    for word in ["高血压", "二甲双胍", "对乙酰氨基酚", "paracetamol", " paracetamol", "blood pressure",
                 " blood pressure"]:
        ids = new(word, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] >= len(old), word
    for text in [MIXED, " hypertension", "  paracetamol  ", "二甲双胍二甲双胍", "para cetamol"]:
        assert new.decode(new(text, add_special_tokens=False).input_ids) == text
    assert len(new(MIXED).input_ids) < len(old(MIXED).input_ids)
    assert new.convert_tokens_to_ids("paracetamol") in new(MIXED).input_ids  # right after Chinese: "和paracetamol"
    report = json.loads((out / "extend_report.json").read_text())
    assert report["words_added"] == 5 and report["tokens_added"] == 7 and report["eval_text"] == "demo"
    assert report["gain"]["all"]["after"]["tokens_per_char"] < report["gain"]["all"]["before"]["tokens_per_char"]
    assert {p.name for p in out.iterdir()} >= {"tokenizer.json", "config.yaml", "extend_report.json"}


def test_extended_model_rows_are_sub_token_means(extended):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, out = extended
    old, new = AutoTokenizer.from_pretrained(base), AutoTokenizer.from_pretrained(out)
    n_added = len(new) - len(old)
    report = json.loads((out / "extend_report.json").read_text())
    assert report["tokens_added"] == n_added and report["mined"] >= 1
    assert {"高血压", " hypertension", " metformin"} <= set(report["tokens"])
    config = json.loads((out / "config.json").read_text())
    assert config["medgpt_added_tokens"] == n_added and config["vocab_size"] == len(new)

    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    for key in ["model.embed_tokens.weight", "lm_head.weight"]:  # the tiny Llama's head is untied
        w0, w1 = before[key], after[key]
        assert w1.shape[0] == len(new) and torch.equal(w1[:len(old)], w0)
        for form in report["tokens"]:
            new_id = new.convert_tokens_to_ids(form)
            sub = old(form, add_special_tokens=False).input_ids
            assert len(sub) > 1 and torch.equal(w1[new_id], w0[sub].float().mean(0)), (key, form)

    model = AutoModelForCausalLM.from_pretrained(out)
    ids = new(MIXED, return_tensors="pt").input_ids
    assert (ids >= len(old)).any()
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(new)) and torch.isfinite(logits).all()
    assert new.chat_template == old.chat_template and new.chat_template
    assert new.decode(new(MIXED, add_special_tokens=False).input_ids) == MIXED
    gain = report["gain"]["all"]
    assert gain["after"]["tokens_per_char"] < gain["before"]["tokens_per_char"]


def test_sft_lora_trains_the_new_rows(extended, tmp_path, monkeypatch):
    """The rows already match the tokenizer (no resize in load_model): config.json's marker makes them train."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    tracked = _tracked(monkeypatch)
    _, model = extended
    out = tmp_path / "sft"
    run_stage("sft", "--model.name_or_path", model, "--data.train_files", f"{FIXTURES}/sharegpt.jsonl",
              "--finetune.type", "lora", "--template", "chatml", "--output_dir", out, *QUICK)
    assert_all_changed(tracked)
    assert any("embed_tokens" in n for n in tracked["after"]) and any("lm_head" in n for n in tracked["after"])
    assert_artifacts(out, adapter=True)
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        emb = [k for k in f.keys() if "embed_tokens" in k]
        assert emb and f.get_tensor(emb[0]).shape[0] == len(AutoTokenizer.from_pretrained(model))


def _run(*argv) -> None:
    run(parse_argv(Config, [str(a) for a in argv], positional="data.train_files"))


def test_refuses_without_words(tokenizer_dir, tmp_path):
    with pytest.raises(MedGPTError, match="no words to add"):
        _run("--model.name_or_path", tokenizer_dir, "--output_dir", tmp_path / "out")
    with pytest.raises(MedGPTError, match="word list .*missing.txt does not exist"):
        _run("--model.name_or_path", tokenizer_dir, "--extend.words", tmp_path / "missing.txt",
             "--output_dir", tmp_path / "out")


def test_refuses_non_empty_output_dir(tokenizer_dir, words_file, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    for flag in ((), ("--overwrite",)):  # not a medgpt output: refused either way
        with pytest.raises(MedGPTError, match="not empty, and medgpt did not write"):
            _run("--model.name_or_path", tokenizer_dir, "--extend.words", words_file, "--output_dir", tmp_path / "out",
                 *flag)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    (tmp_path / "out" / "keep.txt").unlink()
    _run("--model.name_or_path", tokenizer_dir, "--extend.words", words_file, "--output_dir", tmp_path / "out")
    with pytest.raises(MedGPTError, match="not empty.*--overwrite"):
        _run("--model.name_or_path", tokenizer_dir, "--extend.words", words_file, "--output_dir", tmp_path / "out")
    _run("--model.name_or_path", tokenizer_dir, "--extend.words", words_file, "--output_dir", tmp_path / "out",
         "--overwrite")
    with pytest.raises(MedGPTError, match="is the input directory"):
        _run("--model.name_or_path", tmp_path / "out", "--extend.words", words_file, "--output_dir",
             tmp_path / "out", "--overwrite")


def test_refuses_words_that_are_single_tokens(tokenizer, tokenizer_dir, tmp_path):
    single = [t for t in (tokenizer.decode([i]) for i in range(300, 1024)) if t.isalpha()
              and len(tokenizer(t, add_special_tokens=False).input_ids) == 1
              and len(tokenizer(" " + t, add_special_tokens=False).input_ids) == 1][:5]
    assert single
    words = tmp_path / "words.txt"
    words.write_text("\n".join(single) + "\n", encoding="utf-8")
    with pytest.raises(MedGPTError, match="every word in .*words.txt is already a single token"):
        _run("--model.name_or_path", tokenizer_dir, "--extend.words", words, "--output_dir", tmp_path / "out")
    with pytest.raises(MedGPTError, match="nothing to add.*occurs at least 1000 times"):
        _run(FIXTURES / "sharegpt.jsonl", "--model.name_or_path", tokenizer_dir, "--extend.min_count", "1000",
             "--output_dir", tmp_path / "out2")


def test_refuses_model_smaller_than_tokenizer(tiny_llama, tokenizer_dir, words_file, tmp_path):
    from transformers import AutoTokenizer

    grown = tmp_path / "grown"
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_tokens(["高血压", "糖尿病"])
    tok.save_pretrained(grown)
    with pytest.raises(MedGPTError, match=r"has 1024 embedding rows but the tokenizer .* has 1026 tokens"):
        _run("--model.name_or_path", grown, "--extend.model", tiny_llama, "--extend.words", words_file,
             "--output_dir", tmp_path / "out")
    mismatched = tmp_path / "mismatched"
    shutil.copytree(tiny_llama, mismatched)
    tok.save_pretrained(mismatched)
    with pytest.raises(MedGPTError, match="do not belong together"):
        _run("--model.name_or_path", mismatched, "--extend.words", words_file, "--output_dir", tmp_path / "out2")


def test_padded_tied_table_reuses_spare_rows(tokenizer_dir, words_file, tmp_path):
    """A table already larger than the tokenizer (Qwen pads to a multiple of 128) keeps its size; tied weights."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok) + 64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    base = tmp_path / "base"
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    tok.save_pretrained(base)
    out = tmp_path / "out"
    _run("--model.name_or_path", base, "--extend.words", words_file, "--output_dir", out)
    new = AutoTokenizer.from_pretrained(out)
    w0 = load_file(base / "model.safetensors")["model.embed_tokens.weight"]
    w1 = load_file(out / "model.safetensors")["model.embed_tokens.weight"]
    assert w1.shape == w0.shape and torch.equal(w1[:len(tok)], w0[:len(tok)])
    sub = tok("二甲双胍", add_special_tokens=False).input_ids
    assert torch.equal(w1[new.convert_tokens_to_ids("二甲双胍")], w0[sub].mean(0))
    assert json.loads((out / "config.json").read_text())["medgpt_added_tokens"] == len(new) - len(tok)
