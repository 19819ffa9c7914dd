"""rlhf merge: fold a LoRA run's adapters into its base and write a plain transformers model directory.

    rlhf merge runs/sft --output models/sft-merged
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('models/sft-merged')"

The output holds safetensors weights, config, and the run's tokenizer with the chat template used in
training; loading it needs no peft. A QLoRA run is merged into the base loaded unquantized at the base's
own dtype (merging into 4-bit weights would round the update away). The directory is written next to
the target under a temporary name and renamed at the end, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rlhf_cli.errors import DataError, RecipeError
from rlhf_cli.result import RunResult

log = logging.getLogger("rlhf")


def merge(run: str | Path, output: Path, *, dtype: str = "auto", overwrite: bool = False) -> RunResult:
    from rlhf_cli.core.chat import ensure_chat_template
    from rlhf_cli.core.device import DTYPES, dtype_name
    from rlhf_cli.core.hub import check_resolved
    from rlhf_cli.core.inference import run_quant
    from rlhf_cli.core.loading import load_model, load_tokenizer
    from rlhf_cli.runs import resolve_model

    output = Path(output)
    if not Path(run).is_dir():
        raise DataError(f"{run}: run directory not found (merge takes the directory of a LoRA run)")
    resolved = resolve_model(str(run))
    if not resolved.adapters:
        where = f"{run}/run.json says it is a full model" if resolved.run_dir else f"{run} is not a run directory"
        raise RecipeError(f"nothing to merge: {where}; it loads as it is")
    check_resolved(resolved)
    source = Path(resolved.run_dir or run).resolve()
    if _holds(output, source):
        raise RecipeError(f"--output {output} holds the run being merged: choose another directory")
    # Replacing what the merge reads (its base, a parent run) would leave every run trained on it loading
    # the merged weights under its adapters, which then count twice.
    read = [resolved.base, resolved.tokenizer, *(str(Path(a).parent) for a in resolved.adapters)]
    held = next((Path(p) for p in read if p and Path(p).exists() and _holds(output, Path(p).resolve())), None)
    if held is not None:
        raise RecipeError(f"--output {output} holds {held}, which the run is built on: choose another directory")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        if not overwrite:
            raise RecipeError(f"{output} exists and is not empty: pass --overwrite to replace it, or choose another --output")
        if not (output / "config.json").is_file():
            # --overwrite replaces an earlier merged model, never an unrelated folder.
            raise RecipeError(f"{output} is not a model directory (no config.json): refusing to replace it; choose another --output")

    torch_dtype = DTYPES[dtype] if dtype != "auto" else _base_dtype(resolved)
    quantized = run_quant(resolved).bits is not None
    if quantized:
        log.warning(
            "%s is a QLoRA run: merging into the dequantized base at %s; the merged model is close to, "
            "not bit-identical with, the 4-bit base + adapter it was trained as",
            run, dtype_name(torch_dtype),
        )
    head = "reward" if resolved.kind == "reward" else "causal"
    # quant=None: the base is read at full precision even when the adapter was trained on a 4-bit copy.
    model = load_model(resolved, dtype=torch_dtype, quant=None, head=head, device_map="cpu")
    tokenizer = load_tokenizer(resolved)
    if head == "causal":
        ensure_chat_template(tokenizer)
    else:
        # transformers pools a sequence classifier at the rightmost token that is not config.pad_token_id;
        # the base's pad id (or load_model's stand-in) may not be the id the tokenizer pads with, and then
        # every padded row of a batch is scored on padding. train-rm saves its full models the same way.
        model.config.pad_token_id = tokenizer.pad_token_id

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _swap_in(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("merged %d adapter(s) into %s -> %s", len(resolved.adapters), resolved.base, output)
    details: dict[str, Any] = {
        "base": resolved.base,
        "adapters": len(resolved.adapters),
        "dtype": dtype_name(torch_dtype),
        "head": head,
        "dequantized_base": quantized,
    }
    return RunResult("merge", "completed", str(output), details=details)


def _holds(output: Path, path: Path) -> bool:
    out = output.resolve()
    return out == path or out in path.parents


def _swap_in(tmp: Path, output: Path) -> None:
    """tmp becomes output. An earlier merged model there is renamed aside first and deleted only once the
    new one is in place: deleting a model takes seconds, and a Ctrl-C meanwhile lost both the earlier model
    and the new one. Until the new one is in, a failure puts the earlier one back."""
    if not output.exists():
        os.replace(tmp, output)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".old", dir=output.parent)) / output.name
    output.rename(aside)
    try:
        os.replace(tmp, output)
    except BaseException:
        aside.rename(output)
        raise
    shutil.rmtree(aside.parent, ignore_errors=True)


def _base_dtype(resolved: Any) -> Any:
    """The dtype the base checkpoint is stored in (float32 when it does not say)."""
    import torch
    from transformers import AutoConfig

    kwargs = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
    config = AutoConfig.from_pretrained(resolved.base, trust_remote_code=resolved.trust_remote_code, **kwargs)
    stored = getattr(config, "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    if stored in (torch.bfloat16, torch.float16, torch.float32):
        return stored
    return torch.float32
