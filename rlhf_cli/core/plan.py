"""Decide how a training run holds its model before loading any weight: parameter counts, dtype,
parent adapters, activation checkpointing and the memory it will need.

    plan = plan_training(resolved, recipe.model, lora=recipe.lora, quant=recipe.quant, train=recipe.train,
                         head="causal", tokens_per_step=8 * 256)
    plan.as_json()    # --dry-run details and run.json

The architecture is built on the meta device (no weights read), so --dry-run answers in seconds even for
large models, and `gradient_checkpointing: auto` turns on only when the estimate does not fit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch

from rlhf_cli.core.device import Precision, available_memory_bytes, plan_precision
from rlhf_cli.core.memory import estimate_memory, model_shape, weight_bytes_for
from rlhf_cli.errors import RecipeError
from rlhf_cli.recipe import LoraSpec, ModelSpec, QuantSpec, TrainSpec
from rlhf_cli.runs import ResolvedModel

log = logging.getLogger("rlhf")

ParentAdapters = Literal["none", "merged", "kept"]
# Leave a quarter of the device for what the estimate does not see (fragmentation, eval batches, other processes).
_FIT = 0.75


@dataclass(frozen=True)
class TrainingPlan:
    precision: Precision
    trainable_params: int
    total_params: int
    parent_adapters: ParentAdapters
    checkpointing: bool
    memory: dict[str, Any]
    config: Any

    def as_json(self) -> dict[str, Any]:
        return {
            "precision": self.precision.as_json(),
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "parent_adapters": self.parent_adapters,
            "gradient_checkpointing": self.checkpointing,
            "memory_estimate": self.memory,
        }


def parent_adapter_policy(resolved: ResolvedModel, quantized: bool) -> ParentAdapters:
    """A parent run's adapters are merged into the base (exact) unless the base is quantized: folding a
    LoRA into 4/8-bit weights would round it away, so there the parent's adapter keeps training instead."""
    if not resolved.adapters:
        return "none"
    if not quantized:
        return "merged"
    if len(resolved.adapters) > 1:
        raise RecipeError(
            f"{resolved.run_dir} stacks {len(resolved.adapters)} adapters, which cannot be merged into a quantized base: "
            f"merge them first (rlhf merge {resolved.run_dir} --output DIR) and set model.path: DIR"
        )
    return "kept"


def empty_model(resolved: ResolvedModel, spec: ModelSpec, *, head: str, tokenizer: Any = None) -> Any:
    """The architecture on the meta device: shapes and parameter counts without reading weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf_cli.core.loading import build_from_config

    with torch.device("meta"):
        if spec.init == "from_config":
            return build_from_config(spec, tokenizer, torch.float32, seed=None)
        kwargs: dict[str, Any] = {"trust_remote_code": resolved.trust_remote_code}
        if resolved.gguf_file:
            kwargs["gguf_file"] = resolved.gguf_file
        config = AutoConfig.from_pretrained(resolved.base, **kwargs)
        if head == "reward":
            config.num_labels = 1
            cls: Any = AutoModelForSequenceClassification
        else:
            cls = AutoModelForCausalLM
        return cls.from_config(config, trust_remote_code=resolved.trust_remote_code)


def stored_weight_bytes(model: Any, bits: int | None, load_bytes: int) -> float:
    """Mean bytes per parameter as loaded. bitsandbytes quantizes the frozen Linear layers only: the
    embeddings, norms and output head stay in the load dtype (transformers skips the output head), and they
    hold a large share of a small model's or a large vocabulary's parameters."""
    if bits is None:
        return float(load_bytes)
    head = model.get_output_embeddings()
    skip = {id(p) for p in head.parameters()} if head is not None else set()
    quantized = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)
                    and not m.weight.requires_grad and id(m.weight) not in skip)
    total = sum(p.numel() for p in model.parameters())
    return (quantized * weight_bytes_for(bits, load_bytes) + (total - quantized) * load_bytes) / max(total, 1)


def plan_training(
    resolved: ResolvedModel,
    spec: ModelSpec,
    *,
    lora: LoraSpec | None,
    quant: QuantSpec,
    train: TrainSpec,
    head: Literal["causal", "reward"],
    tokens_per_step: int,
    tokenizer: Any = None,
    head_tile: tuple[int, int] | None = None,
    reference_copy: bool = False,
    logit_tokens: int | None = None,
) -> TrainingPlan:
    """head_tile: the trainer's log-prob head works on tiles of (rows, columns) logits (core.memory);
    reference_copy: a second, frozen copy of the weights as loaded is held as the reference model;
    logit_tokens: the tokens of a micro-batch whose logits the loss computes, where fewer than
    tokens_per_step (sft's loss takes logits only where labels are)."""
    from rlhf_cli.core.loading import check_quantizable, count_parameters
    from rlhf_cli.core.lora import attach_lora, start_from_adapter

    check_quantizable(resolved, quant)
    quantized = quant.bits is not None
    precision = plan_precision(spec.dtype, adapters=lora is not None, quantized=quantized)
    parent = parent_adapter_policy(resolved, quantized)
    task = "SEQ_CLS" if head == "reward" else "CAUSAL_LM"
    model = empty_model(resolved, spec, head=head, tokenizer=tokenizer)
    if parent == "kept":
        model = start_from_adapter(model, resolved.adapters[0], task=task, load_weights=False)
    elif lora is not None:
        model = attach_lora(model, lora, task=task, quantized=False, gradient_checkpointing=False)
    trainable, total = count_parameters(model)
    hidden, layers, vocab = model_shape(model.config)
    if head == "reward":
        vocab = 1  # the score head's one output: a reward model computes no vocabulary logits
    act = 4 if precision.load == torch.float32 and precision.autocast is None else 2

    def estimate(checkpointing: bool) -> dict[str, Any]:
        return estimate_memory(
            total_params=total,
            trainable_params=trainable,
            weight_bytes=stored_weight_bytes(model, quant.bits, precision.load.itemsize),
            hidden=hidden,
            layers=layers,
            vocab=vocab,
            tokens_per_step=tokens_per_step,
            logit_tokens=logit_tokens,
            checkpointing=checkpointing,
            act_bytes=act,
            full_finetune=lora is None,
            head_tile=head_tile,
            on_gpu=torch.cuda.is_available(),
            reference_bytes=total * precision.load.itemsize if reference_copy else 0,
        )

    if isinstance(train.gradient_checkpointing, bool):
        checkpointing = train.gradient_checkpointing
    else:
        need = estimate(False)["total_gib"] * 1024**3
        available = available_memory_bytes()
        checkpointing = need > _FIT * available
        if checkpointing:
            log.info("gradient checkpointing on: ~%.1f GiB needed without it, %.1f GiB available", need / 1024**3,
                     available / 1024**3)
    return TrainingPlan(
        precision=precision,
        trainable_params=trainable,
        total_params=total,
        parent_adapters=parent,
        checkpointing=checkpointing,
        memory=estimate(checkpointing),
        config=model.config,
    )

