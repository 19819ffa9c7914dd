"""Logging set-up does the same on an idle and on a busy machine (DESIGN: nothing depends on the instant)."""

from __future__ import annotations

import logging
import sys

import pytest

from rlhf_cli import console


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A process that has not loaded torch yet, without OMP_WAIT_POLICY; the rlhf logger restored after."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    log = logging.getLogger("rlhf")
    monkeypatch.setattr(log, "handlers", log.handlers[:])
    monkeypatch.setattr(log, "propagate", log.propagate)
    monkeypatch.setattr(log, "level", log.level)
    return monkeypatch


def test_setup_logging_neither_samples_the_machine_nor_sets_the_wait_policy(fresh):
    # Sampling the load means reading /proc/stat twice with a sleep between; either would show here.
    def no_sampling(*args, **kwargs):
        raise AssertionError("setup_logging looked at the machine's load")

    fresh.setattr(console.time, "sleep", no_sampling)
    fresh.setattr(console, "open", no_sampling, raising=False)
    console.setup_logging()
    assert "OMP_WAIT_POLICY" not in console.os.environ


def test_progress_logs_each_twentieth_when_work_advances_in_batches(fresh, monkeypatch, capsys):
    # Off a terminal a line is due about every 5 %. Batches of 7 of 100 samples pass a twentieth at every
    # batch but land on a multiple of 5 only at 35 and 70, which were the only lines before the end.
    monkeypatch.setattr(console, "stderr_is_terminal", lambda: False)
    monkeypatch.setattr(console.time, "monotonic", lambda: 0.0)  # no 30 s heartbeat
    console.setup_logging()
    with console.Progress(total=100, description="generate", unit="sample") as bar:
        for done in range(7, 100, 7):
            bar.update(done)
        bar.update(100)
    lines = [line for line in capsys.readouterr().err.splitlines() if "generate sample" in line]
    assert [int(line.split("generate sample ")[1].split("/")[0]) for line in lines] == [*range(7, 100, 7), 100]
