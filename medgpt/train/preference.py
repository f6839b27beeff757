"""The trainer of the reference-free preference stages (`medgpt orpo`, `medgpt simpo`): the collator and a small
`transformers.Trainer` whose loss is an injected pure function from `medgpt.train.losses`. The rows come from
`medgpt.data.pairs.preference_dataset` (only the final reply trains; prompts fitted by the shared rule).

    PreferenceCollator(pad_id)                                     -> batch of 2B rows: chosen rows, then rejected
    PreferenceTrainer(..., loss_fn=partial(orpo_loss, beta=0.1))   -> one forward pass over both halves
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import Trainer

from medgpt.data.templates import IGNORE_INDEX
from medgpt.train.losses import sequence_logps

# ------------------------------------------------------------------------------------------------ tokenization


@dataclass
class PreferenceCollator:
    """Right-pads a list of pairs into one batch of 2B rows: chosen rows first, then rejected rows, so a single
    forward pass covers both. Padding is `pad_id` in input_ids, -100 in labels and 0 in the attention mask."""

    pad_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        seqs = [(r["chosen_input_ids"], r["chosen_labels"]) for r in rows]
        seqs += [(r["rejected_input_ids"], r["rejected_labels"]) for r in rows]
        width = max(len(ids) for ids, _ in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(seqs):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            labels[i, :len(lab)] = torch.tensor(lab)
            attention_mask[i, :len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ------------------------------------------------------------------------------------------------ trainer

LossFn = Callable[..., "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


class PreferenceTrainer(Trainer):
    """A Trainer for reference-free pairwise losses.

    `loss_fn(policy_chosen_logps_avg, policy_rejected_logps_avg, chosen_nll) -> (loss, metrics)`: [B] length-
    averaged log-probs of the chosen and rejected replies, and the per-pair NLL of the chosen reply (its negated
    average log-prob). Metrics are collected per micro-batch and averaged per logging step (as TRL does), and the
    same numbers are computed on eval data (eval_loss, eval_rewards/accuracies, ...).
    """

    loss_is_scaled_for_ga = False  # our loss is a per-batch mean: the Trainer divides it by the accumulation steps

    def __init__(self, *args, loss_fn: LossFn, **kwargs):
        super().__init__(*args, **kwargs)
        self.args.remove_unused_columns = False  # chosen_*/rejected_* columns are not model.forward arguments
        self.loss_fn = loss_fn
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.last_train_metrics: dict[str, float] = {}  # the most recent logged window, for metrics.json

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        # Right padding and a causal mask: padding sits after every real token, so it changes no real logit.
        logps = sequence_logps(outputs.logits, inputs["labels"], average=True)
        n = logps.shape[0] // 2
        chosen, rejected = logps[:n], logps[n:]
        loss, metrics = self.loss_fn(chosen, rejected, -chosen)
        metrics = {**metrics, "logps/chosen": chosen.detach().mean(), "logps/rejected": rejected.detach().mean()}
        mode = "train" if model.training else "eval"
        for key, value in metrics.items():
            value = self.accelerator.gather(value.detach().float().reshape(1))  # one number per process
            self._metrics[mode][key].append(value.mean().item())
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # The default would look for a model-computed loss; ours comes from compute_loss, logits are not needed.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {key: sum(vals) / len(vals) for key, vals in self._metrics[mode].items() if vals}
        if mode == "train" and metrics:
            self.last_train_metrics = metrics
        if mode == "eval":
            metrics = {f"eval_{key}": val for key, val in metrics.items()}  # the Trainer's eval keys carry eval_
        logs.update(metrics)  # in place: evaluate() returns this very dict
        super().log(logs, start_time)
        self._metrics[mode].clear()
