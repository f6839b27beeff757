"""Pairwise reward model: a sequence-classification head scores a conversation; chosen must outscore rejected.

    medgpt rm configs/tiny/rm.yaml --model.name_or_path DIR --output_dir out/rm
    medgpt rm --model.name_or_path Qwen/Qwen2.5-0.5B-Instruct --data.train_files data/demo/preference.jsonl \
        --data.eval_split 0.1 --finetune.type lora --template chatml --output_dir out/rm

Recipe: validate data -> tokenizer + template -> tokenize pairs (chosen_ids, rejected_ids) -> load a 1-label
sequence-classification model (+LoRA; the `score` head always trains fully) -> TRL RewardTrainer (Bradley-Terry
loss: -log sigmoid(r_chosen - r_rejected)) -> save.

What is scored: prompt + assistant reply + its end-of-turn token, rendered with OUR template and cut right after
that token (`scored_ids`). That is exactly what the policy produces at inference (generation stops at the
end-of-turn token), so an RL stage should score `encode_prompt(prompt) + completion ids` the same way. The
reward is read at the last non-pad token, which is why config.pad_token_id is always set in the saved model.

Eval: `eval_accuracy` in metrics.json is the exact fraction of eval pairs where chosen outscores rejected
(TRL's own running accuracy averages per batch; TensorBoard shows that one).

Output: full fine-tuning saves a plain model, `AutoModelForSequenceClassification.from_pretrained(out)`.
LoRA saves an adapter (LoRA weights + the full `score` head): load it with
`PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=1), out)`,
or make a plain model with `medgpt merge`. Either way `--reward.model out` is what RL stages take.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from medgpt.args import DataArgs, FinetuneArgs, ModelArgs, TrainArgs
from medgpt.config import arg, section
from medgpt.utils import log


@dataclass
class RMArgs:
    center_rewards_coefficient: Optional[float] = arg(
        None, "Add this times mean(reward^2) to the loss so rewards stay centred on 0 (Eisenstein et al. 2023, "
              "https://huggingface.co/papers/2312.09244; 0.01 is typical). None disables it.", min=0)


@dataclass
class Config:
    model: ModelArgs = section(ModelArgs)
    data: DataArgs = section(DataArgs, "Preference pairs: {prompt, chosen, rejected}, HH-style or "
                             "question/response_chosen/response_rejected records.")
    finetune: FinetuneArgs = section(FinetuneArgs)
    train: TrainArgs = section(TrainArgs, "Too long for --train.max_length: the prompt loses its oldest exchanges; "
                               "replies are never cut (the reward is read at their end-of-turn token).")
    rm: RMArgs = section(RMArgs)
    template: str = arg("tokenizer", "Chat template name, or `tokenizer` to use the tokenizer's own.")
    output_dir: str = arg("", "Where checkpoints, the final model and logs go.")
    overwrite: bool = arg(False, "Write into a non-empty output_dir.")
    resume: bool = arg(False, "Continue from the last complete checkpoint in output_dir.")


def pairwise_accuracy(trainer) -> float:
    """Exact fraction of eval pairs where the chosen reply gets the higher reward (gathered across processes)."""
    import torch

    model = trainer.model_wrapped
    model.eval()
    wins = []
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader():  # first half of each batch is chosen, second half rejected
            rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            use_cache=False).logits.squeeze(-1)
            chosen, rejected = rewards.chunk(2)
            wins.append(trainer.accelerator.gather_for_metrics(chosen > rejected))
    return torch.cat(wins).float().mean().item()


def run(cfg: Config) -> int:
    """Train a pairwise (Bradley-Terry) reward model on preference pairs."""
    from medgpt.data.pairs import reward_pairs_dataset
    from medgpt.data.templates import apply_template, get_template_for
    from medgpt.data.validate import load_splits
    from medgpt.model.load import load_model, load_tokenizer
    from medgpt.train import run as R

    # Data first: a bad file fails in seconds, before any model loads.
    train_records, eval_records, invalid = load_splits(cfg.data, "preference", purpose="rm", seed=cfg.train.seed)
    from trl import RewardConfig, RewardTrainer

    out = R.start(cfg)
    tokenizer = load_tokenizer(cfg.model)
    template = get_template_for(cfg.template, tokenizer)
    fit = (template, tokenizer, cfg.train.max_length)
    train_ds = reward_pairs_dataset(train_records, *fit, "train", cfg.data.overlong)
    eval_ds = reward_pairs_dataset(eval_records, *fit, "eval", cfg.data.overlong) if eval_records else None

    model = load_model(cfg.model, cfg.finetune, task="seq_cls", gradient_checkpointing=cfg.train.gradient_checkpointing)
    # The reward is read at the last non-pad token; the saved config must name the pad the tokenizer uses. (When
    # a tokenizer's pad is its end-of-turn token, transformers reads the token before it: same at inference.)
    model.config.pad_token_id = tokenizer.pad_token_id
    R.log_parameters(model)
    apply_template(tokenizer, template)  # the saved tokenizer renders the format the reward model scored

    args = RewardConfig(
        **R.trainer_kwargs(cfg.train, out, has_eval=eval_ds is not None),
        max_length=None,  # reward_pairs_dataset already fitted every pair (and counted the drops)
        center_rewards_coefficient=cfg.rm.center_rewards_coefficient,
        dataset_num_proc=None,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                            processing_class=tokenizer, callbacks=[R.checkpoint_callback()])
    result = R.train(trainer, cfg, out)
    metrics = dict(result.metrics)
    if eval_ds is not None:
        metrics.update(trainer.evaluate())
        metrics["eval_accuracy"] = pairwise_accuracy(trainer)
        log(f"eval: pairwise accuracy {metrics['eval_accuracy']:.3f} on {len(eval_ds)} pairs")
    metrics["invalid_records"] = invalid  # skipped by load_splits (--data.max_invalid)
    R.save_artifacts(trainer, tokenizer, out, metrics)
    return 0
