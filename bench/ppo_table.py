"""The table both PPO benchmarks print (bench/ppo_step.py, bench/trl_ppo_baseline.py), so their rows line up."""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any


def peak_rss() -> int:
    """Peak resident memory of this process (VmHWM; ru_maxrss would carry over the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory() -> int:
    """Peak memory of this process where its tensors lived: the CUDA allocator's peak when CUDA was used (as
    rlhf's run.json records it), otherwise the peak resident memory."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return peak_rss()


def header(first: str) -> str:
    return (f"{first:28} {'copies':>6} {'s/iter':>13} {'gen':>6} {'score':>6} {'train':>6} "
            f"{'gen tok/s':>9} {'train tok/s':>11} {'peak GB':>8} {'CPU s':>6} {'load':>5} {'OMP':>7}")


def row(name: str, copies: int, out: dict[str, Any], load: float) -> str:
    """Medians over the iterations after the first (a warm-up), best total in brackets."""
    rows = out["rows"][1:] or out["rows"]
    total = sorted(r["time_generation"] + r["time_scoring"] + r["time_training"] for r in rows)

    def med(key: str) -> float:
        values = sorted(r[key] for r in rows)
        return values[len(values) // 2]

    return (f"{name:28} {copies:>6} {total[len(total) // 2]:>6.2f} ({total[0]:>4.1f}) "
            f"{med('time_generation'):>6.2f} {med('time_scoring'):>6.2f} {med('time_training'):>6.2f} "
            f"{med('tokens_per_s_generation'):>9.0f} {med('tokens_per_s_training'):>11.0f} "
            f"{out['peak_memory'] / 1e9:>8.2f} {med('cpu_seconds'):>6.1f} {load:>5.1f} {out['omp_wait_policy']:>7}")
