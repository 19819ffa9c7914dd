"""Several answers per prompt, and their scores: what best-of-n (`rlhf generate --best-of`), `rlhf compare`
and eval's best_of_n_reward share.

    groups = sample_groups(model, tokenizer, texts, n=4, spec=generation, batch_size=8, seed=42)
    scores = score_groups(scorer, prompts, groups)     # [[s00, s01, s02, s03], [s10, ...], ...]
    picked = best_index(scores[0])                     # the first of the highest-scoring answers

The n answers of one prompt are sampled next to each other (prompt 0 answers 0..n-1, prompt 1 ...), so a
prompt's group does not depend on the batch size's alignment with n. Best-of-n (rejection sampling) is
the cheapest use of a reward model and the baseline a PPO policy is read against (Nakano et al. 2021;
Touvron et al. 2023 use it to build the next round's data).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from rlhf_cli.core.generation import Sample, sample_batches
from rlhf_cli.recipe import GenerationSpec


def sample_groups(model: Any, tokenizer: Any, texts: Sequence[str], *, n: int, spec: GenerationSpec,
                  batch_size: int, seed: int, on_batch: Callable[[int], None] | None = None) -> list[list[Sample]]:
    """n sampled answers to each rendered prompt, grouped by prompt."""
    return [g for _, groups in group_batches(model, tokenizer, texts, n=n, spec=spec, batch_size=batch_size, seed=seed,
                                             on_batch=on_batch) for g in groups]


def group_batches(model: Any, tokenizer: Any, texts: Sequence[str], *, n: int, spec: GenerationSpec, batch_size: int,
                  seed: int, start: int = 0, on_batch: Callable[[int], None] | None = None,
                  ) -> Iterator[tuple[int, list[list[Sample]]]]:
    """The groups of texts[start:] as each generate call completes them: (index of the first, groups).

    A run resumed at `start` samples from the batch that holds that prompt's first answer, with the seed the
    batch has in a run from prompt 0, so its answers are that run's; the groups before `start` are dropped."""
    if start >= len(texts):
        return
    expanded = [t for t in texts for _ in range(n)]
    first_batch = start * n // batch_size
    rows: list[Sample] = []
    done = -(-first_batch * batch_size // n)  # the first group that begins in first_batch
    skip = done * n - first_batch * batch_size  # the answers before it: of a group begun in an earlier batch
    for b, batch in enumerate(sample_batches(model, tokenizer, expanded, spec, batch_size=batch_size, seed=seed,
                                             first_batch=first_batch), start=first_batch):
        rows.extend(batch.samples[skip:])
        skip = 0
        full = len(rows) // n
        groups, rows = [rows[i * n : (i + 1) * n] for i in range(full)], rows[full * n :]
        kept = groups[max(start - done, 0) :]
        if kept:
            yield done + len(groups) - len(kept), kept
        done += full
        if on_batch is not None:
            on_batch(min((b + 1) * batch_size, len(expanded)))


def score_groups(scorer: Callable[[list[Any], list[str]], list[float]], prompts: Sequence[Any],
                 groups: Sequence[Sequence[Sample | str]]) -> list[list[float]]:
    """Every answer's score (answers as samples or texts), in one call of the scorer (a reward model batches
    across prompts)."""
    flat_prompts = [p for p, group in zip(prompts, groups) for _ in group]
    flat = scorer(flat_prompts, [a if isinstance(a, str) else a.text for group in groups for a in group])
    out, start = [], 0
    for group in groups:
        out.append(list(flat[start : start + len(group)]))
        start += len(group)
    return out


def best_index(scores: Sequence[float]) -> int:
    """The first of the highest scores: ties go to the earlier sample, so the choice is reproducible. A NaN
    score (a reward function that could not judge) ranks below every number: compared as it is, NaN is
    neither above nor below anything, and an answer scored NaN before the others would be kept."""
    return max(range(len(scores)), key=lambda i: (-math.inf if math.isnan(scores[i]) else scores[i], -i))
