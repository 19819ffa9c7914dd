"""rlhf generate: sample from a model; one JSON object per sample on stdout.

    rlhf generate runs/sft --prompt "where is the cat?" --num-samples 2 --seed 1
    rlhf generate runs/sft --prompts data/prompts.jsonl --temperature 0 > answers.jsonl
    echo "where is the cat?" | rlhf generate runs/sft --prompts - --seed 1

Each line: {"index", "sample", "prompt", "response", "finish_reason" (eos|stop|length),
"prompt_tokens", "completion_tokens"}. Prompts go through the chat template saved with the run (the one
used in training) unless --raw. Same seed, same output.

Best-of-n keeps, of the --num-samples answers to each prompt, the one the reward scores highest (its line
gains "score" and "candidates"); with --all every answer is written, with its "score" and "best":

    rlhf generate runs/ppo --prompts p.jsonl -n 8 --best-of --reward runs/rm
    rlhf generate runs/sft --prompts p.jsonl -n 4 --best-of --reward mypkg.rewards:exact_answer --all
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from typing import Any

from rlhf_cli.errors import DataError, RecipeError
from rlhf_cli.recipe import GenerateRecipe

log = logging.getLogger("rlhf")


def generate(recipe: GenerateRecipe, prompts: list[str], prompts_file: str | None) -> Iterator[dict[str, Any]]:
    # Prompts first: a problem with them answers before torch loads.
    items = list(prompts) + (read_prompts(prompts_file) if prompts_file is not None else [])
    if not items:
        raise DataError(f"{prompts_file}: no prompts" if prompts_file else "no prompts given")
    if recipe.raw and any(not isinstance(p, str) for p in items):
        raise RecipeError("--raw sends text as it is; these prompts are message lists (drop --raw to use the chat template)")

    from rlhf_cli.console import Progress
    from rlhf_cli.core.chat import ensure_chat_template, prompt_text
    from rlhf_cli.core.generation import sample_texts
    from rlhf_cli.core.inference import load_causal_lm

    # User code is imported first: a wrong reference fails before any model loads.
    scorer = _scorer(recipe.reward) if recipe.best_of else None
    loaded = load_causal_lm(recipe.model, quant=recipe.quant, merge=recipe.merge)
    tokenizer = loaded.tokenizer
    if not recipe.raw:
        ensure_chat_template(tokenizer)
    texts = [prompt_text(tokenizer, p, raw=recipe.raw) for p in items]
    _warn_long(loaded.model, tokenizer, texts, recipe.generation.max_new_tokens)

    if scorer is not None:
        yield from _best_of(recipe, loaded, items, texts, scorer)
        return
    # Samples of one prompt sit next to each other: prompt 0 sample 0..n-1, prompt 1 ...
    expanded = [t for t in texts for _ in range(recipe.num_samples)]
    with Progress(total=len(expanded), description="generate", unit="sample") as bar:
        samples = sample_texts(
            loaded.model, tokenizer, expanded, recipe.generation,
            batch_size=recipe.batch_size, seed=recipe.seed, on_batch=bar.update,
        )
        for i, sample in enumerate(samples):
            yield {
                "index": i // recipe.num_samples,
                "sample": i % recipe.num_samples,
                "prompt": items[i // recipe.num_samples],
                "response": sample.text,
                "finish_reason": sample.finish_reason,
                "prompt_tokens": sample.prompt_tokens,
                "completion_tokens": sample.completion_tokens,
            }


def _scorer(ref: str | None) -> Any:
    from rlhf_cli.core.reward import load_function, load_scorer
    from rlhf_cli.recipe import is_function_ref

    assert ref is not None  # the recipe requires it with best_of
    return load_function(ref) if is_function_ref(ref) else load_scorer(ref)


def _best_of(recipe: GenerateRecipe, loaded: Any, items: list[Any], texts: list[str], scorer: Any) -> Iterator[dict[str, Any]]:
    """Sample every prompt's candidates, score them all, and keep the best (or write all with recipe.all)."""
    from rlhf_cli.console import Progress
    from rlhf_cli.core.candidates import best_index, sample_groups, score_groups

    n = recipe.num_samples
    with Progress(total=len(texts) * n, description="generate", unit="sample") as bar:
        groups = sample_groups(loaded.model, loaded.tokenizer, texts, n=n, spec=recipe.generation,
                               batch_size=recipe.batch_size, seed=recipe.seed, on_batch=bar.update)
    scores = score_groups(scorer, items, groups)
    for index, (prompt, group, group_scores) in enumerate(zip(items, groups, scores)):
        best = best_index(group_scores)
        for k, sample in enumerate(group):
            if k != best and not recipe.all:
                continue
            record = {"index": index, "sample": k, "prompt": prompt, "response": sample.text,
                      "finish_reason": sample.finish_reason, "prompt_tokens": sample.prompt_tokens,
                      "completion_tokens": sample.completion_tokens, "score": group_scores[k]}
            yield {**record, "best": k == best} if recipe.all else {**record, "candidates": n}


def read_prompts(source: str) -> list[Any]:
    """Prompts from stdin lines (`-`) or a JSONL/JSON/TXT file: a prompt column, a conversation whose
    final answer is dropped, or text."""
    from rlhf_cli.core.data import prompts_of, read_records

    if source == "-":
        return _stdin_lines()
    return prompts_of(read_records(source), source)


def _stdin_lines() -> list[str]:
    """Non-blank stdin lines, read as bytes so that text in another encoding names its line."""
    from rlhf_cli.core.data import decode_utf8

    # Python sets sys.stdin to None when the process starts with file descriptor 0 closed (`<&-`).
    if sys.stdin is None:
        raise DataError("--prompts - reads prompts from stdin, but stdin is closed: pipe them in (echo ... | rlhf generate ...)")
    if sys.stdin.isatty():
        raise RecipeError("--prompts - reads prompts from stdin, but stdin is a terminal: pipe them in (echo ... | rlhf generate ...)")
    text = decode_utf8(sys.stdin.buffer.read(), "stdin")
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


def _warn_long(model: Any, tokenizer: Any, texts: list[str], max_new_tokens: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if not limit:
        return
    longest = max(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    if longest + max_new_tokens > limit:
        log.warning(
            "longest prompt (%d tokens) + max_new_tokens (%d) exceeds the model's %d positions; answers may degrade",
            longest, max_new_tokens, limit,
        )
