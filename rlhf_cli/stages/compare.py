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

Lines come out as the work finishes, a generate batch at a time. A reward model loads once the policy
is freed, so with one every answer is sampled first and the lines come as they are scored. With
--output FILE the lines are appended to FILE; a rerun of the same command skips the prompts whose lines
FILE holds and appends the rest. A reward model's answers wait in FILE.answers.jsonl between the two
phases, resumed the same way, and removed once FILE is complete.
"""

from __future__ import annotations

import logging
import math
import random
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from rlhf_cli.errors import DataError, Interrupted, RecipeError
from rlhf_cli.recipe import CompareRecipe

log = logging.getLogger("rlhf")


def compare(recipe: CompareRecipe) -> Iterator[dict[str, Any]]:
    """The lines of the prompts still to do: yielded, or with recipe.output appended to that file."""
    from rlhf_cli.core.data import prompts_of, read_records
    from rlhf_cli.core.reward import load_function, resolve_reward_model
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
    if recipe.output is None:
        yield from _lines(recipe, prompts, judge, done=0, answers=None)
        return
    reward_model = recipe.reward is not None and judge is None
    with ExitStack() as stack:
        out = _opened(stack, Path(recipe.output), lock_hint="choose another --output")
        _check_done(out, recipe, prompts, "ranking" if recipe.for_labelling else "scores")
        done = len(out.records)
        answers = None
        if reward_model and done < len(prompts):
            answers = _opened(stack, _answers_path(recipe.output))
            _check_done(answers, recipe, prompts, None, against=out.records)
        try:
            for record in _lines(recipe, prompts, judge, done=done, answers=answers):
                out.append(record)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted: {recipe.output} holds the lines of {len(out.records)} of {len(prompts)} "
                              "prompts; the same command continues from there") from None
    if reward_model:
        _answers_path(recipe.output).unlink(missing_ok=True)  # FILE is complete: the answers are in it
    log.info("%s holds the lines of all %d prompts (%d written now)", recipe.output, len(prompts), len(prompts) - done)


def _opened(stack: ExitStack, path: Path, **how: Any) -> Any:
    """path as a JsonlFile, closed when the stack closes; one this run created and left without a line (it
    failed first: a wrong model path) is removed, so a failed run leaves no empty file behind."""
    from rlhf_cli.core.jsonl import JsonlFile

    created = not path.exists()
    file = JsonlFile(path, **how)
    stack.callback(file.close)
    stack.callback(lambda: created and not file.records and path.unlink(missing_ok=True))
    return file


def _lines(recipe: CompareRecipe, prompts: list[Any], judge: Any, *, done: int, answers: Any) -> Iterator[dict[str, Any]]:
    """The lines of prompts[done:], each batch's as soon as it is judged. answers: the file that keeps a
    reward model's sampled answers until they are scored (None: memory)."""
    from rlhf_cli.core.candidates import score_groups
    from rlhf_cli.core.reward import load_scorer

    k = recipe.num_samples
    if done >= len(prompts):
        return
    if recipe.for_labelling:
        shuffle = random.Random(recipe.seed)
        for _ in range(done):  # the shuffles of the prompts already written, so the next ones are a full run's
            shuffle.shuffle(list(range(k)))
        for first, groups in _sampled(recipe, prompts, done):
            for prompt, group in zip(prompts[first:], groups):
                texts = [s.text for s in group]
                shuffle.shuffle(texts)
                yield {"prompt": prompt, "responses": texts, "ranking": []}
        return
    if judge is not None:
        for first, groups in _sampled(recipe, prompts, done):
            texts = [[s.text for s in g] for g in groups]
            yield from _scored(prompts[first:], texts, score_groups(judge, prompts[first:], texts))
        return
    # A reward model: every answer first (kept in `answers` when given), then the freed policy's memory
    # holds the reward model. Answers sampled before an interruption are not sampled again.
    sampled = [r["responses"] for r in answers.records] if answers is not None else []
    for first, groups in _sampled(recipe, prompts, len(sampled)):
        for prompt, group in zip(prompts[first:], groups):
            sampled.append([s.text for s in group])
            if answers is not None:
                answers.append({"prompt": prompt, "responses": sampled[-1]})
    scorer = load_scorer(recipe.reward)
    # A fixed slice of prompts at a time, counted from prompt 0, so a resumed run's slices are a full run's.
    per = max(1, recipe.batch_size // k)
    for start in range(done - done % per, len(prompts), per):
        groups = sampled[start : start + per]
        lines = list(_scored(prompts[start:], groups, score_groups(scorer, prompts[start:], groups)))
        yield from lines[max(done - start, 0) :]


def _sampled(recipe: CompareRecipe, prompts: list[Any], start: int) -> Iterator[tuple[int, list[list[Any]]]]:
    """The policy's groups of answers to prompts[start:], a generate batch at a time; the policy is freed after."""
    from rlhf_cli.console import Progress
    from rlhf_cli.core.candidates import group_batches
    from rlhf_cli.core.chat import ensure_chat_template, prompt_text
    from rlhf_cli.core.inference import load_causal_lm

    if start >= len(prompts):
        return
    loaded = load_causal_lm(recipe.model, quant=recipe.quant)
    ensure_chat_template(loaded.tokenizer)
    texts = [prompt_text(loaded.tokenizer, p) for p in prompts]
    k = recipe.num_samples
    with Progress(total=len(texts) * k, description="compare", unit="answer", start=start * k) as bar:
        yield from group_batches(loaded.model, loaded.tokenizer, texts, n=k, spec=recipe.generation,
                                 batch_size=recipe.batch_size, seed=recipe.seed, start=start, on_batch=bar.update)
    del loaded  # the policy's memory is free before a reward model loads


def _scored(prompts: Sequence[Any], groups: list[list[str]], scores: list[list[float]]) -> Iterator[dict[str, Any]]:
    for prompt, texts, group_scores in zip(prompts, groups, scores):
        yield {"prompt": prompt, "responses": texts, "scores": [_orderable(s) for s in group_scores]}


def _answers_path(output: str) -> Path:
    return Path(output + ".answers.jsonl")


def _check_done(file: Any, recipe: CompareRecipe, prompts: list[Any], judged: str | None,
                against: list[Any] | None = None) -> None:
    """A file's lines are this command's for the first prompts: the same prompts in order, K answers each,
    judged the same way (judged: the key of the judgement; None for sampled answers alone), or RecipeError."""
    fix = f"rerun the command that wrote it, or choose another --output than {recipe.output}"
    if len(file.records) > len(prompts):
        raise RecipeError(f"{file.path} holds {len(file.records)} lines and {recipe.prompts} {len(prompts)} prompts: "
                          f"it was written for other prompts; {fix}")
    for i, record in enumerate(file.records):
        where = f"{file.path} line {i + 1}"
        if not isinstance(record, dict) or record.get("prompt") != prompts[i]:
            raise RecipeError(f"{where} answers another prompt than prompt {i + 1} of {recipe.prompts}; {fix}")
        responses = record.get("responses")
        kind = next((key for key in ("scores", "ranking") if key in record), None)
        if not isinstance(responses, list) or len(responses) != recipe.num_samples or kind != judged:
            n = len(responses) if isinstance(responses, list) else 0
            raise RecipeError(f"{where} holds {n} answers{f' with {kind}' if kind else ''}, and this command writes "
                              f"{recipe.num_samples}{f' with {judged}' if judged else ''}; {fix}")
        if against is not None and i < len(against) and against[i].get("responses") != responses:
            raise RecipeError(f"{where} holds other answers than line {i + 1} of {recipe.output}; {fix}")


def _orderable(score: float) -> float:
    """An infinite score (a judge's "never" or "always") as the largest float of its sign: strict JSON has no
    inf, and written as null, like NaN, the answer would take part in no pair; this keeps every pair it makes."""
    return math.copysign(sys.float_info.max, score) if math.isinf(score) else score
