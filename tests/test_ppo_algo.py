"""PPO math against values worked out by hand (the arithmetic is in the comments).

PYTHONPATH=. python -m pytest tests/test_ppo_algo.py -q
"""

from __future__ import annotations

import math
import threading

import pytest
import torch

from rlhf_cli.core.generation import token_logprobs
from rlhf_cli.ppo.algo import (
    AdaptiveKLController,
    FixedKLController,
    clip_scores,
    entropy_from_logits,
    gae,
    kl_penalty,
    make_kl_controller,
    masked_mean,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    value_loss,
    whiten_scores,
)

NAN = float("nan")


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        atol=atol,
        rtol=0,
    )


# ------------------------------------------------------------------------------------------------
# masked statistics and whitening
# ------------------------------------------------------------------------------------------------


def test_masked_mean_ignores_padding_even_nan():
    x = torch.tensor([[1.0, 2.0, NAN], [4.0, math.inf, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    # (1 + 2 + 4 + 6) / 4 = 3.25
    close(masked_mean(x, mask), 3.25)
    # rows: (1 + 2) / 2 = 1.5, (4 + 6) / 2 = 5
    close(masked_mean(x, mask, dim=1), [1.5, 5.0])
    # an all-padding row averages to 0 rather than NaN
    close(masked_mean(x, torch.tensor([[0, 0, 0], [1, 0, 0]]), dim=1), [0.0, 4.0])


def test_masked_whiten_divides_by_the_unbiased_std():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # entries 1,2,3,4: mean 2.5, squared deviations 2.25+0.25+0.25+2.25 = 5, unbiased variance 5 / 3
    out = masked_whiten(x, mask)
    close((x[0, 0] - 2.5) / out[0, 0], math.sqrt(5 / 3))
    with pytest.raises(ValueError, match="at least 2"):
        masked_whiten(x, torch.tensor([[1, 0, 0], [0, 0, 0]]))


def test_masked_whiten_values_and_padding():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, NAN]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    out = masked_whiten(x, mask)
    # mean 2.5, std sqrt(5/3) = 1.2909944: 1.5 / 1.2909944 = 1.1618950, 0.5 / 1.2909944 = 0.3872983
    close(out, [[-1.1618950, -0.3872983, 0.3872983], [1.1618950, 0.0, 0.0]])
    close(masked_mean(out, mask), 0.0)
    close(out[mask].var(), 1.0)  # unbiased, over the real entries
    # shift_mean=False scales only: the mean 2.5 is added back
    close(
        masked_whiten(x, mask, shift_mean=False), [[1.3381050, 2.1127017, 2.8872983], [3.6618950, 0.0, 0.0]]
    )


class FakeAllReduce:
    """A sum all-reduce between threads standing in for ranks, to test global whitening."""

    def __init__(self, world: int):
        self.slots: list[torch.Tensor | None] = [None] * world
        self.barrier = threading.Barrier(world, timeout=10)
        self.calls = [0] * world

    def for_rank(self, rank: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.calls[rank] += 1
            self.slots[rank] = t.clone()
            self.barrier.wait()
            out = torch.stack(self.slots).sum(0)
            self.barrier.wait()  # nobody overwrites a slot before everyone has summed
            return out

        return reduce


def test_masked_whiten_with_global_statistics():
    # rank 0 holds 1, 2; rank 1 holds 3, 4 and a pad. Globally: mean 2.5, unbiased var 5/3 (as above),
    # which neither rank could compute alone (rank 0 alone would have mean 1.5).
    shards = [
        (torch.tensor([[1.0, 2.0]]), torch.tensor([[1, 1]])),
        (torch.tensor([[3.0, 4.0, 50.0]]), torch.tensor([[1, 1, 0]])),
    ]
    fake = FakeAllReduce(world=2)
    results: list[torch.Tensor | None] = [None, None]

    def work(rank):
        x, m = shards[rank]
        results[rank] = masked_whiten(x, m, reduce=fake.for_rank(rank))

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    close(results[0], [[-1.1618950, -0.3872983]])
    close(results[1], [[0.3872983, 1.1618950, 0.0]])
    assert fake.calls[0] == fake.calls[1]  # collectives must match across ranks


def test_whiten_and_clip_scores():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    close(whiten_scores(scores, shift_mean=True), [-1.1618950, -0.3872983, 0.3872983, 1.1618950])
    close(clip_scores(torch.tensor([-7.0, 0.5, 9.0]), 5.0), [-5.0, 0.5, 5.0])
    assert clip_scores(scores, None) is scores


def test_reward_whitening_scales_to_unit_variance_and_keeps_the_mean():
    # As trl whitens rewards (shift_mean=False): mean 2.5 kept, std sqrt(5/3) -> 1, so
    # 2.5 + (x - 2.5) / 1.2909944.
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = whiten_scores(scores)
    close(out, [1.3381050, 2.1127017, 2.8872983, 3.6618950])
    close(out.mean(), 2.5)
    close(out.var(), 1.0)


# ------------------------------------------------------------------------------------------------
# response masks
# ------------------------------------------------------------------------------------------------

EOS, PAD = 2, 0




def test_kl_estimators_by_hand():
    logp = torch.log(torch.tensor([0.5, 0.2]))
    ref_logp = torch.log(torch.tensor([0.25, 0.4]))
    ln2 = 0.6931472
    # token 1: d = ln(0.5 / 0.25) = ln 2; token 2: d = ln(0.2 / 0.4) = -ln 2
    close(kl_penalty(logp, ref_logp, "k1"), [ln2, -ln2])  # k1 is negative on token 2
    # k2 = 0.5 * (ln 2)^2 = 0.2402265 for both
    close(kl_penalty(logp, ref_logp, "k2"), [0.2402265, 0.2402265])
    # k3: r = ref/p. token 1: r = 0.5, (0.5 - 1) - ln 0.5 = 0.1931472; token 2: r = 2, 1 - ln 2 = 0.3068528
    close(kl_penalty(logp, ref_logp, "k3"), [0.1931472, 0.3068528])
    close(kl_penalty(logp, ref_logp, "abs"), [ln2, ln2])
    with pytest.raises(ValueError, match="unknown KL"):
        kl_penalty(logp, ref_logp, "k4")


def test_k3_is_never_negative_and_zero_when_equal():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, generator=g) * 3, torch.randn(64, generator=g) * 3
    assert (kl_penalty(a, b, "k3") >= 0).all()
    assert (kl_penalty(a, b, "k1") < 0).any()
    close(kl_penalty(a, a, "k3"), torch.zeros(64))


def test_per_token_rewards_score_on_last_real_token():
    # answers [5, EOS, pad, pad] (EOS in the middle: score on it at t=1), [5, 6, 7, EOS] (score at t=3),
    # [5, 6, 7, 8] (no EOS, all real: score at t=3); the mask covers each answer up to and including its EOS
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    scores = torch.tensor([2.0, 3.0, -1.0])
    logp = torch.zeros(3, 4)
    # NaN at padding must not leak into anything
    ref_logp = torch.tensor([[-0.2, 0.4, NAN, NAN], [0.2, 0.2, 0.2, 0.2], [0.0, -0.1, 0.1, 0.3]])
    rewards, kl = per_token_rewards(scores, logp, ref_logp, mask, kl_coef=0.5)
    # k1 = logp - ref = -ref_logp on real tokens, 0 on padding
    close(kl, [[0.2, -0.4, 0.0, 0.0], [-0.2, -0.2, -0.2, -0.2], [0.0, 0.1, -0.1, -0.3]])
    # rewards = -0.5 * k1, plus the score at the last real token:
    # row 0: -0.1, 0.2 + 2 = 2.2; row 1: 0.1 x3, 0.1 + 3 = 3.1; row 2: 0, -0.05, 0.05, 0.15 - 1 = -0.85
    close(rewards, [[-0.1, 2.2, 0.0, 0.0], [0.1, 0.1, 0.1, 3.1], [0.0, -0.05, 0.05, -0.85]])


# ------------------------------------------------------------------------------------------------
# GAE
# ------------------------------------------------------------------------------------------------

REWARDS = torch.tensor([[-0.1, 0.0, 1.0]])
VALUES = torch.tensor([[0.5, 0.6, 0.7]])


def test_gae_gamma1_lam095():
    adv, ret = gae(REWARDS, VALUES, torch.ones(1, 3), gamma=1.0, lam=0.95)
    # t=2 (terminal): delta = 1.0 + 0 - 0.7 = 0.3;             A2 = 0.3
    # t=1:            delta = 0.0 + 0.7 - 0.6 = 0.1;           A1 = 0.1 + 0.95 * 0.3 = 0.385
    # t=0:            delta = -0.1 + 0.6 - 0.5 = 0.0;          A0 = 0.0 + 0.95 * 0.385 = 0.36575
    close(adv, [[0.36575, 0.385, 0.3]])
    # returns = A + V
    close(ret, [[0.86575, 0.985, 1.0]])


def test_gae_gamma09_lam1_is_discounted_return_minus_value():
    adv, ret = gae(REWARDS, VALUES, torch.ones(1, 3), gamma=0.9, lam=1.0)
    # lam = 1: returns are Monte-Carlo discounted returns, independent of the values:
    # G2 = 1.0; G1 = 0 + 0.9 * 1.0 = 0.9; G0 = -0.1 + 0.9 * 0.9 = 0.71
    close(ret, [[0.71, 0.9, 1.0]])
    # A = G - V = 0.71 - 0.5, 0.9 - 0.6, 1.0 - 0.7
    close(adv, [[0.21, 0.3, 0.3]])


def test_gae_padding_does_not_leak():
    rewards = torch.tensor([[0.0, 1.0, 5.0], [-0.1, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.7, NAN], [0.5, 0.6, 0.7]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0, t=1 is terminal despite the pad after it (its reward 5 and NaN value are ignored):
    # delta1 = 1.0 - 0.7 = 0.3, A1 = 0.3; delta0 = 0 + 0.7 - 0.5 = 0.2, A0 = 0.2 + 0.95 * 0.3 = 0.485
    close(adv[0], [0.485, 0.3, 0.0])
    close(ret[0], [0.985, 1.0, 0.0])
    # row 1 is the unpadded example above: rows do not interact
    close(adv[1], [0.36575, 0.385, 0.3])


# ------------------------------------------------------------------------------------------------
# losses
# ------------------------------------------------------------------------------------------------


def test_policy_loss_clipping_four_cases():
    # eps = 0.2; ratios 1.5, 0.5, 1.5, 0.5 with advantages +1, +1, -1, -1, plus a pad with a wild ratio
    ratio = torch.tensor([[1.5, 0.5, 1.5, 0.5, 100.0]])
    logp_old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.0]])
    logp_new = (logp_old + ratio.log()).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, stats = policy_loss(logp_new, logp_old, adv, mask, clip_range=0.2)
    # max(-A*r, -A*clip(r)):
    # A=+1, r=1.5: max(-1.5, -1.2) = -1.2  (clipped)
    # A=+1, r=0.5: max(-0.5, -0.8) = -0.5  (unclipped; clipping never lifts a bad ratio)
    # A=-1, r=1.5: max( 1.5,  1.2) =  1.5  (unclipped)
    # A=-1, r=0.5: max( 0.5,  0.8) =  0.8  (clipped)
    # mean = (-1.2 - 0.5 + 1.5 + 0.8) / 4 = 0.15
    close(loss, 0.15)
    close(stats["clipfrac"], 0.5)
    close(stats["ratio_mean"], 1.0)  # (1.5 + 0.5 + 1.5 + 0.5) / 4
    close(stats["ratio_max"], 1.5)  # the pad's 100 is ignored
    # k3: r=1.5 -> 0.5 - ln 1.5 = 0.0945349; r=0.5 -> -0.5 + ln 2 = 0.1931472; mean = 0.1438410
    close(stats["approx_kl"], 0.1438410)
    loss.backward()
    # d/dlogp of -A*r/4 is -A*r/4 where unclipped, 0 where clipped or padded:
    # token 2: -1 * 0.5 / 4 = -0.125; token 3: +1 * 1.5 / 4 = 0.375
    close(logp_new.grad, [[0.0, -0.125, 0.375, 0.0, 0.0]])
    assert all(not v.requires_grad for v in stats.values())

    # inside the clip range, or with a zero advantage, both terms tie: not counted as clipped.
    # loss = (-1 * 1.1 + -0 * 0.9) / 2 = -0.55
    inside = torch.tensor([[1.1, 0.9]]).log()
    loss, stats = policy_loss(inside, torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), torch.ones(1, 2), 0.2)
    close(loss, -0.55)
    close(stats["clipfrac"], 0.0)


def test_value_loss_clipping():
    # eps = 0.2
    values_old = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values_new = torch.tensor([[0.5, 0.5, 0.9, 9.0]], requires_grad=True)
    returns = torch.tensor([[1.0, 0.0, 0.0, NAN]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = value_loss(values_new, values_old, returns, mask, clip_range=0.2)
    # token 1: v_clip = 0 + 0.2 = 0.2; (0.5-1)^2 = 0.25 vs (0.2-1)^2 = 0.64 -> 0.64 (clipped)
    # token 2: v_clip = 0.2;           (0.5-0)^2 = 0.25 vs (0.2-0)^2 = 0.04 -> 0.25
    # token 3: v_clip = 0.9 (moved 0.1 < eps); 0.81 both -> 0.81
    # loss = 0.5 * (0.64 + 0.25 + 0.81) / 3 = 0.2833333
    close(loss, 0.2833333)
    close(stats["vf_clipfrac"], 1 / 3)
    close(stats["value_mean"], (0.5 + 0.5 + 0.9) / 3)
    # residuals R - v = 0.5, -0.5, -0.9: mean -0.3, var (0.64 + 0.04 + 0.36) / 3 = 1.04 / 3
    # returns 1, 0, 0: mean 1/3, var (4/9 + 1/9 + 1/9) / 3 = 2/9; EV = 1 - (1.04/3) / (2/9) = -0.56
    close(stats["explained_variance"], -0.56)
    loss.backward()
    # token 1 clipped -> no grad; token 2: 0.5 * 2 * 0.5 / 3 = 1/6; token 3: 0.5 * 2 * 0.9 / 3 = 0.3
    close(values_new.grad, [[0.0, 1 / 6, 0.3, 0.0]])


# ------------------------------------------------------------------------------------------------
# from logits
# ------------------------------------------------------------------------------------------------


def test_entropy_uniform_is_log_vocab():
    close(entropy_from_logits(torch.full((2, 3, 7), 1.3)), torch.full((2, 3), math.log(7)))
    # p = (0.25, 0.75): -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.3465736 + 0.2157616 = 0.5623351
    close(entropy_from_logits(torch.tensor([0.0, math.log(3)])), 0.5623351)
    # logits masked to -inf contribute 0, not NaN: two live tokens -> ln 2
    close(entropy_from_logits(torch.tensor([[0.0, 0.0, -math.inf, -math.inf]])), [math.log(2)])
    close(
        entropy_from_logits(torch.full((2, 3, 7), 1.3, dtype=torch.bfloat16)), torch.full((2, 3), math.log(7))
    )


def test_token_logprobs_matches_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g) * 4
    labels = torch.randint(0, 11, (2, 5), generator=g)
    expected = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    close(token_logprobs(logits, labels), expected)
    # bf16 logits: compared against the float32 log-softmax of the same bf16 values
    half = logits.bfloat16()
    expected_half = torch.log_softmax(half.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    out = token_logprobs(half, labels)
    assert out.dtype == torch.float32
    close(out, expected_half)


def test_token_logprobs_gradient_matches():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, generator=g, requires_grad=True)
    labels = torch.tensor([0, 5, 2])
    token_logprobs(logits, labels).sum().backward()
    # d log p_y / d z = onehot(y) - softmax(z)
    expected = torch.nn.functional.one_hot(labels, 6).float() - torch.softmax(logits.detach(), -1)
    close(logits.grad, expected)


# ------------------------------------------------------------------------------------------------
# KL controllers
# ------------------------------------------------------------------------------------------------


def test_adaptive_kl_exact_multipliers():
    # target 6, horizon 10000, 512 sequences per rollout
    above = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    # KL 9: 9/6 - 1 = 0.5 -> clipped to 0.2; mult = 1 + 0.2 * 512 / 10000 = 1.01024
    close(above.update(9.0, n_steps=512), 0.2 * 1.01024)
    below = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    # KL 3: 3/6 - 1 = -0.5 -> -0.2; mult = 1 - 0.01024 = 0.98976
    close(below.update(torch.tensor(3.0), n_steps=512), 0.2 * 0.98976)
    near = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    # KL 6.6: 6.6/6 - 1 = 0.1 (inside the clip); mult = 1 + 0.1 * 512 / 10000 = 1.00512
    close(near.update(6.6, n_steps=512), 0.2 * 1.00512)
    assert near.value == pytest.approx(0.2 * 1.00512)
    with pytest.raises(ValueError, match="finite"):
        near.update(NAN, n_steps=512)


def test_kl_controller_state_dict_round_trip():
    ctl = AdaptiveKLController(0.1, target=4.0, horizon=1000)
    for kl in (8.0, 7.0, 1.0):
        ctl.update(kl, n_steps=64)
    resumed = AdaptiveKLController(0.1, target=4.0, horizon=1000)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value
    assert resumed.update(5.0, 64) == ctl.update(5.0, 64)

    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 512) == 0.05
    with pytest.raises(ValueError, match="adaptive"):
        fixed.load_state_dict(ctl.state_dict())
    restored = FixedKLController(0.0)
    restored.load_state_dict(fixed.state_dict())
    assert restored.value == 0.05


def test_make_kl_controller():
    assert isinstance(make_kl_controller(0.05), FixedKLController)
    adaptive = make_kl_controller(0.2, kl_target=6.0, horizon=500)
    assert isinstance(adaptive, AdaptiveKLController)
    assert (adaptive.value, adaptive.target, adaptive.horizon) == (0.2, 6.0, 500)


def test_tempered_logprobs_and_entropy_of_bf16_logits_equal_the_fp32_computation():
    # Sampling divides fp32 logits by the temperature; dividing the bf16 logits first rounds each quotient
    # to 8 mantissa bits (up to ~0.03 on logits near 8), which the log-probs then carry.
    torch.manual_seed(0)
    logits = (torch.randn(3, 4, 64) * 6).bfloat16()
    labels = torch.randint(64, (3, 4))
    T = 0.7
    exact = torch.log_softmax(logits.float() / T, -1)
    close(token_logprobs(logits, labels, T), exact.gather(-1, labels.unsqueeze(-1)).squeeze(-1), atol=1e-5)
    close(entropy_from_logits(logits, T), -(exact.exp() * exact).sum(-1), atol=1e-5)
    close(token_logprobs(logits.float(), labels, T), exact.gather(-1, labels.unsqueeze(-1)).squeeze(-1), atol=1e-5)
    with pytest.raises(ValueError, match="temperature must be positive"):
        token_logprobs(logits, labels, 0.0)
