"""The prompts of an online RL run (ppo, grpo) read and measured before anything loads: too long is a
data error with the fix, and what the reward model will read is checked against how it was trained.
"""

from __future__ import annotations

import logging
from typing import Any

from rlhf_cli.errors import DataError
from rlhf_cli.ppo.build import context_length
from rlhf_cli.ppo.layout import LayoutPlan, check_reward_template
from rlhf_cli.recipe import OnlineRecipe

log = logging.getLogger("rlhf")


def read_prompts(recipe: OnlineRecipe) -> list[Any]:
    """Prompts as strings or message lists (a trailing assistant turn is dropped: the policy writes that one)."""
    from rlhf_cli.core.data import check_columns, detect_format, read_records, warn_empty_prompts

    data = recipe.data
    records = read_records(data.train, fields=data.fields, split=data.split, max_samples=data.max_samples)
    fmt = detect_format(records, data.train, allowed=("prompt", "messages"), declared=data.format)
    check_columns(records, fmt, data.train)
    if fmt == "prompt":
        out = [r["prompt"] for r in records]
    else:
        out = []
        for r in records:
            messages = list(r["messages"])
            if messages and messages[-1].get("role") == "assistant":
                messages = messages[:-1]
            out.append(messages)
    warn_empty_prompts(out, data.train)
    return out


def check_lengths(lengths: list[int], recipe: OnlineRecipe, context: int | None, whose: str, max_prompt: bool = True) -> None:
    """Prompts are never cut (a cut prompt asks another question): too long is a data error with the fix."""
    source, limit, new = recipe.data.train, recipe.data.max_prompt_length, recipe.generation.max_new_tokens
    longest = max(lengths)
    where = lengths.index(longest) + 1
    if max_prompt and longest > limit:
        n = sum(n > limit for n in lengths)
        raise DataError(
            f"{source}: {n} of {len(lengths)} prompts are longer than data.max_prompt_length={limit} tokens "
            f"(longest: record {where}, {longest} tokens): raise data.max_prompt_length or drop those prompts"
        )
    if context and longest + new > context:
        raise DataError(
            f"{source}: record {where} ({longest} prompt tokens) + generation.max_new_tokens={new} exceeds {whose} "
            f"context of {context} tokens: lower generation.max_new_tokens to {max(context - longest, 0)} "
            f"or drop prompts longer than {max(context - new, 0)} tokens"
        )


def check_reward_reads(plan: LayoutPlan, raw: list[Any], recipe: OnlineRecipe) -> int | None:
    """For a reward model: its chat template renders a prompt, the prompts fit its context, and a warning when
    transcripts will be longer than it was trained on. Returns that trained length (None for a function)."""
    from rlhf_cli.core.chat import conversation_text
    from rlhf_cli.core.reward import trained_max_length

    if plan.reward_tokenizer is None:
        return None
    rm_tok = plan.reward_tokenizer
    check_reward_template(rm_tok, raw[0])
    assert plan.reward_resolved is not None
    lengths = [len(ids) for ids in rm_tok([conversation_text(rm_tok, p, "") for p in raw], add_special_tokens=False)["input_ids"]]
    check_lengths(lengths, recipe, context_length(plan.reward_resolved), "the reward model's", max_prompt=False)
    reward_max_length = trained_max_length(plan.reward_resolved) or 1024
    if max(lengths) + recipe.generation.max_new_tokens > reward_max_length:
        log.warning("the reward model was trained on transcripts of up to %d tokens (its data.max_length); longer "
                    "prompt + answer transcripts are scored with the prompt cut from the left, as in its training",
                    reward_max_length)
    return reward_max_length
