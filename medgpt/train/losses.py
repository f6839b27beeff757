"""Loss functions for preference tuning and RLHF: pure tensor functions, one paper each.

Trainers in `medgpt/stages/` call these; tests: `python -m pytest tests/test_losses.py -q`.

Conventions, everywhere in this file:
- batch first: per-sequence tensors are [B], per-token tensors are [B, T];
- `mask` is 0/1 (bool or any number type); masked-out positions never change a result or a gradient
  (they are replaced with 0 *before* any arithmetic, so even NaN padding is harmless);
- losses and logged quantities are computed in float32, whatever the input dtype (bf16 log-ratios are too coarse);
- nothing here calls a model or keeps state; metrics come back as detached 0-d tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# --------------------------------------------------------------------------------------------- log-probs


def token_logps(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Log-prob of each label token under a causal LM: logits[:, t] predict labels[:, t + 1].

    Args:
        logits: [B, T, V] raw model outputs.
        labels: [B, T] token ids, `ignore_index` where a token must not count (prompt, padding).

    Returns:
        (logps [B, T-1] float32, 0 where ignored; mask [B, T-1] bool, True where the label counts).
    """
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != ignore_index
    # cross_entropy fuses log_softmax + gather; ignored labels (even out-of-vocab ids like -100) give exactly 0.
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=ignore_index, reduction="none")
    return -nll.view(labels.shape), mask


def sequence_logps(logits: Tensor, labels: Tensor, ignore_index: int = -100, average: bool = False) -> Tensor:
    """Per-sequence log π(y|x): the sum (average=False) or mean over counted tokens (average=True) of
    `token_logps`. A row with no counted token gives 0. Returns [B] float32."""
    logps, mask = token_logps(logits, labels, ignore_index)
    total = logps.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


# --------------------------------------------------------------------------------------------- ORPO

_LN2 = math.log(2.0)


def _log1mexp(x: Tensor, eps: float = 1e-6) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and far from it, with finite gradients.

    Maechler (2012), "Accurately computing log(1 - exp(-|a|))": use log(-expm1(x)) for x > -ln 2 and
    log1p(-exp(x)) below. Each branch is fed a safe dummy where it is not selected, because torch.where
    still back-propagates NaN/inf from the unused branch. x is clamped to <= -eps: an average log-prob of
    exactly 0 (p = 1) would make the odds infinite.
    """
    x = x.clamp(max=-eps)
    near0 = x > -_LN2
    hi = torch.log(-torch.expm1(torch.where(near0, x, torch.full_like(x, -_LN2))))
    lo = torch.log1p(-torch.exp(torch.where(near0, torch.full_like(x, -1.0), x)))
    return torch.where(near0, hi, lo)


def orpo_loss(
    chosen_logps_avg: Tensor, rejected_logps_avg: Tensor, chosen_nll: Tensor, beta: float = 0.1
) -> tuple[Tensor, dict[str, Tensor]]:
    """ORPO: SFT loss plus an odds-ratio penalty, no reference model.

    Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
    https://arxiv.org/abs/2403.07691, eqs. 4-7:
        odds(y|x) = P / (1 - P) with log P the *length-averaged* log-prob of y (not the sum),
        L = L_SFT - λ · mean_b log σ(log odds(y_w|x) - log odds(y_l|x)).
    `beta` is λ, as in TRL's ORPOConfig (default 0.1).

    Args:
        chosen_logps_avg, rejected_logps_avg: [B] from `sequence_logps(..., average=True)`, all < 0.
        chosen_nll: the SFT loss on the chosen responses, either already reduced (0-d) or per sample ([B]);
            it is averaged over the batch, so both give the same loss when the [B] values average to the 0-d one.

    Returns:
        (loss, metrics): `log_odds_ratio` is mean log σ(log-odds ratio), `log_odds_chosen` the mean log-odds
        ratio itself (TRL's names), `rewards/*` are beta · avg log-prob, `rewards/accuracies` the share of
        pairs whose chosen reward is higher.
    """
    lc, lr = chosen_logps_avg.float(), rejected_logps_avg.float()
    log_odds = (lc - lr) - (_log1mexp(lc) - _log1mexp(lr))
    ratio = F.logsigmoid(log_odds)
    nll = chosen_nll.float().mean()
    loss = nll - beta * ratio.mean()
    rc, rr = (beta * lc).detach(), (beta * lr).detach()
    metrics = {
        "nll": nll.detach(),
        "log_odds_ratio": ratio.mean().detach(),
        "log_odds_chosen": log_odds.mean().detach(),
        "rewards/chosen": rc.mean(),
        "rewards/rejected": rr.mean(),
        "rewards/margins": (rc - rr).mean(),
        "rewards/accuracies": (rc > rr).float().mean(),
    }
    return loss, metrics


# --------------------------------------------------------------------------------------------- SimPO


def simpo_loss(
    chosen_logps_avg: Tensor,
    rejected_logps_avg: Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[Tensor, dict[str, Tensor]]:
    """SimPO: the length-averaged log-prob is the reward, with a target margin γ; no reference model.

    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    https://arxiv.org/abs/2405.14734, eq. 6:
        z = β/|y_w| log π(y_w|x) - β/|y_l| log π(y_l|x) - γ,   L = -log σ(z).
    `gamma` is the *absolute* margin γ of the paper (TRL's CPO `simpo_gamma` is the same quantity). The SimPO
    repo's `gamma_beta_ratio` r is γ/β: convert with gamma = r · beta.

    loss_type "sigmoid": -(1 - ε) log σ(z) - ε log σ(-z), ε = label_smoothing (conservative DPO-style smoothing);
    loss_type "hinge": max(0, 1 - z), as in the SimPO repo (label_smoothing ignored).
    The inputs are already divided by length: pass `sequence_logps(..., average=True)`. Returns (mean loss, metrics).
    """
    if loss_type not in ("sigmoid", "hinge"):
        raise ValueError(f"simpo_loss: unknown loss_type {loss_type!r}; use 'sigmoid' or 'hinge'")
    rc, rr = beta * chosen_logps_avg.float(), beta * rejected_logps_avg.float()
    z = rc - rr - gamma
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    else:
        losses = torch.relu(1 - z)
    rc, rr = rc.detach(), rr.detach()
    metrics = {
        "rewards/chosen": rc.mean(),
        "rewards/rejected": rr.mean(),
        "rewards/margins": (rc - rr).mean(),
        "rewards/accuracies": (rc > rr).float().mean(),
    }
    return losses.mean(), metrics


# --------------------------------------------------------------------------------------------- PPO (RLHF)
# References for this section:
#   Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", https://arxiv.org/abs/1909.08593
#   Ouyang et al. 2022, "Training language models to follow instructions with human feedback",
#       https://arxiv.org/abs/2203.02155
#   Zheng et al. 2023, "Secrets of RLHF in Large Language Models Part I: PPO", https://arxiv.org/abs/2307.04964
#   Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO", https://arxiv.org/abs/2403.17031
# Per-token tensors cover the *response* tokens only, right-padded: mask is 1...1 0...0 on each row.


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over positions where mask is 1 (over all dims, or along `dim`). An empty mask gives 0, not NaN."""
    mask = mask.bool()
    total = torch.where(mask, x, torch.zeros_like(x))
    count = mask.sum() if dim is None else mask.sum(dim)
    total = total.sum() if dim is None else total.sum(dim)
    return total / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of x over masked positions. unbiased=True divides by n - 1 like TRL's `masked_var`
    (but gives 0, not an error, for n <= 1)."""
    mask = mask.bool()
    centered = torch.where(mask, x - masked_mean(x, mask), torch.zeros_like(x))
    n = mask.sum()
    return (centered**2).sum() / ((n - 1) if unbiased else n).clamp(min=1)


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) with mean and *unbiased* variance taken over all masked elements of the
    batch at once (not per row), as TRL's `masked_whiten`. shift_mean=False adds the mean back (used for
    rewards, whose sign matters). Masked-out positions come back as 0."""
    mask = mask.bool()
    x = x.float()
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, torch.zeros_like(out))


def apply_missing_eos_penalty(scores: Tensor, ended: Tensor, penalty: float) -> Tensor:
    """Lower the reward-model score of responses that hit the length limit without an EOS token.

    The reward model often scores a truncated answer well; without this the policy learns to ramble
    (Huang et al. 2024, detail "penalize responses that do not end with EOS"). Here, like TRL's
    `missing_eos_penalty`, the penalty is *subtracted*: scores[~ended] - penalty (penalty > 0 lowers them).
    Huang et al. instead *replace* the score with a constant (-1); a trainer wanting that can use
    `torch.where(ended, scores, -1.0)`. The trainer computes `ended = (response_ids == eos_id).any(-1)`
    and applies this before `kl_penalized_rewards`. Returns a new tensor.
    """
    return torch.where(ended.bool(), scores, scores - penalty)


def kl_penalized_rewards(
    score: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coef: float, kl_estimator: str = "k1"
) -> tuple[Tensor, Tensor]:
    """Per-token RLHF reward: -kl_coef · KL_t at every response token, plus the sequence score at the last one.

    Ziegler et al. 2019 eq. 2 / Ouyang et al. 2022 eq. 2, per token as in Zheng et al. 2023. KL estimators
    (Schulman, "Approximating KL divergence", http://joschu.net/blog/kl-approx.html), with
    log r = ref_logprob - logprob:
        "k1": -log r = logprob - ref_logprob   (unbiased, can be negative per token)
        "k3": (r - 1) - log r                 (unbiased, always >= 0)

    Args:
        score: [B] reward-model score of each full response (after `apply_missing_eos_penalty`).
        logprobs, ref_logprobs: [B, T] log-probs of the sampled tokens under the policy and the reference.
        mask: [B, T] 1 on response tokens; the score lands on the last 1 of each row (a row of zeros gets none).

    Returns:
        (rewards [B, T], kl [B, T]) in float32, both 0 where masked. The trainer calls this on rollouts
        under torch.no_grad(); this function does not detach.
    """
    mask = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=logprobs.device)
    logprobs = torch.where(mask, logprobs.float(), zero)
    ref_logprobs = torch.where(mask, ref_logprobs.float(), zero)
    log_ratio = ref_logprobs - logprobs  # log r
    if kl_estimator == "k1":
        kl = -log_ratio
    elif kl_estimator == "k3":
        kl = torch.expm1(log_ratio) - log_ratio  # expm1 keeps (r - 1) accurate when r is near 1
    else:
        raise ValueError(f"kl_penalized_rewards: unknown kl_estimator {kl_estimator!r}; use 'k1' or 'k3'")
    rewards = -kl_coef * kl
    # index of the last 1 in each row: argmax of position * mask (0 for an all-zero row, then masked off below)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).argmax(-1, keepdim=True)
    has_tokens = mask.any(-1, keepdim=True)
    bonus = torch.where(has_tokens, score.float().unsqueeze(-1), zero)
    rewards = rewards.scatter_add(1, last, bonus)
    return rewards, kl


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation over response tokens (Schulman et al. 2015,
    https://arxiv.org/abs/1506.02438):

        δ_t = r_t + γ V_{t+1} - V_t,   A_t = δ_t + γ λ A_{t+1},   returns_t = A_t + V_t,

    computed backward in time with V and A taken as 0 after the last valid token (the episode ends there;
    padding is never bootstrapped from). Defaults γ = 1, λ = 0.95 as in Huang et al. 2024.

    Args: rewards, values, mask all [B, T], right-padded. Returns (advantages, returns), float32, no grad,
    0 where masked. Whiten the advantages (`whiten(adv, mask)`) *after* taking the returns, as TRL does.
    """
    mask = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=rewards.device)
    rewards = torch.where(mask, rewards.float(), zero)
    values = torch.where(mask, values.float(), zero)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = torch.where(mask[:, t], delta + gamma * lam * next_adv, zero)
        advantages[:, t] = adv_t
        next_value, next_adv = values[:, t], adv_t  # both already 0 on padding
    returns = torch.where(mask, advantages + values, zero)
    return advantages, returns


def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_range: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, https://arxiv.org/abs/1707.06347, eq. 7), masked token mean:

        ratio = exp(logp - old_logp),   L = mean_t max(-A ratio, -A clip(ratio, 1 - c, 1 + c)).

    `old_logprobs` and `advantages` are rollout constants and are detached here. Metrics: `clipfrac`
    (share of tokens where the clipped term is chosen, i.e. gets no gradient), `approx_kl`
    = 0.5 · mean (logp - old_logp)², `ratio` mean.
    """
    mask = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=logprobs.device)
    log_ratio = torch.where(mask, logprobs.float() - old_logprobs.detach().float(), zero)
    advantages = torch.where(mask, advantages.detach().float(), zero)
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(pg1, pg2), mask)
    metrics = {
        "clipfrac": masked_mean((pg2 > pg1).float(), mask).detach(),
        "approx_kl": (0.5 * masked_mean(log_ratio**2, mask)).detach(),
        "ratio": masked_mean(ratio, mask).detach(),
    }
    return loss, metrics


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range_value: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss, masked token mean (as in OpenAI's baselines PPO2 and TRL):

        v_clip = old_v + clip(v - old_v, -c, c),   L = 0.5 · mean_t max((v - R)², (v_clip - R)²).

    `old_values` and `returns` are rollout constants and are detached here. Metric `vf_clipfrac`: share of
    tokens where the clipped term is larger (no gradient there).
    """
    mask = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=values.device)
    values = torch.where(mask, values.float(), zero)
    old_values = torch.where(mask, old_values.detach().float(), zero)
    returns = torch.where(mask, returns.detach().float(), zero)
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    vf1, vf2 = (values - returns) ** 2, (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(vf1, vf2), mask)
    return loss, {"vf_clipfrac": masked_mean((vf2 > vf1).float(), mask).detach()}
