"""Shared config groups. Commands compose these into their own `Config` dataclass.

Names are a public contract (see README): `--model.*`, `--data.*`, `--finetune.*`, `--train.*`, `--gen.*`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from medgpt.config import arg

FORMATS = ("auto", "text", "alpaca", "sharegpt", "openai", "qa", "preference", "prompt", "mcq")


@dataclass
class ModelArgs:
    name_or_path: str = arg("", "Base model: a local HF-format directory or a hub id.")
    adapter: Optional[str] = arg(None, "A LoRA adapter directory to load on top of the base model.")
    trust_remote_code: bool = arg(False, "Allow model code shipped with the checkpoint to run. Off unless you trust it.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = arg(
        "auto", "Weights dtype: auto picks bfloat16 on GPUs that support it, else float32.")


@dataclass
class DataArgs:
    train_files: list[str] = arg(factory=list, help="Training data: files, globs, directories (recursive), "
                                 "a saved `datasets` dir or a hub dataset name; comma-separated.")
    eval_files: list[str] = arg(factory=list, help="Evaluation data, same forms as train_files.")
    max_samples: Optional[int] = arg(None, "Use at most this many records per split (for quick runs).")
    format: Literal[FORMATS] = arg("auto", "Record format; auto detects it per file.")  # type: ignore[valid-type]
    columns: dict[str, str] = arg(factory=dict, help="Map your column names onto canonical ones, e.g. "
                                  "prompt=question,response=answer (keys: prompt, response, system, query, history, "
                                  "chosen, rejected, text, messages, answer).")
    encoding: str = arg("auto", "Text encoding: auto (UTF-8 with or without BOM, else GB18030 when it decodes "
                        "cleanly) or any Python codec name (utf-8, gbk, gb18030, ...).")
    text_mode: Literal["line", "paragraph", "file"] = arg(
        "line", "For .txt files: one document per line, per blank-line-separated paragraph, or per file.")
    streaming: bool = arg(False, "Read files lazily instead of loading them into memory (corpora larger than RAM).")
    eval_split: float = arg(0.0, "When no eval_files are given, hold out this fraction of train records.")


@dataclass
class FinetuneArgs:
    type: Literal["full", "lora", "qlora"] = arg("lora", "Full fine-tuning, LoRA, or QLoRA (4-bit base).")
    lora_rank: int = arg(8, "LoRA rank r.")
    lora_alpha: int = arg(16, "LoRA alpha (scale = alpha / rank).")
    lora_dropout: float = arg(0.05, "Dropout on the LoRA path.")
    target_modules: list[str] = arg(factory=lambda: ["all-linear"], help="Modules that get LoRA; all-linear "
                                    "means every linear layer but the output head.")


@dataclass
class TrainArgs:
    max_steps: int = arg(-1, "Stop after this many optimizer steps (-1: run num_epochs).")
    num_epochs: float = arg(1.0, "Passes over the training data.")
    learning_rate: float = arg(2e-5, "Peak learning rate.")
    batch_size: int = arg(4, "Per-device batch size.")
    gradient_accumulation_steps: int = arg(1, "Micro-batches per optimizer step.")
    max_length: int = arg(1024, "Longest tokenized sample; longer conversations lose whole turns from the end.")
    seed: int = arg(42, "Random seed (data order, init, dropout).")


@dataclass
class GenArgs:
    max_new_tokens: int = arg(512, "Most tokens to generate per answer.")
    temperature: float = arg(0.7, "Sampling temperature; 0 means greedy.")
    top_p: float = arg(0.9, "Nucleus sampling: keep the smallest token set with this total probability.")
    repetition_penalty: float = arg(1.1, "Penalty > 1 discourages repeating tokens.")
