"""Experiment trackers (`report_to`) for the loops that are not transformers' Trainer (ppo, grpo).

    check_installed(recipe.grpo.report_to, "grpo.report_to")      # at the edge, before anything loads
    with Trackers(["tensorboard"], run.path, first_step=1) as trackers:
        trackers.log({"score_mean": 0.4, "kl": 1.2}, step=1)

Everything stays inside the run directory and offline, as the Trainer stages keep it: tensorboard event
files in RUN/tensorboard (where Trainer writes them too), wandb in offline mode under RUN/wandb, mlflow in
a local file store RUN/mlruns. metrics.jsonl stays the record; trackers are views of it. Numbers only:
a tracker gets the record's int and float values.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from types import TracebackType
from typing import Any

from rlhf_cli.errors import RecipeError

# The module(s) that make each tracker usable: tensorboard writes through torch.utils.tensorboard, which
# needs the tensorboard package; tensorboardX is the other writer Trainer accepts.
MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}


def check_installed(names: list[str], key: str) -> None:
    """A tracker the recipe names but this environment lacks is a recipe error (exit 2) with the fix."""
    for name in names:
        if not any(importlib.util.find_spec(m) for m in MODULES[name]):
            raise RecipeError(f"{key} lists {name}, which is not installed: pip install {name}, or remove it")


def point_trainer_trackers(names: list[str], run_path: Path) -> None:
    """Where transformers' Trainer callbacks write: they read only the environment, and left alone wandb
    syncs to its servers and mlflow writes into the working directory. Set here to what Trackers uses."""
    run_path = Path(run_path)
    if "tensorboard" in names:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_path / "tensorboard")
    if "wandb" in names:
        os.environ["WANDB_MODE"] = "offline"
        os.environ["WANDB_DIR"] = str(run_path)
    if "mlflow" in names:
        os.environ["MLFLOW_TRACKING_URI"] = (run_path / "mlruns").resolve().as_uri()


class Trackers:
    """The trackers of one run, opened on entry and closed on exit; `names` empty = none (other ranks)."""

    def __init__(self, names: list[str], run_path: Path, first_step: int = 1, config: dict[str, Any] | None = None):
        self.names, self.run_path, self.first_step, self.config = list(names), Path(run_path), first_step, config or {}
        self._writers: list[Any] = []

    def __enter__(self) -> Trackers:
        for name in self.names:
            self._writers.append(getattr(self, f"_open_{name}")())
        return self

    def log(self, record: dict[str, Any], step: int) -> None:
        numbers = {k: float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        for name, writer in zip(self.names, self._writers):
            if name == "tensorboard":
                for k, v in numbers.items():
                    writer.add_scalar(k, v, step)
            elif name == "wandb":
                writer.log(numbers, step=step)
            else:
                writer.log_metrics(numbers, step=step)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for name, writer in zip(self.names, self._writers):
            if name == "tensorboard":
                writer.close()
            elif name == "wandb":
                writer.finish(exit_code=0 if kind is None else 1)
            else:
                writer.end_run("FINISHED" if kind is None else "FAILED")
        self._writers = []

    def _open_tensorboard(self) -> Any:
        if importlib.util.find_spec("tensorboard"):
            from torch.utils.tensorboard import SummaryWriter
        else:
            from tensorboardX import SummaryWriter
        # purge_step: a resumed run re-runs the iterations after its checkpoint; TensorBoard drops the
        # events an interrupted earlier writer logged from that step on, so each curve has one value per step.
        purge = self.first_step if self.first_step > 1 else None
        return SummaryWriter(log_dir=str(self.run_path / "tensorboard"), purge_step=purge)

    def _open_wandb(self) -> Any:
        import wandb

        return wandb.init(mode="offline", dir=str(self.run_path), name=self.run_path.name, config=self.config)

    def _open_mlflow(self) -> Any:
        import mlflow

        mlflow.set_tracking_uri((self.run_path / "mlruns").resolve().as_uri())
        mlflow.start_run(run_name=self.run_path.name)
        return mlflow
