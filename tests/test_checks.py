"""Reward-gaming signs (rlhf_cli/core/checks.py) on hand-computed numbers."""

from __future__ import annotations

import json
import logging
import math

import pytest

from rlhf_cli.core.checks import (
    check_disagrees,
    distinct_rate,
    length_collapse,
    mean_and_error,
    one_answer,
    paired_gain,
    pearson,
    rank_correlation,
    warn_if_length_collapsed,
)


def test_rank_correlation_by_hand():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    # Ties share their mean rank: x ranks 1, 2.5, 2.5, 4 against y ranks 1, 3, 2, 4 -> 4.5 / sqrt(4.5 * 5).
    assert rank_correlation([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10))
    # Ranks, not values: one very long answer does not decide it (Pearson of the values is 0.31).
    assert rank_correlation([1, 2, 3, 100], [1, 2, 3, 2.5]) == pytest.approx(0.8)
    assert pearson([1, 2, 3, 100], [1, 2, 3, 2.5]) == pytest.approx(0.3087, abs=1e-4)
    # No spread on one side: undefined, not 0.
    assert math.isnan(rank_correlation([5, 5, 5], [1, 2, 3]))
    assert math.isnan(rank_correlation([1], [2]))
    with pytest.raises(ValueError):
        rank_correlation([1, 2], [1])


def test_length_collapse_needs_shorter_answers_and_a_higher_score():
    rising = [0.1 * i for i in range(8)]
    # 8 iterations: windows of 2. First 20, 20 tokens; last 8, 8: 8 < 0.5 * 20 while the score rose 0.05 -> 0.65.
    message = length_collapse([20, 20, 18, 15, 12, 10, 8, 8], rising)
    assert message is not None
    assert "0.05 to 0.65" in message and "20.0 to 8.0 tokens" in message and "first and last 2 iterations" in message
    assert length_collapse([20, 20, 18, 15, 12, 10, 8, 8], rising[::-1]) is None  # the score fell
    assert length_collapse([20, 20, 18, 15, 12, 12, 11, 11], rising) is None      # 11 is not under 10
    assert length_collapse([20, 20, 18, 15, 12, 12, 11, 11], rising, ratio=0.6) is not None
    assert length_collapse([20], [0.0]) is None                                    # nothing to compare
    # 40 iterations: windows of 5 at most.
    assert "first and last 5 iterations" in length_collapse([30] * 20 + [5] * 20, [0.0] * 20 + [1.0] * 20)


def test_length_collapse_is_warned_from_the_metrics_log(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": i + 1, "score_mean": 0.1 * i, "response_length": 24 - 2.5 * i} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    log = logging.getLogger("rlhf")
    log.addHandler(caplog.handler)  # the CLI's logging setup stops "rlhf" records from reaching the root logger
    try:
        warn_if_length_collapsed(path)
        warn_if_length_collapsed(tmp_path / "missing.jsonl")
    finally:
        log.removeHandler(caplog.handler)
    warned = {r.getMessage() for r in caplog.records}  # one warning, whether or not the root logger also saw it
    assert len(warned) == 1 and "answers shortened from 22.8 to 7.8 tokens" in warned.pop()


def test_check_disagrees_only_when_the_reward_model_and_the_check_part_ways():
    message = check_disagrees(-1.37, -1.59, -0.042, -0.019)
    assert message is not None and "-1.37 vs -1.59" in message and "-0.042 vs -0.019" in message
    assert check_disagrees(-1.37, -1.59, 0.227, 0.020) is None   # both say better
    assert check_disagrees(-1.6, -1.5, -0.1, 0.0) is None        # both say worse
    assert check_disagrees(-1.6, -1.5, 0.3, 0.0) is None         # the reward model claims no gain
    # A drop of 0.023 with a standard error of 0.03 is noise; with 0.005 it is not.
    assert check_disagrees(-1.37, -1.59, -0.042, -0.019, check_gain_se=0.03) is None
    assert check_disagrees(-1.37, -1.59, -0.042, -0.019, check_gain_se=0.005) is not None
    assert check_disagrees(-1.37, -1.59, -0.042, -0.019, check_gain_se=float("nan")) is not None  # one pair: no error


def test_one_answer_names_a_policy_that_gives_most_prompts_the_same_answer():
    # The shape of a collapsed demo policy: 34 of 40 held-out prompts got one sentence.
    same = "I'm a helpful AI assistant named SmolLM, trained by Hugging Face"
    texts = [same] * 33 + [same + " "] + [f"answer {i}" for i in range(6)]
    line = one_answer(texts)
    assert line is not None and line.startswith("34 of 40 prompts get the same answer (\"I'm a helpful AI assistant")
    assert distinct_rate(texts) == 7 / 40
    assert one_answer([same] * 19 + [f"answer {i}" for i in range(21)]) is None  # under half the prompts
    assert one_answer(["yes", "yes", "no"]) is None  # fewer than 3 alike
    assert one_answer([]) is None and math.isnan(distinct_rate([]))


def test_several_answers_per_prompt_do_not_shrink_the_gains_error():
    # eval -n 4 answers each prompt 4 times (greedily: 4 copies of one answer); the prompts are the draws.
    values, reference = [1.0, 2.0, 3.0], [0.0, 2.0, 1.0]
    four = paired_gain([v for v in values for _ in range(4)], [r for r in reference for _ in range(4)], per_prompt=4)
    assert four == pytest.approx(paired_gain(values, reference))
    # Different answers to one prompt average into that prompt's gain.
    assert paired_gain([1.0, 3.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0], per_prompt=2) == pytest.approx(
        paired_gain([2.0, 2.0], [0.0, 2.0]))
    with pytest.raises(ValueError, match="2 per prompt"):
        paired_gain([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], per_prompt=2)


def test_paired_gain_by_hand():
    # gaps 1, 0, 2: mean 1, sample std 1, standard error 1 / sqrt(3)
    assert paired_gain([1.0, 2.0, 3.0], [0.0, 2.0, 1.0]) == pytest.approx((1.0, 1 / math.sqrt(3)))
    mean, se = paired_gain([0.5], [0.25])
    assert mean == 0.25 and math.isnan(se)
    assert mean_and_error([1.0, 0.0, 2.0]) == pytest.approx((1.0, 1 / math.sqrt(3)))
    with pytest.raises(ValueError, match="equally many"):
        paired_gain([1.0, 2.0], [1.0])
