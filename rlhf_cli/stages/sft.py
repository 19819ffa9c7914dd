"""rlhf sft."""

from __future__ import annotations

from rlhf_cli.errors import NotImplementedStage
from rlhf_cli.result import RunOptions, RunResult


def run(recipe, options: RunOptions) -> RunResult:
    raise NotImplementedStage("rlhf sft is not implemented yet")
