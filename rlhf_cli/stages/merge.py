"""rlhf merge."""

from __future__ import annotations

from rlhf_cli.errors import NotImplementedStage


def merge(*args, **kwargs):
    raise NotImplementedStage("rlhf merge is not implemented yet")
