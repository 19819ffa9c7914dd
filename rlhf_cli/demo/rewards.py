"""Rule-based rewards for the demo, in the `package.module:function(prompts, responses)` hook format.

    rlhf ppo --reward rlhf_cli.demo.rewards:vader_sentiment ...
    rlhf eval --reward-fn rlhf_cli.demo.rewards:vader_sentiment ...
    rlhf grpo --reward rlhf_cli.demo.rewards:arithmetic_exact --prompts data/arithmetic.jsonl ...

The hook: `fn(prompts: list[str | list[dict]], responses: list[str]) -> list[float]`, one finite float per
response. `prompts[i]` is the i-th prompt as the data holds it (a string, or the message list without a
trailing assistant turn) and `responses[i]` the decoded answer to it, special tokens removed; under
`rlhf grpo` the group_size answers to one prompt arrive as consecutive entries. The function runs in the
training process on every rollout, so keep it fast and deterministic; raise to stop the run.

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


def arithmetic_exact(prompts: list[Any], responses: list[str]) -> list[float]:
    """Exact-answer check for the arithmetic questions of rlhf_cli.demo.arithmetic: 1.0 when the last
    integer in the response is the answer to the prompt's question, else 0.0 (also for a prompt without
    such a question). The last integer, as GSM8K-style checkers read it: "7 + 5 = 12" answers 12.

        >>> arithmetic_exact(["What is 7 + 5?", "What is 3 * 4?"], ["7 + 5 = 12", "13"])
        [1.0, 0.0]
    """
    import re

    from rlhf_cli.demo.arithmetic import answer_of

    out = []
    for prompt, response in zip(prompts, responses, strict=True):
        expected, said = answer_of(prompt), re.findall(r"-?\d+", response.replace(",", ""))
        out.append(float(expected is not None and bool(said) and int(said[-1]) == expected))
    return out
