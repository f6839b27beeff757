"""SimPO: the length-averaged log-prob of a reply is its reward; prefer chosen by a target margin, no reference.

    medgpt simpo configs/tiny/simpo.yaml --model.name_or_path DIR --output_dir out/simpo
    medgpt simpo --model.name_or_path out/sft --data.train_files data/demo/preference.jsonl \
        --finetune.type lora --template chatml --simpo.beta 2.0 --simpo.gamma 1.0 --output_dir out/simpo

Meng et al. 2024, https://arxiv.org/abs/2405.14734, eq. 6, with r(y) = β/|y| · log π(y|x):
    L = -log σ(r(chosen) - r(rejected) - γ)          (+ sft_weight · NLL(chosen), the CPO-style term, optional)
exactly `medgpt.train.losses.simpo_loss`. --simpo.gamma is the ABSOLUTE margin γ of the paper (as TRL's
`simpo_gamma`); the SimPO repo's `gamma_beta_ratio` r corresponds to γ = r · β (the paper's settings use
β 2-10, γ/β 0.3-0.8). SimPO has no SFT term by default, so start from an SFT model.

Recipe: validate data -> tokenizer + template -> tokenize pairs (only the final reply trains) -> load model
(+LoRA) -> PreferenceTrainer (one forward pass over chosen and rejected) -> save. TRL has SimPO only inside
trl.experimental (CPOTrainer), whose API may change in any release, so it is not used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from medgpt.args import DataArgs, FinetuneArgs, ModelArgs, TrainArgs
from medgpt.config import arg, section


@dataclass
class SimPOArgs:
    beta: float = arg(2.0, "β: scale of the length-averaged log-prob reward (paper: 2.0-10).", above=0)
    gamma: float = arg(0.5, "γ: the absolute target reward margin (not γ/β; a gamma_beta_ratio r is γ = r·β).",
                       min=0)
    loss_type: Literal["sigmoid", "hinge"] = arg("sigmoid", "sigmoid: -log σ(z) (the paper); hinge: max(0, 1 - z).")
    label_smoothing: float = arg(0.0, "ε in [0, 0.5): assume this share of labels is flipped (sigmoid loss only).",
                                 min=0, below=0.5)
    sft_weight: float = arg(0.0, "Weight of an NLL term on the chosen reply (CPO-style); 0 is plain SimPO.", min=0)


@dataclass
class Config:
    model: ModelArgs = section(ModelArgs)
    data: DataArgs = section(DataArgs, "Preference pairs: prompt, chosen, rejected (any supported preference format).")
    finetune: FinetuneArgs = section(FinetuneArgs)
    train: TrainArgs = section(TrainArgs)
    simpo: SimPOArgs = section(SimPOArgs)
    template: str = arg("tokenizer", "Chat template name, or `tokenizer` to use the tokenizer's own.")
    output_dir: str = arg("", "Where checkpoints, the final model and logs go.")
    overwrite: bool = arg(False, "Write into a non-empty output_dir.")
    resume: bool = arg(False, "Continue from the last complete checkpoint in output_dir.")


def simpo_objective(chosen_logps_avg, rejected_logps_avg, chosen_nll, *, args: SimPOArgs):
    """`losses.simpo_loss` plus `sft_weight` times the mean chosen NLL (also logged as `nll`)."""
    from medgpt.train.losses import simpo_loss

    loss, metrics = simpo_loss(chosen_logps_avg, rejected_logps_avg, beta=args.beta, gamma=args.gamma,
                               label_smoothing=args.label_smoothing, loss_type=args.loss_type)
    nll = chosen_nll.float().mean()
    if args.sft_weight:
        loss = loss + args.sft_weight * nll
    return loss, {**metrics, "nll": nll.detach()}


def check_args(args: SimPOArgs) -> None:
    from medgpt.utils import MedGPTError

    # The ranges of label_smoothing and beta are checked with every other value (config.check_range).
    if args.label_smoothing and args.loss_type == "hinge":
        raise MedGPTError("--simpo.label_smoothing only applies to --simpo.loss_type sigmoid; the hinge loss has no "
                          "smoothing. Set one of them back (label_smoothing 0, or loss_type sigmoid).")


def run(cfg: Config) -> int:
    """Simple preference optimization on preference pairs."""
    from functools import partial

    from medgpt.data.templates import apply_template, get_template_for
    from medgpt.data.validate import load_splits
    from medgpt.model.load import load_model, load_tokenizer
    from medgpt.train import run as R

    check_args(cfg.simpo)
    # Data first: a bad file fails in seconds, before any model loads.
    train_records, eval_records, invalid = load_splits(cfg.data, "preference", purpose="simpo", seed=cfg.train.seed)
    from transformers import TrainingArguments

    from medgpt.data.pairs import preference_dataset
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
    trainer = PreferenceTrainer(model=model, args=args, loss_fn=partial(simpo_objective, args=cfg.simpo),
                                train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                                data_collator=PreferenceCollator(tokenizer.pad_token_id),
                                callbacks=[R.checkpoint_callback()])
    result = R.train(trainer, cfg, out)
    metrics = {**trainer.last_train_metrics, **result.metrics}  # rewards/* and nll of the last log window
    if eval_ds is not None:
        metrics.update(trainer.evaluate())
    metrics["invalid_records"] = invalid  # skipped by load_splits (--data.max_invalid)
    R.save_artifacts(trainer, tokenizer, out, metrics)
    return 0
