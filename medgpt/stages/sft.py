"""Supervised fine-tuning on conversations: only the assistant's words (and its end-of-turn token) train.

    medgpt sft configs/tiny/sft.yaml
    medgpt sft --model.name_or_path Qwen/Qwen2.5-0.5B-Instruct --data.train_files data/demo/sft_sharegpt.jsonl \
        --finetune.type lora --template tokenizer --output_dir out/sft

Recipe: validate data -> tokenizer + template -> tokenize (ids, labels) -> load model (+LoRA) -> TRL SFTTrainer
-> save. Labels come from medgpt.data.templates, never from the trainer, so training and inference render the
same template (it is saved into the output tokenizer).

Packing (--sft.packing): conversations are packed best-fit into rows of max_length with position ids
restarting per conversation; transformers turns those into a block-diagonal causal mask for sdpa/eager and
variable-length kernels for flash-attention, so no token attends across conversations. On CPU each conversation
attends only to itself (model/attention.py: no work on the masked-out blocks), so a batch's rows are joined into
one row with no padding (TRL's padding-free form); elsewhere rows stay separate, so that a masked kernel never
costs more than the padded batch would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from medgpt.args import DataArgs, FinetuneArgs, ModelArgs, TrainArgs
from medgpt.config import arg, section


@dataclass
class SFTArgs:
    packing: bool = arg(False, "Pack conversations into full rows (padding-free; no attention across samples).")
    neftune_noise_alpha: Optional[float] = arg(None, "NEFTune: add uniform noise of this scale to the input "
                                               "embeddings while training (e.g. 5). None disables it.", min=0)


@dataclass
class Config:
    model: ModelArgs = section(ModelArgs)
    data: DataArgs = section(DataArgs, "Conversations: Alpaca, ShareGPT, OpenAI messages, QA pairs, ...")
    finetune: FinetuneArgs = section(FinetuneArgs)
    train: TrainArgs = section(TrainArgs)
    sft: SFTArgs = section(SFTArgs)
    template: str = arg("tokenizer", "Chat template name, or `tokenizer` to use the tokenizer's own.")
    output_dir: str = arg("", "Where checkpoints, the final model and logs go.")
    overwrite: bool = arg(False, "Write into a non-empty output_dir.")
    resume: bool = arg(False, "Continue from the last complete checkpoint in output_dir.")


def run(cfg: Config) -> int:
    """Supervised fine-tuning with assistant-only labels."""
    from medgpt.data.prepare import PackedCollator, chat_dataset, pack
    from medgpt.data.templates import apply_template, get_template_for
    from medgpt.data.validate import load_splits
    from medgpt.model.attention import use_packed_attention
    from medgpt.model.load import load_model, load_tokenizer
    from medgpt.train import run as R

    # Data first: a bad file fails in seconds, before any model loads.
    train_records, eval_records, invalid = load_splits(cfg.data, "chat", purpose="sft", seed=cfg.train.seed)
    from trl import SFTConfig, SFTTrainer
    out = R.start(cfg)
    tokenizer = load_tokenizer(cfg.model)
    template = get_template_for(cfg.template, tokenizer)
    fit = (template, tokenizer, cfg.train.max_length)
    train_ds = chat_dataset(train_records, *fit, "train", cfg.data.overlong)
    eval_ds = chat_dataset(eval_records, *fit, "eval", cfg.data.overlong) if eval_records else None

    if cfg.sft.packing:
        train_ds = pack(train_ds, cfg.train.max_length)
    model = load_model(cfg.model, cfg.finetune, gradient_checkpointing=cfg.train.gradient_checkpointing,
                       vocab_size=len(tokenizer))
    R.log_parameters(model)
    # packed rows on CPU: each sample attends only to itself, so a batch is one row with no padding at all
    flatten = cfg.sft.packing and use_packed_attention(model) and next(model.parameters()).device.type == "cpu"
    apply_template(tokenizer, template)  # the saved tokenizer renders exactly what we trained on

    args = SFTConfig(
        **R.trainer_kwargs(cfg.train, out, has_eval=eval_ds is not None),
        max_length=cfg.train.max_length,
        neftune_noise_alpha=cfg.sft.neftune_noise_alpha,
        dataset_num_proc=None,
    )
    collator = PackedCollator(tokenizer.pad_token_id, real_tokens=True, flatten=flatten) if cfg.sft.packing else None
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, callbacks=[R.checkpoint_callback()],
                         data_collator=collator)
    result = R.train(trainer, cfg, out)
    metrics = dict(result.metrics)
    if eval_ds is not None:
        metrics.update(trainer.evaluate())
    metrics["invalid_records"] = invalid  # skipped by load_splits (--data.max_invalid)
    R.save_artifacts(trainer, tokenizer, out, metrics)
    return 0
