"""Offline test kit: a BPE tokenizer trained on the shipped demo corpus and tiny real-architecture models.

Everything is built locally in a session fixture (random init + save_pretrained), so no test touches a hub.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"

# A few lines that always exist, so the kit works even on a checkout without the demo corpus.
_SEED_TEXT = [
    "高血压是指血压持续高于140/90 mmHg，需要长期管理。",
    "Hypertension means blood pressure at or above 140/90 mmHg on repeated readings.",
    "对乙酰氨基酚成人每日最大剂量为4克，过量会损伤肝脏。",
    "Paracetamol: adults should not take more than 4 g in 24 hours.",
    "If you notice face drooping, arm weakness or speech difficulty, call emergency services.",
    "如果出现胸痛并向左臂放射，请立即拨打急救电话。",
]


def demo_texts() -> list[str]:
    texts = list(_SEED_TEXT)
    for p in sorted(DEMO.glob("*.txt")) + sorted((DEMO / "knowledge").glob("*.md")):
        texts += [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    # A fixed list: a data file added to data/demo later must not change the test tokenizer (and so every tiny
    # model's greedy output that tests rely on).
    for p in [DEMO / n for n in ("mcq.jsonl", "preference.jsonl", "safety.jsonl", "sft_alpaca.json",
                                 "sft_sharegpt.jsonl")]:
        texts.append(p.read_text(encoding="utf-8")[:200_000])
    return texts


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A saved PreTrainedTokenizerFast: ByteLevel BPE (~1k vocab) with ChatML special tokens, no chat template."""
    from medgpt.scratch.tokenizer import train_bpe

    out = tmp_path_factory.mktemp("tokenizer")
    tok = train_bpe(demo_texts(), vocab_size=1024, show_progress=False)
    tok.save_pretrained(out)
    return out


@pytest.fixture()
def tokenizer(tokenizer_dir):
    """A fresh tokenizer per test (tests may set its chat_template or add tokens)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _tiny_config(arch: str, vocab_size: int, **extra):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                  tie_word_embeddings=False, **extra)
    return (LlamaConfig if arch == "llama" else Qwen2Config)(**common)


def _build(tmp_path_factory, tokenizer_dir, arch: str, head: str) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    extra = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "bos_token_id": None}
    if head == "cls":
        extra["num_labels"] = 1
    cfg = _tiny_config(arch, len(tok), **extra)
    torch.manual_seed(0)
    cls = AutoModelForCausalLM if head == "lm" else AutoModelForSequenceClassification
    model = cls.from_config(cfg)
    out = tmp_path_factory.mktemp(f"tiny-{arch}-{head}")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer_dir) -> Path:
    """Directory of a tiny random LlamaForCausalLM (a few thousand parameters) with its tokenizer."""
    return _build(tmp_path_factory, tokenizer_dir, "llama", "lm")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, tokenizer_dir) -> Path:
    return _build(tmp_path_factory, tokenizer_dir, "qwen2", "lm")


@pytest.fixture(scope="session")
def tiny_llama_cls(tmp_path_factory, tokenizer_dir) -> Path:
    """Tiny LlamaForSequenceClassification with one label (a reward model)."""
    return _build(tmp_path_factory, tokenizer_dir, "llama", "cls")


@pytest.fixture(scope="session")
def tiny_qwen2_cls(tmp_path_factory, tokenizer_dir) -> Path:
    return _build(tmp_path_factory, tokenizer_dir, "qwen2", "cls")
