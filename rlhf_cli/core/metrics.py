"""Evaluation measures shared by `rlhf eval` (and usable by PPO): perplexity, pairwise wins, sequence KL, gates.

    ppl = perplexity(model, tokenizer, records, fmt="messages", max_length=512, batch_size=8)
    wins = compare(scores_a, scores_b, texts_a, texts_b)          # win_rate counts ties as half
    kl = sequence_kl(logp_model, logp_ref, response_mask)         # [B], k1 estimate of KL(model || ref)
    failed = check_gates(metrics, fail_under={"reward": 0.5}, fail_over={"kl": 8})
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_cli.core.generation import token_logprobs
from rlhf_cli.errors import DataError


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored
    samples: int
    truncated: int  # samples cut at max_length


def encode_for_perplexity(tokenizer: Any, record: dict[str, Any], fmt: str, max_length: int) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated): every token of text; the assistant tokens of a conversation."""
    if fmt == "text":
        ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"]
        return ids[:max_length], ids[:max_length], len(ids) > max_length
    from rlhf_cli.core.chat import prompt_turns, record_messages, render_conversation

    rendered = render_conversation(tokenizer, record_messages(record, fmt), max_length, completion_only=True,
                                   context=prompt_turns(record, fmt))
    return rendered.input_ids, rendered.labels, rendered.truncated


@torch.no_grad()
def perplexity(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    fmt: str,
    *,
    max_length: int,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> Perplexity:
    """exp(total NLL / scored tokens) over the whole set (token-weighted, not a mean of per-sample values)."""
    device = next(model.parameters()).device
    encoded = [encode_for_perplexity(tokenizer, r, fmt, max_length) for r in records]
    truncated = sum(t for _, _, t in encoded)
    # A sample scores from its second token on; one with no scored token left (cut away) adds nothing.
    encoded = [(i, lab) for i, lab, _ in encoded if len(i) > 1 and any(x != -100 for x in lab[1:])]
    if not encoded:
        raise DataError("no tokens to score for perplexity (empty answers, or everything truncated: raise data.max_length)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total_nll, total_tokens = 0.0, 0
    model.eval()
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(i) for i, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (i, lab) in enumerate(chunk):  # right padding: positions start at 0 for every row
            ids[row, : len(i)] = torch.tensor(i)
            labels[row, : len(lab)] = torch.tensor(lab)
            mask[row, : len(i)] = 1
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        targets = labels[:, 1:]
        scored = targets != -100
        logp = token_logprobs(logits, targets.clamp(min=0))
        total_nll -= float((logp * scored).sum())
        total_tokens += int(scored.sum())
        if on_batch is not None:
            on_batch(min(start + batch_size, len(encoded)))
    nll = total_nll / total_tokens
    return Perplexity(math.exp(nll), nll, total_tokens, len(encoded), truncated)


@dataclass
class Comparison:
    win_rate: float  # (wins + ties / 2) / pairs
    tie_rate: float
    wins: int
    ties: int
    losses: int


def compare(scores: Sequence[float], ref_scores: Sequence[float], texts: Sequence[str], ref_texts: Sequence[str]) -> Comparison:
    """Pairwise verdicts of a reward model: a tie is the same answer or the same score; ties count half."""
    wins = ties = losses = 0
    for s, r, a, b in zip(scores, ref_scores, texts, ref_texts, strict=True):
        if a == b or s == r:
            ties += 1
        elif s > r:
            wins += 1
        else:
            losses += 1
    n = wins + ties + losses
    if n == 0:
        raise DataError("win_rate: no pairs to compare")
    return Comparison((wins + 0.5 * ties) / n, ties / n, wins, ties, losses)


def sequence_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence sum over answer tokens of log p_model - log p_ref, on samples drawn from the model.

    Its mean is the unbiased "k1" Monte-Carlo estimate of KL(model || ref) over whole answers
    (Schulman 2020, "Approximating KL divergence"); single sequences can be negative.
    """
    return ((logp - ref_logp) * mask).sum(-1)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation."""
    if not values:
        raise DataError("no values to average")
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def check_gates(metrics: dict[str, float], fail_under: dict[str, float], fail_over: dict[str, float]) -> list[str]:
    """One message per gate that does not hold (NaN never holds, nor a gate on a metric not computed)."""
    failed = []
    missing = [name for name in (*fail_under, *fail_over) if name not in metrics]
    failed += [f"{name} was not computed, so its gate cannot hold" for name in dict.fromkeys(missing)]
    for name, limit in fail_under.items():
        value = metrics.get(name)
        if value is not None and not value >= limit:
            failed.append(f"{name} = {value:.4g} is under the gate {limit:g} (--fail-under {name}={limit:g})")
    for name, limit in fail_over.items():
        value = metrics.get(name)
        if value is not None and not value <= limit:
            failed.append(f"{name} = {value:.4g} is over the gate {limit:g} (--fail-over {name}={limit:g})")
    return failed


@torch.no_grad()
def answer_logprobs(model: Any, rows: Sequence[tuple[list[int], list[int]]], batch_size: int,
                    on_batch: Callable[[int], None] | None = None) -> list[float]:
    """Summed log-probability of each answer given its prompt, for (prompt ids, answer ids) rows."""
    from rlhf_cli.core.generation import token_logprobs

    device = next(model.parameters()).device
    # An answer with no prompt before it: its first token is the context (nothing predicts it).
    rows = [(p, a) if p else (a[:1], a[1:]) for p, a in rows]
    out: list[float] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        seqs = [list(p) + list(a) for p, a in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        logp = token_logprobs(model(input_ids=ids, attention_mask=mask).logits[:, :-1], ids[:, 1:])
        for row, (prompt, answer) in enumerate(chunk):
            # Position t predicts token t + 1: the answer's tokens are predicted from len(prompt) - 1 on.
            first = len(prompt) - 1
            out.append(float(logp[row, first : first + len(answer)].sum()))
        if on_batch is not None:
            on_batch(min(start + batch_size, len(rows)))
    return out
