"""Comparison data for reward models: preference pairs and K-way rankings as one kind of sample.

    comparison = comparison_of(record, "ranked")       # prompt, responses, (better, worse) pairs; None if unranked
    samples, stats = comparison_samples(tokenizer, records, "preference", max_length=512)
    batch = RankCollator(pad_id)(samples[:8])          # every answer of 8 prompts in one padded batch

A pair (chosen, rejected) is the K = 2 ranking [0, 1], so pairs and rankings share one loss
(core.ranking.ranking_loss) and one collator. Answers are rendered with the chat template exactly as
core.reward.RewardModel renders them later. When a transcript is longer than max_length, the prompt is
cut from the left (its start goes first) so the answers, which are what is compared, survive; only an
answer that alone is too long is cut at its end.

HH-RLHF as it ships (Bai et al. 2022) has no prompt column: chosen and rejected are whole transcripts
"\n\nHuman: ...\n\nAssistant: ...". Such a pair is split into turns, the turns both sides share become
the prompt, and each side's last assistant turn its response. Message lists without a prompt (trl's
conversational pairs) are split the same way: the leading messages all answers share are the prompt.
Answers that are whole conversations beside a prompt column, opening with the prompt's turns
(HuggingFaceH4/ultrafeedback_binarized), lose those turns: the prompt is rendered once.
An empty prompt cell counts as none (dpo's split_pair reads pairs alike).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_cli.core.chat import conversation_text
from rlhf_cli.core.ranking import Pair, pairs_from_ranking, pairs_from_scores
from rlhf_cli.errors import DataError

log = logging.getLogger("rlhf")

_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass(frozen=True)
class Comparison:
    prompt: Any  # text, message list, or None (transcripts that carry their own context)
    responses: list[Any]
    pairs: list[Pair]


def hh_turns(transcript: str) -> list[dict[str, str]] | None:
    """An HH-RLHF transcript as chat messages, or None when the text is not one."""
    parts = _HH_TURN.split(transcript)
    if len(parts) < 3 or parts[0].strip():
        return None
    return [{"role": _HH_ROLES[role], "content": text.strip()} for role, text in zip(parts[1::2], parts[2::2])]


def split_hh_pair(chosen: Any, rejected: Any) -> tuple[list[dict[str, str]], str, str] | None:
    """(shared prompt turns, chosen answer, rejected answer) of an HH-RLHF pair, or None if it is not one."""
    if not (isinstance(chosen, str) and isinstance(rejected, str)):
        return None
    a, b = hh_turns(chosen), hh_turns(rejected)
    if not a or not b or a[-1]["role"] != "assistant" or b[-1]["role"] != "assistant" or a[:-1] != b[:-1] or not a[:-1]:
        return None
    return a[:-1], a[-1]["content"], b[-1]["content"]


def comparison_of(record: dict[str, Any], fmt: str, where: str = "") -> Comparison | None:
    """A record's prompt, answers and (better, worse) pairs; None for a ranked row nobody has ranked yet."""
    if fmt == "preference":
        hh = split_hh_pair(record["chosen"], record["rejected"]) if record.get("prompt") in (None, "") else None
        if hh is not None:
            return Comparison(hh[0], [hh[1], hh[2]], [(0, 1)])
        return _shared_turns(record.get("prompt"), [record["chosen"], record["rejected"]], [(0, 1)])
    responses = record["responses"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise DataError(f"{where}: responses must be a list of 2 or more answers")
    ranking, scores = record.get("ranking"), record.get("scores")
    if ranking:
        # Types first: a ranking that mixes numbers and text cannot be sorted to look for repeats.
        if not all(type(i) is int and 0 <= i < len(responses) for i in ranking) or len(set(ranking)) != len(ranking):
            raise DataError(f"{where}: ranking {ranking} must list answer indices 0..{len(responses) - 1}, best first, each once")
        return _shared_turns(record.get("prompt"), responses, pairs_from_ranking(ranking))
    if scores:
        try:
            # null (like NaN) is an answer not scored yet: it takes part in no pair (pairs_from_scores).
            numbers = [math.nan if s is None else float(s) for s in scores]
        except (TypeError, ValueError):
            raise DataError(f"{where}: scores {scores} must all be numbers, one per response (higher is better)") from None
        if len(numbers) != len(responses):
            raise DataError(f"{where}: {len(numbers)} scores for {len(responses)} responses")
        return _shared_turns(record.get("prompt"), responses, pairs_from_scores(numbers))
    return None


def without_repeated_prompt(prompt: Any, responses: list[Any]) -> list[Any]:
    """Answers given as whole conversations that open with the prompt's own turns, as they follow a prompt
    column in HuggingFaceH4/ultrafeedback_binarized: those turns are dropped, else the transcript would
    hold the prompt twice (train-rm, dpo and eval read pairs through here)."""
    if not isinstance(prompt, (str, list)) or not prompt or not all(isinstance(r, list) for r in responses):
        return responses
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if all(len(r) > len(turns) and r[: len(turns)] == turns for r in responses):
        return [r[len(turns) :] for r in responses]
    return responses


def _shared_turns(prompt: Any, responses: list[Any], pairs: list[Pair]) -> Comparison:
    """Without a prompt, the leading messages that every answer's conversation shares are the prompt (as
    dpo splits its pairs): so a transcript too long for max_length loses the start of that context, not
    the end of an answer."""
    responses = without_repeated_prompt(prompt, responses)
    if prompt in (None, "") and all(isinstance(r, list) for r in responses):
        n = _common_prefix(responses)
        if n and all(len(r) > n for r in responses):
            return Comparison(responses[0][:n], [r[n:] for r in responses], pairs)
    return Comparison(prompt, responses, pairs)


def answer_text(response: Any) -> str:
    """An answer as the text a reward function judges (RewardFn takes strings): a message list's contents."""
    if isinstance(response, list):
        return "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in response)
    return str(response)


def encode_answers(tokenizer: Any, prompt: Any, responses: list[Any], max_length: int) -> tuple[list[list[int]], bool]:
    """Token ids of each prompt + answer transcript within max_length; True when anything was cut.

    Too long a transcript loses the start of its prompt first (a leading BOS stays), then, if the answer
    alone is too long, the answer's end. The prompt ends where the transcript parts from the same prompt
    with an empty answer, so each answer is encoded the same whatever its siblings: train-rm, eval and
    every other scorer cut alike (encode_for_scoring).
    """
    ids, whole = _encode_within(tokenizer, prompt, responses, max_length)
    return ids, any(len(r) > max_length for r in whole)


def _encode_within(tokenizer: Any, prompt: Any, responses: list[Any], max_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """encode_answers' ids, and each transcript's ids before they were cut."""
    encode = lambda r: tokenizer(conversation_text(tokenizer, prompt, r), add_special_tokens=False)["input_ids"]  # noqa: E731
    rows = [encode(r) for r in responses]
    empty = encode("")
    head = 1 if rows and rows[0] and rows[0][0] == getattr(tokenizer, "bos_token_id", None) else 0
    out = []
    for ids in rows:
        excess = len(ids) - max_length
        if excess > 0:
            shared = _common_prefix([ids, empty])
            cut = min(excess, max(shared - head, 0))
            ids = ids[:head] + ids[head + cut :]
        out.append(ids[:max_length])
    return out, rows


def encode_for_scoring(tokenizer: Any, prompt: Any, response: Any, max_length: int) -> list[int]:
    """One answer's ids as train-rm trained on them."""
    return encode_answers(tokenizer, prompt, [response], max_length)[0][0]


def _common_prefix(rows: list[list[int]]) -> int:
    n = min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != rows[0][i] for r in rows[1:]):
            return i
    return n


@dataclass
class ComparisonStats:
    prompts: int = 0
    answers: int = 0
    pairs: int = 0
    truncated: int = 0
    unranked: int = 0  # ranked rows still waiting for a ranking (skipped)
    no_signal: int = 0  # every pair tied, or identical within max_length (skipped)
    cut_equal: int = 0  # of those, prompts whose answers differ but became equal within max_length
    tokens: int = 0

    def summary(self) -> dict[str, int]:
        return dict(self.__dict__)


def comparison_samples(tokenizer: Any, records: list[dict[str, Any]], fmt: str, max_length: int,
                       source: str = "") -> tuple[list[dict[str, Any]], ComparisonStats, list[int]]:
    """(samples, stats, transcript lengths): one sample per prompt with every answer's ids and its pairs. The
    lengths are the transcripts' before truncation (as core.batches.Stats counts them), so they show how much
    of the data max_length cuts."""
    samples, stats, lengths = [], ComparisonStats(), []
    for n, record in enumerate(records, 1):
        comparison = comparison_of(record, fmt, f"{source}: record {n}")
        if comparison is None:
            stats.unranked += 1
            continue
        ids, whole = _encode_within(tokenizer, comparison.prompt, comparison.responses, max_length)
        stats.truncated += max(len(r) for r in whole) > max_length
        lengths.extend(len(r) for r in whole)
        # A pair whose transcripts are equal within max_length carries no signal.
        pairs = [(b, w) for b, w in comparison.pairs if ids[b] != ids[w]]
        if not pairs:
            stats.no_signal += 1
            stats.cut_equal += any(whole[b] != whole[w] for b, w in comparison.pairs)
            continue
        samples.append({"response_ids": ids, "pairs": pairs})
        stats.prompts += 1
        stats.answers += len(ids)
        stats.pairs += len(pairs)
        stats.tokens += sum(len(r) for r in ids)
    if stats.unranked:
        log.warning("%s: %d of %d rows have no ranking or scores yet and are skipped", source, stats.unranked, len(records))
    return samples, stats, lengths


# Not trl's reward DataCollatorForPreference: it pads a chosen and a rejected answer, a ranking has K.
class RankCollator:
    """Every answer of every prompt in the batch as one right-padded batch, and each prompt's pairs as
    indices into its rows (a ranking is scored in one forward pass, Ouyang et al. 2022)."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        rows, groups = [], []
        for f in features:
            offset = len(rows)
            rows.extend(f["response_ids"])
            groups.append([(offset + b, offset + w) for b, w in f["pairs"]])
        width = max(len(r) for r in rows)
        return {
            "input_ids": torch.tensor([r + [self.pad] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            "groups": groups,
        }
