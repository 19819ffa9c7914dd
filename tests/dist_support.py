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


def explained_variance_on_rank(rank: int, store: str, out: str) -> None:
    """One of two gloo processes: the explained variance of its half of a rollout, reduced over both."""
    import torch
    import torch.distributed as dist

    from rlhf_cli.ppo.algo import explained_variance

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)

    def reduce(t):
        dist.all_reduce(t)
        return t

    try:
        values, returns, mask = (t.chunk(2)[rank] for t in rollout_for_explained_variance())
        torch.save(explained_variance(values, returns, mask, reduce=reduce), f"{out}/ev-{rank}.pt")
    finally:
        dist.destroy_process_group()


def rollout_for_explained_variance():
    """Values, returns and a mask of 8 answers: rank 1's returns sit 2 higher, and the value model predicts
    each half's mean, so within a half it explains nothing and over the whole rollout about 0.6."""
    import torch

    g = torch.Generator().manual_seed(0)
    returns = torch.randn(8, 6, generator=g)
    returns[4:] += 2.0
    values = torch.cat([returns[:4].mean().expand(4, 6), returns[4:].mean().expand(4, 6)])
    mask = torch.ones(8, 6, dtype=torch.bool)
    mask[1, 4:] = mask[6, 2:] = False
    return values, returns, mask


def answer_length_recorded(prompts, responses):
    """answer_length, with each process's answers appended to $RLHF_TEST_ANSWERS-<rank>.jsonl."""
    import json
    import os

    with open(f"{os.environ['RLHF_TEST_ANSWERS']}-{os.environ.get('RANK', '0')}.jsonl", "a") as f:
        f.write(json.dumps({"prompts": prompts, "responses": responses}) + "\n")
    return answer_length(prompts, responses)


def answer_length_slow_sampling_on_rank_1(prompts, responses):
    """answer_length; from its first call on, rank 1 takes a second longer to sample each rollout (a process
    whose answers run longer than the others')."""
    import os
    import time

    from rlhf_cli.ppo import rollout

    if os.environ.get("RANK") == "1" and not hasattr(rollout.generate_batch, "slowed"):
        sample = rollout.generate_batch

        def slowed(*args, **kwargs):
            time.sleep(1.0)
            return sample(*args, **kwargs)

        slowed.slowed = True
        rollout.generate_batch = slowed
    return answer_length(prompts, responses)
