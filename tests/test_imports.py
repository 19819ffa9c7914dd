"""Import boundaries: `rlhf --help`, `validate` and `schema` answer without torch, so they
are instant.

Each check runs in a fresh interpreter, because this test process may already hold torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes")

# Runs the CLI in-process as the `rlhf` script would, then reports which heavy packages got imported.
PROBE = """
import json, runpy, sys
report, args = sys.argv[1], sys.argv[2:]
code = None
if args != ["--import-only"]:
    sys.argv = ["rlhf", *args]
    try:
        runpy.run_module("rlhf_cli", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code
else:
    import rlhf_cli.cli  # noqa: F401
heavy = sorted({name.split(".")[0] for name in sys.modules} & set(HEAVY))
with open(report, "w") as f:
    json.dump({"code": code, "heavy": heavy}, f)
""".replace("HEAVY", repr(HEAVY))


def _probe(tmp_path: Path, *args: str) -> dict:
    report = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(report), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(report.read_text())


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "sft.yaml"
    path.write_text("stage: sft\nmodel: {path: some/model}\ndata: {train: data/chat.jsonl}\n")
    return path


def test_importing_cli_imports_no_heavy_package(tmp_path):
    assert _probe(tmp_path, "--import-only")["heavy"] == []


@pytest.mark.parametrize(
    "args",
    [["--help"], ["sft", "--help"], ["validate", "RECIPE"], ["schema"]],
    ids=["help", "sft-help", "validate", "schema"],
)
def test_light_commands_import_no_heavy_package(tmp_path, recipe, args):
    args = [str(recipe) if a == "RECIPE" else a for a in args]
    result = _probe(tmp_path, *args)
    assert result["code"] in (0, None), result
    assert result["heavy"] == [], f"rlhf {' '.join(args)} imported {result['heavy']}"
