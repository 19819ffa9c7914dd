"""People's text goes to stderr: rich progress bars on a terminal, plain timestamped lines otherwise.

stdout is reserved for results (`--json`, generate's JSONL), so nothing here touches it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from typing import Any

from rlhf_cli.core.distributed import rank as _rank
from rlhf_cli.core.distributed import world_size

log = logging.getLogger("rlhf")


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if _rank() != 0:
        level = logging.WARNING
    log.handlers.clear()
    log.propagate = False
    if stderr_is_terminal():
        from rich.console import Console
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=Console(stderr=True), show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        prefix = f"[rank {_rank()}] " if world_size() > 1 else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(level)
    # Libraries' own chatter (tokenizer warnings, progress bars of datasets) stays out of CI logs.
    # bitsandbytes warns on CPUs that it cannot fetch an optional kernel from a hub; its fallback works.
    for name in ("transformers", "datasets", "peft", "trl", "accelerate", "torch", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    # Per-file "Loading weights" bars from transformers/hub; our own Progress shows the long work.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # The GGUF loader's per-tensor "de-quantizing" bar (plain tqdm) would otherwise flood logs.
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        # Deprecation notices of the libraries are for their callers' code (ours), not for users.
        warnings.filterwarnings("ignore", category=FutureWarning)


def _fmt(fields: dict[str, Any]) -> str:
    parts = []
    for k, v in fields.items():
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """Progress of long work: a rich bar on a terminal, a log line every ~5% (or 30 s) elsewhere.

        with Progress(total=steps, description="sft", start=resumed_step) as bar:
            bar.update(step, loss=1.23)
    """

    def __init__(self, total: int, description: str, start: int = 0, unit: str = "step", enabled: bool = True):
        self.total = max(int(total), 1)
        self.description = description
        self.unit = unit
        self.done = start
        self._start_done = start
        self._t0 = time.monotonic()
        self._last_log = 0.0
        self._every = max(1, self.total // 20)
        self._next_log = start + self._every
        self._bar = None
        self._task = None
        self._enabled = enabled and _rank() == 0

    def __enter__(self) -> Progress:
        if self._enabled and stderr_is_terminal():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=Console(stderr=True),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total, completed=self.done, info="")
        return self

    def update(self, done: int, **fields: Any) -> None:
        self.done = done
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=done, info=_fmt(fields))
            return
        now = time.monotonic()
        # Work often advances a batch at a time, so a line is due once `done` passes the next twentieth,
        # not only when it lands on a multiple of one.
        if done >= self.total or done >= self._next_log or now - self._last_log > 30:
            self._last_log = now
            self._next_log = done + self._every - (done - self._start_done) % self._every
            rate = (done - self._start_done) / max(now - self._t0, 1e-9)
            eta = (self.total - done) / rate if rate > 0 else 0.0
            log.info(
                "%s %s %d/%d (%d%%) %s eta %s",
                self.description,
                self.unit,
                done,
                self.total,
                100 * done // self.total,
                _fmt(fields),
                _duration(eta),
            )

    def advance(self, n: int = 1, **fields: Any) -> None:
        self.update(self.done + n, **fields)

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()
