"""PPO for RLHF: a policy, a value model, a frozen reference and a reward (model and/or rules).

    medgpt ppo configs/tiny/ppo.yaml --model.name_or_path DIR --reward.model RM_DIR --output_dir out/ppo
    medgpt ppo --model.name_or_path Qwen/Qwen2.5-0.5B-Instruct --model.adapter out/sft --reward.model out/rm \
        --data.train_files data/demo/preference.jsonl --finetune.type lora --template qwen --output_dir out/ppo

The recipe follows
  Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", https://arxiv.org/abs/1909.08593
      (per-token KL penalty against the frozen reference, adaptive KL controller: --ppo.target_kl);
  Ouyang et al. 2022, "Training language models to follow instructions with human feedback" (InstructGPT),
      https://arxiv.org/abs/2203.02155 (reward = RM score - beta KL, policy initialised from the SFT model);
  Zheng et al. 2023, "Secrets of RLHF in Large Language Models Part I: PPO", https://arxiv.org/abs/2307.04964
      (token-level KL penalty, advantage whitening, clipped value loss, value model initialised from the RM);
  Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO", https://arxiv.org/abs/2403.17031
      (penalty for responses without EOS, truncate after the end-of-turn token, sample with top_k=0 / top_p=1 and
      score at the sampling temperature, dropout off, gamma=1, lam=0.95, value head initialised from the RM).
The math is in medgpt/train/losses.py (pure, golden-tested); the rollout/update loop in medgpt/train/ppo.py.

Choices:
- Value model: a sequence-classification model (backbone + `score`: hidden -> 1) whose head is applied to EVERY
  position, giving one value per token. It is initialised from --ppo.value_model, else the reward model
  (--reward.model, as Huang et al.), else the policy base (then the head starts random). Under LoRA it gets its
  own LoRA with a fully trained head; the reward model used for scoring stays frozen and separate.
- Reference: with LoRA the same module with adapters switched off (no second copy); on top of an SFT adapter
  (--model.adapter) that adapter is loaded a second time, frozen, as the reference; full fine-tuning keeps a
  frozen copy.
- One AdamW over policy + value (loss = pg + vf_coef * vf); gradients clipped over both together.
- --train.batch_size prompts per PPO step, split into --ppo.num_mini_batches mini-batches (and each into
  --train.gradient_accumulation_steps micro-batches); --train.max_steps counts PPO steps (rollout + update).
- Single process: one device (GPU when there is one); no multi-GPU. Weights train in the dtype --model.dtype
  loads them in (auto: bfloat16 on GPUs that have it, float32 on CPU); --train.precision is not used.
- Output: the policy (full safetensors or adapter) + tokenizer with the template + config.yaml, value_model/,
  metrics.json (final step, mean score of the first/last 5 steps), trainer_state.json (every step's log),
  loss.png (score and losses), TensorBoard under runs/, resumable checkpoint-N/ (same layout + optimizer, RNG).
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Optional

from medgpt.args import DataArgs, FinetuneArgs, ModelArgs, RewardArgs, TrainArgs
from medgpt.config import arg, section
from medgpt.utils import MedGPTError, log


@dataclass
class PPOArgs:
    max_new_tokens: int = arg(128, "Most tokens sampled per response.", min=1)
    temperature: float = arg(0.7, "Sampling temperature (log-probs are taken at the same temperature).", above=0)
    kl_coef: float = arg(0.05, "Weight of the per-token KL penalty against the reference policy (beta).", min=0)
    kl_estimator: Literal["k1", "k3"] = arg("k1", "KL estimator: k1 = logp - ref_logp, k3 = always >= 0.")
    target_kl: Optional[float] = arg(None, "Adaptive KL controller (Ziegler et al.): per-sequence KL to aim for; "
                                     "None keeps kl_coef fixed.", above=0)
    kl_horizon: int = arg(10000, "Adaptive KL controller horizon (samples).", min=1)
    gamma: float = arg(1.0, "GAE discount.", min=0, max=1)
    lam: float = arg(0.95, "GAE lambda.", min=0, max=1)
    cliprange: float = arg(0.2, "PPO policy ratio clip range.", above=0)
    cliprange_value: float = arg(0.2, "Value clip range around the rollout's values.", above=0)
    vf_coef: float = arg(0.1, "Weight of the value loss in the joint loss.", min=0)
    ppo_epochs: int = arg(4, "Passes over each rollout batch.", min=1)
    num_mini_batches: int = arg(1, "Mini-batches (optimizer steps) per pass; must divide --train.batch_size.", min=1)
    missing_eos_penalty: Optional[float] = arg(1.0, "Subtracted from the score of responses that never end "
                                               "(Huang et al.); None disables it.", min=0)
    whiten_rewards: bool = arg(False, "Whiten the per-token rewards of each batch (keeping their mean).")
    value_model: Optional[str] = arg(None, "Initialise the value model from this dir (default: --reward.model, "
                                     "else the policy base).")


@dataclass
class Config:
    model: ModelArgs = section(ModelArgs)
    data: DataArgs = section(DataArgs, "Prompts (prompt-only records; chat and preference files give theirs).")
    finetune: FinetuneArgs = section(FinetuneArgs)
    train: TrainArgs = section(TrainArgs)
    reward: RewardArgs = section(RewardArgs)
    ppo: PPOArgs = section(PPOArgs)
    template: str = arg("tokenizer", "Chat template name, or `tokenizer` to use the tokenizer's own.")
    output_dir: str = arg("", "Where checkpoints, the final policy, value_model/ and logs go.")
    overwrite: bool = arg(False, "Write into a non-empty output_dir.")
    resume: bool = arg(False, "Continue from the last complete checkpoint in output_dir.")


def check(cfg: Config) -> None:
    """Fail in milliseconds on settings that cannot work, before anything loads."""
    from medgpt.train.rewards import check_rewards

    check_rewards(cfg.reward)  # no reward source, unknown rule, weights that do not match
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise MedGPTError("medgpt ppo runs in one process on one device; launch it with plain `medgpt ppo`, not "
                          "torchrun/accelerate (for multi-GPU RL use `medgpt grpo` or `medgpt rloo`).")
    if cfg.ppo.value_model and not Path(cfg.ppo.value_model).exists():
        raise MedGPTError(f"--ppo.value_model {cfg.ppo.value_model} does not exist. Point it at a model directory.")
    step = cfg.ppo.num_mini_batches * cfg.train.gradient_accumulation_steps
    if cfg.train.batch_size % step:
        raise MedGPTError(f"--train.batch_size {cfg.train.batch_size} must be divisible by --ppo.num_mini_batches x "
                          f"--train.gradient_accumulation_steps = {step}.")
    if cfg.train.max_length <= cfg.ppo.max_new_tokens:
        raise MedGPTError(f"--train.max_length {cfg.train.max_length} leaves no room for the prompt: it must exceed "
                          f"--ppo.max_new_tokens {cfg.ppo.max_new_tokens}.")


def scorer(fns, weights):
    """(records, texts) -> (weighted sum of reward functions [B], mean of each function) in TRL's calling
    convention: conversational prompts and completions, plus every other record field (answer, ...) as a list."""
    import torch

    def score(records, texts):
        prompts = [r["prompt"] for r in records]
        completions = [[{"role": "assistant", "content": t}] for t in texts]
        extra = {k: [r.get(k) for r in records] for k in sorted({k for r in records for k in r} - {"prompt"})}
        total, parts = torch.zeros(len(texts)), {}
        for fn, w in zip(fns, weights):
            got = fn(prompts=prompts, completions=completions, **extra)
            vals = torch.tensor([math.nan if v is None else float(v) for v in got])
            name = getattr(fn, "__name__", type(fn).__name__)
            parts[name] = vals.nanmean().item() if not vals.isnan().all() else math.nan
            total += w * vals.nan_to_num(0.0)  # None: this function has no opinion on that sample
        return total, parts

    return score


def resolve(margs: ModelArgs) -> ModelArgs:
    """A model dir that is itself a LoRA adapter (the output of `medgpt sft`/`rm` with LoRA) -> its base + it."""
    adapter_cfg = Path(margs.name_or_path, "adapter_config.json")
    if not adapter_cfg.exists():
        return margs
    base = json.loads(adapter_cfg.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise MedGPTError(f"{adapter_cfg} names no base model (base_model_name_or_path); pass a merged model "
                          f"(`medgpt merge`) instead.")
    return replace(margs, name_or_path=base, adapter=margs.name_or_path)


def load(margs: ModelArgs, cfg: Config, task: str):
    """load_model with the run's finetune settings (under full fine-tuning load_model folds an adapter into the
    weights, so every weight of base + adapter trains)."""
    from medgpt.model.load import load_model

    return load_model(margs, cfg.finetune, task=task, gradient_checkpointing=cfg.train.gradient_checkpointing)


def run(cfg: Config) -> int:
    """PPO (RLHF): rollouts scored by a reward model and/or rules, KL-penalized, GAE, clipped updates."""
    from medgpt.data.prepare import fit_kind, fit_prompt, fit_records
    from medgpt.data.templates import apply_template, encode_prompt, get_template_for, stop_token_ids
    from medgpt.data.validate import load_splits
    from medgpt.model.load import load_tokenizer
    from medgpt.train import run as R

    check(cfg)
    # Data first: a bad file fails in seconds, before any model loads.
    records, _, invalid = load_splits(cfg.data, "prompt", purpose="ppo", seed=cfg.train.seed)
    from medgpt.train.ppo import PPOTrainer
    from medgpt.train.rewards import build_rewards, check_rewards

    check_rewards(cfg.reward, records)  # e.g. answer_match without reference answers

    out = R.start(cfg)
    policy_args = resolve(cfg.model)
    tokenizer = load_tokenizer(policy_args)
    template = get_template_for(cfg.template, tokenizer)
    # Too-long prompts lose their oldest exchanges first, then (--data.overlong truncate) the middle of their last
    # turn; the same rule and counts as grpo/rloo (fit_records).
    limit = cfg.train.max_length - cfg.ppo.max_new_tokens

    def fit(rec):
        prompt = fit_prompt(rec["prompt"], [], template, tokenizer, None, limit, cfg.data.overlong)
        if prompt is None:
            return None, ""
        return ({**rec, "prompt": prompt}, encode_prompt(prompt, template, tokenizer)), fit_kind(prompt, rec["prompt"])

    kept = fit_records(records, fit, what="train", unit="prompts",
                       limits=f"{limit} tokens (--train.max_length - --ppo.max_new_tokens)")
    fns, weights = build_rewards(cfg.reward, template=template, max_length=cfg.train.max_length)

    policy = load(policy_args, cfg, "causal_lm")
    ref_model = None
    if cfg.finetune.type == "full":
        ref_model = copy.deepcopy(policy).eval().requires_grad_(False)
    elif policy_args.adapter:  # reference = the SFT policy, not the bare base under it
        policy.load_adapter(policy_args.adapter, adapter_name="ref", is_trainable=False)
    R.log_parameters(policy)
    value_src = cfg.ppo.value_model or cfg.reward.model or cfg.model.name_or_path
    value_model = load(resolve(replace(cfg.model, name_or_path=value_src, adapter=None)), cfg, "seq_cls")
    if not hasattr(getattr(value_model, "get_base_model", lambda: value_model)(), "score"):
        raise MedGPTError(f"the value model from {value_src} has no `score` head (hidden -> 1), which PPO applies "
                          f"to every token. Pass --ppo.value_model DIR with a causal-LM or `medgpt rm` model.")
    if value_model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        raise MedGPTError(f"the value model from {value_src} has a smaller vocabulary than the policy's tokenizer "
                          f"({len(tokenizer)}); it must read the policy's tokens. Pass --ppo.value_model DIR with "
                          f"the policy's tokenizer (e.g. the policy base).")
    log(f"value model from {value_src}")
    R.log_parameters(value_model)
    apply_template(tokenizer, template)  # the saved tokenizer renders exactly what we trained on

    # Stop at the template's end-of-turn token and eos, and at the model's own eos ids (Qwen's <|im_end|> when
    # --template tokenizer): a response is cut right after its first stop token (Huang et al.).
    extra = getattr(getattr(policy, "generation_config", None), "eos_token_id", None)
    stops = sorted(set(stop_token_ids(template, tokenizer)) | set([extra] if isinstance(extra, int) else extra or []))
    if getattr(policy, "generation_config", None) is not None:
        policy.generation_config.eos_token_id = stops  # saved with a full model: inference stops there too
    steps = cfg.train.max_steps if cfg.train.max_steps > 0 else \
        math.ceil(cfg.train.num_epochs * len(kept) / cfg.train.batch_size)
    trainer = PPOTrainer(policy, value_model, tokenizer, [r for r, _ in kept], [ids for _, ids in kept],
                         scorer(fns, weights), cfg.ppo, cfg.train, out,
                         stop_ids=stops, ref_model=ref_model, max_steps=steps)
    metrics = trainer.train(resume_from=R.resume_checkpoint(cfg, out))
    metrics["invalid_records"] = invalid  # skipped by load_splits (--data.max_invalid)
    trainer.save_final(tokenizer, {**R.data_metrics(), **metrics})
    return 0
