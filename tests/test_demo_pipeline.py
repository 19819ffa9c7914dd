"""The demo pipeline's command lines (each `rlhf` call recorded, nothing run): --seed and the DPO branch."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _commands(tmp_path, monkeypatch, seed):
    from rlhf_cli.demo import pipeline

    calls: list[tuple[str, ...]] = []
    monkeypatch.chdir(tmp_path)  # run() moves into the work folder; restored after the test
    monkeypatch.setattr(pipeline, "_rlhf", lambda *args, **_: calls.append(args) or 0.0)
    monkeypatch.setattr(pipeline, "prepare_tiny", lambda work: None)
    monkeypatch.setattr(pipeline, "round_two", lambda recipes, force: {})
    pipeline.run("tiny", ROOT / "recipes/demo-tiny", tmp_path / "work", seed=seed)
    return calls


def _pairs(args: tuple[str, ...]) -> list[tuple[str, str]]:
    return list(zip(args, args[1:]))


def test_seed_reaches_every_training_stage_and_eval(tmp_path, monkeypatch):
    calls = _commands(tmp_path, monkeypatch, seed=3)
    stages = {c[0]: c for c in calls if c[0] in ("pretrain", "sft", "train-rm", "ppo", "dpo")}
    assert list(stages) == ["pretrain", "sft", "train-rm", "ppo", "dpo"]
    for stage, args in stages.items():
        assert ("--set", f"{'ppo' if stage == 'ppo' else 'train'}.seed=3") in _pairs(args), args
    evals = [c for c in calls if c[0] == "eval"]
    assert [Path(c[1]).name for c in evals] == ["eval.yaml", "eval-dpo.yaml"]
    assert all(("--seed", "3") in _pairs(c) for c in evals)
    (report,) = [c for c in calls if c[0] == "report"]
    assert {"runs/ppo", "runs/dpo", "runs/eval", "runs/eval_dpo"} <= set(report)


def test_without_a_seed_the_recipes_keep_their_own(tmp_path, monkeypatch):
    calls = _commands(tmp_path, monkeypatch, seed=None)
    assert not any(a.startswith(("train.seed", "ppo.seed")) for c in calls for a in c)
    assert not any(c[0] == "eval" and "--seed" in c for c in calls)


def test_a_demo_run_again_replaces_its_evals(tmp_path, monkeypatch):
    """eval refuses an output dir holding an earlier eval.json without --overwrite; the demo's evals are
    made again from the runs as they are each time."""
    from rlhf_cli.demo import pipeline

    round_two = pipeline.round_two  # _commands leaves it out
    calls = _commands(tmp_path, monkeypatch, seed=None)
    monkeypatch.setattr(pipeline, "_has_pairs", lambda path: True)
    monkeypatch.setattr(pipeline, "_rlhf", lambda *args, **_: calls.append(args) or 0.0)
    round_two(ROOT / "recipes/demo-tiny", force=False)
    evals = [c for c in calls if c[0] == "eval"]
    assert len(evals) == 4 and all("--overwrite" in c for c in evals), evals


TRAINED = ("pretrain", "sft", "train-rm", "ppo", "dpo")


def _train_instantly(calls: list[tuple[str, ...]]):
    """A stand-in for `rlhf STAGE RECIPE [--set ...] [--overwrite]` that claims and completes the run as the
    stage would (recipe, run_id, the runs it reads), without training: what the pipeline decides from."""
    from types import SimpleNamespace

    from rlhf_cli.recipe_load import load_recipe
    from rlhf_cli.runs import prepare_run

    def rlhf(*args: str, **_) -> float:
        calls.append(args)
        if args[0] not in TRAINED:
            return 0.0
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        recipe = load_recipe(args[0], Path(args[1]), sets=sets).model_dump(mode="json")
        read = [recipe[k]["path"] for k in ("model", "policy", "reward")
                if isinstance(recipe.get(k), dict) and Path(str(recipe[k].get("path")), "run.json").is_file()]
        prepare_run(recipe["output_dir"], args[0], "", recipe, overwrite="--overwrite" in args,
                    parent_run=read[0] if read else None,
                    inputs=[SimpleNamespace(run_dir=p, local_paths=()) for p in read]).finish("completed")
        return 0.0

    return rlhf


@pytest.mark.parametrize("kind", ["tiny", "real"])
def test_a_second_run_trains_only_what_changed_and_what_depends_on_it(tmp_path, monkeypatch, kind):
    import shutil

    from rlhf_cli.demo import pipeline

    recipes = tmp_path / "recipes"
    shutil.copytree(ROOT / ("recipes/demo-tiny" if kind == "tiny" else "recipes/demo"), recipes)
    calls: list[tuple[str, ...]] = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline, "_rlhf", _train_instantly(calls))
    monkeypatch.setattr(pipeline, f"prepare_{kind}", lambda work: None)
    monkeypatch.setattr(pipeline, "round_two", lambda recipes, force: {})

    def trained(**kw) -> dict[str, bool]:
        calls.clear()
        pipeline.run(kind, recipes, tmp_path / "work", **kw)
        return {c[0]: "--overwrite" in c for c in calls if c[0] in TRAINED}

    assert trained() == dict.fromkeys(TRAINED, False)  # a first run trains everything
    assert trained() == {}  # nothing changed: nothing is trained again
    # train-rm's learning rate changed: it and ppo, which reads it, are trained again; sft and dpo are as they were.
    rm_yaml = recipes / "train-rm.yaml"
    rm_yaml.write_text(re.sub(r"\n  lr: .*\n", "\n  lr: 1.234e-3\n", rm_yaml.read_text(), count=1))
    assert trained() == {"train-rm": True, "ppo": True}
    assert trained() == {}
    # Another seed is another run of every stage.
    assert trained(seed=5) == dict.fromkeys(TRAINED, True)
    assert trained(seed=5) == {}


def test_the_plan_of_a_stage_says_why(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from rlhf_cli.demo.pipeline import plan_stage
    from rlhf_cli.recipe_load import load_recipe
    from rlhf_cli.runs import prepare_run

    monkeypatch.chdir(tmp_path)
    sft_yaml, rm_yaml = ROOT / "recipes/demo-tiny/sft.yaml", ROOT / "recipes/demo-tiny/train-rm.yaml"
    assert plan_stage("sft", sft_yaml, Path("runs/sft"), []) == ("run", "no run in runs/sft yet")

    def claim(stage, recipe, sets=(), **kw):
        as_json = load_recipe(stage, recipe, sets=list(sets)).model_dump(mode="json")
        return prepare_run(as_json["output_dir"], stage, "", as_json, **kw)

    claim("sft", sft_yaml).finish("interrupted")
    assert plan_stage("sft", sft_yaml, Path("runs/sft"), ["train.max_steps=500"]) == (
        "run", "runs/sft is interrupted: it continues from its last checkpoint")  # lengthening resumes
    assert plan_stage("sft", sft_yaml, Path("runs/sft"), ["train.lr=0.5"]) == ("again", "the recipe changed (train.lr)")

    claim("sft", sft_yaml, overwrite=True).finish("completed")
    assert plan_stage("sft", sft_yaml, Path("runs/sft"), []) == ("skip", "runs/sft is complete and up to date")
    assert plan_stage("sft", sft_yaml, Path("runs/sft"), ["train.max_steps=500"]) == (
        "again", "the recipe changed (train.max_steps)")  # a completed run is the recipe's in every key

    claim("train-rm", rm_yaml, parent_run="runs/sft", inputs=[SimpleNamespace(run_dir="runs/sft", local_paths=())]
          ).finish("completed")
    assert plan_stage("train-rm", rm_yaml, Path("runs/rm"), [])[0] == "skip"
    claim("sft", sft_yaml, overwrite=True).finish("completed")
    assert plan_stage("train-rm", rm_yaml, Path("runs/rm"), []) == (
        "again", f"{Path('runs/sft').resolve()} was trained again (finished {json.loads(Path('runs/sft/run.json').read_text())['finished_at']})")


STEP = """
import pathlib, signal, sys, time
def save_and_stop(*_):
    time.sleep(1.0)  # a checkpoint being written
    pathlib.Path(sys.argv[1]).write_text("saved")
    sys.exit(130)
signal.signal(signal.SIGINT, save_and_stop)
pathlib.Path(sys.argv[2]).write_text("started")
time.sleep(60)
"""


def test_ctrl_c_lets_the_running_step_save_its_checkpoint(tmp_path):
    """Ctrl-C reaches the whole process group: the pipeline waits for the step it runs to save and exit 130,
    and stops with that code, rather than killing the step mid-save."""
    import os
    import signal
    import subprocess
    import sys
    import time

    saved, started = tmp_path / "saved", tmp_path / "started"
    (tmp_path / "step.py").write_text(STEP)
    # Stands in for `python -m rlhf_cli ...`: the step the pipeline runs.
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} {tmp_path / 'step.py'} {saved} {started}\n")
    fake.chmod(0o755)
    parent = (f"import sys; from rlhf_cli.demo import pipeline; sys.executable = {str(fake)!r}; "
              "pipeline._rlhf('sft', 'recipe.yaml')")
    proc = subprocess.Popen([sys.executable, "-c", parent], cwd=ROOT, start_new_session=True,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
    _, err = proc.communicate(timeout=30)
    assert saved.read_text() == "saved", err
    assert proc.returncode == 130, err
    assert "step failed (exit 130): rlhf sft recipe.yaml" in err


def test_round_two_trains_its_reward_model_anew_over_an_interrupted_one(tmp_path, monkeypatch):
    """An interrupted round-2 reward run was trained from the round-1 model (and answers) of its time: when
    round 1 was trained again since, the demo's command must start it over, not resume it (refused)."""
    from rlhf_cli.demo import pipeline
    from rlhf_cli.runs import prepare_run

    monkeypatch.chdir(tmp_path)

    def claim(out: str, **kw):
        return prepare_run(out, "train-rm", "", {"stage": "train-rm", "output_dir": out}, **kw)

    claim("runs/rm").finish("completed")
    rm2 = claim("runs/rm2", parent_run="runs/rm")
    (tmp_path / "runs/rm2/checkpoints/checkpoint-30").mkdir(parents=True)
    (tmp_path / "runs/rm2/checkpoints/checkpoint-30/COMPLETE").touch()
    rm2.finish("interrupted")
    claim("runs/rm", overwrite=True).finish("completed")  # round 1 trained again
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(pipeline, "_rlhf", lambda *args, **_: calls.append(args) or 0.0)
    monkeypatch.setattr(pipeline, "_has_pairs", lambda ranked: True)
    pipeline.round_two(ROOT / "recipes/demo-tiny", force=False)
    (cmd,) = [c for c in calls if c[0] == "train-rm"]
    resume = cmd[cmd.index("--resume") + 1] if "--resume" in cmd else "auto"
    run = claim("runs/rm2", parent_run="runs/rm", resume=resume, overwrite="--overwrite" in cmd)
    assert run.resume_from is None


def test_round_two_sees_pairs_only_where_two_answers_got_different_scores(tmp_path):
    from rlhf_cli.demo.pipeline import _has_pairs

    ranked = tmp_path / "round2.jsonl"

    def write(*rows):
        ranked.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))

    # An answer holding U+2028 (compare keeps it raw) is one line, not two halves of invalid JSON.
    write({"prompt": "p", "responses": ["a\u2028b", "c"], "scores": [0.5, 0.5]},
          {"prompt": "q", "responses": ["d", "e"], "scores": [0.1, 0.2]})
    assert _has_pairs(ranked)
    # A score the judge could not give (null) pairs with no other: one valid score per prompt is no pair.
    write({"prompt": "p", "responses": ["a", "b"], "scores": [0.5, None]},
          {"prompt": "q", "responses": ["c", "d"], "scores": [None, None]})
    assert not _has_pairs(ranked)
