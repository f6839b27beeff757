"""ORPO: supervised fine-tuning and preference alignment in one loss, with no reference model.

    medgpt orpo configs/tiny/orpo.yaml --model.name_or_path DIR --output_dir out/orpo
    medgpt orpo --model.name_or_path Qwen/Qwen2.5-0.5B-Instruct --data.train_files data/demo/preference.jsonl \
        --finetune.type lora --template tokenizer --orpo.beta 0.1 --output_dir out/orpo

Hong et al. 2024, https://arxiv.org/abs/2403.07691. Per pair, with log P the length-averaged log-prob of a reply:
    L = NLL(chosen) - λ · log σ(log odds(chosen) - log odds(rejected)),   odds = P / (1 - P),
exactly `medgpt.train.losses.orpo_loss` (λ is --orpo.beta). ORPO starts from a base or SFT model alike: its NLL term
is the SFT loss.

Recipe: validate data -> tokenizer + template -> tokenize pairs (only the final reply trains) -> load model
(+LoRA) -> PreferenceTrainer (one forward pass over chosen and rejected) -> save. We do not use TRL's ORPO
trainer: it lives in trl.experimental, whose API may change in any release.
"""

from __future__ import annotations

from dataclasses import dataclass

from medgpt.args import DataArgs, FinetuneArgs, ModelArgs, TrainArgs
from medgpt.config import arg, section


@dataclass
class ORPOArgs:
    beta: float = arg(0.1, "λ: weight of the odds-ratio term against the NLL term (the paper uses 0.1-0.25).", min=0)


@dataclass
class Config:
    model: ModelArgs = section(ModelArgs)
    data: DataArgs = section(DataArgs, "Preference pairs: prompt, chosen, rejected (any supported preference format).")
    finetune: FinetuneArgs = section(FinetuneArgs)
    train: TrainArgs = section(TrainArgs)
    orpo: ORPOArgs = section(ORPOArgs)
    template: str = arg("tokenizer", "Chat template name, or `tokenizer` to use the tokenizer's own.")
    output_dir: str = arg("", "Where checkpoints, the final model and logs go.")
    overwrite: bool = arg(False, "Write into a non-empty output_dir.")
    resume: bool = arg(False, "Continue from the last complete checkpoint in output_dir.")


def run(cfg: Config) -> int:
    """Odds-ratio preference optimization on preference pairs."""
    from functools import partial

    from medgpt.data.templates import apply_template, get_template_for
    from medgpt.data.validate import load_splits
    from medgpt.model.load import load_model, load_tokenizer
    from medgpt.train import run as R

    # Data first: a bad file fails in seconds, before any model loads.
    train_records, eval_records, invalid = load_splits(cfg.data, "preference", purpose="orpo", seed=cfg.train.seed)
    from transformers import TrainingArguments

    from medgpt.data.pairs import preference_dataset
    from medgpt.train.losses import orpo_loss
    from medgpt.train.preference import PreferenceCollator, PreferenceTrainer

    out = R.start(cfg)
    tokenizer = load_tokenizer(cfg.model)
    template = get_template_for(cfg.template, tokenizer)
    train_ds = preference_dataset(train_records, template, tokenizer, cfg.train.max_length, "train", cfg.data.overlong)
    eval_ds = (preference_dataset(eval_records, template, tokenizer, cfg.train.max_length, "eval", cfg.data.overlong)
               if eval_records else None)

    model = load_model(cfg.model, cfg.finetune, gradient_checkpointing=cfg.train.gradient_checkpointing)
    R.log_parameters(model)
    apply_template(tokenizer, template)  # the saved tokenizer renders exactly what we trained on

    args = TrainingArguments(**R.trainer_kwargs(cfg.train, out, has_eval=eval_ds is not None))
    trainer = PreferenceTrainer(model=model, args=args, loss_fn=partial(orpo_loss, beta=cfg.orpo.beta),
                                train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                                data_collator=PreferenceCollator(tokenizer.pad_token_id),
                                callbacks=[R.checkpoint_callback()])
    result = R.train(trainer, cfg, out)
    metrics = {**trainer.last_train_metrics, **result.metrics}  # rewards/*, nll, log_odds_* of the last log window
    if eval_ds is not None:
        metrics.update(trainer.evaluate())
    metrics["invalid_records"] = invalid  # skipped by load_splits (--data.max_invalid)
    R.save_artifacts(trainer, tokenizer, out, metrics)
    return 0
