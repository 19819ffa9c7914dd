"""Load a model to sample from or score with: a run directory, a local model or a hub id.

    loaded = load_causal_lm(recipe.model, merge=False)   # LoRA run: its own adapter stays live
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
from rlhf_cli.core.models import load_model, load_tokenizer, resolve
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


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    resolved: ResolvedModel
    quant: QuantSpec
    live_adapter: str | None

    @property
    def describe(self) -> str:
        parts = [self.resolved.run_dir or self.resolved.base]
        merged = len(self.resolved.adapters) - (1 if self.live_adapter else 0)
        if merged:
            parts.append(f"{merged} adapter(s) merged")
        if self.live_adapter:
            parts.append("adapter live (peft)")
        if self.quant.bits:
            parts.append(f"{self.quant.bits}-bit base")
        return "; ".join(parts)


def load_causal_lm(
    spec: ModelSpec, *, quant: QuantSpec | None = None, merge: bool | None = None, padding_side: str = "left"
) -> Loaded:
    """Model in eval mode and its tokenizer.

    merge=False keeps a run's last adapter as a live peft adapter (what it was trained as); earlier
    adapters (its parents') are merged into the base either way. merge=None merges unless the base is
    quantized: folding an update into 4/8-bit weights rounds part of it away. quant=None follows the run.
    """
    resolved = resolve(spec)
    if quant is None or quant.bits is None:
        quant = run_quant(resolved)
    if merge is None:
        merge = quant.bits is None
    elif merge and quant.bits is not None and resolved.adapters:
        log.warning("merging the adapter into a %d-bit base rounds part of the update away; "
                    "answers can differ from the trained model (leave out --merge to keep it live)", quant.bits)
    tokenizer = load_tokenizer(resolved, padding_side=padding_side)
    dtype = resolve_dtype(spec.dtype)
    live = resolved.adapters[-1] if (resolved.adapters and not merge) else None
    base = replace(resolved, adapters=resolved.adapters[:-1]) if live else resolved
    model = load_model(base, dtype=dtype, quant=quant)
    if live:
        from peft import PeftModel

        from rlhf_cli.core.models import fast_lora_layers

        model = PeftModel.from_pretrained(model, live)
        fast_lora_layers(model)  # computes as in training
    model.eval()
    loaded = Loaded(model=model, tokenizer=tokenizer, resolved=resolved, quant=quant, live_adapter=live)
    log.info("loaded %s", loaded.describe)
    return loaded
