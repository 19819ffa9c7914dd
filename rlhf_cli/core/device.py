"""Where training runs and in which dtype.

`dtype: auto` picks bf16 where the hardware multiplies it fast: CUDA devices with bf16 support, and CPUs
with AMX or AVX512-BF16, whose bf16 matmuls are several times faster than fp32's (bench/sft_throughput.py
prints this CPU's bf16 rate).
Elsewhere fp32: fp16 training needs loss scaling and is only used when asked for.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("rlhf")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@functools.cache
def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("amx_bf16", "avx512_bf16"))


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.cache
def resolve_dtype(name: str) -> torch.dtype:
    """Turn a recipe dtype into a torch dtype; `auto` is decided by the hardware and logged once."""
    if name != "auto":
        if name == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            from rlhf_cli.errors import TrainingError

            raise TrainingError("dtype bf16 asked for, but this GPU has no bf16 support: use dtype: fp16 or fp32")
        return DTYPES[name]
    if torch.cuda.is_available():
        chosen, why = (
            (torch.bfloat16, "CUDA device supports bf16")
            if torch.cuda.is_bf16_supported()
            else (torch.float32, "CUDA device lacks bf16")
        )
    elif cpu_has_fast_bf16():
        chosen, why = torch.bfloat16, "CPU has AMX/AVX512-BF16"
    else:
        chosen, why = torch.float32, "CPU without fast bf16"
    log.info("dtype auto -> %s (%s)", str(chosen).removeprefix("torch."), why)
    return chosen


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def available_memory_bytes() -> int:
    """Memory a run can use: the GPU's total memory, or the host's MemAvailable."""
    if torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[1])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def peak_memory_bytes() -> int:
    """Peak memory of this process: CUDA allocator peak on GPU, max RSS on CPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass(frozen=True)
class Precision:
    """How a run holds and multiplies its weights.

    load: dtype the model is loaded in; autocast: dtype matmuls run in under torch.autocast (None = as
    loaded). Adapters, a new reward head and other trainable tensors stay fp32 (core.lora.make_trainable),
    so AdamW's small updates are not rounded to bf16's 8 mantissa bits.
    """

    load: torch.dtype
    autocast: torch.dtype | None
    description: str

    def as_json(self) -> dict[str, str | None]:
        return {
            "weights": dtype_name(self.load),
            "compute": dtype_name(self.autocast or self.load),
            "note": self.description,
        }


def plan_precision(name: str, *, adapters: bool, quantized: bool) -> Precision:
    """Frozen bases (LoRA, QLoRA) are loaded straight in the compute dtype: half the memory of fp32 and no
    casts; peft runs the fp32 adapters on casted inputs. A full fine-tune keeps fp32 master weights, under
    bf16/fp16 autocast on a GPU. Not on a CPU: torch's CPU autocast made both LoRA and full training slower
    per CPU-second than fp32 (SmolLM2-135M, 2 threads), so a full CPU run computes in fp32."""
    compute = resolve_dtype(name)
    if compute == torch.float32:
        return Precision(torch.float32, None, "fp32 throughout")
    half = dtype_name(compute)
    if quantized:
        return Precision(compute, None, f"4/8-bit base computing in {half}; adapters, norms and head fp32")
    if adapters:
        return Precision(compute, None, f"frozen base in {half}; adapters fp32")
    if torch.cuda.is_available():
        return Precision(torch.float32, compute, f"fp32 master weights; {half} autocast (mixed precision)")
    return Precision(torch.float32, None, f"full fine-tune on the CPU: fp32 weights and compute ({half} autocast is slower on CPUs)")
