"""What a stage hands back to the CLI (which alone prints it)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class RunOptions:
    """Command-line choices that are not part of the recipe itself."""

    resume: str = "auto"  # auto | never | PATH of a checkpoint
    overwrite: bool = False
    dry_run: bool = False


@dataclass
class RunResult:
    stage: str
    status: Literal["completed", "dry-run", "failed", "interrupted"]
    output_dir: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    # Human-oriented extras (dry-run plan, rendered sample, side-by-side answers): shown on stderr,
    # included in --json.
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """As JSON data; an undefined number (NaN, inf: a correlation over answers of one length) is null,
        since strict JSON parsers reject NaN."""
        return finite(asdict(self))


def finite(value: Any) -> Any:
    """JSON data with every NaN and inf as null: what rlhf writes as JSON (stdout, eval.json) stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def jsonl_line(record: dict[str, Any]) -> bytes:
    """One JSONL line as rlhf writes it, to stdout or a file: UTF-8 whatever the locale (a latin-1 or cp1252
    stdout cannot encode an emoji in an answer), and strict JSON, a NaN score null."""
    return (json.dumps(finite(record), ensure_ascii=False) + "\n").encode("utf-8")
