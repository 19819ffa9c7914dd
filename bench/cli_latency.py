"""Start-up cost of the CLI: `rlhf validate` against `python -c "import torch"`, measured in one run.

    python bench/cli_latency.py        (make bench-cli)

`rlhf validate` must not import torch (tests/test_imports.py), so it should take a small fraction of the torch
import. Prints the median wall time of 5 runs of each (after one warm-up run) and their ratio.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = 5


def rlhf_command() -> list[str]:
    """The `rlhf` script next to this interpreter (what users run), else `python -m rlhf_cli`."""
    script = Path(sys.executable).parent / "rlhf"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "rlhf_cli"]


def wall_times(cmd: list[str]) -> list[float]:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # warm the file cache
    times = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    rlhf = rlhf_command()
    tmp = Path(tempfile.mkdtemp(prefix="rlhf-bench-"))
    try:
        recipe = tmp / "sft.yaml"
        subprocess.run([*rlhf, "init", "sft", "-o", str(recipe)], check=True, stderr=subprocess.DEVNULL)
        validate = wall_times([*rlhf, "validate", str(recipe)])
        torch = wall_times([sys.executable, "-c", "import torch"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    v, t = statistics.median(validate), statistics.median(torch)
    print(f"command: {' '.join(rlhf)} validate sft.yaml   (python {sys.version.split()[0]})")
    print(f"rlhf validate sft.yaml     median {v:.3f} s   runs: {' '.join(f'{x:.3f}' for x in validate)}")
    print(f'python -c "import torch"   median {t:.3f} s   runs: {" ".join(f"{x:.3f}" for x in torch)}')
    print(f"ratio validate / import torch: {v / t:.3f}")


if __name__ == "__main__":
    main()
