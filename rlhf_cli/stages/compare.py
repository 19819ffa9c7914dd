"""rlhf compare: K answers per prompt from any run, as ranked data for the next round's reward model.

    rlhf compare runs/ppo --prompts data/prompts.jsonl -n 4 --reward runs/rm > round2.jsonl
    rlhf compare runs/ppo --prompts data/prompts.jsonl -n 4 --reward mypkg.judge:score > round2.jsonl
    rlhf compare runs/ppo --prompts data/prompts.jsonl -n 4 --for-labelling > to_rank.jsonl

This is the step that closes InstructGPT's loop (Ouyang et al. 2022): the improved policy's own answers
become the comparisons the next reward model learns from. Each line is one prompt:
{"prompt", "responses": [K answers], "scores": [K floats]} when a judge scores them (train-rm makes a
pair of every two answers whose scores differ), or, with --for-labelling, the answers shuffled (people
should not see the sampling order) and "ranking": [] for people to fill in with answer indices, best
first. train-rm reads both; rows still unranked are skipped and counted.
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Iterator
from typing import Any

from rlhf_cli.errors import DataError
from rlhf_cli.recipe import CompareRecipe


def compare(recipe: CompareRecipe) -> Iterator[dict[str, Any]]:
    from rlhf_cli.console import Progress
    from rlhf_cli.core.candidates import sample_groups, score_groups
    from rlhf_cli.core.chat import ensure_chat_template, prompt_text
    from rlhf_cli.core.data import prompts_of, read_records
    from rlhf_cli.core.inference import load_causal_lm
    from rlhf_cli.core.reward import load_function, load_scorer, resolve_reward_model
    from rlhf_cli.recipe import is_function_ref

    prompts = prompts_of(read_records(recipe.prompts), recipe.prompts)
    if not prompts:
        raise DataError(f"{recipe.prompts}: no prompts")
    # The judge is checked before any model loads: user code is imported, a reward model is resolved
    # through its run.json (a causal-lm run, an unfinished run, missing files), so a wrong --reward fails
    # now, not after every answer was sampled. The reward model itself loads once the policy is freed.
    judge = None
    if recipe.reward is not None:
        if is_function_ref(recipe.reward):
            judge = load_function(recipe.reward)
        else:
            resolve_reward_model(recipe.reward)
    loaded = load_causal_lm(recipe.model, quant=recipe.quant)
    ensure_chat_template(loaded.tokenizer)
    texts = [prompt_text(loaded.tokenizer, p) for p in prompts]
    k = recipe.num_samples
    with Progress(total=len(texts) * k, description="compare", unit="answer") as bar:
        groups = sample_groups(loaded.model, loaded.tokenizer, texts, n=k, spec=recipe.generation,
                               batch_size=recipe.batch_size, seed=recipe.seed, on_batch=bar.update)
    if recipe.for_labelling:
        shuffle = random.Random(recipe.seed)
        for prompt, group in zip(prompts, groups):
            answers = [s.text for s in group]
            shuffle.shuffle(answers)
            yield {"prompt": prompt, "responses": answers, "ranking": []}
        return
    if judge is None:
        del loaded  # the policy's memory is free before the reward model loads
        judge = load_scorer(recipe.reward)
    for prompt, group, scores in zip(prompts, groups, score_groups(judge, prompts, groups)):
        yield {"prompt": prompt, "responses": [s.text for s in group], "scores": [_orderable(s) for s in scores]}


def _orderable(score: float) -> float:
    """An infinite score (a judge's "never" or "always") as the largest float of its sign: strict JSON has no
    inf, and written as null, like NaN, the answer would take part in no pair; this keeps every pair it makes."""
    return math.copysign(sys.float_info.max, score) if math.isinf(score) else score
