"""rlhf report."""

from __future__ import annotations

from rlhf_cli.errors import NotImplementedStage


def report(*args, **kwargs):
    raise NotImplementedStage("rlhf report is not implemented yet")
