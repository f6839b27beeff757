"""GRPO: online RL with group-relative advantages (DeepSeekMath, https://huggingface.co/papers/2402.03300).

    medgpt grpo configs/tiny/grpo.yaml --model.name_or_path DIR --output_dir out/grpo
    medgpt grpo --model.name_or_path out/sft-merged --data.train_files data/demo/mcq.jsonl \
        --reward.functions answer_match,format --grpo.num_generations 8 --train.batch_size 8 --output_dir out/grpo

For each prompt the policy samples a group of `num_generations` replies; every reply is scored by the reward
sources (`--reward.model` and/or `--reward.functions`, weighted by `--reward.weights`), and its advantage is its
reward relative to the group's mean (scaled by the group's std). No value model. `--grpo.beta` adds a KL penalty
toward the starting policy.

Recipe: medgpt.train.online.run_group_rl (shared with rloo).

Batch shape: --train.batch_size counts *completions*. The completions of one optimizer step (batch_size x
gradient_accumulation_steps x processes) must hold whole groups, i.e. be a multiple of --grpo.num_generations;
each step then trains on that many / num_generations prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from medgpt.args import DataArgs, FinetuneArgs, ModelArgs, RewardArgs, TrainArgs
from medgpt.config import arg, section


@dataclass
class GRPOArgs:
    num_generations: int = arg(4, "Replies sampled per prompt (one group, at least 2). Completions per step "
                               "(batch_size x gradient_accumulation_steps x processes) must be a multiple of it.",
                               min=2)
    max_completion_length: int = arg(256, "Most tokens generated per reply. Prompts get --train.max_length minus "
                                     "this; longer ones lose their oldest turns.", min=1)
    beta: float = arg(0.04, "KL penalty toward the starting policy. 0 keeps no reference model (less memory, "
                      "faster) but lets the policy drift freely.", min=0)
    temperature: float = arg(1.0, "Sampling temperature: replies in a group must differ for rewards to differ.",
                             above=0)
    top_p: float = arg(1.0, "Nucleus sampling for the replies (1.0: the full distribution).", above=0, max=1)
    epsilon: float = arg(0.2, "Clip range of the importance ratio (as in PPO).", above=0)
    epsilon_high: Optional[float] = arg(None, "Upper clip bound (DAPO uses 0.28); None: same as epsilon.", above=0)
    loss_type: Literal["dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo"] = arg(
        "dapo", "How token losses are averaged: dapo (over all tokens of the step; no length bias), grpo (per "
                "reply, then over replies), dr_grpo (by a constant), bnpo (local batch), cispo/sapo (clipped/soft "
                "importance weights). See TRL's GRPOConfig.loss_type.")
    scale_rewards: Literal["group", "batch", "none"] = arg(
        "group", "Divide advantages by the reward std of the group, of the batch, or not at all (Dr. GRPO).")
    num_iterations: int = arg(1, "Optimizer passes over each generated batch (mu in the paper).", min=1)
    mask_truncated_completions: bool = arg(False, "Leave replies cut at max_completion_length out of the loss.")


@dataclass
class Config:
    model: ModelArgs = section(ModelArgs)
    data: DataArgs = section(DataArgs, "Prompts: prompt records {prompt, answer?}, or preference, chat or MCQ "
                             "data (converted to prompts; chat and MCQ keep their answer).")
    finetune: FinetuneArgs = section(FinetuneArgs)
    train: TrainArgs = section(TrainArgs, "batch_size counts completions: a multiple of --grpo.num_generations.")
    grpo: GRPOArgs = section(GRPOArgs)
    reward: RewardArgs = section(RewardArgs)
    template: str = arg("tokenizer", "Chat template name, or `tokenizer` to use the tokenizer's own.")
    output_dir: str = arg("", "Where checkpoints, the final model and logs go.")
    overwrite: bool = arg(False, "Write into a non-empty output_dir.")
    resume: bool = arg(False, "Continue from the last complete checkpoint in output_dir.")


def run(cfg: Config) -> int:
    """Online RL with group-relative advantages (TRL GRPOTrainer)."""
    from trl import GRPOConfig, GRPOTrainer

    from medgpt.train.online import run_group_rl

    return run_group_rl(cfg, "grpo", GRPOConfig, GRPOTrainer,
                        dict(loss_type=cfg.grpo.loss_type, scale_rewards=cfg.grpo.scale_rewards),
                        why_two="GRPO compares replies within a group, so it needs at least 2 (4-16 is usual).",
                        why_together="are scored as one group")
