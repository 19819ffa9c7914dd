"""Reward for the launched PPO tests (imported by the stage as `tests.dist_support:answer_length`)."""

from __future__ import annotations


def answer_length(prompts, responses):
    """Characters / 10: every rollout carries a learning signal, whatever the tiny policy says."""
    return [len(r) / 10 for r in responses]


def nan_on_rank_1(prompts, responses):
    """answer_length on rank 0, NaN for every response on rank 1: a reward that fails on one process only."""
    import os

    if os.environ.get("RANK") == "1":
        return [float("nan")] * len(responses)
    return answer_length(prompts, responses)
