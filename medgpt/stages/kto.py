"""KTO: align on answers labelled desirable or undesirable, one at a time; no pairs needed.

    medgpt kto configs/tiny/kto.yaml --model.name_or_path DIR --output_dir out/kto
    medgpt kto --model.name_or_path Qwen/Qwen2.5-0.5B-Instruct --data.train_files feedback.jsonl \
        --finetune.type lora --template tokenizer --kto.beta 0.1 --output_dir out/kto

Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306. With r(y) = β · (log π(y|x) - log π_ref(y|x)) and z a
batch estimate of KL(π || π_ref) (each prompt scored with another example's answer):
    desirable:   λ_D · (1 - σ(r(y) - z))        undesirable:   λ_U · (1 - σ(z - r(y)))

Data, per file:
- unpaired records {"prompt", "completion" (or "response"/"answer"), "label": true|false}: a file whose first
  record has a `label` key is read here (the shared data layer has no label-carrying kind). prompt and completion
  may be strings or messages; a bad record fails as `file:line: why`, like `medgpt data validate`.
- preference pairs (any supported preference format): each pair gives (prompt, chosen, desirable) and
  (prompt, rejected, undesirable).
Examples are shuffled once (seeded): TRL reads them in order, and the KL estimate pairs neighbours in a batch.

λ_D, λ_U: left unset, they are balanced from the counts so that λ_D·n_D / (λ_U·n_U) is just above 1, inside
the paper's recommended [1, 4/3] (Eq. 8): the rarer kind gets the larger weight. Set either to override.

Template, length limits and the reference model work as in `medgpt dpo` (see medgpt/stages/dpo.py): TRL renders
conversations with our template's jinja; prompts lose their oldest exchanges to fit; LoRA uses a frozen "ref"
adapter copy (the base model, or base + --model.adapter), full fine-tuning a frozen copy of the model.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal, Optional

from medgpt.args import DataArgs, FinetuneArgs, ModelArgs, TrainArgs
from medgpt.config import arg, section
from medgpt.utils import MedGPTError, log

LOGGED = ("rewards/", "logps/", "logits/", "kl")  # TRL's per-step KTO metrics, kept in metrics.json
UNPAIRED = "unpaired records {prompt, completion, label: true|false}"


@dataclass
class KTOArgs:
    beta: float = arg(0.1, "β: how far the policy may move from the reference (higher: less).", above=0)
    desirable_weight: Optional[float] = arg(None, "λ_D, the weight of desirable examples. None: balanced "
                                            "automatically from the desirable/undesirable counts.", above=0)
    undesirable_weight: Optional[float] = arg(None, "λ_U, the weight of undesirable examples. None: balanced "
                                              "automatically from the desirable/undesirable counts.", above=0)
    loss_type: Literal["kto", "apo_zero_unpaired"] = arg("kto", "kto, or apo_zero_unpaired (APO-zero: no KL "
                                                         "estimate; for answers better than the model's own).")
    max_prompt_length: Optional[int] = arg(None, "Longest prompt in tokens; longer prompts lose their oldest "
                                           "exchanges (whole turns). None: only --train.max_length applies.", min=1)
    precompute_ref_log_probs: bool = arg(False, "Compute reference log-probs once before training, so full "
                                         "fine-tuning needs no second model copy in memory.")


@dataclass
class Config:
    model: ModelArgs = section(ModelArgs)
    data: DataArgs = section(DataArgs, f"Preference pairs (split into good and bad answers) and/or {UNPAIRED}.")
    finetune: FinetuneArgs = section(FinetuneArgs)
    train: TrainArgs = section(TrainArgs)
    kto: KTOArgs = section(KTOArgs)
    template: str = arg("tokenizer", "Chat template name, or `tokenizer` to use the tokenizer's own.")
    output_dir: str = arg("", "Where checkpoints, the final model and logs go.")
    overwrite: bool = arg(False, "Write into a non-empty output_dir.")
    resume: bool = arg(False, "Continue from the last complete checkpoint in output_dir.")


# ------------------------------------------------------------------------------------------------ data


def unpaired_example(obj: dict, columns: dict[str, str] | None = None) -> dict:
    """One raw labelled record -> {"prompt": messages, "completion": [assistant message], "label": bool} (the
    shared reader's `labelled` format, data/formats.py)."""
    from medgpt.data.formats import to_canonical

    return to_canonical(obj, "labelled", columns)


def load_units(specs: list[str], data: DataArgs) -> tuple[list[list[dict]], int]:
    """KTO examples grouped by source record: [pair's chosen, pair's rejected] or [one labelled example]; and
    how many invalid records were skipped. Each file is read by the shared loader in its own format."""
    from medgpt.data.formats import record_kind
    from medgpt.data.readers import expand_paths
    from medgpt.data.validate import load_tolerant

    if data.lang != "all":
        raise MedGPTError("kto does not filter by --data.lang yet: leave it at all, or filter the files first.")
    units, invalid = [], 0
    for path in expand_paths(specs):
        records, skipped = load_tolerant([path], None, format=data.format, columns=data.columns,
                                         encoding=data.encoding, text_mode=data.text_mode,
                                         max_samples=data.max_samples, max_invalid=data.max_invalid,
                                         purpose=f"kto (preference records or {UNPAIRED})")
        invalid += skipped
        for r in records:
            kind = record_kind(r)
            if kind == "preference":
                units.append([{"prompt": r["prompt"], "completion": r["chosen"], "label": True},
                              {"prompt": r["prompt"], "completion": r["rejected"], "label": False}])
            elif kind == "labelled":
                units.append([r])
            else:
                raise MedGPTError(f"{path} holds {kind} records; kto trains on preference records {{prompt, "
                                  f"chosen, rejected}} or {UNPAIRED}.")
    return (units[:data.max_samples] if data.max_samples is not None else units), invalid


def load_examples(data: DataArgs, seed: int) -> tuple[list[dict], list[dict], int]:
    """Train and eval examples, each shuffled, and the number of invalid records skipped; an eval_split holds
    out whole records (both halves of a pair)."""
    if not data.train_files:
        raise MedGPTError(f"no training data given. Add --data.train_files FILES (kto needs preference records "
                          f"{{prompt, chosen, rejected}} or {UNPAIRED}).")
    rng = random.Random(seed)
    train, invalid = load_units(data.train_files, data)
    rng.shuffle(train)
    if data.eval_files:
        held, more = load_units(data.eval_files, data)
        invalid += more
    elif data.eval_split > 0 and len(train) > 1:
        n_eval = max(1, int(len(train) * data.eval_split))
        held, train = train[:n_eval], train[n_eval:]
    else:
        held = []
    train_examples, eval_examples = [x for u in train for x in u], [x for u in held for x in u]
    rng.shuffle(train_examples)  # halves of a pair apart: KL estimates should not pair an answer with its twin
    return train_examples, eval_examples, invalid


def balanced_weights(n_desirable: int, n_undesirable: int, desirable: float | None = None,
                     undesirable: float | None = None) -> tuple[float, float]:
    """(λ_D, λ_U): given values kept, unset ones chosen so λ_D·n_D / (λ_U·n_U) is in [1, 4/3] (KTO paper, Eq. 8).

    Both unset: the rarer kind is up-weighted to just balance the counts (2 decimals, rounded to stay >= 1).
    """
    if desirable is not None or undesirable is not None or not (n_desirable and n_undesirable):
        return (1.0 if desirable is None else desirable), (1.0 if undesirable is None else undesirable)
    if n_desirable < n_undesirable:
        return math.ceil(100 * n_undesirable / n_desirable) / 100, 1.0
    return 1.0, max(1.0, math.floor(100 * n_desirable / n_undesirable) / 100)


def _weights(k: KTOArgs, labels: list[bool]) -> tuple[float, float]:
    n_d = sum(labels)
    n_u = len(labels) - n_d
    d, u = balanced_weights(n_d, n_u, k.desirable_weight, k.undesirable_weight)
    how = "given" if (k.desirable_weight, k.undesirable_weight) != (None, None) else "balanced from the counts"
    ratio = d * n_d / (u * n_u) if n_u else math.inf
    log(f"kto weights ({how}): desirable {d}, undesirable {u}; {n_d} desirable / {n_u} undesirable examples, "
        f"λ_D·n_D / λ_U·n_U = {ratio:.2f}")
    if not n_d or not n_u:
        log(f"warning: the training data has only {'un' if not n_d else ''}desirable examples; KTO can train on "
            f"them, but it learns most when both kinds are present")
    elif not 1 <= ratio <= 4 / 3 + 1e-9:
        log("warning: the KTO paper recommends λ_D·n_D / λ_U·n_U in [1, 4/3]; leave --kto.desirable_weight and "
            "--kto.undesirable_weight unset to get balanced weights")
    return d, u


# ------------------------------------------------------------------------------------------------ recipe


def run(cfg: Config) -> int:
    """KTO on desirable/undesirable examples (TRL KTOTrainer)."""
    from medgpt.data.pairs import labelled_dataset
    from medgpt.data.templates import apply_template, get_template_for
    from medgpt.model.load import load_model, load_reference, load_tokenizer
    from medgpt.train import run as R

    if cfg.kto.loss_type == "kto" and cfg.train.batch_size < 2:
        raise MedGPTError("--kto.loss_type kto needs --train.batch_size >= 2: the KL estimate scores each prompt "
                          "with another example's answer from the same batch.")
    # Data first: a bad file fails in seconds, before any model loads.
    train_examples, eval_examples, invalid = load_examples(cfg.data, cfg.train.seed)
    from trl import KTOConfig, KTOTrainer

    out = R.start(cfg)
    tokenizer = load_tokenizer(cfg.model)
    template = get_template_for(cfg.template, tokenizer)
    # TRL renders conversations with tokenizer.chat_template: ours, so training sees exactly the inference format.
    apply_template(tokenizer, template)
    fit = (template, tokenizer, cfg.train.max_length, cfg.kto.max_prompt_length)
    train_ds = labelled_dataset(train_examples, *fit, "train", cfg.data.overlong)
    eval_ds = labelled_dataset(eval_examples, *fit, "eval", cfg.data.overlong) if eval_examples else None
    desirable_weight, undesirable_weight = _weights(cfg.kto, train_ds["label"])

    model = load_model(cfg.model, cfg.finetune, gradient_checkpointing=cfg.train.gradient_checkpointing)
    R.log_parameters(model)
    ref_model = None
    if cfg.finetune.type == "full" and not cfg.kto.precompute_ref_log_probs:
        ref_model = load_reference(cfg.model)  # π_ref: the untouched starting point

    args = KTOConfig(
        **R.trainer_kwargs(cfg.train, out, has_eval=eval_ds is not None),
        max_length=cfg.train.max_length,  # cuts the completions --data.overlong truncate left too long
        beta=cfg.kto.beta,
        loss_type=cfg.kto.loss_type,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        precompute_ref_log_probs=cfg.kto.precompute_ref_log_probs,
        dataset_num_proc=None,
    )
    trainer = KTOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, callbacks=[R.checkpoint_callback()])
    result = R.train(trainer, cfg, out)
    metrics = {k: v for h in trainer.state.log_history for k, v in h.items() if k.startswith(LOGGED)}
    metrics.update(result.metrics, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    if eval_ds is not None:
        metrics.update(trainer.evaluate())
    metrics["invalid_records"] = invalid  # skipped while loading (--data.max_invalid)
    R.save_artifacts(trainer, tokenizer, out, metrics)
    return 0
