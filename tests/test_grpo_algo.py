"""The critic-free advantage estimators and loss aggregations of rlhf_cli/ppo/algo.py, on hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_cli.ppo import algo

# Two prompts, four answers each (consecutive rows): one right answer in four, then a group all alike.
SCORES = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])


def test_grpo_divides_the_centred_scores_by_the_group_std():
    # Group 1: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5.
    want = [0.75 / (0.5 + algo.GROUP_STD_EPS)] + [-0.25 / (0.5 + algo.GROUP_STD_EPS)] * 3 + [0.0] * 4
    torch.testing.assert_close(algo.group_advantages(SCORES, 4, "grpo"), torch.tensor(want))


def test_dr_grpo_only_centres():
    want = [0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(algo.group_advantages(SCORES, 4, "dr_grpo"), torch.tensor(want))


def test_rloo_leaves_each_answer_out_of_its_own_baseline():
    # Answer 1: 1 - mean(0, 0, 0) = 1; answer 2: 0 - mean(1, 0, 0) = -1/3.
    want = [1.0, -1 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(algo.group_advantages(SCORES, 4, "rloo"), torch.tensor(want))
    # The same as scores minus the mean of the others, computed directly, on unequal scores.
    s = torch.tensor([3.0, 1.0, 2.0])
    direct = torch.tensor([3 - 1.5, 1 - 2.5, 2 - 2.0])
    torch.testing.assert_close(algo.group_advantages(s, 3, "rloo"), direct)


def test_reinforce_pp_whitens_kl_shaped_returns_over_the_batch():
    # Two answers of 2 and 1 real tokens, scores 1 and 0, k1 KL of 0.5 nats per token, beta 0.1:
    # rewards [[-0.05, 1 - 0.05], [-0.05, pad]] -> returns to go [[0.9, 0.95], [-0.05, 0]].
    scores = torch.tensor([1.0, 0.0])
    logp = torch.tensor([[-1.0, -1.0], [-1.0, 0.0]])
    ref = logp - 0.5
    mask = torch.tensor([[True, True], [True, False]])
    adv, kl = algo.critic_free_advantages(scores, logp, ref, mask, 1, "reinforce_pp", kl_coef=0.1, kl_kind="k1")
    returns = torch.tensor([0.9, 0.95, -0.05])
    mean, std = returns.mean(), returns.std()
    want = torch.tensor([[0.9, 0.95], [-0.05, 0.0]])
    want[mask] = (returns - mean) / torch.sqrt(std**2 + algo.WHITEN_EPS)
    torch.testing.assert_close(adv, want)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.5], [0.5, 0.0]]))


def test_a_group_advantage_reaches_every_token_of_its_answer_and_kl_in_the_loss_leaves_it_alone():
    scores = torch.tensor([1.0, 0.0])
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv, kl = algo.critic_free_advantages(scores, logp, logp - 0.3, mask, 2, "dr_grpo", kl_coef=0.0)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.5, 0.5], [-0.5, -0.5, 0.0]]))
    torch.testing.assert_close(kl.sum(1), torch.tensor([0.9, 0.6]))
    # Without a reference pass there is no KL at all.
    adv0, kl0 = algo.critic_free_advantages(scores, logp, None, mask, 2, "dr_grpo", kl_coef=0.5)
    torch.testing.assert_close(adv0, adv)
    assert not kl0.any()


def test_kl_in_the_reward_is_paid_by_the_tokens_that_led_to_it():
    # rloo, kl_coef 1, k1 KL of 0.1 per token: token t pays for the KL of tokens t.. of its answer.
    scores = torch.tensor([1.0, 0.0])
    logp = torch.zeros(2, 2)
    mask = torch.ones(2, 2, dtype=torch.bool)
    adv, _ = algo.critic_free_advantages(scores, logp, logp - 0.1, mask, 2, "rloo", kl_coef=1.0, kl_kind="k1")
    torch.testing.assert_close(adv, torch.tensor([[1.0 - 0.2, 1.0 - 0.1], [-1.0 - 0.2, -1.0 - 0.1]]))


def test_group_reward_stats_count_groups_without_spread():
    same, std = algo.group_reward_stats(SCORES, 4)
    assert same.item() == 0.5  # the second group scored 2, 2, 2, 2
    assert std.item() == pytest.approx((0.5 + 0.0) / 2)
    same1, std1 = algo.group_reward_stats(torch.tensor([1.0, 2.0]), 1)
    assert same1.item() == 1.0 and std1.item() == 0.0


def test_group_estimators_refuse_groups_they_cannot_form():
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        algo.group_advantages(SCORES, 3, "grpo")
    with pytest.raises(ValueError, match="needs at least 2 answers per prompt"):
        algo.group_advantages(SCORES, 1, "rloo")


def test_reward_to_go_sums_the_rest_of_each_answer():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    torch.testing.assert_close(algo.reward_to_go(rewards, mask), torch.tensor([[6.0, 5.0, 3.0], [9.0, 5.0, 0.0]]))


def test_aggregations_weigh_long_and_short_answers_as_their_papers_say():
    # Per-token terms 1 on a 3-token answer and 4 on a 1-token answer (budget 4 tokens).
    x = torch.tensor([[1.0, 1.0, 1.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert algo.aggregate(x, mask, "token").item() == pytest.approx((3 + 4) / 4)
    assert algo.aggregate(x, mask, "sequence").item() == pytest.approx((1 + 4) / 2)  # GRPO: mean per answer
    assert algo.aggregate(x, mask, "budget", budget=4).item() == pytest.approx((3 + 4) / (2 * 4))  # Dr. GRPO
    with pytest.raises(ValueError, match="needs the token budget"):
        algo.aggregate(x, mask, "budget")


def test_policy_loss_aggregates_the_surrogate_as_asked():
    # Ratio 1 everywhere: the surrogate is -A per token.
    logp = torch.zeros(2, 2)
    adv = torch.tensor([[1.0, 1.0], [-2.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    token, _ = algo.policy_loss(logp, logp, adv, mask, 0.2)
    seq, _ = algo.policy_loss(logp, logp, adv, mask, 0.2, "sequence")
    budget, _ = algo.policy_loss(logp, logp, adv, mask, 0.2, "budget", budget=2)
    assert token.item() == pytest.approx(-(1 + 1 - 2) / 3)
    assert seq.item() == pytest.approx(-(1 + -2) / 2)
    assert budget.item() == pytest.approx(-(1 + 1 - 2) / 4)


def test_kl_loss_is_k3_and_pulls_the_policy_back_to_the_reference():
    ref = torch.log(torch.tensor([[0.5, 0.25]]))
    logp = torch.log(torch.tensor([[0.25, 0.25]])).requires_grad_()
    loss = algo.kl_loss(logp, ref, torch.ones(1, 2))
    # k3 = r - 1 - log r with r = pi_ref / pi: r = 2 on the first token, 1 on the second.
    assert loss.item() == pytest.approx((2 - 1 - math.log(2) + 0) / 2)
    loss.backward()
    assert logp.grad[0, 0] < 0  # raising the under-weighted token's log-prob lowers the loss
    assert logp.grad[0, 1] == 0  # where policy and reference agree, no pull


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "rloo"])
def test_a_group_of_equal_scores_gets_exactly_zero_whatever_the_float(kind):
    # Eight scores of 0.1 have a float32 mean an ulp off 0.1; grpo divided that by std + eps (7e-5 per answer).
    same = torch.tensor([0.1] * 8 + [12.3456] * 8 + [0.7] * 8)
    assert algo.group_reward_stats(same, 8)[0] == 1.0
    assert algo.group_advantages(same, 8, kind).eq(0).all()
    # A group with spread keeps its advantages.
    assert algo.group_advantages(torch.tensor([0.1, 0.1, 0.1, 0.2]), 4, kind).ne(0).all()
