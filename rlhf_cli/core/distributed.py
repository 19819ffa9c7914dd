"""Several processes: who is who, one process group, rank 0's decisions shared, sums over ranks, and the
launch combinations refused before anything is loaded.

    accelerate launch --config_file recipes/accelerate/ddp.yaml -m rlhf_cli sft recipe.yaml
    torchrun --nproc_per_node 4 -m rlhf_cli sft recipe.yaml

torchrun, and accelerate launch for DDP / FSDP / DeepSpeed (it runs torchrun's launcher underneath), set
RANK, WORLD_SIZE and LOCAL_RANK in every process; mpirun sets its own names, read here as accelerate
reads them. Everything is read from the environment, so the CLI can check a launch without importing
torch. The process group is accelerate's PartialState, the same one transformers' Trainer and PPO's
Accelerator use: gloo on CPUs, NCCL on GPUs.

The recipe is validated before any process group exists, so a recipe error is raised identically on every
rank. What only rank 0 decides (claiming the run directory) is broadcast, errors included, so the other
ranks fail with the same message and exit code instead of waiting.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from rlhf_cli.errors import RecipeError

log = logging.getLogger("rlhf")

_RANK = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
_WORLD = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_LOCAL = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def rank() -> int:
    return _env_int(_RANK, 0)


def world_size() -> int:
    return _env_int(_WORLD, 1)


def local_rank() -> int:
    return _env_int(_LOCAL, 0)


def is_main() -> bool:
    return rank() == 0


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def sharding() -> str:
    """How accelerate launch shards the model: "fsdp", "zero0".."zero3" (DeepSpeed), "ddp", or "none"."""
    if _flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return f"zero{_zero_stage()}"
    return "ddp" if world_size() > 1 else "none"


def _zero_stage() -> int:
    """The ZeRO stage: `--zero_stage` / the config's zero_stage, else the DeepSpeed JSON config file's, else
    accelerate's default (2)."""
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage:
        return int(stage)
    config = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if config and Path(config).is_file():
        try:
            return int(json.loads(Path(config).read_text()).get("zero_optimization", {}).get("stage", 0))
        except (ValueError, TypeError, AttributeError):
            pass
    return 2


def check_launch(stage: str, recipe: Any) -> None:
    """Refuse launches that cannot work, before a weight is loaded or a file written (every rank alike)."""
    mode = sharding()
    quant = getattr(recipe, "quant", None)
    bits = getattr(quant, "bits", None)
    if bits is not None and mode in ("fsdp", "zero3"):
        what = "FSDP" if mode == "fsdp" else "DeepSpeed ZeRO-3"
        raise RecipeError(
            f"quant.bits {bits} under {what}: sharding a bitsandbytes {bits}-bit base is not supported here; "
            "launch QLoRA with DDP (recipes/accelerate/ddp.yaml) or DeepSpeed ZeRO-2 (recipes/accelerate/deepspeed-zero2.yaml), "
            "or set quant.bits: null"
        )
    if stage in ("ppo", "grpo") and mode not in ("none", "ddp"):
        raise RecipeError(
            f"rlhf {stage} runs on one process or under DDP, not under {_name(mode)}: every process samples from its "
            "whole policy; launch with recipes/accelerate/ddp.yaml (or torchrun), and use quant.bits: 4 to fit a "
            "large policy on each GPU"
        )
    world = world_size()
    if stage in ("ppo", "grpo") and world > 1:
        rl, key = recipe.rl, stage
        unit = world * rl.grad_accum
        # GRPO's rollout counts answers, group_size per prompt, and each process samples whole groups.
        prompts = rl.rollout_batch_size // (rl.group_size if stage == "grpo" else 1)
        if prompts % world or rl.mini_batch_size % unit:
            raise RecipeError(
                f"{key}.rollout_batch_size {rl.rollout_batch_size} and {key}.mini_batch_size {rl.mini_batch_size} are global "
                f"batch sizes: under {world} processes x {key}.grad_accum {rl.grad_accum} set both to multiples of {unit}"
                + (f" (and {key}.rollout_batch_size to a multiple of {world} x {key}.group_size)" if stage == "grpo" else "")
            )
    if world == 1 and _flag("ACCELERATE_USE_CPU") and os.environ.get("MASTER_ADDR"):
        # accelerate launch --cpu --num_processes N starts one process unless given an MPI hostfile.
        log.warning(
            "running as a single process: `accelerate launch --cpu` starts one process without --mpirun_hostfile; "
            "for several CPU processes use `accelerate launch --multi_gpu --num_processes N` or torchrun (gloo on CPUs)"
        )


def _name(mode: str) -> str:
    return "FSDP" if mode == "fsdp" else f"DeepSpeed ZeRO-{mode.removeprefix('zero')}"


# --------------------------------------------------------------------------- the process group


def init() -> None:
    """Join the process group (once; nothing to do for a single process)."""
    if world_size() == 1:
        return
    import torch
    from accelerate import PartialState

    mode = sharding()
    if mode not in ("ddp", "none") and not torch.cuda.is_available():
        from rlhf_cli.errors import TrainingError

        raise TrainingError(
            f"{_name(mode)} needs CUDA GPUs and this process sees none: on CPUs launch DDP instead "
            "(recipes/accelerate/cpu-2proc.yaml, or torchrun)"
        )
    # cpu=True where there is no GPU, as Trainer does (training_args use_cpu): gloo instead of NCCL.
    PartialState(cpu=not torch.cuda.is_available())


def _device() -> Any:
    from accelerate import PartialState

    return PartialState().device


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        init()
        dist.barrier()


def broadcast_json(obj: Any = None, src: int = 0) -> Any:
    """rank `src`'s JSON-able value on every rank (JSON bytes, not pickles)."""
    if world_size() == 1:
        return obj
    import torch
    import torch.distributed as dist

    init()
    device = _device()
    payload = json.dumps(obj, default=str).encode() if rank() == src else b""
    size = torch.tensor([len(payload)], dtype=torch.long, device=device)
    dist.broadcast(size, src)
    buffer = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    if rank() == src:
        buffer.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(buffer, src)
    return json.loads(bytes(buffer.cpu().tolist()).decode())


def gather_ints(value: int) -> list[int]:
    """Every rank's value, in rank order, on every rank."""
    if world_size() == 1:
        return [int(value)]
    import torch
    import torch.distributed as dist

    init()
    mine = torch.tensor([int(value)], dtype=torch.long, device=_device())
    out = [torch.zeros_like(mine) for _ in range(world_size())]
    dist.all_gather(out, mine)
    return [int(t.item()) for t in out]


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any (e.g. a stop signal that reached one process first)."""
    if world_size() == 1:
        return flag
    return max(gather_ints(int(flag))) > 0


def all_finite(tensors: Any) -> bool:
    """Whether every value of these tensors is finite on every rank, decided alike on all of them.

    One stacked isfinite (one device sync) and one collective: weights may be sharded, and a rank that
    stopped on its own would leave the others waiting in their next collective.
    """
    import torch

    flags = [torch.isfinite(t).all() for t in tensors]
    finite = bool(torch.stack([f.to(flags[0].device) for f in flags]).all()) if flags else True
    return not any_rank(not finite)


def total(value: float) -> float:
    """The sum of every rank's value, on every rank (a NaN or inf on any rank makes it NaN or inf on all)."""
    if world_size() == 1:
        return float(value)
    import torch
    import torch.distributed as dist

    init()
    t = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return float(t.item())


def longest(values: list[float]) -> list[float]:
    """Each value's largest over the ranks, on every rank: a phase the processes run side by side (their
    rollout's sampling, say) lasts, for the run, as long as its slowest process."""
    if world_size() == 1:
        return [float(v) for v in values]
    import torch
    import torch.distributed as dist

    init()
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [float(v) for v in t.tolist()]


def report(samples_this_rank: int, **extra: Any) -> dict[str, Any]:
    """run.json `distributed`: how the run was launched and how many samples each rank processed
    (a collective: every rank calls it)."""
    samples = gather_ints(samples_this_rank)
    log.debug("rank %d processed %d samples", rank(), samples_this_rank)
    if len(samples) > 1:
        log.info("%d processes (%s): samples per rank %s", len(samples), sharding(), samples)
    return {"world_size": len(samples), "sharding": sharding(), "samples_per_rank": samples, **extra}


def on_main(decide: Any) -> Any:
    """Run `decide()` on rank 0 only and hand its JSON-able result to every rank.

    An RlhfError raised there is raised on every rank (same class, message and exit code), so no rank
    waits for a rank that has already failed.
    """
    from rlhf_cli import errors

    if world_size() == 1:
        return decide()
    init()  # before deciding: a rank that cannot join fails before rank 0 writes anything
    outcome: dict[str, Any] = {}
    failure: BaseException | None = None
    if is_main():
        try:
            outcome = {"value": decide()}
        except errors.RlhfError as e:
            failure = e
            outcome = {"error": type(e).__name__, "message": e.message, "details": e.details}
        except BaseException as e:  # told to the others, then raised here as it is
            failure = e
            outcome = {"error": "TrainingError", "message": f"rank 0 failed: {type(e).__name__}: {e}", "details": []}
    outcome = broadcast_json(outcome)
    if failure is not None:
        raise failure
    if "error" in outcome:
        cls = getattr(errors, outcome["error"], None)
        if not (isinstance(cls, type) and issubclass(cls, errors.RlhfError)):
            cls = errors.TrainingError
        raise cls(outcome["message"], details=outcome["details"])
    return outcome["value"]
