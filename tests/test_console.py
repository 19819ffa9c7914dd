"""The OpenMP wait policy is chosen from how busy the CPUs are before torch loads."""

from __future__ import annotations

import sys

import pytest

from rlhf_cli import console


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # as in a process that has not loaded torch yet
    return monkeypatch


def test_busy_cpus_reads_a_plausible_figure() -> None:
    busy = console.busy_cpus(0.05)
    if busy is None:
        pytest.skip("no /proc/stat")
    assert 0.0 <= busy <= (console.os.cpu_count() or 1) + 1e-6


def test_idle_cpus_keep_the_spinning_default(fresh: pytest.MonkeyPatch) -> None:
    fresh.setattr(console, "busy_cpus", lambda window=0.1: 0.1)
    assert console.choose_omp_wait_policy() is None
    assert "OMP_WAIT_POLICY" not in console.os.environ


def test_busy_cpus_make_threads_sleep(fresh: pytest.MonkeyPatch) -> None:
    fresh.setattr(console, "busy_cpus", lambda window=0.1: 1.2)
    assert console.choose_omp_wait_policy() == "PASSIVE"
    assert console.os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_a_users_setting_is_left_alone(fresh: pytest.MonkeyPatch) -> None:
    fresh.setenv("OMP_WAIT_POLICY", "ACTIVE")
    fresh.setattr(console, "busy_cpus", lambda window=0.1: 2.0)
    assert console.choose_omp_wait_policy() is None
    assert console.os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_too_late_once_torch_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch  # noqa: F401

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(console, "busy_cpus", lambda window=0.1: 2.0)
    assert console.choose_omp_wait_policy() is None
    assert "OMP_WAIT_POLICY" not in console.os.environ
