"""Rankings of K answers to one prompt, as the reward model learns them (Ouyang et al. 2022, section 3.5).

    pairs = pairs_from_ranking([2, 0, 1])           # answer 2 best: [(2, 0), (2, 1), (0, 1)]
    pairs = pairs_from_scores([0.1, 0.9, 0.9])      # ties give no pair: [(1, 0), (2, 0)]
    loss = ranking_loss(rewards, groups)            # one ranking = one sample

A pairwise record (chosen, rejected) is the K = 2 ranking [0, 1]. Every ordered pair of a ranking is
trained on, and the C(K, 2) pair losses of one prompt are averaged before the batch mean: InstructGPT
scores the K answers of a prompt in one pass and treats the ranking as one element of the batch, since
its pairs are correlated and, shuffled as separate samples, overfit within one epoch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations

import torch

Pair = tuple[int, int]  # (better, worse): indices of two answers of the same prompt


def pairs_from_ranking(ranking: Sequence[int]) -> list[Pair]:
    """Every (better, worse) pair of a ranking given as answer indices, best first."""
    if len(set(ranking)) != len(ranking):
        raise ValueError(f"ranking {list(ranking)} names an answer twice")
    return [(ranking[i], ranking[j]) for i, j in combinations(range(len(ranking)), 2)]


def pairs_from_scores(scores: Sequence[float]) -> list[Pair]:
    """Every (better, worse) pair by score, higher is better; equal scores give no pair, nor does a NaN score
    (an answer nobody scored: a missing value read from Parquet or pandas)."""
    # NaN sorted last: compared as it is, it is neither above nor below anything and leaves the sort unsorted,
    # so that pairs of the answers that were scored are lost.
    order = sorted(range(len(scores)), key=lambda i: (math.isnan(scores[i]), -scores[i]))
    return [(a, b) for a, b in combinations(order, 2) if scores[a] > scores[b]]


def ranking_loss(rewards: torch.Tensor, groups: Sequence[Sequence[Pair]]) -> torch.Tensor:
    """Mean over rankings of the mean over their pairs of -log sigmoid(r_better - r_worse).

    `rewards` holds the scores of every answer of the batch; each group lists its pairs as indices into it.
    Groups without pairs (all answers tied) are left out.
    """
    better, worse, weight = pair_weights(groups, rewards.device)
    if better.numel() == 0:
        raise ValueError("no ranking in the batch has a pair")
    per_pair = -torch.nn.functional.logsigmoid(rewards[better] - rewards[worse])
    ranked = sum(1 for pairs in groups if pairs)
    return (per_pair * weight).sum() / ranked


def pair_margins(rewards: torch.Tensor, groups: Sequence[Sequence[Pair]]) -> torch.Tensor:
    """r_better - r_worse of every pair of the batch: > 0 where the model orders the pair right."""
    better, worse, _ = pair_weights(groups, rewards.device)
    return rewards[better] - rewards[worse]


def pair_weights(groups: Sequence[Sequence[Pair]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index tensors of all pairs, and each pair's weight 1 / (pairs in its group)."""
    better, worse, weight = [], [], []
    for pairs in groups:
        for b, w in pairs:
            better.append(b)
            worse.append(w)
            weight.append(1.0 / len(pairs))
    long = {"dtype": torch.long, "device": device}
    return torch.tensor(better, **long), torch.tensor(worse, **long), torch.tensor(weight, device=device)
