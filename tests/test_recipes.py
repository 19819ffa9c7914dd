"""Recipes: shipped files validate, the schema is current, overrides, and one clear line per mistake."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlhf_cli.cli import app
from rlhf_cli.errors import DataError, RecipeError
from rlhf_cli.recipe import RECIPE_CLASSES, STAGES
from rlhf_cli.recipe_load import dump_recipe, load_recipe, parse_set
from rlhf_cli.starter import schema_text

REPO = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO / "recipes"
# recipes/accelerate/ holds accelerate launch configs, not recipes.
SHIPPED = sorted(
    p for p in RECIPES_DIR.rglob("*") if p.suffix in (".yaml", ".yml") and p.relative_to(RECIPES_DIR).parts[0] != "accelerate"
)
runner = CliRunner()

SFT = "stage: sft\nmodel:\n  path: some/model\ndata:\n  train: data/chat.jsonl\n"
PPO = "stage: ppo\npolicy:\n  path: runs/sft\nreward:\n  path: runs/rm\ndata:\n  train: data/prompts.jsonl\n"


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def line_of(path: Path, prefix: str) -> int:
    """1-based number of the first line that starts with prefix (indentation included)."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if line.startswith(prefix))


@pytest.fixture(autouse=True)
def no_stage_runs(monkeypatch):
    """Every recipe error must stop before a stage runs; if one slips through, fail instead of training."""

    def run(recipe, options):
        raise AssertionError(f"the {recipe.stage} stage ran: the recipe should have been rejected")

    for stage in STAGES:
        name = f"rlhf_cli.stages.{stage.replace('-', '_')}"
        module = types.ModuleType(name)
        module.run = run
        monkeypatch.setitem(sys.modules, name, module)


def rlhf(*args: str):
    result = runner.invoke(app, list(args))
    assert not isinstance(result.exception, AssertionError), result.exception
    return result


# --------------------------------------------------------------------------- shipped recipes and schema


def test_shipped_recipes_are_found():
    # A glob that finds nothing must fail, not quietly check zero files.
    assert len(SHIPPED) > 0, f"no *.yaml recipes under {RECIPES_DIR}"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(RECIPES_DIR)))
def test_shipped_recipe_validates(path, tmp_path):
    recipe = load_recipe(None, path)
    # The file name says which command takes it: sft-lora-0.5b.yaml is an sft recipe, rm-qlora-8b.yaml a train-rm one.
    named = "train-rm" if path.stem.startswith(("rm-", "train-rm")) else path.stem.split("-")[0]
    assert recipe.stage == named
    # What a run writes as recipe.yaml validates back to the same recipe: re-runnable as is.
    resolved = tmp_path / "recipe.yaml"
    resolved.write_text(dump_recipe(recipe))
    assert load_recipe(None, resolved) == recipe


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(RECIPES_DIR)))
def test_shipped_recipe_points_editors_at_the_schema(path):
    first = path.read_text().splitlines()[0]
    m = re.fullmatch(r"# yaml-language-server: \$schema=(\S+)", first)
    assert m, f"{path}: first line should be '# yaml-language-server: $schema=<relative path to schema.json>'"
    assert (path.parent / m.group(1)).resolve() == RECIPES_DIR / "schema.json"


def test_all_shipped_recipes_through_the_cli():
    result = rlhf("validate", *map(str, SHIPPED))
    assert result.exit_code == 0, result.stderr


def test_committed_schema_is_current():
    committed = (RECIPES_DIR / "schema.json").read_text()
    assert committed == schema_text(), "recipes/schema.json is stale: run `make schema` and commit it"
    json.loads(committed)


# --------------------------------------------------------------------------- unknown keys, types, syntax


@pytest.mark.parametrize(
    ("command", "added", "at", "says", "also"),
    [
        ("validate", "trian:\n  lr: 1.0e-4\n", "trian:", "trian: unknown key; did you mean train?", []),
        ("sft", "lora:\n  alpha: 16\n  rr: 8\n", "  rr:", "lora.rr: unknown key; did you mean lora.r?",
         ["valid keys in lora: r, alpha, dropout, target_modules"]),
        ("validate", "train:\n  batch_size: many\n", "  batch_size:", "train.batch_size:", ["'many'"]),
    ],
    ids=["unknown-key-did-you-mean", "unknown-nested-key-did-you-mean", "wrong-type"],
)
def test_a_bad_key_is_named_with_its_line(tmp_path, command, added, at, says, also):
    path = write(tmp_path, SFT + added)
    result = rlhf(command, str(path))
    assert result.exit_code == 2
    assert f"{path}:{line_of(path, at)}: {says}" in result.stderr
    for text in also:
        assert text in result.stderr


def test_every_unknown_key_is_reported(tmp_path):
    path = write(tmp_path, SFT + "trian: {}\nlora: {rr: 8}\n")
    result = rlhf("validate", str(path))
    assert result.exit_code == 2
    assert "did you mean train?" in result.stderr and "did you mean lora.r?" in result.stderr


@pytest.mark.parametrize(
    ("recipe", "added", "says"),
    [
        (SFT, "train:\n  learning_rate: 1.0e-4\n", "train.learning_rate: unknown key; rlhf calls it train.lr"),
        (SFT, "train:\n  num_train_epochs: 3\n", "train.num_train_epochs: unknown key; rlhf calls it train.epochs"),
        (SFT, "train:\n  per_device_train_batch_size: 4\n", "train.per_device_train_batch_size: unknown key; rlhf calls it train.batch_size"),
        (SFT, "train:\n  gradient_accumulation_steps: 4\n", "train.gradient_accumulation_steps: unknown key; rlhf calls it train.grad_accum"),
        (SFT, "lora:\n  rank: 8\n", "lora.rank: unknown key; rlhf calls it lora.r"),
        (SFT, "lora:\n  lora_alpha: 16\n", "lora.lora_alpha: unknown key; rlhf calls it lora.alpha"),
        (SFT, "lora:\n  lora_dropout: 0.1\n", "lora.lora_dropout: unknown key; rlhf calls it lora.dropout"),
        (SFT, "cutoff_len: 512\n", "cutoff_len: unknown key; rlhf calls it data.max_length"),
        (SFT, "learning_rate: 1.0e-4\n", "learning_rate: unknown key; rlhf calls it train.lr"),
        (PPO, "ppo:\n  total_episodes: 10\n", "ppo.total_episodes: unknown key; rlhf calls it ppo.iterations (rollouts of"),
        (PPO, "ppo:\n  per_device_train_batch_size: 4\n", "ppo.per_device_train_batch_size: unknown key; rlhf calls it ppo.mini_batch_size"),
    ],
    ids=["learning_rate", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps", "rank",
         "lora_alpha", "lora_dropout", "top-level-cutoff_len", "top-level-learning_rate", "total_episodes",
         "ppo-per_device_train_batch_size"],
)
def test_a_key_of_another_tool_says_what_rlhf_calls_it(tmp_path, recipe, added, says):
    path = write(tmp_path, recipe + added)
    result = rlhf("validate", str(path))
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    last = added.strip().splitlines()[-1]
    assert line.startswith(f"error: {path}:{line_of(path, last)}: {says}"), line


def test_a_renamed_key_given_with_set_says_what_rlhf_calls_it(tmp_path):
    result = rlhf("ppo", str(write(tmp_path, PPO)), "--set", "ppo.total_episodes=10")
    assert result.exit_code == 2, result.output
    assert "--set/flag: ppo.total_episodes: unknown key; rlhf calls it ppo.iterations" in result.stderr


def test_an_alias_is_offered_only_where_its_key_exists(tmp_path):
    # `rank` means lora.r; under train it is just unknown, with the ordinary list of valid keys.
    result = rlhf("validate", str(write(tmp_path, SFT + "train:\n  rank: 8\n")))
    assert result.exit_code == 2
    assert "train.rank: unknown key (valid keys in train:" in result.stderr and "rlhf calls it" not in result.stderr


def test_a_run_manifest_given_as_a_recipe_names_the_recipe_beside_it(tmp_path):
    run = tmp_path / "runs" / "sft"
    run.mkdir(parents=True)
    manifest = {"schema_version": 1, "stage": "sft", "status": "completed", "recipe": "recipe.yaml",
                "model": {"kind": "lora", "adapters": ["adapter"]}, "metrics": {}, "versions": {}}
    (run / "run.json").write_text(json.dumps(manifest))
    result = rlhf("validate", str(run / "run.json"))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {run / 'run.json'} is a run manifest (run.json), not a recipe: give its recipe, {run / 'recipe.yaml'}"]


def test_many_unknown_keys_are_one_line(tmp_path):
    # A config written for another tool: one line with the count, not one line per key.
    foreign = "".join(f"{k}: 1\n" for k in ("model_type", "optimizer", "flash_attention", "bf16", "val_set_size", "strict"))
    path = write(tmp_path, SFT + foreign)
    result = rlhf("validate", str(path))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {path}:{line_of(path, 'model_type')}: 6 unknown keys (model_type, optimizer, flash_attention and 3 more): "
        "is this a recipe for rlhf sft? `rlhf init sft` writes one (top-level keys: stage, model, quant, lora, data, train, "
        "output_dir)"]


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
@pytest.mark.parametrize("key", ["eval: data/held.jsonl", "eval_fraction: 0.1", "eval_max_samples: 8"])
def test_an_online_stage_refuses_held_out_prompts_it_would_never_use(tmp_path, stage, key):
    # ppo and grpo train on every prompt and hold none out; these keys were accepted and did nothing.
    path = write(tmp_path, PPO.replace("stage: ppo", f"stage: {stage}") + f"  {key}\n")
    result = rlhf(stage, str(path))
    assert result.exit_code == 2, result.output
    name = key.split(":")[0]
    assert f"{path}:{line_of(path, '  ' + name)}: data.{name}: unknown key" in result.stderr
    assert "valid keys in data: train, format, fields, split, max_samples, max_prompt_length, chat_template" in result.stderr


@pytest.mark.parametrize(("command", "right"), [("ppo", "sft"), ("train-rm", "sft")])
def test_recipe_for_another_stage_names_the_right_command(tmp_path, command, right):
    path = write(tmp_path, SFT)
    result = rlhf(command, str(path))
    assert result.exit_code == 2
    assert f"this is a `{right}` recipe, not `{command}`" in result.stderr
    assert f"rlhf {right} {path}" in result.stderr


def test_unknown_stage_gets_did_you_mean(tmp_path):
    path = write(tmp_path, "stage: ppoo\n")
    result = rlhf("validate", str(path))
    assert result.exit_code == 2
    assert f"{path}:1: stage: unknown stage 'ppoo'; did you mean ppo?" in result.stderr


def test_validate_needs_a_stage_key(tmp_path):
    result = rlhf("validate", str(write(tmp_path, "model: {path: m}\n")))
    assert result.exit_code == 2
    assert "no `stage:` key" in result.stderr


def test_yaml_syntax_error_gives_line_and_column(tmp_path):
    path = write(tmp_path, "stage: sft\nmodel:\n  path: x\n    dtype: bf16\n")
    result = rlhf("validate", str(path))
    assert result.exit_code == 2
    assert f"{path}:4:10: invalid YAML" in result.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"- stage: sft\n", "not a list"), (b"stage: sft\nmodel: {path: \xff}\n", "not UTF-8")],
    ids=["list", "latin-1"],
)
def test_file_that_is_not_a_recipe_exits_2(tmp_path, content, message):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(content)
    result = rlhf("validate", str(path))
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("content", "line", "message"),
    [
        (SFT + "train:\n  lr: 1.0e-3\n  lr: 1.0e-1\n", 8, "key 'lr' given twice (first on line 7)"),
        (SFT + "output_dir: runs/sft\noutput_dir: runs/other\n", 7, "key 'output_dir' given twice (first on line 6)"),
        (SFT + "output_dir: runs/\x01sft\n", 6, "control character #x01"),
        (SFT + "\x1b\n", 6, "control character #x1b"),
    ],
    ids=["duplicate-nested", "duplicate-top", "control-in-value", "control-alone"],
)
def test_duplicate_key_or_control_character_exits_2_naming_the_line(tmp_path, content, line, message):
    path = write(tmp_path, content)
    before = path.read_bytes()
    result = rlhf("validate", str(path))
    assert result.exit_code == 2, result.output
    [error] = result.stderr.strip().splitlines()
    assert error.startswith(f"error: {path}:{line}") and message in error, error
    assert path.read_bytes() == before


def test_duplicate_key_in_a_set_value_exits_2(tmp_path):
    with pytest.raises(RecipeError, match="given twice"):
        load_recipe("sft", write(tmp_path, SFT), sets=["lora={r: 4, r: 8}"])


def test_merge_keys_still_override_as_in_safe_load(tmp_path):
    path = write(tmp_path, "stage: sft\nmodel:\n  <<: {path: a, dtype: bf16}\n  path: b\ndata: {train: d.jsonl}\n")
    recipe = load_recipe("sft", path)
    assert (recipe.model.path, recipe.model.dtype) == ("b", "bf16")


def test_missing_recipe_file_exits_3(tmp_path):
    result = rlhf("sft", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 3
    assert "nope.yaml: recipe file not found" in result.stderr
    with pytest.raises(DataError):
        load_recipe("sft", tmp_path / "nope.yaml")


# --------------------------------------------------------------------------- overrides


def test_set_nested_list_and_float_values(tmp_path):
    path = write(tmp_path, SFT)
    recipe = load_recipe(
        "sft", path,
        sets=["train.lr=2e-4", "lora.target_modules=[q_proj,v_proj]", "lora.r=8", "data.fields={instruction: prompt}"],
    )
    # PyYAML reads 2e-4 as a string; the float field coerces it.
    assert recipe.train.lr == 2e-4 and isinstance(recipe.train.lr, float)
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.lora.r == 8
    assert recipe.data.fields == {"instruction": "prompt"}


def test_dates_are_read_as_the_text_written(tmp_path):
    # YAML 1.1 reads 2024-01-01 as a date, which no string field accepts: a dated run name was exit 2.
    path = write(tmp_path, SFT.replace("data/chat.jsonl", "data/2024-01-01") + "output_dir: runs/2024-01-01\n")
    assert load_recipe("sft", path).data.train == "data/2024-01-01"
    recipe = load_recipe("sft", path, sets=["output_dir=2024-01-01", "data.train=2024-01-01 10:00:00"])
    assert recipe.output_dir == "2024-01-01" and recipe.data.train == "2024-01-01 10:00:00"


def test_set_null_removes_a_section(tmp_path):
    recipe = load_recipe("sft", write(tmp_path, SFT + "lora:\n  r: 8\n"), sets=["lora=null"])
    assert recipe.lora is None


def test_set_creates_sections_the_file_lacks(tmp_path):
    recipe = load_recipe("sft", write(tmp_path, SFT), sets=["quant.bits=4"])
    assert recipe.quant.bits == 4


def test_precedence_defaults_file_flags_set(tmp_path):
    path = write(tmp_path, SFT + "train:\n  lr: 1.0e-3\n  seed: 7\n")
    assert load_recipe("sft", path).train.batch_size == 8  # schema default
    assert load_recipe("sft", path).train.lr == 1e-3  # file beats default
    flags = {"model.path": "flag/model", "data.train": None}  # None means "flag not given"
    recipe = load_recipe("sft", path, flags=flags)
    assert (recipe.model.path, recipe.data.train) == ("flag/model", "data/chat.jsonl")
    recipe = load_recipe("sft", path, flags=flags, sets=["model.path=set/model", "train.seed=1"])
    assert (recipe.model.path, recipe.train.seed, recipe.train.lr) == ("set/model", 1, 1e-3)


def test_later_set_wins(tmp_path):
    recipe = load_recipe("sft", write(tmp_path, SFT), sets=["train.lr=1e-4", "train.lr=3e-4"])
    assert recipe.train.lr == 3e-4


def test_recipe_without_file_from_flags():
    recipe = load_recipe("ppo", None, flags={"policy.path": "runs/sft", "reward.path": "runs/rm", "data.train": "p.jsonl"})
    assert recipe.reward.path == "runs/rm"


@pytest.mark.parametrize("item", ["train.lr", "=1", "train..lr=1", ".lr=1", "train.lr.=1"])
def test_bad_set_syntax(item):
    with pytest.raises(RecipeError, match="expected dotted.key=value"):
        parse_set(item)


def test_bad_set_syntax_exits_2(tmp_path):
    result = rlhf("sft", str(write(tmp_path, SFT)), "--set", "train.lr")
    assert result.exit_code == 2
    assert "--set 'train.lr': expected dotted.key=value" in result.stderr


@pytest.mark.parametrize("item", ["train.lr.x=1", "model.path.x=1"])
def test_set_below_a_scalar_exits_2(tmp_path, item):
    result = rlhf("sft", str(write(tmp_path, SFT + "train:\n  lr: 1.0e-3\n")), "--set", item)
    assert result.exit_code == 2
    assert "is a value, not a section" in result.stderr


def test_set_unknown_key_gets_did_you_mean(tmp_path):
    result = rlhf("sft", str(write(tmp_path, SFT)), "--set", "train.learning_rate=1e-4", "--set", "lora.rr=4")
    assert result.exit_code == 2
    assert "--set/flag: train.learning_rate: unknown key" in result.stderr
    assert "did you mean lora.r?" in result.stderr


def test_set_value_is_validated_like_the_file(tmp_path):
    result = rlhf("sft", str(write(tmp_path, SFT)), "--set", "train.lr=fast")
    assert result.exit_code == 2
    assert "--set/flag: train.lr:" in result.stderr


# --------------------------------------------------------------------------- cross-field rules


@pytest.mark.parametrize(
    ("stage", "text", "sets", "fix"),
    [
        ("sft", SFT, ["quant.bits=4", "lora=null"], "add a lora block or set quant.bits: null"),
        ("sft", SFT, ["train.epochs=null", "train.max_steps=null"], "set train.epochs (e.g. 1) or train.max_steps"),
        ("sft", SFT, ["data.format=preference"], "set data.format: auto"),
        ("ppo", PPO.replace("reward:\n  path: runs/rm\n", ""), [], "set reward.path, or pass --reward RUN"),
        ("ppo", PPO, ["reward.function=mypkg.mod:fn"], "give exactly one of reward.path"),
        ("ppo", PPO, ["ppo.rollout_batch_size=60"], "set ppo.rollout_batch_size to a multiple of it (e.g. 64)"),
        ("ppo", PPO, ["ppo.grad_accum=3"], "set ppo.grad_accum to a divisor of ppo.mini_batch_size"),
        ("ppo", PPO, ["generation.temperature=0"], "PPO must sample"),
        ("ppo", PPO, ["generation.top_p=0.9"], "leave top_p: 1.0 and top_k: 0"),
        ("ppo", PPO, ["generation.top_k=50"], "leave top_p: 1.0 and top_k: 0"),
        ("ppo", PPO, ["ppo.kl_target=6", "ppo.kl_estimator=abs"], "use kl_estimator: k1 or k3 with it"),
    ],
    ids=["qlora-without-lora", "no-length", "sft-format", "ppo-no-reward", "two-rewards", "rollout", "grad-accum", "greedy",
         "nucleus", "top-k", "kl-target-of-no-kl"],
)
def test_cross_field_rules_say_how_to_fix(tmp_path, stage, text, sets, fix):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as info:
        load_recipe(stage, path, sets=sets)
    assert fix in info.value.message
    result = rlhf(stage, str(path), *[arg for s in sets for arg in ("--set", s)])
    assert result.exit_code == 2
    assert fix in result.stderr


def test_section_rule_broken_by_set_says_so(tmp_path):
    path = write(tmp_path, SFT + "train:\n  epochs: 1\n")
    with pytest.raises(RecipeError) as info:
        load_recipe("sft", path, sets=["train.epochs=null"])
    assert info.value.message.startswith(f"{path}:{line_of(path, 'train:')} (after --set/flags): train:")


def test_missing_required_key_names_the_flag():
    with pytest.raises(RecipeError) as info:
        load_recipe("sft", None, flags={"data.train": "d.jsonl"})
    assert info.value.message == "command line: model: required key is missing (set model.path, or pass --model MODEL)"
    with pytest.raises(RecipeError) as info:
        load_recipe("ppo", None, flags={"reward.path": "runs/rm", "data.train": "p.jsonl"})
    assert "pass --policy RUN" in info.value.message


def test_setting_one_generation_key_keeps_the_stage_default_temperature():
    """eval answers greedily and compare samples at 1 by default, also when another generation key is set."""
    flags = {"model.path": "m", "metrics": ["length"], "data.prompts": "p.jsonl"}
    assert load_recipe("eval", None, flags=flags, sets=["generation.max_new_tokens=12"]).generation.temperature == 0.0
    compare = load_recipe("compare", None, flags={"model.path": "m", "prompts": "p", "for_labelling": True},
                          sets=["generation.max_new_tokens=12"])
    assert compare.generation.temperature == 1.0

def _laughs(levels: int) -> str:
    """The "billion laughs" file: each anchor is nine aliases of the one before, 9**levels values in all."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("where", ["top level", "a real key"])
def test_a_recipe_that_aliases_expand_to_billions_of_values_is_refused_at_once(tmp_path, where):
    text = _laughs(9) + SFT + ("lora: {target_modules: *l8}\n" if where == "a real key" else "")
    with pytest.raises(RecipeError) as e:
        load_recipe("sft", write(tmp_path, text))
    assert e.value.message == (f"{tmp_path / 'recipe.yaml'}:1:1: invalid YAML: the recipe expands to more than 100000 "
                               "values through anchors and aliases (*name): write the values out")


def test_aliases_of_a_few_values_still_read(tmp_path):
    text = "stage: sft\nmodel: &m {path: some/model}\ndata: {train: d.jsonl}\nlora: {target_modules: &t [q_proj, v_proj]}\n"
    assert load_recipe("sft", write(tmp_path, text)).lora.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("where", ["file", "--set"])
def test_values_nested_thousands_deep_are_one_line(tmp_path, where):
    deep = "[" * 20000 + "]" * 20000
    with pytest.raises(RecipeError, match="values are nested too deeply to read; nest them less"):
        if where == "file":
            load_recipe("sft", write(tmp_path, SFT + f"x: {deep}\n"))
        else:
            load_recipe("sft", write(tmp_path, SFT), sets=[f"train.lr={deep}"])


@pytest.mark.parametrize(("line", "shown"), [("lr: .inf", "inf"), ("max_grad_norm: .nan", "nan"), ("epochs: 1e400", "'1e400'")])
def test_infinite_or_nan_numbers_are_refused(tmp_path, line, shown):
    # YAML reads .inf and .nan as floats, and pydantic reads 1e400 as inf: none is a setting.
    key = line.split(":")[0]
    with pytest.raises(RecipeError) as e:
        load_recipe("sft", write(tmp_path, SFT + f"train:\n  {line}\n"))
    assert e.value.message == f"{tmp_path / 'recipe.yaml'}:7: train.{key}: Input should be a finite number (got {shown})"


def test_a_directory_given_as_the_recipe_says_so(tmp_path):
    result = rlhf("sft", str(tmp_path))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path} is a directory, not a recipe: give one of its YAML files (rlhf validate {tmp_path}/*.yaml)"]


@pytest.mark.parametrize("gate", ["--fail-over=reward_fn_gain_se=0.1", "--fail-under=reference_reward_fn=0"])
def test_a_gate_on_the_references_check_needs_win_rate(gate):
    # eval computes the reference's reward_fn only beside win_rate: the gate was accepted, and the eval
    # crashed at its end (KeyError), after all its work, without eval.json.
    args = ["eval", "--model", "m", "--prompts", "p.jsonl", "--metric", "reward_fn", "--reward-fn", "pkg.mod:fn", gate]
    result = rlhf(*args)
    assert result.exit_code == 2, result.output
    assert "compares with the reference's answers, which only win_rate makes: add --metric win_rate" in result.stderr
    from rlhf_cli.recipe import EvalRecipe

    name, value = gate.split("=", 1)[1].split("=")
    EvalRecipe(model={"path": "m"}, reference={"path": "r"}, reward={"path": "rm"}, reward_fn="pkg.mod:fn",
               metrics=["reward_fn", "win_rate"], data={"prompts": "p.jsonl"},
               **{gate.split("=")[0][2:].replace("-", "_"): {name: float(value)}})  # with win_rate it is accepted


def test_eval_without_a_metric_names_the_flag_and_the_metrics():
    result = rlhf("eval", "--model", "runs/sft")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: command line: metrics: required key is missing (set metrics, or pass --metric NAME, one of: "
        "perplexity, reward, win_rate, kl, rm_accuracy, length, reward_fn, best_of_n, dpo_accuracy)"]


@pytest.mark.parametrize("stage", STAGES)
def test_a_partly_given_section_keeps_the_stages_defaults(stage):
    """A section's defaults are its class's own, so giving one key of it keeps the others: DPO's lr stayed
    5e-6 only without a train block (TrainSpec(lr=5e-6) as the default, 2e-4 once any train key was set)."""
    from pydantic import BaseModel

    cls = RECIPE_CLASSES[stage]
    for name, field in cls.model_fields.items():
        if field.default_factory is None:
            continue
        default = field.default_factory()
        if isinstance(default, BaseModel):
            assert default == type(default)(), f"{stage}.{name}: its default differs from {type(default).__name__}()"


def test_a_train_block_without_lr_keeps_the_stages_learning_rate():
    flags = {"model.path": "m", "data.train": "p.jsonl"}
    for stage, lr in (("dpo", 5e-6), ("train-rm", 5e-5), ("pretrain", 5e-4), ("sft", 2e-4)):
        assert load_recipe(stage, None, flags=flags, sets=["train.max_steps=3"]).train.lr == lr, stage


@pytest.mark.parametrize("reward_fn", [True, False])
def test_eval_reward_without_a_reward_model_points_to_reward_fn_when_one_is_given(reward_fn):
    args = ["eval", "--model", "runs/sft", "--metric", "reward", "--prompts", "p.jsonl"]
    result = rlhf(*args, *(["--reward-fn", "mypkg.mod:fn"] if reward_fn else []))
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert "need a reward model: set reward.path (--reward RUN)" in line
    assert line.endswith("; to score with reward_fn mypkg.mod:fn, use --metric reward_fn") is reward_fn, line


@pytest.mark.parametrize(
    ("sets", "says"),
    [
        # Llama's attention repeats each key/value head num_heads / num_kv_heads times: 4 / 3 failed in the
        # first forward, with a traceback, after the run directory was claimed.
        (["model.config.num_kv_heads=3"], "num_heads 4 is not a multiple of num_kv_heads 3"),
        # head_dim 15: transformers refused the config with a traceback when the model was built.
        (["model.config.hidden_size=60"], "head_dim 15 (hidden_size / num_heads) is odd"),
    ],
)
def test_a_scratch_model_shape_the_attention_cannot_run_is_a_recipe_error(sets, says):
    base = ["model.path=tiny", "model.init=from_config", "model.tokenizer=tok", "lora=null", "data.train=t.jsonl",
            "model.config={hidden_size: 64, num_layers: 2, num_heads: 4, num_kv_heads: 2}"]
    load_recipe("pretrain", None, sets=base)
    with pytest.raises(RecipeError, match=re.escape(says)):
        load_recipe("pretrain", None, sets=[*base, *sets])
