"""Rule-based rewards for the demo, in the `package.module:function(prompts, responses)` hook format.

    rlhf ppo --reward rlhf_cli.demo.rewards:vader_sentiment ...
    rlhf eval --reward-fn rlhf_cli.demo.rewards:vader_sentiment ...

VADER (Hutto & Gilbert 2014) scores sentiment from a hand-built lexicon and rules, so it shares nothing
with a learned reward model: a PPO run that raises the reward model's score and also VADER's has changed
the text in a way an outside judge sees.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _analyzer() -> Any:
    # Imported here: vaderSentiment is a demo extra, and reading its lexicon takes a moment.
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        from rlhf_cli.errors import DataError

        raise DataError("vaderSentiment is not installed: pip install vadersentiment==3.3.2") from None
    return SentimentIntensityAnalyzer()


def vader_sentiment(prompts: list[Any], responses: list[str]) -> list[float]:
    """VADER compound score of each response, in [-1, 1]; the prompts are not scored."""
    analyzer = _analyzer()
    return [float(analyzer.polarity_scores(r)["compound"]) for r in responses]


def tiny_judge(prompts: list[Any], responses: list[str]) -> list[float]:
    """The demo-tiny ground truth, as a labeller would rank: one point for a whole answer ("the cat is in
    the barn."), one more for ending "it is great." The round-1 reward model learned the second from pairs
    that differ in nothing else; nothing taught it that a cut-off answer ("the cat is in the") is worse,
    which is where a PPO policy sampled against it drifts."""
    import re

    whole = re.compile(r"the \w+ is in the \w+\.( it is \w+\.)?")
    return [float(bool(whole.fullmatch(r.strip()))) + float(r.strip().endswith("it is great.")) for r in responses]
