"""Train a byte-level BPE tokenizer for a mini model from scratch.

    medgpt tokenizer train --data.train_files data/demo --tokenizer.vocab_size 6400 --output_dir out/tokenizer

Byte-level BPE never produces an unknown token (any UTF-8 byte is in the base alphabet), so Chinese,
English and stray symbols all round-trip. The vocabulary is small by default: in a model of a few million
parameters the embedding table would otherwise be most of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from medgpt.args import DataArgs
from medgpt.config import arg, save_config, section
from medgpt.data.text import record_text

EOS = "<|endoftext|>"   # document separator in pretraining; also ends generation of base models
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"   # end of an assistant turn in ChatML
PAD = "<|pad|>"         # padding has its own id, so nothing mistakes it for a real end of text


def special_tokens(n_reserved: int = 8) -> list[str]:
    # Reserved slots let later stages add tokens (tools, images) without resizing the embeddings.
    return [EOS, IM_START, IM_END, PAD] + [f"<|reserved_{i}|>" for i in range(n_reserved)]


def train_bpe(texts: Iterable[str], vocab_size: int = 6400, min_frequency: int = 2,
              n_reserved: int = 8, show_progress: bool = True) -> PreTrainedTokenizerFast:
    """Train ByteLevel BPE on an iterator of strings and wrap it as a HF fast tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens(n_reserved),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=None,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=1 << 20,
        clean_up_tokenization_spaces=False,
    )


# ----------------------------------------------------------------------------- the command



@dataclass
class TokenizerArgs:
    vocab_size: int = arg(6400, "Vocabulary size, special tokens included. Small keeps a mini model's "
                          "embedding table a small share of its weights.", min=1)
    min_frequency: int = arg(2, "A merge must occur at least this often in the corpus.", min=1)
    n_reserved: int = arg(8, "Reserved special tokens <|reserved_i|> for later use without resizing.", min=0)
    template: str = arg("chatml", "Chat template saved into the tokenizer (used by training and inference).")
    heldout_fraction: float = arg(0.02, "Share of documents kept out of training to report characters per token.",
                                  min=0, below=1)


@dataclass
class TrainConfig:
    data: DataArgs = section(DataArgs, "Text to learn the vocabulary from (any supported format).")
    tokenizer: TokenizerArgs = section(TokenizerArgs)
    output_dir: str = arg("", "Where to save the tokenizer (a PreTrainedTokenizerFast directory).")
    overwrite: bool = arg(False, "Write into a non-empty output_dir.")


def train(cfg: TrainConfig) -> int:
    """Train a byte-level BPE tokenizer and save it with its chat template."""
    import random

    from medgpt.data.templates import apply_template
    from medgpt.data.validate import iter_canonical
    from medgpt.outdir import final_save, prepare_output_dir
    from medgpt.utils import MedGPTError, log

    if not cfg.data.train_files:
        raise MedGPTError("no training text given. Add --data.train_files FILES (files, globs or directories).")
    out = prepare_output_dir(cfg.output_dir, cfg.overwrite, command="tokenizer train")
    d = cfg.data
    rng = random.Random(0)
    heldout: list[str] = []
    n_docs = 0

    def texts():
        nonlocal n_docs
        records = iter_canonical(d.train_files, format=d.format, columns=d.columns,
                                 encoding=d.encoding, text_mode=d.text_mode)
        for i, rec in enumerate(records):
            if d.max_samples is not None and i >= d.max_samples:
                break
            text = record_text(rec)
            if not text.strip():
                continue
            if rng.random() < cfg.tokenizer.heldout_fraction and len(heldout) < 2000:
                heldout.append(text)
                continue
            n_docs += 1
            yield text

    t = cfg.tokenizer
    import sys

    tok = train_bpe(texts(), vocab_size=t.vocab_size, min_frequency=t.min_frequency, n_reserved=t.n_reserved,
                    show_progress=sys.stderr.isatty())
    if n_docs == 0:
        raise MedGPTError(f"the corpus {', '.join(d.train_files)} holds no text to learn from.")
    apply_template(tok, t.template)
    with final_save(out) as staging:
        tok.save_pretrained(staging)
        save_config(cfg, staging / "config.yaml")
    sample = heldout or ["高血压患者应定期测量血压。 Patients with hypertension should check their blood pressure."]
    n_chars = sum(len(s) for s in sample)
    n_tokens = sum(len(tok(s, add_special_tokens=False).input_ids) for s in sample)
    log(f"trained on {n_docs} documents; vocabulary {len(tok)} tokens; "
        f"{n_chars / max(n_tokens, 1):.2f} characters per token on {len(sample)} held-out documents")
    log(f"saved tokenizer to {out}")
    return 0
