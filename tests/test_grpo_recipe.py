"""grpo recipes and command line: mistakes exit 2 with the fix (did-you-mean for unknown keys), flags route,
and what the method object derives from a recipe. No model is loaded here."""

from __future__ import annotations

import sys
import types

import pytest
from typer.testing import CliRunner

from rlhf_cli.cli import app
from rlhf_cli.recipe import STAGES
from rlhf_cli.result import RunResult

FLAGS = ["--policy", "runs/sft", "--reward", "mypkg.rewards:exact", "--prompts", "p.jsonl"]


@pytest.fixture
def calls(monkeypatch):
    """The grpo stage replaced by one that records the recipe it was given (other stages refuse to run)."""
    seen = []

    def run(recipe, options):
        seen.append(recipe)
        return RunResult(stage=recipe.stage, status="completed", output_dir=recipe.output_dir)

    def refuse(recipe, options):
        raise AssertionError(f"the {recipe.stage} stage ran")

    for stage in STAGES:
        name = f"rlhf_cli.stages.{stage.replace('-', '_')}"
        module = types.ModuleType(name)
        module.run = run if stage == "grpo" else refuse
        monkeypatch.setitem(sys.modules, name, module)
    return seen


def rlhf(*args: str):
    return CliRunner().invoke(app, list(args))


def test_flags_make_a_recipe_file_optional_and_route_the_reward(calls):
    assert rlhf("grpo", *FLAGS).exit_code == 0
    recipe = calls[-1]
    assert recipe.stage == "grpo" and recipe.reward.function == "mypkg.rewards:exact" and recipe.reward.path is None
    assert recipe.grpo.group_size == 8 and recipe.grpo.advantage == "grpo" and recipe.generation.temperature == 1.0
    assert rlhf("grpo", *FLAGS[:2], "--reward", "runs/rm", *FLAGS[4:]).exit_code == 0
    assert calls[-1].reward.path == "runs/rm" and calls[-1].reward.function is None


def test_the_reward_flag_replaces_the_files_reward_source(calls, tmp_path):
    path = tmp_path / "grpo.yaml"
    path.write_text("stage: grpo\npolicy: {path: runs/sft}\nreward: {path: runs/rm}\ndata: {train: p.jsonl}\n")
    assert rlhf("grpo", str(path), "--reward", "mypkg.rewards:exact").exit_code == 0
    assert calls[-1].reward.function == "mypkg.rewards:exact" and calls[-1].reward.path is None


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["grpo.advantge=rloo"], "grpo.advantge: unknown key; did you mean grpo.advantage?"),
        (["grpo.groupsize=4"], "did you mean grpo.group_size?"),
        (["grpo.vf_coef=0.1"], "grpo.vf_coef: unknown key"),  # a critic's setting: GRPO has no critic
        (["grpo.advantage=ppo"], "grpo.advantage"),
        (["grpo.group_size=1"], "set grpo.group_size to 2 or more (8 is usual), or grpo.advantage: reinforce_pp"),
        (["grpo.rollout_batch_size=60", "grpo.mini_batch_size=12", "grpo.group_size=8"],
         "it counts answers, group_size per prompt; set grpo.rollout_batch_size to e.g. 64"),
        (["grpo.rollout_batch_size=60"], "set grpo.rollout_batch_size to a multiple of it (e.g. 64)"),
        (["grpo.kl_coef=-1"], "grpo.kl_coef"),
        (["grpo.kl_in=critic"], "grpo.kl_in"),
        (["grpo.report_to=[neptune]"], "grpo.report_to"),
        (["generation.temperature=0"], "GRPO must sample its rollouts"),
        (["generation.top_p=0.95"], "GRPO scores its answers with the whole distribution"),
    ],
    ids=["typo", "typo-2", "critic-key", "estimator", "group-of-one", "groups", "minibatches", "negative-kl",
         "kl-in", "tracker", "greedy", "nucleus"],
)
def test_recipe_mistakes_exit_2_with_the_fix(calls, sets, message):
    result = rlhf("grpo", *FLAGS, *[a for s in sets for a in ("--set", s)])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert calls == []


def test_a_missing_policy_names_the_flag(calls):
    result = rlhf("grpo", *FLAGS[2:])
    assert result.exit_code == 2
    assert "policy: required key is missing (set policy.path, or pass --policy RUN)" in result.stderr


def test_an_unknown_stage_name_gets_a_did_you_mean(calls, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("stage: grpoo\npolicy: {path: runs/sft}\n")
    result = rlhf("validate", str(path))
    assert result.exit_code == 2 and "did you mean grpo?" in result.stderr


def test_the_method_puts_the_kl_where_each_estimators_paper_does():
    from rlhf_cli.ppo.method import method_of
    from rlhf_cli.recipe import GRPORecipe, PPORecipe

    def grpo(**spec):
        return method_of(GRPORecipe(policy={"path": "m"}, reward={"function": "a.b:c"}, data={"train": "p"}, grpo=spec))

    assert (grpo().kl_in, grpo().kl_kind, grpo().aggregation) == ("loss", "k3", "sequence")
    assert (grpo(advantage="dr_grpo").kl_in, grpo(advantage="dr_grpo").aggregation) == ("loss", "budget")
    assert (grpo(advantage="rloo").kl_in, grpo(advantage="rloo").kl_kind) == ("reward", "k1")
    assert grpo(advantage="reinforce_pp", kl_in="loss").kl_kind == "k3"
    assert grpo(kl_estimator="k2").kl_kind == "k2"
    assert not grpo().critic and grpo().reference and not grpo(kl_coef=0).reference
    assert grpo(rollout_batch_size=64, group_size=8).prompts_per_rollout == 8
    ppo = method_of(PPORecipe(policy={"path": "m"}, reward={"function": "a.b:c"}, data={"train": "p"}, ppo={"kl_coef": 0}))
    assert ppo.critic and ppo.reference and ppo.group_size == 1 and ppo.aggregation == "token"
