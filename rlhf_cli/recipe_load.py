"""Read a recipe: YAML file < direct flags < `--set`, validated once, errors with line numbers.

    recipe = load_recipe("sft", Path("recipes/tiny/sft.yaml"), flags={"data.train": "x.jsonl"},
                         sets=["train.lr=2e-4", "lora.target_modules=[q_proj,v_proj]"])

Every problem becomes one line: `file:line: key: what is wrong (did you mean ...?)`.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from rlhf_cli.errors import DataError, RecipeError
from rlhf_cli.recipe import METRIC_KEYS, RECIPE_CLASSES, STAGES

Loc = tuple[str, ...]

# A flag value that removes the key from the recipe file: `rlhf ppo --reward pkg.mod:fn` replaces a
# file's reward.path instead of tripping the "exactly one of path or function" rule.
UNSET = object()


# --------------------------------------------------------------------------- YAML with line numbers


def _key_lines(node: yaml.Node, prefix: Loc, out: dict[Loc, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            loc = prefix + (str(key_node.value),)
            out[loc] = key_node.start_mark.line + 1
            _key_lines(value_node, loc, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            loc = prefix + (str(i),)
            out[loc] = item.start_mark.line + 1
            _key_lines(item, loc, out)


class _RecipeLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key given twice in one mapping is an error: PyYAML keeps
    the last one silently, so `lr` written twice would train with whichever came later."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:
            # Merge keys (<<) may be overridden by design; scalars are compared by tag and text.
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = (key_node.tag, key_node.value)
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key_node.value!r} given twice (first on line {first[key]}); keep one",
                    key_node.start_mark,
                )
            first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


# No recipe value is a date: a run named `output_dir: runs/2024-01-01` or `--set output_dir=2024-01-01`
# means the text written, which PyYAML would otherwise turn into a date that no string field accepts.
_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


# Values a recipe may expand to through anchors and aliases; real recipes hold a few hundred. A few nested
# aliases ("billion laughs") expand to billions, which every later walk (key lines, validation) would visit.
MAX_VALUES = 100_000


def load_yaml(text: str) -> tuple[Any, yaml.Node | None]:
    """(data, node tree) of one YAML document, parsed once with _RecipeLoader."""
    loader = _RecipeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            # PyYAML reads nested brackets recursively: thousands deep end the parser's stack, not the file.
            raise yaml.YAMLError("values are nested too deeply to read; nest them less") from None
        if node is not None and _expanded_size(node, {}) > MAX_VALUES:
            raise yaml.constructor.ConstructorError(
                None, None, f"the recipe expands to more than {MAX_VALUES} values through anchors and aliases (*name): write the values out",
                node.start_mark,
            )
        return (loader.construct_document(node) if node is not None else None), node
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many nodes the document holds once every alias is expanded (each distinct node counted once)."""
    if id(node) not in sizes:
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else (
            node.value if isinstance(node, yaml.SequenceNode) else [])
        sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


def _yaml_error(path: Path, text: str, e: yaml.YAMLError) -> RecipeError:
    """One line naming the line of a YAML problem."""
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        return RecipeError(f"{where}: invalid YAML: {e.problem or e.context}")
    if isinstance(e, yaml.reader.ReaderError):
        # The reader stops at characters YAML forbids (control characters); it knows their offset only.
        line = text.count("\n", 0, e.position) + 1
        return RecipeError(f"{path}:{line}: invalid YAML: control character #x{e.character:02x} is not allowed; delete it")
    return RecipeError(f"{path}: invalid YAML: {e}")


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[Loc, int]]:
    """Parse a recipe file safely; returns the mapping and the line of every key."""
    if path.is_dir():
        raise RecipeError(f"{path} is a directory, not a recipe: give one of its YAML files (rlhf validate {path}/*.yaml)")
    if not path.is_file():
        raise DataError(f"{path}: recipe file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start}); save the recipe as UTF-8") from None
    try:
        data, node = load_yaml(text)
    except yaml.YAMLError as e:
        raise _yaml_error(path, text, e) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys (stage, model, data, ...), not a {type(data).__name__}")
    lines: dict[Loc, int] = {}
    if node is not None:
        _key_lines(node, (), lines)
    return data, lines


# --------------------------------------------------------------------------- overrides


def parse_set(item: str) -> tuple[Loc, Any]:
    """`a.b=value`: value parsed as YAML (lists, numbers, null), like the file itself."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set {item!r}: expected dotted.key=value, e.g. --set train.lr=2e-4")
    try:
        value = load_yaml(raw)[0] if raw.strip() else None
    except yaml.YAMLError as e:
        raise RecipeError(f"--set {item!r}: value is not valid YAML ({getattr(e, 'problem', e)})") from None
    return tuple(key.split(".")), value


def set_path(data: dict[str, Any], loc: Loc, value: Any, origin: str) -> None:
    """Set data[a][b]... = value, creating sections on the way; value UNSET removes the key."""
    node = data
    for i, part in enumerate(loc[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise RecipeError(f"{origin}: {'.'.join(loc[: i + 1])} is a value, not a section; cannot set {'.'.join(loc)}")
        node = child
    if value is UNSET:
        node.pop(loc[-1], None)
    else:
        node[loc[-1]] = value


# --------------------------------------------------------------------------- validation errors

# Direct flags that supply a required key, so that "missing" names the flag too (DESIGN: a recipe file
# is optional when flags give the required keys). Keep in step with the options in cli.py.
_FLAGS: dict[str, str] = {"model.path": "--model MODEL", "data.train": "--data FILE"}
_STAGE_FLAGS: dict[str, dict[str, str]] = {
    "ppo": {"policy.path": "--policy RUN", "reward.path": "--reward RUN", "data.train": "--prompts FILE"},
    "grpo": {"policy.path": "--policy RUN", "reward.path": "--reward RUN|package.module:function", "data.train": "--prompts FILE"},
    "eval": {"metrics": f"--metric NAME, one of: {', '.join(METRIC_KEYS)}"},
}


def _missing_hint(stage: str, loc: Loc) -> str:
    flags = {**_FLAGS, **_STAGE_FLAGS.get(stage, {})}
    dotted = ".".join(loc)
    for key, flag in flags.items():
        if key == dotted or key.startswith(dotted + "."):
            return f" (set {key}, or pass {flag})"
    return ""


# Names other tools give our keys (HF TrainingArguments, TRL, peft, axolotl, LLaMA-Factory): an unknown key
# found here says what rlhf calls it, where a did-you-mean would guess by spelling (learning_rate ->
# logging_steps). Each name maps to the keys it may mean, relative to its section, first match wins; a
# target that is not a key of that section is skipped, so `rank` under `train` suggests nothing.
RENAMED: dict[str, tuple[str, ...]] = {
    "learning_rate": ("lr", "train.lr"),
    "num_train_epochs": ("epochs", "train.epochs"),
    "num_epochs": ("epochs", "train.epochs"),
    "per_device_train_batch_size": ("batch_size", "train.batch_size", "mini_batch_size"),
    "micro_batch_size": ("batch_size", "train.batch_size", "mini_batch_size"),
    "train_batch_size": ("batch_size", "train.batch_size"),
    "gradient_accumulation_steps": ("grad_accum", "train.grad_accum"),
    "lr_scheduler_type": ("lr_scheduler", "train.lr_scheduler"),
    "warmup_steps": ("warmup_ratio", "train.warmup_ratio"),
    "warmup": ("warmup_ratio", "train.warmup_ratio"),
    "max_steps": ("train.max_steps",),
    "seed": ("train.seed",),
    "evaluation_strategy": ("eval_steps", "train.eval_steps"),
    "eval_strategy": ("eval_steps", "train.eval_steps"),
    "save_strategy": ("save_steps", "train.save_steps"),
    "rank": ("r",),
    "lora_r": ("r", "lora.r"),
    "lora_rank": ("r", "lora.r"),
    "lora_alpha": ("alpha", "lora.alpha"),
    "lora_dropout": ("dropout", "lora.dropout"),
    "lora_target": ("target_modules", "lora.target_modules"),
    "lora_target_modules": ("target_modules", "lora.target_modules"),
    "max_seq_length": ("max_length", "data.max_length"),
    "max_seq_len": ("max_length", "data.max_length"),
    "cutoff_len": ("max_length", "data.max_length"),
    "sequence_len": ("max_length", "data.max_length"),
    "max_len": ("max_length", "data.max_length"),
    "model_name_or_path": ("path", "model.path", "policy.path"),
    "base_model": ("path", "model.path", "policy.path"),
    "torch_dtype": ("dtype", "model.dtype"),
    "load_in_4bit": ("quant.bits",),
    "load_in_8bit": ("quant.bits",),
    "bnb_4bit_quant_type": ("quant_type", "quant.quant_type"),
    "bnb_4bit_use_double_quant": ("double_quant", "quant.double_quant"),
    "bnb_4bit_compute_dtype": ("compute_dtype", "quant.compute_dtype"),
    "dataset": ("data.train", "train"),
    "datasets": ("data.train", "train"),
    "loss_type": ("loss", "dpo.loss"),
    "num_ppo_epochs": ("ppo_epochs",),
    "cliprange": ("clip_range",),
    "cliprange_value": ("value_clip_range",),
    "init_kl_coef": ("kl_coef",),
    "target_kl": ("kl_target",),
    "num_generations": ("group_size",),
    "epsilon": ("clip_range",),
    "response_length": ("generation.max_new_tokens",),
    "max_completion_length": ("generation.max_new_tokens",),
    "max_new_tokens": ("generation.max_new_tokens",),
    # TRL counts prompts over the whole run; rlhf counts rollouts of rollout_batch_size prompts each.
    "total_episodes": ("iterations",),
    "num_episodes": ("iterations",),
}
_RENAME_NOTES = {
    ("total_episodes", "iterations"): " (rollouts of rollout_batch_size prompts each: total_episodes / rollout_batch_size)",
    ("num_episodes", "iterations"): " (rollouts of rollout_batch_size prompts each: num_episodes / rollout_batch_size)",
    ("load_in_4bit", "quant.bits"): ": 4",
    ("load_in_8bit", "quant.bits"): ": 8",
    ("warmup_steps", "warmup_ratio"): ", a fraction of the steps",
    ("warmup_steps", "train.warmup_ratio"): ", a fraction of the steps",
}


def renamed_key(cls: type[BaseModel], loc: Loc) -> str | None:
    """What rlhf calls the unknown key at `loc` when another tool's name for it is known, as a dotted key
    with a short note; None otherwise."""
    name = loc[-1].lower()
    for target in RENAMED.get(name, ()):
        parts = tuple(target.split("."))
        if parts[-1] in _fields_at(cls, loc[:-1] + parts[:-1]):
            return ".".join(loc[:-1] + parts) + _RENAME_NOTES.get((name, target), "")
    return None


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation like `LoraSpec | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) or origin is typing.Annotated:
        for arg in typing.get_args(annotation):
            found = _model_of(arg)
            if found is not None:
                return found
    return None


def _fields_at(cls: type[BaseModel], loc: Loc) -> list[str]:
    """Valid key names of the section `loc` points into."""
    current: type[BaseModel] | None = cls
    for part in loc:
        if current is None or part not in current.model_fields:
            return []
        current = _model_of(current.model_fields[part].annotation)
    return list(current.model_fields) if current else []


def _clean_loc(loc: tuple[Any, ...]) -> Loc:
    # pydantic adds union branch names ("list[str]", "literal['all-linear']") into loc; drop them.
    return tuple(str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))


# More unknown keys than this (with no known other name) are one line: a file written for another tool, or
# another command, would otherwise print one line per key (LLaMA-Factory's "keys are not used" list).
MAX_UNKNOWN_LINES = 5


def format_errors(
    err: ValidationError, cls: type[BaseModel], lines: dict[Loc, int], source: str, from_set: set[Loc]
) -> list[str]:
    out: list[str] = []
    seen: set[tuple[Loc, str]] = set()
    errors = err.errors()
    unknown = [_clean_loc(e["loc"]) for e in errors if e["type"] == "extra_forbidden"]
    unknown = [loc for loc in unknown if renamed_key(cls, loc) is None]
    if len(unknown) > MAX_UNKNOWN_LINES:
        out.append(_unknown_summary(cls, unknown, lines, source, from_set))
        errors = [e for e in errors if not (e["type"] == "extra_forbidden" and _clean_loc(e["loc"]) in unknown)]
    for e in errors:
        loc = _clean_loc(e["loc"])
        key = ".".join(loc) or "(recipe)"
        if e["type"] == "extra_forbidden" and (ours := renamed_key(cls, loc)) is not None:
            msg = f"unknown key; rlhf calls it {ours}"
        elif e["type"] == "extra_forbidden":
            valid = _fields_at(cls, loc[:-1])
            close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
            hint = f"; did you mean {'.'.join(loc[:-1] + (close[0],))}?" if close else ""
            section = ".".join(loc[:-1]) or "the top level"
            msg = f"unknown key{hint} (valid keys in {section}: {', '.join(valid)})"
        elif e["type"] == "missing":
            msg = "required key is missing" + _missing_hint(str(cls.model_fields["stage"].default), loc)
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] not in ("value_error", "assertion_error") and "input" in e:
                msg += f" (got {e['input']!r})"
        if (loc, msg) in seen:
            continue
        seen.add((loc, msg))
        where = _where(loc, lines, source, from_set)
        out.append(f"{where}: {key}: {msg}" if loc else f"{where}: {msg}")
    return out


def _unknown_summary(cls: type[BaseModel], unknown: list[Loc], lines: dict[Loc, int], source: str, from_set: set[Loc]) -> str:
    stage = str(cls.model_fields["stage"].default)
    named = ", ".join(".".join(loc) for loc in unknown[:3])
    return (
        f"{_where(unknown[0], lines, source, from_set)}: {len(unknown)} unknown keys ({named} and {len(unknown) - 3} more): "
        f"is this a recipe for rlhf {stage}? `rlhf init {stage}` writes one (top-level keys: {', '.join(cls.model_fields)})"
    )


def _where(loc: Loc, lines: dict[Loc, int], source: str, from_set: set[Loc]) -> str:
    # A rule on a whole section (train: epochs and max_steps both null) may be broken by a flag below it.
    via = " (after --set/flags)" if lines and any(s[: len(loc)] == loc for s in from_set) else ""
    for n in range(len(loc), 0, -1):
        if loc[:n] in from_set:
            return "--set/flag"
        if loc[:n] in lines:
            return f"{source}:{lines[loc[:n]]}{via}"
    return source + via


# --------------------------------------------------------------------------- entry point


def load_recipe(
    stage: str | None,
    path: Path | None,
    flags: dict[str, Any] | None = None,
    sets: list[str] | None = None,
) -> Any:
    """Build the typed recipe for `stage` (or the file's own `stage:` when stage is None)."""
    data: dict[str, Any] = {}
    lines: dict[Loc, int] = {}
    source = str(path) if path else "command line"
    if path is not None:
        data, lines = read_yaml(path)
        _refuse_manifest(path, data)

    file_stage = data.get("stage")
    if stage is None:
        if file_stage is None:
            raise RecipeError(f"{source}: no `stage:` key; add e.g. `stage: sft` (one of {', '.join(STAGES)})")
        stage = str(file_stage)
    if stage not in RECIPE_CLASSES:
        close = difflib.get_close_matches(stage, STAGES, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        line = f":{lines[('stage',)]}" if ("stage",) in lines else ""
        raise RecipeError(f"{source}{line}: stage: unknown stage {stage!r}{hint} (stages: {', '.join(STAGES)})")
    if file_stage is not None and file_stage != stage:
        raise RecipeError(
            f"{source}:{lines.get(('stage',), 1)}: this is a `{file_stage}` recipe, not `{stage}`: "
            f"run `rlhf {file_stage} {source}`"
        )
    data["stage"] = stage

    from_set: set[Loc] = set()
    for dotted, value in (flags or {}).items():
        if value is None:
            continue
        loc = tuple(dotted.split("."))
        set_path(data, loc, value, f"--{dotted}")
        from_set.add(loc)
    for item in sets or []:
        loc, value = parse_set(item)
        set_path(data, loc, value, f"--set {item}")
        from_set.add(loc)

    cls = RECIPE_CLASSES[stage]
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        problems = format_errors(err, cls, lines, source, from_set)
        raise RecipeError(problems[0], details=problems[1:]) from None


def _refuse_manifest(path: Path, data: dict[str, Any]) -> None:
    """A run's run.json handed over as a recipe: its recipe is the recipe.yaml beside it."""
    if path.name == "run.json" or {"schema_version", "status", "recipe"} <= set(data):
        raise RecipeError(f"{path} is a run manifest (run.json), not a recipe: give its recipe, {path.parent / 'recipe.yaml'}")


def dump_recipe(recipe: BaseModel) -> str:
    """The resolved recipe as YAML, re-runnable as is."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
