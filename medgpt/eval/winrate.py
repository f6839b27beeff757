"""Win rate of model A against model B on the same prompts, judged by a reward model.

    medgpt eval --model.name_or_path outputs/dpo --eval.compare_model outputs/sft \
        --eval.reward_model outputs/rm --eval.prompt_files data/heldout/prompts.jsonl

Both models answer every prompt with the same --gen settings (greedy by default); the reward model (`medgpt rm`
output, full or LoRA, via `medgpt.train.rewards.RewardModel`) scores each (prompt, answer) with its own tokenizer and
chat template. Per prompt: A wins when its score beats B's by more than --eval.tie_margin, loses when B's beats it
by more, else a tie.

    win_rate = (wins + ties / 2) / prompts

A reward model rewards what it was trained to prefer, length and style included: check a sample of the pairs in
`predictions/winrate-*.jsonl` before reading much into a few points of win rate.
"""

from __future__ import annotations


def tally(scores_a: list[float], scores_b: list[float], margin: float = 0.0) -> dict:
    """Wins, ties and losses of A against B, and the win rate counting ties as half a win."""
    if len(scores_a) != len(scores_b):
        raise ValueError("one score per prompt for each model")
    wins = sum(a - b > margin for a, b in zip(scores_a, scores_b))
    losses = sum(b - a > margin for a, b in zip(scores_a, scores_b))
    n = len(scores_a)
    ties = n - wins - losses
    return {"prompts": n, "wins": wins, "ties": ties, "losses": losses,
            "win_rate": (wins + ties / 2) / n if n else float("nan")}


def score(reward_model, prompts: list[list[dict]], answers: list[str]) -> list[float]:
    """One reward per (prompt messages, answer text), from a callable with TRL's reward-function signature."""
    return list(reward_model(prompts, [[{"role": "assistant", "content": a}] for a in answers]))
