"""Signs that a reward is being gamed rather than earned: pure functions on numbers a run already has.

    rank_correlation(scores, lengths)                 # eval's reward_length_corr (Spearman)
    length_collapse(lengths, scores)                  # PPO: answers shortening while the score rises
    check_disagrees(reward, ref_reward, fn, ref_fn)   # the reward model and an independent check part ways
    paired_gain(values, reference_values)             # mean gain on the same prompts, and its standard error
    mean_and_error(values)                            # a mean and its standard error (PPO's KL of a rollout)
    one_answer(texts)                                 # a policy that gives most prompts the same answer

A learned reward model rewards whatever separated chosen from rejected in its training pairs, and length
is the first such cue in most preference data (Singhal et al. 2023, "A Long Way to Go"). A policy optimised
against it then moves along that cue, longer or shorter, whether or not the answers get better. These
functions say so with the numbers; nothing here imports torch, so `rlhf report` can use them too.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("rlhf")


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, tied values sharing the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson correlation; NaN when either side has no spread (or fewer than 2 values)."""
    if len(xs) != len(ys):
        raise ValueError(f"pearson: {len(xs)} values against {len(ys)}")
    n = len(xs)
    if n < 2:
        return math.nan
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return math.nan
    return sxy / math.sqrt(sxx * syy)


def rank_correlation(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rho: the Pearson correlation of the ranks (ties averaged), so one very long answer cannot
    decide it and any monotone preference (not only a linear one) shows. NaN when either side is constant."""
    return pearson(_ranks(xs), _ranks(ys))


def length_collapse(lengths: Sequence[float], scores: Sequence[float], *, ratio: float = 0.5) -> str | None:
    """A sentence with the numbers when the answers of the last iterations are shorter than `ratio` times those
    of the first while the score rose; else None. The window is a quarter of the run, 1 to 5 iterations."""
    if len(lengths) != len(scores):
        raise ValueError(f"length_collapse: {len(lengths)} lengths against {len(scores)} scores")
    k = max(1, min(5, len(lengths) // 4))
    if len(lengths) < 2 * k or len(lengths) < 2:
        return None
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    first_len, last_len = mean(lengths[:k]), mean(lengths[-k:])
    first_score, last_score = mean(scores[:k]), mean(scores[-k:])
    if not (last_len < ratio * first_len and last_score > first_score):
        return None
    span = "iteration" if k == 1 else f"{k} iterations"
    return (f"the score rose from {first_score:.3g} to {last_score:.3g} while answers shortened from {first_len:.1f} "
            f"to {last_len:.1f} tokens (first and last {span}): the reward may be paying for brevity, not quality; "
            "check the reward model's reward_length_corr (rlhf eval --metric reward) and an independent --reward-fn")


def warn_if_length_collapsed(metrics_file: Path) -> None:
    """length_collapse over a PPO run's logged iterations (response_length, score_mean), as a warning."""
    if not metrics_file.is_file():  # written by the main process only
        return
    records = [json.loads(line) for line in metrics_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = [r for r in records if isinstance(r.get("response_length"), (int, float)) and "score_mean" in r]
    message = length_collapse([r["response_length"] for r in records], [r["score_mean"] for r in records])
    if message:
        log.warning("%s", message)


def check_disagrees(reward: float, reference_reward: float, check: float, reference_check: float,
                    check_gain_se: float = 0.0) -> str | None:
    """A sentence when the reward model prefers the model to the reference while an independent check
    (a rule-based reward_fn) scores it lower by more than two standard errors of its gain (`check_gain_se`,
    from paired_gain); None when they agree, or either shows no change beyond that noise."""
    se = check_gain_se if math.isfinite(check_gain_se) else 0.0
    if not (reward > reference_reward and check < reference_check - 2 * se):
        return None
    return (f"the reward model scores the model above the reference ({reward:.3g} vs {reference_reward:.3g}) but the "
            f"independent check (reward_fn) scores it below ({check:.3g} vs {reference_check:.3g}): the gain may be "
            "the reward model's blind spot rather than better answers; look at reward_length_corr and the answers")


def mean_and_error(values: Sequence[float]) -> tuple[float, float]:
    """(mean, its standard error: sample standard deviation / sqrt(n)); the error is NaN under 2 values."""
    if not values:
        raise ValueError("mean_and_error needs at least one value")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def paired_gain(values: Sequence[float], reference: Sequence[float], per_prompt: int = 1) -> tuple[float, float]:
    """(mean of value - reference over the same prompts, its standard error): a gain smaller than about two
    standard errors is what another draw of prompts could give either way. The error is NaN under 2 prompts.

    per_prompt: answers per prompt, each prompt's `per_prompt` values side by side (eval -n). The prompts are
    the independent draws, not the answers (greedy answers to one prompt are all the same answer), so the
    error is taken over each prompt's mean difference."""
    if len(values) != len(reference) or not values or len(values) % per_prompt:
        raise ValueError(f"paired_gain needs equally many values, {per_prompt} per prompt, got {len(values)} and "
                         f"{len(reference)}")
    gaps = [v - r for v, r in zip(values, reference)]
    return mean_and_error([sum(gaps[i:i + per_prompt]) / per_prompt for i in range(0, len(gaps), per_prompt)])


def distinct_rate(texts: Sequence[str]) -> float:
    """Share of different answers among answers to different prompts (1.0: no two alike)."""
    return len({t.strip() for t in texts}) / len(texts) if texts else float("nan")


def one_answer(texts: Sequence[str], share: float = 0.5) -> str | None:
    """A sentence when one text answers at least `share` of the prompts (and at least 3 of them): a policy
    collapsed onto what its reward scores highest wins a reward-model comparison without answering; None
    otherwise. `texts`: one answer per prompt."""
    if not texts:
        return None
    [(text, n)] = Counter(t.strip() for t in texts).most_common(1)
    if n < 3 or n < share * len(texts):
        return None
    shown = text if len(text) <= 60 else text[:57] + "..."
    return (f"{n} of {len(texts)} prompts get the same answer ({shown!r}): the policy may have collapsed onto what "
            "the reward model scores highest, and its reward and win rate then say little about its answers; "
            "look at the answers (eval.json samples) and distinct_rate")
