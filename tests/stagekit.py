"""Helpers for stage tests: run the shipped tiny recipes through the CLI, in this process, and read runs.

The recipes in recipes/tiny/ name `.assets/tiny/...`; `workdir` makes those paths point at the session's
tiny fixture, so the tests train exactly what `rlhf sft recipes/tiny/sft.yaml` trains.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from rlhf_cli.cli import app

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPES = REPO / "recipes" / "tiny"
runner = CliRunner()


@pytest.fixture
def workdir(tmp_path, monkeypatch, tiny):
    """A working directory where .assets/tiny is the fixture folder; one torch thread (tiny ops on shared
    cores spend more time synchronising threads than computing)."""
    import torch

    (tmp_path / ".assets").mkdir()
    (tmp_path / ".assets" / "tiny").symlink_to(Path(tiny["model"]).parent, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


class Outcome:
    def __init__(self, result: Any):
        self.code = result.exit_code
        self.stderr = result.stderr
        self.exception = result.exception
        self.json = json.loads(result.stdout) if result.exit_code == 0 and result.stdout.strip() else None

    def __repr__(self) -> str:
        return f"exit {self.code}: {self.stderr[-2000:]}"


def rlhf(stage: str, recipe: str | Path | None, *args: str) -> Outcome:
    """`rlhf STAGE RECIPE ARGS --json`, with recipe names resolved against recipes/tiny/."""
    argv = [stage]
    if recipe is not None:
        argv.append(str(TINY_RECIPES / recipe if isinstance(recipe, str) and "/" not in recipe else recipe))
    result = runner.invoke(app, [*argv, *args, "--json"])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Outcome(result)


def manifest(run: Path) -> dict[str, Any]:
    return json.loads((Path(run) / "run.json").read_text())


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_losses(run: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in metrics(run) if "loss" in m]
