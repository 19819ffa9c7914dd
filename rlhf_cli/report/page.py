"""The page of `rlhf report`: report.html rendered from report.html.j2 with jinja2, autoescape on.

The template holds the markup and the CSS; this module holds the filters it formats numbers, durations
and answers with. What the page shows is decided in report/collect.py (rows, checks, side-by-side
tables) and report/plots.py (the figures); nothing here reads a file other than the template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2

from rlhf_cli.report.collect import EvalResult, Run, flatten

TEMPLATE = "report.html.j2"
MAX_RESPONSE_CHARS = 1500


def render(summary: dict[str, Any], runs: list[Run], evals: list[EvalResult],
           plots: dict[str, list[tuple[str, str]]], tables: list[dict[str, Any]]) -> str:
    """report.html: summary.json's content, plus each run's figures ([(file name, caption)] by run name)."""
    return _environment().get_template(TEMPLATE).render(summary=summary, runs=runs, evals=evals, plots=plots,
                                                        tables=tables)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent),
        autoescape=True,  # answers are model output and prompts user data: never markup
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(fmt=_fmt, fmt_or_dash=_fmt_or_dash, duration=_fmt_duration, flatten=flatten,
                       basename=lambda path: Path(path).name, clip=_clip, extras=_extras,
                       pretty_json=lambda value: json.dumps(value, indent=2, default=str))
    return env


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _fmt_or_dash(value: Any) -> str:
    return "–" if value is None else _fmt(value)


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, s = divmod(int(round(seconds)), 60)
    h, m = divmod(minutes, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _clip(text: str) -> str:
    """An answer as shown in a side-by-side cell: long ones cut, saying how much was left out."""
    if len(text) <= MAX_RESPONSE_CHARS:
        return text
    return text[:MAX_RESPONSE_CHARS] + f" … [{len(text) - MAX_RESPONSE_CHARS} more characters]"


def _extras(answer: dict[str, Any]) -> str:
    """What an answer carries besides its text (score, finish_reason, ...), on one line."""
    return " · ".join(f"{k} {_fmt(v)}" for k, v in answer.items() if k != "response")
