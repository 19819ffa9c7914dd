"""JSON Schema of the recipes and annotated starter recipes, both derived from the pydantic models."""

from __future__ import annotations

import json
from typing import Any

import yaml
from pydantic import BaseModel, TypeAdapter

from rlhf_cli.recipe import RECIPE_CLASSES, Recipe
from rlhf_cli.recipe_load import _model_of

# The keys a recipe must supply itself, filled with values that show their shape.
_PLACEHOLDERS: dict[str, dict[str, Any]] = {
    "pretrain": {"model": {"path": "HuggingFaceTB/SmolLM2-135M"}, "data": {"train": "data/corpus.jsonl"}},
    "sft": {"model": {"path": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "data": {"train": "data/chat.jsonl"}},
    "train-rm": {"model": {"path": "runs/sft"}, "data": {"train": "data/preferences.jsonl"}},
    "dpo": {"model": {"path": "runs/sft"}, "data": {"train": "data/preferences.jsonl"}},
    "ppo": {"policy": {"path": "runs/sft"}, "reward": {"path": "runs/rm"}, "data": {"train": "data/prompts.jsonl"}},
    "grpo": {"policy": {"path": "runs/sft"}, "reward": {"function": "rlhf_cli.demo.rewards:arithmetic_exact"},
             "data": {"train": "data/arithmetic.jsonl"}},
    "eval": {
        "model": {"path": "runs/ppo"},
        "reward": {"path": "runs/rm"},
        "reference": {"path": "runs/sft"},
        "metrics": ["reward", "win_rate", "kl", "length"],
        "data": {"prompts": "data/prompts.jsonl"},
    },
    "generate": {"model": {"path": "runs/sft"}},
    "compare": {"model": {"path": "runs/ppo"}, "prompts": "data/prompts.jsonl", "reward": "runs/rm"},
}


def recipe_schema(stage: str | None = None) -> dict[str, Any]:
    if stage is not None:
        schema = RECIPE_CLASSES[stage].model_json_schema()
    else:
        schema = TypeAdapter(Recipe).json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema.setdefault("title", "rlhf recipe" if stage is None else f"rlhf {stage} recipe")
    return schema


def schema_text() -> str:
    """What recipes/schema.json holds (a test keeps the committed file current)."""
    return json.dumps(recipe_schema(), indent=2) + "\n"


def _scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _emit(cls: type[BaseModel], values: dict[str, Any], indent: int, out: list[str]) -> None:
    pad = "  " * indent
    for name, info in cls.model_fields.items():
        if name not in values:
            continue
        value = values[name]
        if info.description:
            out.append(f"{pad}# {info.description}")
        sub = _model_of(info.annotation)
        if sub is not None and isinstance(value, dict) and value:
            out.append(f"{pad}{name}:")
            _emit(sub, value, indent + 1, out)
        else:
            out.append(f"{pad}{name}: {_scalar(value)}")


def starter_recipe(stage: str) -> str:
    """An annotated recipe: every key with its default and a comment from its description."""
    cls = RECIPE_CLASSES[stage]
    recipe = cls.model_validate({"stage": stage, **_PLACEHOLDERS[stage]})
    values = recipe.model_dump(mode="json")
    lines = [
        "# yaml-language-server: $schema=schema.json",
        f"# rlhf {stage} recipe. Check it with `rlhf validate FILE`, run it with `rlhf {stage} FILE`.",
        f"# {(cls.__doc__ or '').strip()}",
    ]
    _emit(cls, values, 0, lines)
    return "\n".join(lines) + "\n"
