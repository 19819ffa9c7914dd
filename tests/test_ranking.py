"""Rankings to pairs and the ranking loss, against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_cli.core.ranking import pair_margins, pairs_from_ranking, pairs_from_scores, ranking_loss


def nll(d: float) -> float:
    """-log sigmoid(d), by hand."""
    return math.log(1 + math.exp(-d))


def test_pairs_of_a_ranking_are_every_ordered_pair():
    assert pairs_from_ranking([2, 0, 1]) == [(2, 0), (2, 1), (0, 1)]
    assert len(pairs_from_ranking([3, 1, 0, 2])) == 6
    with pytest.raises(ValueError, match="twice"):
        pairs_from_ranking([0, 1, 1])


def test_scores_give_pairs_and_ties_give_none():
    assert sorted(pairs_from_scores([0.1, 0.9, 0.9])) == [(1, 0), (2, 0)]
    assert pairs_from_scores([5, 5]) == []
    assert sorted(pairs_from_scores([3, 1, 2, 0])) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 1), (2, 3)]


def test_an_answer_scored_nan_gives_no_pair_and_takes_none_from_the_others():
    nan = float("nan")
    assert pairs_from_scores([0.1, nan, 0.9]) == [(2, 0)]
    assert sorted(pairs_from_scores([0.5, nan, 0.1, 0.9])) == [(0, 2), (3, 0), (3, 2)]
    assert pairs_from_scores([nan, nan]) == []


def test_k3_loss_is_the_mean_of_its_three_pairs():
    rewards = torch.tensor([1.0, 0.0, -1.0])
    loss = ranking_loss(rewards, [pairs_from_ranking([0, 1, 2])])
    assert loss.item() == pytest.approx((nll(1.0) + nll(2.0) + nll(1.0)) / 3, rel=1e-6)


def test_k4_ranking_counts_once_beside_a_pair():
    """A K=4 ranking and a pair in one batch: each is one sample, whatever its number of pairs."""
    rewards = torch.tensor([0.5, 2.0, -1.0, 0.0, 3.0, 1.0])
    groups = [pairs_from_ranking([1, 0, 3, 2]), [(4, 5)]]
    k4 = [2.0 - 0.5, 2.0 - 0.0, 2.0 + 1.0, 0.5 - 0.0, 0.5 + 1.0, 0.0 + 1.0]
    expected = (sum(nll(d) for d in k4) / 6 + nll(2.0)) / 2
    assert ranking_loss(rewards, groups).item() == pytest.approx(expected, rel=1e-6)
    assert pair_margins(rewards, groups).tolist() == pytest.approx([*k4, 2.0])


def test_k2_ranking_equals_the_pairwise_loss():
    chosen, rejected = torch.tensor([0.3, -0.2, 1.5]), torch.tensor([0.1, 0.4, -0.5])
    rewards = torch.stack([chosen, rejected], 1).flatten()  # c0 r0 c1 r1 c2 r2
    groups = [[(2 * i, 2 * i + 1)] for i in range(3)]
    pairwise = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
    assert torch.allclose(ranking_loss(rewards, groups), pairwise)


def test_tied_rankings_are_left_out_and_gradients_flow():
    rewards = torch.tensor([1.0, 1.0, 0.0, 2.0], requires_grad=True)
    groups = [pairs_from_scores([7, 7]), [(2 + b, 2 + w) for b, w in pairs_from_scores([0, 1])]]
    loss = ranking_loss(rewards, groups)
    assert loss.item() == pytest.approx(nll(2.0), rel=1e-6)
    loss.backward()
    assert rewards.grad[:2].abs().sum() == 0 and rewards.grad[3] < 0 < rewards.grad[2]
    with pytest.raises(ValueError, match="no ranking"):
        ranking_loss(rewards, [[], []])
