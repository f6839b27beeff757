"""Shared config groups. Commands compose these into their own `Config` dataclass.

Names are a public contract (see README): `--model.*`, `--data.*`, `--finetune.*`, `--train.*`, `--gen.*`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from medgpt.config import arg
from medgpt.utils import MedGPTError

SEED_MAX = 2**32 - 1  # numpy and CUDA seeds are 32-bit unsigned
FORMATS = ("auto", "text", "alpaca", "sharegpt", "openai", "qa", "preference", "prompt", "mcq")


@dataclass
class ModelArgs:
    name_or_path: str = arg("", "Base model: a local HF-format directory or a hub id.")
    adapter: Optional[str] = arg(None, "A LoRA adapter directory to load on top of the base model.")
    trust_remote_code: bool = arg(False, "Allow model code shipped with the checkpoint to run. Off unless you trust it.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = arg(
        "auto", "Weights dtype: auto picks bfloat16 on GPUs that support it, else float32.")
    init: Optional[Literal["llama", "qwen2"]] = arg(
        None, "`medgpt pt` only: build this architecture with random weights (shaped by --arch.*) instead of "
        "loading one; --model.name_or_path then names only the tokenizer (empty: the one the packed corpus records).")


@dataclass
class DataArgs:
    train_files: list[str] = arg(factory=list, help="Training data: files, globs, directories (recursive), "
                                 "a saved `datasets` dir or a hub dataset name; comma-separated.")
    eval_files: list[str] = arg(factory=list, help="Evaluation data, same forms as train_files.")
    max_samples: Optional[int] = arg(None, "Use at most this many records per split (for quick runs).", min=1)
    format: Literal[FORMATS] = arg("auto", "Record format; auto detects it per file.")  # type: ignore[valid-type]
    columns: dict[str, str] = arg(factory=dict, help="Map your column names onto canonical ones, e.g. "
                                  "prompt=question,response=answer (keys: prompt, response, system, query, history, "
                                  "chosen, rejected, text, messages, answer).")
    encoding: str = arg("auto", "Text encoding: auto (UTF-8 with or without BOM, else GB18030 when it decodes "
                        "cleanly) or any Python codec name (utf-8, gbk, gb18030, ...).")
    text_mode: Literal["line", "paragraph", "file"] = arg(
        "line", "For .txt files: one document per line, per blank-line-separated paragraph, or per file.")
    streaming: bool = arg(False, "Read files lazily instead of loading them into memory (corpora larger than RAM).")
    lang: Literal["all", "en", "zh"] = arg(
        "all", "Train on the records of one language only: zh keeps records holding Chinese characters, en the "
        "others (counted in the log). For a model that reads one of them, e.g. SmolLM2 (English).")
    eval_split: float = arg(0.0, "When no eval_files are given, hold out this fraction of train records.", min=0,
                             below=1)
    overlong: Literal["truncate", "drop"] = arg(
        "truncate", "Records longer than --train.max_length: truncate (keep every whole exchange that fits and "
        "the next answer up to the cut, which then has no end-of-turn token to learn; a prompt too long on its own "
        "loses the middle of its last turn, after its oldest turns) or drop (keep whole exchanges only; a record "
        "whose first exchange does not fit is dropped). Counted in the log and metrics.json either way.")
    max_invalid: float = arg(0.05, "Training skips invalid records (each named as file:line in the log, counted as "
                             "invalid_records in metrics.json) up to this fraction of the records read, default "
                             "0.05, and refuses more; 0: any invalid record stops the run. Unreadable files always "
                             "do; `medgpt data validate` and `data convert` never skip.", min=0, max=1)


@dataclass
class FinetuneArgs:
    type: Literal["full", "lora", "qlora"] = arg("lora", "Full fine-tuning, LoRA, or QLoRA (4-bit base).")
    lora_rank: int = arg(8, "LoRA rank r.", min=1)
    lora_alpha: int = arg(16, "LoRA alpha (scale = alpha / rank).", min=1)
    lora_dropout: float = arg(0.05, "Dropout on the LoRA path.", min=0, below=1)
    target_modules: list[str] = arg(factory=lambda: ["all-linear"], help="Modules that get LoRA; all-linear "
                                    "means every linear layer but the output head.")


@dataclass
class TrainArgs:
    max_steps: int = arg(-1, "Stop after this many optimizer steps (-1: run num_epochs).", min=-1)
    num_epochs: float = arg(1.0, "Passes over the training data (above 0 unless max_steps is set).", min=0)
    learning_rate: float = arg(2e-5, "Peak learning rate.", above=0)
    batch_size: int = arg(4, "Per-device batch size.", min=1)
    gradient_accumulation_steps: int = arg(1, "Micro-batches per optimizer step.", min=1)
    max_length: int = arg(1024, "Longest tokenized sample; longer conversations lose whole turns from the end.",
                           min=1)
    seed: int = arg(42, "Random seed (data order, init, dropout).", min=0, max=SEED_MAX)
    lr_scheduler: str = arg("cosine", "Learning-rate schedule after warmup: cosine, linear, constant, "
                            "warmup_stable_decay, ...")
    warmup: float = arg(0.03, "Warmup: a fraction of the total steps (< 1) or a number of steps (>= 1).", min=0)
    weight_decay: float = arg(0.0, "AdamW weight decay.", min=0)
    max_grad_norm: float = arg(1.0, "Clip gradients to this global norm (0: no clipping).", min=0)
    gradient_checkpointing: bool = arg(False, "Recompute activations in the backward pass: less memory, ~30% slower.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = arg(
        "auto", "Mixed precision: auto uses bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU.")
    logging_steps: int = arg(10, "Log loss and learning rate every N steps (progress bar, TensorBoard).", min=1)
    save_steps: int = arg(500, "Write a resumable checkpoint-N every N steps (0: only the final model).", min=0)
    save_total_limit: int = arg(2, "Keep at most this many checkpoints.", min=0)
    eval_steps: int = arg(0, "Evaluate every N steps when eval data exists (0: once at the end).", min=0)
    eval_batch_size: int = arg(8, "Per-device batch size for evaluation.", min=1)
    num_workers: int = arg(0, "Data-loader worker processes.", min=0)
    tensorboard: bool = arg(True, "Write TensorBoard logs under <output_dir>/runs/.")
    peak_seconds: float = arg(1.0, "Measure this machine's matmul peak this long at the start, for the MFU in the "
                              "logs and metrics.json (0: no MFU; tokens/s are always reported).", min=0)

    def validate(self) -> None:
        """num_epochs only counts when max_steps does not; with neither the run would save an untrained model."""
        if self.max_steps <= 0 and self.num_epochs <= 0:
            raise MedGPTError(f"--train.num_epochs {self.num_epochs:g} with --train.max_steps {self.max_steps}: the "
                              f"run would train nothing and save an untrained model. Set --train.num_epochs above 0, "
                              f"or --train.max_steps N.")


@dataclass
class GenArgs:
    max_new_tokens: int = arg(512, "Most tokens to generate per answer.", min=1)
    temperature: float = arg(0.7, "Sampling temperature; 0 means greedy.", min=0)
    top_p: float = arg(0.9, "Nucleus sampling: keep the smallest token set with this total probability.", above=0,
                        max=1)
    repetition_penalty: float = arg(1.1, "Penalty > 1 discourages repeating tokens (1 turns it off).", above=0)
    top_k: int = arg(0, "Sample only from the k most likely tokens (0: no limit).", min=0)
    seed: Optional[int] = arg(None, "Random seed for sampling (reproducible answers).", min=0, max=SEED_MAX)
    repetition_guard: bool = arg(True, "Stop a reply whose tail repeats the same unit 3+ times (24+ tokens) "
                                 "and keep one copy: small models loop.")


@dataclass
class RewardArgs:
    model: Optional[str] = arg(None, "Reward model directory (the output of `medgpt rm`).")
    functions: list[str] = arg(factory=list, help="Built-in rule rewards: answer_match (records with an answer), "
                               "length, format, repetition; comma-separated.")
    weights: list[float] = arg(factory=list, help="One weight per reward source: the reward model first (when "
                               "given), then each function in order; a negative one penalizes. Default: all 1.",
                               unbounded=True)
