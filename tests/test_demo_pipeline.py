"""The demo pipeline's command lines (each `rlhf` call recorded, nothing run): --seed and the DPO branch."""

from __future__ import annotations

from pathlib import Path

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
