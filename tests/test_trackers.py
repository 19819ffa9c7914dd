"""report_to trackers of the ppo/grpo loops: what each tracker is called with, where it writes, and the
error for one that is not installed. wandb and mlflow are stood in for by recording modules (neither is a
dependency); tensorboard writes real event files (tests/test_grpo_stage.py reads them back)."""

from __future__ import annotations

import sys
import types

import pytest

from rlhf_cli.core.trackers import Trackers, check_installed
from rlhf_cli.errors import RecipeError


class Recorder:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return self
        return call


def test_wandb_runs_offline_and_mlflow_in_a_file_store_inside_the_run(tmp_path, monkeypatch):
    wandb, mlflow = Recorder(), Recorder()
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=wandb.init))
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    with Trackers(["wandb", "mlflow"], tmp_path / "run", config={"stage": "grpo"}) as trackers:
        trackers.log({"step": 1, "score_mean": 0.5, "kl": float("nan"), "note": "text", "done": True}, step=1)
    init = wandb.calls[0]
    assert init[0] == "init" and init[2]["mode"] == "offline" and init[2]["dir"] == str(tmp_path / "run")
    assert ("log", ({"score_mean": 0.5},), {"step": 1}) in wandb.calls  # numbers only, finite only
    assert wandb.calls[-1] == ("finish", (), {"exit_code": 0})
    assert mlflow.calls[0] == ("set_tracking_uri", ((tmp_path / "run" / "mlruns").resolve().as_uri(),), {})
    assert ("log_metrics", ({"score_mean": 0.5},), {"step": 1}) in mlflow.calls
    assert mlflow.calls[-1] == ("end_run", ("FINISHED",), {})


def test_a_failed_run_is_marked_failed_in_the_tracker(tmp_path, monkeypatch):
    mlflow = Recorder()
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    with pytest.raises(ValueError), Trackers(["mlflow"], tmp_path):
        raise ValueError("boom")
    assert mlflow.calls[-1] == ("end_run", ("FAILED",), {})


def test_a_tracker_that_is_not_installed_names_the_key_and_the_fix(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(RecipeError, match=r"^ppo.report_to lists wandb, which is not installed: pip install wandb, or remove it$"):
        check_installed(["wandb"], "ppo.report_to")
    check_installed([], "ppo.report_to")


def test_the_trainer_stages_keep_wandb_offline_and_mlflow_inside_the_run(tmp_path, monkeypatch):
    # transformers' WandbCallback calls wandb.init(project=...) and MLflowCallback reads MLFLOW_TRACKING_URI:
    # with nothing in the environment wandb synced to its servers and mlflow wrote ./mlruns.
    import importlib.util

    import torch

    from rlhf_cli.core.device import Precision
    from rlhf_cli.core.trainer import training_args
    from rlhf_cli.recipe import TrainSpec

    for name in ("WANDB_MODE", "WANDB_DIR", "MLFLOW_TRACKING_URI", "TENSORBOARD_LOGGING_DIR"):
        monkeypatch.delenv(name, raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in ("wandb", "mlflow") else real(name, *a))
    run = tmp_path / "run"
    training_args(TrainSpec(max_steps=1, report_to=["wandb", "mlflow", "tensorboard"]), run / "checkpoints",
                  precision=Precision(torch.float32, None, "fp32"), has_eval=False)
    import os

    assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_DIR"] == str(run)
    assert os.environ["MLFLOW_TRACKING_URI"] == (run / "mlruns").resolve().as_uri()
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(run / "tensorboard")
