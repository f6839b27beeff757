"""Direct preference optimization: make chosen replies more likely than rejected ones, relative to a frozen reference.

    medgpt dpo configs/tiny/dpo.yaml --model.name_or_path DIR --output_dir out/dpo
    medgpt dpo --model.name_or_path Qwen/Qwen2.5-0.5B-Instruct --data.train_files data/demo/preference.jsonl \
        --finetune.type lora --template tokenizer --dpo.beta 0.1 --output_dir out/dpo
    medgpt dpo --model.name_or_path BASE --model.adapter out/sft --finetune.type lora ...   # continue an SFT adapter

Rafailov et al. 2023, https://arxiv.org/abs/2305.18290. Per pair, with r(y) = β · (log π(y|x) - log π_ref(y|x)):
    L = -log σ(r(chosen) - r(rejected))          (--dpo.loss_type sigmoid; ipo, hinge, robust, ... as TRL has them)

Recipe: validate data -> tokenizer + template -> fit prompts (whole turns) -> load model (+LoRA) [+ frozen
reference] -> TRL DPOTrainer -> save.

Template: pairs go to TRL in its conversational format after `apply_template`, so TRL renders them with our
template's jinja, which is byte-identical to `templates.render`: the ids TRL trains on are the ids
`templates.encode` gives and the prompt ids are `encode_prompt`'s (tests/stages/test_dpo.py checks both). TRL
scores a reply as every token after the generation prompt: the reply, its end-of-turn token, and the template's
fixed separator after it (ChatML's "\\n"), never the prompt. Too long for --train.max_length: the oldest prompt
exchanges are dropped (`fit_prompt`), never the end of a reply; a pair that still does not fit is dropped.

Reference model (π_ref):
- LoRA/QLoRA, new adapter: TRL copies the fresh adapter (a no-op: LoRA starts at zero) into a frozen "ref"
  adapter, so π_ref is the base model; no second copy of the weights.
- LoRA/QLoRA with --model.adapter (e.g. the output of `medgpt sft`): that adapter keeps training, and TRL copies
  it into a frozen "ref" adapter first, so π_ref is base + the adapter as loaded: the SFT model.
- full: a frozen second copy of --model.name_or_path, or none with --dpo.precompute_ref_log_probs (reference
  log-probs are computed once, before the first step, with the untouched policy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from medgpt.args import DataArgs, FinetuneArgs, ModelArgs, TrainArgs
from medgpt.config import arg, section
from medgpt.utils import MedGPTError, log

# Every loss DPOTrainer implements in trl 1.16 (trl/trainer/dpo_trainer.py, `_compute_loss`).
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
LossType = Literal[LOSS_TYPES]  # type: ignore[valid-type]
LOGGED = ("rewards/", "logps/", "logits/")  # TRL's per-step preference metrics, kept in metrics.json


@dataclass
class DPOArgs:
    beta: float = arg(0.1, "β: how far the policy may move from the reference (higher: less). For ipo it is τ.",
                      above=0)
    loss_type: list[LossType] = arg(factory=lambda: ["sigmoid"], help="Loss, or several summed with "
                                    "loss_weights: sigmoid (DPO), ipo, hinge (SLiC), robust, exo_pair, nca_pair, "
                                    "bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, "
                                    "sigmoid_norm, sft (NLL of the chosen reply). MPO: sigmoid,bco_pair,sft.")
    loss_weights: list[float] = arg(factory=list, help="One weight per loss_type entry (default: all 1).", min=0)
    label_smoothing: float = arg(0.0, "Probability that a pair's label is flipped (robust: in [0, 0.5), e.g. 0.1; "
                                 "exo_pair: ε > 0, e.g. 1e-3).", min=0, max=0.5)
    rpo_alpha: Optional[float] = arg(None, "RPO: also minimize rpo_alpha × the NLL of the chosen reply (TRL's `sft` "
                                     "loss added with this weight; the paper uses 1.0). None: off.", min=0)
    max_prompt_length: Optional[int] = arg(None, "Longest prompt in tokens; longer prompts lose their oldest "
                                           "exchanges (whole turns). None: only --train.max_length applies.", min=1)
    precompute_ref_log_probs: bool = arg(False, "Compute reference log-probs once before training, so full "
                                         "fine-tuning needs no second model copy in memory.")


@dataclass
class Config:
    model: ModelArgs = section(ModelArgs)
    data: DataArgs = section(DataArgs, "Preference pairs: prompt, chosen, rejected (any supported preference format).")
    finetune: FinetuneArgs = section(FinetuneArgs)
    train: TrainArgs = section(TrainArgs)
    dpo: DPOArgs = section(DPOArgs)
    template: str = arg("tokenizer", "Chat template name, or `tokenizer` to use the tokenizer's own.")
    output_dir: str = arg("", "Where checkpoints, the final model and logs go.")
    overwrite: bool = arg(False, "Write into a non-empty output_dir.")
    resume: bool = arg(False, "Continue from the last complete checkpoint in output_dir.")


def losses(d: DPOArgs) -> tuple[list[str], list[float]]:
    """(loss types, weights) for TRL, with RPO's NLL term appended; bad combinations fail before any work."""
    types, weights = list(d.loss_type), list(d.loss_weights) or [1.0] * len(d.loss_type)
    if len(weights) != len(types):
        raise MedGPTError(f"--dpo.loss_weights has {len(weights)} values for {len(types)} loss types "
                          f"({','.join(types)}). Give one weight per loss type, or none for all 1.")
    if d.rpo_alpha is not None:
        if "sft" in types:
            raise MedGPTError("--dpo.rpo_alpha adds the `sft` loss, which --dpo.loss_type already has. Use one: "
                              "drop sft from --dpo.loss_type, or drop --dpo.rpo_alpha and weight sft there.")
        types, weights = types + ["sft"], weights + [d.rpo_alpha]
    if "exo_pair" in types and d.label_smoothing <= 0:
        raise MedGPTError("--dpo.loss_type exo_pair needs --dpo.label_smoothing > 0 (the EXO paper uses 1e-3).")
    if "robust" in types and not 0 <= d.label_smoothing < 0.5:
        raise MedGPTError(f"--dpo.label_smoothing {d.label_smoothing}: robust DPO reads it as the probability "
                          f"that a label is flipped, so it must be in [0, 0.5) (e.g. 0.1).")
    return types, weights


def last_logged(history: list[dict], prefixes: tuple[str, ...] = LOGGED) -> dict[str, float]:
    """The most recent training value of each TRL metric that starts with one of `prefixes`."""
    return {k: v for h in history for k, v in h.items() if k.startswith(prefixes)}


def run(cfg: Config) -> int:
    """Direct preference optimization on preference pairs (TRL DPOTrainer)."""
    from medgpt.data.pairs import message_pairs_dataset
    from medgpt.data.templates import apply_template, get_template_for
    from medgpt.data.validate import load_splits
    from medgpt.model.load import load_model, load_reference, load_tokenizer
    from medgpt.train import run as R

    loss_types, loss_weights = losses(cfg.dpo)
    # Data first: a bad file fails in seconds, before any model loads.
    train_records, eval_records, invalid = load_splits(cfg.data, "preference", purpose="dpo", seed=cfg.train.seed)
    from trl import DPOConfig, DPOTrainer

    out = R.start(cfg)
    tokenizer = load_tokenizer(cfg.model)
    template = get_template_for(cfg.template, tokenizer)
    # TRL renders conversations with tokenizer.chat_template: ours, so training sees exactly the inference format.
    apply_template(tokenizer, template)
    fit = (template, tokenizer, cfg.train.max_length, cfg.dpo.max_prompt_length)
    train_ds = message_pairs_dataset(train_records, *fit, "train", cfg.data.overlong)
    eval_ds = message_pairs_dataset(eval_records, *fit, "eval", cfg.data.overlong) if eval_records else None

    model = load_model(cfg.model, cfg.finetune, gradient_checkpointing=cfg.train.gradient_checkpointing)
    R.log_parameters(model)
    ref_model = None
    if cfg.finetune.type == "full" and not cfg.dpo.precompute_ref_log_probs:
        ref_model = load_reference(cfg.model)  # π_ref: the untouched starting point
    log(f"reference model: {_describe_reference(cfg)}")

    args = DPOConfig(
        **R.trainer_kwargs(cfg.train, out, has_eval=eval_ds is not None),
        max_length=cfg.train.max_length,  # cuts the replies --data.overlong truncate left too long
        beta=cfg.dpo.beta,
        loss_type=loss_types,
        loss_weights=loss_weights,
        label_smoothing=cfg.dpo.label_smoothing,
        precompute_ref_log_probs=cfg.dpo.precompute_ref_log_probs,
        dataset_num_proc=None,
    )
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, callbacks=[R.checkpoint_callback()])
    result = R.train(trainer, cfg, out)
    metrics = {**last_logged(trainer.state.log_history), **result.metrics}  # rewards/accuracies, margins, ...
    if eval_ds is not None:
        metrics.update(trainer.evaluate())
    metrics["invalid_records"] = invalid  # skipped by load_splits (--data.max_invalid)
    R.save_artifacts(trainer, tokenizer, out, metrics)
    return 0


def _describe_reference(cfg: Config) -> str:
    if cfg.finetune.type != "full":
        return (f"base model + the adapter from {cfg.model.adapter} as loaded (a frozen copy)" if cfg.model.adapter
                else "the base model (the new adapter starts at zero)")
    if cfg.dpo.precompute_ref_log_probs:
        return "the starting model, its log-probs computed once before training"
    return f"a frozen copy of {cfg.model.name_or_path}" + (f" with {cfg.model.adapter} merged in" if cfg.model.adapter
                                                           else "")
