"""What a stage saves into its run directory, and how run.json describes it.

run.json "model" section (read back by runs.resolve_model):
    {"kind": "adapter" | "full" | "reward-adapter" | "reward-full",
     "adapters": ["adapter"],      # own adapters, relative to the run dir, applied after the parent's
     "path": "model",              # full weights (kind full / reward-full)
     "tokenizer": "tokenizer"}     # tokenizer with the exact chat template used in training
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhf_cli.runs import ResolvedModel, is_main_process


def base_entry(resolved: ResolvedModel, spec_path: str, *, parent_adapter_kept: bool = False) -> dict[str, Any]:
    """run.json base_model: the parent run directory when there is one, else the base itself.

    When the run trains its parent's adapter further (a quantized base, see core.plan), the saved adapter
    already holds the parent's update, so the base is the parent's own base: applying the parent's
    adapter again would count it twice. Local paths are stored absolute so a later stage finds them
    from any working directory.
    """
    if resolved.run_dir and not parent_adapter_kept:
        return {"path": str(Path(resolved.run_dir).resolve())}
    if parent_adapter_kept:
        spec_path = resolved.base
    local = Path(spec_path)
    path = str(local.resolve()) if local.exists() else spec_path
    return {"path": path, "gguf_file": resolved.gguf_file}


def save_outputs(run_path: Path, model: Any, tokenizer: Any, *, reward: bool = False,
                 state_dict: dict[str, Any] | None = None) -> dict[str, Any]:
    """Save adapter/ (peft) or model/ (full weights) plus tokenizer/; return run.json's model section.

    state_dict: the gathered weights where the training processes hold only shards (FSDP, ZeRO-3).
    """
    from peft import PeftModel

    run_path = Path(run_path)
    is_adapter = isinstance(model, PeftModel)
    if is_main_process():
        folder = run_path / ("adapter" if is_adapter else "model")
        model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(run_path / "tokenizer")
    kind = ("reward-" if reward else "") + ("adapter" if is_adapter else "full")
    section: dict[str, Any] = {"kind": kind, "tokenizer": "tokenizer"}
    if is_adapter:
        section["adapters"] = ["adapter"]
    else:
        section["path"] = "model"
    return section
