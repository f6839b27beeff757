"""Golden tests for medgpt/train/losses.py: every expected number is worked out by hand in the comments.

Run: python -m pytest tests/test_losses.py -q   (pure tensor code, milliseconds)
"""

from __future__ import annotations

import math

import pytest
import torch

from medgpt.train.losses import (
    apply_missing_eos_penalty,
    gae,
    kl_penalized_rewards,
    masked_mean,
    masked_var,
    orpo_loss,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_logps,
    simpo_loss,
    token_logps,
    whiten,
)

T = torch.tensor
LN = math.log


def close(a, b, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                               atol=atol, rtol=1e-5)


# ------------------------------------------------------------------------------------------ log-probs


def _logits_1x3x4():
    # row 0: all equal        -> every token has p = 1/4
    # row 1: ln 1, ln 2, ln 3, ln 4 -> softmax p = [1, 2, 3, 4] / 10
    # row 2: never read (the last position predicts nothing after the shift)
    return T([[[0.0, 0.0, 0.0, 0.0], [LN(1), LN(2), LN(3), LN(4)], [9.0, -9.0, 3.0, 1.0]]])


def test_token_logps_shift_and_ignore():
    logits = _logits_1x3x4()
    labels = T([[-100, -100, 3]])  # label 1 ignored; label 2 (= token 3) is predicted by logits row 1
    logps, mask = token_logps(logits, labels)
    assert logps.shape == mask.shape == (1, 2)
    assert mask.tolist() == [[False, True]]
    # counted token: log p(3) under row 1 = ln(4/10) = -0.916291; ignored token contributes exactly 0
    close(logps, [[0.0, LN(0.4)]])
    close(sequence_logps(logits, labels), [LN(0.4)])
    close(sequence_logps(logits, labels, average=True), [LN(0.4)])  # one counted token: mean == sum


def test_sequence_logps_matches_manual_gather():
    logits = _logits_1x3x4()
    labels = T([[0, 2, 3]])  # labels[0] is never a target (nothing predicts it)
    lp = torch.log_softmax(logits, -1)
    manual = lp[0, 0, 2] + lp[0, 1, 3]  # = ln(1/4) + ln(4/10) = -1.386294 - 0.916291 = -2.302585
    close(manual, LN(0.25) + LN(0.4))
    close(sequence_logps(logits, labels), [manual])
    close(sequence_logps(logits, labels, average=True), [manual / 2])  # two counted tokens


def test_sequence_logps_ignored_positions_do_not_matter_and_grad_flows():
    labels = T([[0, -100, 3], [1, 2, -100]])
    logits = torch.randn(2, 3, 4, requires_grad=True)
    out = sequence_logps(logits, labels)
    poked = logits.detach().clone()
    poked[0, 0] = 1e4  # predicts the ignored label of row 0
    poked[1, 1] = -1e4  # predicts the ignored label of row 1
    poked[:, 2] = 123.0  # last position predicts nothing
    close(sequence_logps(poked, labels), out)
    out.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[0, 0].abs().sum() == 0 and logits.grad[:, 2].abs().sum() == 0


def test_sequence_logps_bf16_gives_float32():
    logits = _logits_1x3x4().to(torch.bfloat16)
    assert sequence_logps(logits, T([[0, 2, 3]])).dtype == torch.float32


# ------------------------------------------------------------------------------------------ ORPO


def _orpo_reference(lc, lr, nll, beta):
    """The paper's formula in plain Python math, no tricks."""
    odds = lambda logp: math.exp(logp) / (1 - math.exp(logp))  # noqa: E731
    log_or = LN(odds(lc)) - LN(odds(lr))
    return nll - beta * LN(1 / (1 + math.exp(-log_or)))


def test_orpo_golden():
    # lc = -1, lr = -2, nll = 0.5, beta = 0.1
    # log(1 - e^-1) = ln 0.632121 = -0.458675 ; log(1 - e^-2) = ln 0.864665 = -0.145413
    # log odds ratio = (-1 - -2) - (-0.458675 - -0.145413) = 1 + 0.313262 = 1.313262
    # log σ(1.313262) = -ln(1 + e^-1.313262) = -ln 1.268941 = -0.238183
    # loss = 0.5 - 0.1 * -0.238183 = 0.523818
    loss, m = orpo_loss(T([-1.0]), T([-2.0]), T(0.5), beta=0.1)
    close(loss, 0.523818)
    close(loss, _orpo_reference(-1.0, -2.0, 0.5, 0.1))
    close(m["log_odds_chosen"], 1.313262)
    close(m["log_odds_ratio"], -0.238183)
    close(m["rewards/chosen"], -0.1)  # beta * lc
    close(m["rewards/rejected"], -0.2)
    close(m["rewards/margins"], 0.1)
    close(m["rewards/accuracies"], 1.0)
    close(m["nll"], 0.5)


def test_orpo_batch_matches_reference_and_per_sample_nll():
    lc, lr, nll = [-0.3, -1.5], [-0.9, -0.7], [0.4, 0.8]
    expected = sum(_orpo_reference(c, r, n, 0.25) for c, r, n in zip(lc, lr, nll)) / 2
    loss_vec, m = orpo_loss(T(lc), T(lr), T(nll), beta=0.25)  # per-sample nll [B]
    loss_scalar, _ = orpo_loss(T(lc), T(lr), T(0.6), beta=0.25)  # already-averaged nll
    close(loss_vec, expected)
    close(loss_scalar, expected)
    close(m["rewards/accuracies"], 0.5)  # -0.3 > -0.9 yes, -1.5 > -0.7 no


def test_orpo_stable_near_zero_and_far_away():
    # near 0, float32 log1p(-exp(x)) loses digits: at lc = -1e-5, lr = -3e-5 it gives a log odds ratio of 1.09665
    # instead of 2e-5 - ln(1e-5 / 3e-5) = ln 3 + 2e-5 = 1.098633 (Python floats, expm1 for accuracy)
    _, m = orpo_loss(T([-1e-5]), T([-3e-5]), T(0.0), beta=1.0)
    close(m["log_odds_chosen"], 2e-5 - (LN(-math.expm1(-1e-5)) - LN(-math.expm1(-3e-5))), atol=1e-5)
    for lc, lr in [(-1e-4, -2e-4), (-1e-3, -0.5), (-30.0, -60.0)]:
        loss, _ = orpo_loss(T([lc]), T([lr]), T(0.0), beta=1.0)
        close(loss, _orpo_reference(lc, lr, 0.0, 1.0), atol=1e-4)
    # p = 1 exactly (log-prob 0) must not give inf/NaN loss or gradients
    lc = T([0.0, -1e-9, -100.0], requires_grad=True)
    lr = T([-1.0, 0.0, -200.0], requires_grad=True)
    loss, _ = orpo_loss(lc, lr, T(1.0), beta=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lc.grad).all() and torch.isfinite(lr.grad).all()


def test_orpo_loss_decreases_as_chosen_improves():
    losses = [orpo_loss(T([c]), T([-1.0]), T(0.0), beta=0.1)[0].item() for c in (-3.0, -2.0, -1.0, -0.5, -0.1)]
    assert all(a > b for a, b in zip(losses, losses[1:]))
    lc = T([-1.0], requires_grad=True)
    orpo_loss(lc, T([-1.0]), T(0.0))[0].backward()
    assert lc.grad.item() < 0


# ------------------------------------------------------------------------------------------ SimPO


def test_simpo_sigmoid_golden():
    # beta = 2, gamma = 0.5: z = 2 * -1 - 2 * -2 - 0.5 = 1.5
    # -log σ(1.5) = ln(1 + e^-1.5) = ln 1.223130 = 0.201413
    loss, m = simpo_loss(T([-1.0]), T([-2.0]), beta=2.0, gamma=0.5)
    close(loss, 0.201413)
    close(m["rewards/chosen"], -2.0)
    close(m["rewards/rejected"], -4.0)
    close(m["rewards/margins"], 2.0)
    close(m["rewards/accuracies"], 1.0)
    # label smoothing 0.1: 0.9 * 0.201413 + 0.1 * ln(1 + e^1.5) = 0.181272 + 0.1 * 1.701413 = 0.351413
    loss, _ = simpo_loss(T([-1.0]), T([-2.0]), beta=2.0, gamma=0.5, label_smoothing=0.1)
    close(loss, 0.351413)


def test_simpo_hinge_golden_and_gamma_is_absolute():
    # pair 1: z = 1.5 -> max(0, 1 - 1.5) = 0
    # pair 2: lc = lr = -1.5 -> z = 0 - 0.5 = -0.5 -> max(0, 1 + 0.5) = 1.5 ; mean = 0.75
    loss, _ = simpo_loss(T([-1.0, -1.5]), T([-2.0, -1.5]), beta=2.0, gamma=0.5, loss_type="hinge")
    close(loss, 0.75)
    # sigmoid on pair 2 alone: ln(1 + e^0.5) = ln 2.648721 = 0.974077 (γ subtracted as-is, not γ/β)
    close(simpo_loss(T([-1.5]), T([-1.5]), beta=2.0, gamma=0.5)[0], 0.974077)
    with pytest.raises(ValueError):
        simpo_loss(T([-1.0]), T([-2.0]), loss_type="ipo")


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_simpo_loss_decreases_as_chosen_improves(loss_type):
    # hinge is flat once z >= 1, so stay below: z = 2 * (c + 1) - 0.5 < 1 for c < -0.25
    losses = [simpo_loss(T([c]), T([-1.0]), loss_type=loss_type)[0].item() for c in (-3.0, -2.0, -1.0, -0.5)]
    assert all(a > b for a, b in zip(losses, losses[1:]))
    lc = T([-1.0], requires_grad=True)
    simpo_loss(lc, T([-1.0]), loss_type=loss_type)[0].backward()
    assert torch.isfinite(lc.grad).all() and lc.grad.item() < 0


# ------------------------------------------------------------------------------------------ PPO pieces


def test_masked_mean_and_var():
    x = T([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    mask = T([[1, 1, 0], [1, 0, 0]])
    close(masked_mean(x, mask), 2.0)  # (1 + 2 + 3) / 3
    close(masked_mean(x, mask, dim=1), [1.5, 3.0])  # row means over their own tokens
    close(masked_mean(x, torch.zeros_like(mask)), 0.0)  # empty mask: 0, not NaN
    close(masked_var(x, mask), 1.0)  # ((1-2)² + 0 + (3-2)²) / (3 - 1)
    close(masked_var(x, mask, unbiased=False), 2 / 3)


def test_whiten_golden():
    x = T([[1.0, 2.0, 3.0, 100.0]])
    mask = T([[1, 1, 1, 0]])
    # mean 2, unbiased var 1 -> (x - 2) / sqrt(1 + 1e-8); padding -> 0
    close(whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]])
    close(whiten(x, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]])  # scaled by 1, mean added back
    x2 = x.clone()
    x2[0, 3] = float("nan")
    close(whiten(x2, mask), whiten(x, mask))


def test_apply_missing_eos_penalty():
    scores = T([1.0, 2.0, -0.5])
    out = apply_missing_eos_penalty(scores, T([True, False, False]), penalty=1.0)
    close(out, [1.0, 1.0, -1.5])  # only the unfinished ones lose 1
    close(scores, [1.0, 2.0, -0.5])  # not in place


def _kl_case():
    logprobs = T([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref_logprobs = T([[-1.5, -1.5, -3.0], [-2.0, -1.0, 0.0]])
    mask = T([[1, 1, 1], [1, 1, 0]])
    return T([1.0, 2.0]), logprobs, ref_logprobs, mask


def test_kl_penalized_rewards_k1_golden():
    score, lp, ref, mask = _kl_case()
    rewards, kl = kl_penalized_rewards(score, lp, ref, mask, kl_coef=0.1)
    # k1 = logp - ref: row 0 [0.5, -0.5, 0], row 1 [1.0, 0, pad]
    close(kl, [[0.5, -0.5, 0.0], [1.0, 0.0, 0.0]])
    # -0.1 * kl, then the score on the last valid token (index 2 in row 0, index 1 in row 1)
    close(rewards, [[-0.05, 0.05, 1.0], [-0.1, 2.0, 0.0]])


def test_kl_penalized_rewards_k3_golden():
    score, lp, ref, mask = _kl_case()
    rewards, kl = kl_penalized_rewards(score, lp, ref, mask, kl_coef=0.1, kl_estimator="k3")
    # log r = ref - logp; k3 = e^{log r} - 1 - log r
    # row 0: log r = -0.5 -> 0.606531 - 1 + 0.5 = 0.106531 ; +0.5 -> 1.648721 - 1 - 0.5 = 0.148721 ; 0 -> 0
    # row 1: log r = -1 -> 0.367879 - 1 + 1 = 0.367879 ; 0 -> 0
    close(kl, [[0.106531, 0.148721, 0.0], [0.367879, 0.0, 0.0]])
    close(rewards, [[-0.0106531, -0.0148721, 1.0], [-0.0367879, 2.0, 0.0]])
    assert (kl >= 0).all()
    with pytest.raises(ValueError):
        kl_penalized_rewards(score, lp, ref, mask, 0.1, kl_estimator="k9")


def test_kl_penalized_rewards_empty_row_gets_no_score():
    rewards, _ = kl_penalized_rewards(T([5.0]), T([[-1.0, -1.0]]), T([[-1.0, -1.0]]), T([[0, 0]]), 0.1)
    close(rewards, [[0.0, 0.0]])


def _gae_case():
    # row 0: 3 valid tokens + 1 pad ; row 1: 2 valid tokens + 2 pads (pads hold garbage on purpose)
    rewards = T([[1.0, 0.0, 2.0, 50.0], [1.0, 2.0, 99.0, -7.0]])
    values = T([[0.5, 1.0, 1.5, 50.0], [0.5, 1.5, 7.0, 3.0]])
    mask = T([[1, 1, 1, 0], [1, 1, 0, 0]])
    return rewards, values, mask


def test_gae_golden_hand_unrolled():
    rewards, values, mask = _gae_case()
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)  # γλ = 0.72
    # row 0, value after the last token is 0:
    #   t=2: δ = 2 + 0.9*0   - 1.5 = 0.5   A = 0.5
    #   t=1: δ = 0 + 0.9*1.5 - 1.0 = 0.35  A = 0.35 + 0.72*0.5  = 0.71
    #   t=0: δ = 1 + 0.9*1.0 - 0.5 = 1.4   A = 1.4  + 0.72*0.71 = 1.9112
    # row 1:
    #   t=1: δ = 2 + 0.9*0   - 1.5 = 0.5   A = 0.5
    #   t=0: δ = 1 + 0.9*1.5 - 0.5 = 1.85  A = 1.85 + 0.72*0.5  = 2.21
    close(adv, [[1.9112, 0.71, 0.5, 0.0], [2.21, 0.5, 0.0, 0.0]])
    # returns = A + V
    close(ret, [[2.4112, 1.71, 2.0, 0.0], [2.71, 2.0, 0.0, 0.0]])
    assert not adv.requires_grad and not ret.requires_grad


def test_gae_lambda1_gamma1_gives_reward_to_go():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6, requires_grad=True)
    lengths = T([6, 4, 1])
    mask = torch.arange(6)[None] < lengths[:, None]
    _, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    r = torch.where(mask, rewards, 0)
    to_go = r.flip(-1).cumsum(-1).flip(-1)  # sum of rewards from t to the end
    close(ret, torch.where(mask, to_go, 0))


def test_ppo_policy_loss_golden_clipped_and_unclipped():
    # clip 0.2 -> ratios clamp to [0.8, 1.2]; per token: pg1 = -A r, pg2 = -A clip(r), take max
    #   r=1.1, A= 2: pg1 = -2.2, pg2 = -2.2 -> -2.2 (inside the band, gradient -A r = -2.2)
    #   r=1.5, A= 1: pg1 = -1.5, pg2 = -1.2 -> -1.2 (clipped, gradient 0)
    #   r=0.5, A=-1: pg1 =  0.5, pg2 =  0.8 -> 0.8  (clipped, gradient 0)
    #   r=1.5, A=-1: pg1 =  1.5, pg2 =  1.2 -> 1.5  (outside the band but unclipped: pessimistic side, grad -A r = 1.5)
    #   5th token is padding with garbage
    # loss = (-2.2 - 1.2 + 0.8 + 1.5) / 4 = -1.1 / 4 = -0.275
    ratios = [1.1, 1.5, 0.5, 1.5]
    old = T([[0.3, -1.0, -2.0, -0.7, 123.0]])
    logp = (old + T([[LN(r) for r in ratios] + [9.0]])).requires_grad_()
    adv = T([[2.0, 1.0, -1.0, -1.0, 77.0]])
    mask = T([[1, 1, 1, 1, 0]])
    loss, m = ppo_policy_loss(logp, old, adv, mask, clip_range=0.2)
    close(loss, -0.275)
    loss.backward()
    # d loss / d logp_t = -A_t r_t / 4 where unclipped, 0 where clipped or masked
    close(logp.grad, [[-2.2 / 4, 0.0, 0.0, 1.5 / 4, 0.0]])
    close(m["clipfrac"], 0.5)  # tokens 2 and 3 (pg2 > pg1)
    close(m["ratio"], (1.1 + 1.5 + 0.5 + 1.5) / 4)  # 1.15
    close(m["approx_kl"], 0.5 * sum(LN(r) ** 2 for r in ratios) / 4)


def test_ppo_policy_loss_on_policy_is_minus_mean_advantage():
    # first PPO epoch: logp == old -> ratio 1, loss = -mean(A) = -(1 - 3) / 2 = 1, nothing clipped
    lp = T([[-1.0, -2.0]])
    loss, m = ppo_policy_loss(lp, lp, T([[1.0, -3.0]]), T([[1, 1]]))
    close(loss, 1.0)
    close(m["clipfrac"], 0.0)
    close(m["approx_kl"], 0.0)


def test_ppo_value_loss_golden():
    # clip 0.2 around old = 1.0 -> v_clip in [0.8, 1.2]
    #   v=1.1, R=2: vf1 = 0.81, v_clip = 1.1, vf2 = 0.81 -> 0.81 (unclipped, grad (v - R) / 3 = -0.3)
    #   v=1.5, R=2: vf1 = 0.25, v_clip = 1.2, vf2 = 0.64 -> 0.64 (clipped, grad 0)
    #   v=1.5, R=0: vf1 = 2.25, v_clip = 1.2, vf2 = 1.44 -> 2.25 (unclipped, grad 1.5 / 3 = 0.5)
    # loss = 0.5 * (0.81 + 0.64 + 2.25) / 3 = 0.5 * 3.7 / 3 = 0.616667
    values = T([[1.1, 1.5, 1.5, 42.0]], requires_grad=True)
    old = T([[1.0, 1.0, 1.0, -5.0]])
    returns = T([[2.0, 2.0, 0.0, 9.0]])
    mask = T([[1, 1, 1, 0]])
    loss, m = ppo_value_loss(values, old, returns, mask, clip_range_value=0.2)
    close(loss, 3.7 / 6)
    close(m["vf_clipfrac"], 1 / 3)
    loss.backward()
    close(values.grad, [[-0.3, 0.0, 0.5, 0.0]])


# ------------------------------------------------------------------------------------------ properties


def _poke(x, mask, value):
    """x with every masked-out position replaced by `value`."""
    return torch.where(mask.bool(), x, torch.full_like(x, value))


@pytest.mark.parametrize("junk", [float("nan"), float("inf"), -1e6, 3.0])
def test_masked_positions_never_affect_results(junk):
    torch.manual_seed(1)
    B, L = 3, 5
    mask = torch.arange(L)[None] < T([5, 3, 1])[:, None]
    lp, old, ref, adv, v, old_v, ret = (torch.randn(B, L) for _ in range(7))
    score = torch.randn(B)

    def run(p):
        out = []
        for est in ("k1", "k3"):
            out += list(kl_penalized_rewards(score, p(lp), p(ref), mask, 0.05, est))
        out += list(gae(p(adv), p(v), mask, 0.9, 0.8))
        out += [whiten(p(adv), mask), whiten(p(adv), mask, shift_mean=False), masked_mean(p(lp), mask),
                masked_mean(p(lp), mask, dim=1), masked_var(p(lp), mask)]
        loss, m = ppo_policy_loss(p(lp), p(old), p(adv), mask)
        out += [loss, *m.values()]
        loss, m = ppo_value_loss(p(v), p(old_v), p(ret), mask)
        out += [loss, *m.values()]
        return out

    for a, b in zip(run(lambda x: x), run(lambda x: _poke(x, mask, junk))):
        close(a, b)


def test_gradients_finite_with_junk_padding():
    mask = T([[1, 1, 0], [1, 0, 0]])
    nan_pad = lambda x: _poke(x, mask, float("nan"))  # noqa: E731
    lp = nan_pad(torch.randn(2, 3)).requires_grad_()
    v = nan_pad(torch.randn(2, 3)).requires_grad_()
    ref = nan_pad(torch.randn(2, 3)).requires_grad_()
    rewards, _ = kl_penalized_rewards(T([1.0, -1.0]), lp, ref, mask, 0.1, "k3")
    pl, _ = ppo_policy_loss(lp, nan_pad(torch.randn(2, 3)), nan_pad(torch.randn(2, 3)), mask)
    vl, _ = ppo_value_loss(v, nan_pad(torch.randn(2, 3)), nan_pad(torch.randn(2, 3)), mask)
    (rewards.sum() + pl + vl + masked_mean(lp, mask)).backward()
    for t in (lp, v, ref):
        assert torch.isfinite(t.grad).all()
        assert (t.grad[~mask.bool()] == 0).all()


def test_outputs_are_float32_for_bf16_inputs():
    bf = lambda x: T(x, dtype=torch.bfloat16)  # noqa: E731
    assert orpo_loss(bf([-1.0]), bf([-2.0]), bf(0.5))[0].dtype == torch.float32
    assert simpo_loss(bf([-1.0]), bf([-2.0]))[0].dtype == torch.float32
    mask = T([[1, 1]])
    assert ppo_policy_loss(bf([[-1.0, -2.0]]), bf([[-1.0, -2.1]]), bf([[1.0, 1.0]]), mask)[0].dtype == torch.float32
    assert gae(bf([[1.0, 0.0]]), bf([[0.5, 0.5]]), mask)[0].dtype == torch.float32
