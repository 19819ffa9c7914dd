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
    """The demo-tiny ground truth, as a labeller would rank: a point for answering about the animal asked
    for ("where is the cat?" -> "the cat ..."), one for saying where it is ("... is in the barn."), one
    for "great" at the end. The round-1 reward model learned only the last, from pairs that differ in
    nothing else; a PPO policy sampled against it drifts to answers that drop the rest ("the owl great.")."""
    import re

    out = []
    for prompt, response in zip(prompts, responses):
        text = prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt)
        animal, answer = text.rstrip("?").split()[-1], response.strip()
        out.append(float(answer.startswith(f"the {animal} ")) + float(bool(re.search(r"is in the \w+\.", answer)))
                   + float(answer.endswith("great.")))
    return out
