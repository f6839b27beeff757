"""RLOO: online RL with leave-one-out baselines (Ahmadian et al. 2024, https://huggingface.co/papers/2402.14740).

    medgpt rloo configs/tiny/rloo.yaml --model.name_or_path DIR --output_dir out/rloo
    medgpt rloo --model.name_or_path out/sft-merged --data.train_files data/demo/preference.jsonl \
        --reward.model out/rm --rloo.num_generations 4 --train.batch_size 8 --output_dir out/rloo

For each prompt the policy samples `num_generations` replies (k); every reply is scored by the reward sources
(`--reward.model` and/or `--reward.functions`, weighted by `--reward.weights`), and its advantage is its reward
minus the mean reward of the other k-1 replies to the same prompt: an unbiased baseline without a value model.
`--rloo.beta` subtracts beta x (summed log-ratio to the starting policy) from each reward, as in the paper.

Recipe: medgpt.train.online.run_group_rl (shared with grpo).

Batch shape: --train.batch_size counts *completions*. The completions of one optimizer step (batch_size x
gradient_accumulation_steps x processes) must hold whole groups, i.e. be a multiple of --rloo.num_generations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from medgpt.args import DataArgs, FinetuneArgs, ModelArgs, RewardArgs, TrainArgs
from medgpt.config import arg, section


@dataclass
class RLOOArgs:
    num_generations: int = arg(4, "Replies sampled per prompt (k, at least 2). Completions per step "
                               "(batch_size x gradient_accumulation_steps x processes) must be a multiple of it.",
                               min=2)
    max_completion_length: int = arg(256, "Most tokens generated per reply. Prompts get --train.max_length minus "
                                     "this; longer ones lose their oldest turns.", min=1)
    beta: float = arg(0.05, "KL penalty toward the starting policy, subtracted from each reward. 0 keeps no "
                      "reference model (less memory, faster) but lets the policy drift freely.", min=0)
    temperature: float = arg(1.0, "Sampling temperature: replies to one prompt must differ for rewards to differ.",
                             above=0)
    top_p: float = arg(1.0, "Nucleus sampling for the replies (1.0: the full distribution).", above=0, max=1)
    epsilon: float = arg(0.2, "Clip range of the importance ratio (as in PPO).", above=0)
    epsilon_high: Optional[float] = arg(None, "Upper clip bound; None: same as epsilon.", above=0)
    normalize_advantages: bool = arg(False, "Scale advantages to mean 0, std 1 over each generated batch.")
    num_iterations: int = arg(1, "Optimizer passes over each generated batch.", min=1)
    mask_truncated_completions: bool = arg(False, "Leave replies cut at max_completion_length out of the loss.")


@dataclass
class Config:
    model: ModelArgs = section(ModelArgs)
    data: DataArgs = section(DataArgs, "Prompts: prompt records {prompt, answer?}, or preference, chat or MCQ "
                             "data (converted to prompts; chat and MCQ keep their answer).")
    finetune: FinetuneArgs = section(FinetuneArgs)
    train: TrainArgs = section(TrainArgs, "batch_size counts completions: a multiple of --rloo.num_generations.")
    rloo: RLOOArgs = section(RLOOArgs)
    reward: RewardArgs = section(RewardArgs)
    template: str = arg("tokenizer", "Chat template name, or `tokenizer` to use the tokenizer's own.")
    output_dir: str = arg("", "Where checkpoints, the final model and logs go.")
    overwrite: bool = arg(False, "Write into a non-empty output_dir.")
    resume: bool = arg(False, "Continue from the last complete checkpoint in output_dir.")


def run(cfg: Config) -> int:
    """Online RL with leave-one-out baselines (TRL RLOOTrainer)."""
    from trl import RLOOConfig, RLOOTrainer

    from medgpt.train.online import run_group_rl

    return run_group_rl(cfg, "rloo", RLOOConfig, RLOOTrainer,
                        dict(normalize_advantages=cfg.rloo.normalize_advantages),
                        why_two="the leave-one-out baseline of a reply is the mean reward of the other replies to "
                                "its prompt, so RLOO needs at least 2 (4 is usual).",
                        why_together="are baselines for one another")
