"""Load a model to sample from or score with: a run directory, a local model or a hub id.

    loaded = load_causal_lm(recipe.model)   # a LoRA run's adapters stay live, as trained
    loaded.model, loaded.tokenizer (left padding, the run's chat template), loaded.describe

A run's tokenizer/ carries the chat template used in training, so inference renders prompts the way
the model learnt them. A run trained with QLoRA (its recipe has quant.bits) is loaded on the same
quantized base its adapter was trained against, unless the caller asks for another quantization.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from rlhf_cli.core.device import resolve_dtype
from rlhf_cli.core.loading import load_model, load_tokenizer, resolve
from rlhf_cli.core.lora import apply_adapters
from rlhf_cli.recipe import ModelSpec, QuantSpec
from rlhf_cli.runs import ResolvedModel, read_manifest

log = logging.getLogger("rlhf")


def run_quant(resolved: ResolvedModel) -> QuantSpec:
    """The quantization a run's adapter was trained on (quant.bits of its recipe), or none."""
    if not resolved.run_dir or not resolved.adapters:
        return QuantSpec()
    manifest = read_manifest(resolved.run_dir) or {}
    quant = (manifest.get("recipe") or {}).get("quant") or {}
    return QuantSpec(**quant) if quant.get("bits") else QuantSpec()


def live_adapters(resolved: ResolvedModel, quant: QuantSpec, merge: bool) -> tuple[str, ...]:
    """The adapters peft applies live, in order; the others are merged into the base first.

    The run is held as it was trained: its own adapter live (folding a small update into bf16 weights
    rounds it away, so eval would score another model than PPO trained), its parents merged as sft and
    PPO merge them, except on a quantized base, where training kept them live (folding a LoRA into 4/8-bit
    weights rounds it) and so does a PPO run that stacked them. merge=True folds everything.
    """
    if merge or not resolved.adapters:
        return ()
    if quant.bits is not None or _parents_stacked(resolved):
        return resolved.adapters
    return resolved.adapters[-1:]


def _parents_stacked(resolved: ResolvedModel) -> bool:
    """A PPO run that kept its policy's adapters frozen under its own (run.json layout.parent_adapters)."""
    if not resolved.run_dir:
        return False
    manifest = read_manifest(resolved.run_dir) or {}
    return (manifest.get("layout") or {}).get("parent_adapters") == "stacked"


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    resolved: ResolvedModel
    quant: QuantSpec
    live: tuple[str, ...]

    @property
    def describe(self) -> str:
        parts = [self.resolved.run_dir or self.resolved.base]
        merged = len(self.resolved.adapters) - len(self.live)
        if merged:
            parts.append(f"{merged} adapter(s) merged")
        if self.live:
            parts.append(f"{len(self.live)} adapter(s) live (peft)")
        if self.quant.bits:
            parts.append(f"{self.quant.bits}-bit base")
        return "; ".join(parts)


def load_causal_lm(
    spec: ModelSpec, *, quant: QuantSpec | None = None, merge: bool = False, padding_side: str = "left"
) -> Loaded:
    """Model in eval mode and its tokenizer, its adapters live as in training (see live_adapters).

    merge=True folds every adapter into the base (faster sampling, another model on a bf16 or quantized
    base). quant=None follows the run.
    """
    resolved = resolve(spec)
    if quant is None or quant.bits is None:
        quant = run_quant(resolved)
    if merge and quant.bits is not None and resolved.adapters:
        log.warning("merging the adapter into a %d-bit base rounds part of the update away; "
                    "answers can differ from the trained model (leave out --merge to keep it live)", quant.bits)
    tokenizer = load_tokenizer(resolved, padding_side=padding_side)
    live = live_adapters(resolved, quant, merge)
    base = replace(resolved, adapters=resolved.adapters[: len(resolved.adapters) - len(live)])
    model = apply_adapters(load_model(base, dtype=resolve_dtype(spec.dtype), quant=quant), live)
    model.eval()
    loaded = Loaded(model=model, tokenizer=tokenizer, resolved=resolved, quant=quant, live=live)
    log.info("loaded %s", loaded.describe)
    return loaded
