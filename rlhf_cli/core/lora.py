"""LoRA adapters: attach, load, merge and train them, and how their layers compute.

    model = make_trainable(model, lora=recipe.lora, task="CAUSAL_LM", quantized=..., checkpointing=..., seed=...)
    optimizer = torch.optim.AdamW(...); track_optimizer(model, optimizer)
    with lora_arithmetic(model, "exact"):                 # PPO: the adapters' own dtype, as peft computes
        ...

On a CPU the LoRA layers take faster forwards (fast_lora_layers, the classes in core.peft_patches). How
they compute is a property of each model (LoraArithmetic): "fast" multiplies in the activations' dtype,
"exact" in the adapter weights' dtype as peft does; and a cached low-precision copy of a weight is
dropped after each step of the optimizers that train that model. Loading base weights is core.loading.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from rlhf_cli.core import peft_patches
from rlhf_cli.errors import DataError
from rlhf_cli.recipe import LoraSpec

log = logging.getLogger("rlhf")


def merge_adapters(model: Any, adapters: tuple[str, ...] | list[str]) -> Any:
    """Fold adapters into the weights in order (a parent run's training becomes part of the base)."""
    if not adapters:
        return model
    from peft import PeftConfig, PeftModel

    task = "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else "CAUSAL_LM"
    for path in adapters:
        if not Path(path).is_dir():
            raise DataError(f"{path}: adapter directory not found (was the run moved?)")
        config = PeftConfig.from_pretrained(path)
        if config.task_type != task:
            # A policy adapter folded into a reward model (sft -> train-rm): same layers, another head.
            # peft's task wrappers assume their own head, so the plain wrapper does the merge.
            config.task_type = None
            config.modules_to_save = None
        model = PeftModel.from_pretrained(model, path, config=config).merge_and_unload()
    log.info("merged %d parent adapter(s) into the base", len(adapters))
    return model


def apply_adapters(model: Any, adapters: tuple[str, ...] | list[str]) -> Any:
    """Wrap the model with saved adapters, live and frozen, their updates adding up in order.

    A reward adapter's score head (modules_to_save) comes with it. Each LoRA layer then computes as in
    training (fast_lora_layers).
    """
    if not adapters:
        return model
    from peft import PeftModel

    for path in adapters:
        if not Path(path).is_dir():
            raise DataError(f"{path}: adapter directory not found (was the run moved?)")
    names = [f"adapter{i}" for i in range(len(adapters))] if len(adapters) > 1 else ["default"]
    model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:]):
        model.load_adapter(path, adapter_name=name)
    if len(names) > 1:
        model.base_model.set_adapter(names, inference_mode=True)
    fast_lora_layers(model)
    return model


def start_from_adapter(model: Any, path: str, *, task: Literal["CAUSAL_LM", "SEQ_CLS"], load_weights: bool = True) -> Any:
    """Wrap the model with a parent run's adapter, trainable, as the starting point of this run.

    Used where merging is not exact (a quantized base): the parent's LoRA keeps training instead of being
    folded into 4-bit weights. A causal adapter may start a reward model: same layers, plus a new score head.
    """
    from peft import LoraConfig, get_peft_model, load_peft_weights, set_peft_model_state_dict

    if not Path(path).is_dir():
        raise DataError(f"{path}: adapter directory not found (was the run moved?)")
    config = LoraConfig.from_pretrained(path)
    config.inference_mode = False
    if config.task_type != task:
        config.task_type = task
        config.modules_to_save = ["score"] if task == "SEQ_CLS" else None
    model = get_peft_model(model, config)
    if not load_weights:
        return model
    weights = load_peft_weights(path, device=str(next(model.parameters()).device))
    if task == "SEQ_CLS" and not any(".score." in k for k in weights):
        log.info("parent adapter has no score head: the reward head starts fresh")
    set_peft_model_state_dict(model, weights)
    return model


def attach_lora(
    model: Any,
    lora: LoraSpec,
    *,
    task: Literal["CAUSAL_LM", "SEQ_CLS"],
    quantized: bool,
    gradient_checkpointing: bool,
    adapter_name: str = "default",
) -> Any:
    """Wrap the model with a fresh LoRA adapter (all base weights frozen)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        # Casts norms to fp32 and enables input grads so checkpointed k-bit layers backprop (Dettmers et al. 2023).
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task,
        # The reward head is new: it trains fully and is saved with the adapter.
        modules_to_save=["score"] if task == "SEQ_CLS" else None,
    )
    return get_peft_model(model, config, adapter_name=adapter_name)


def make_trainable(
    model: Any,
    *,
    lora: LoraSpec | None,
    task: Literal["CAUSAL_LM", "SEQ_CLS"],
    quantized: bool,
    checkpointing: bool,
    seed: int,
    parent_adapter: str | None = None,
) -> Any:
    """The recipe's trainable setup: the parent's adapter trained on (kept), a fresh LoRA, or all weights.

    Trainable tensors end up fp32 whatever the base dtype (the reward head copied from a bf16 base too),
    so AdamW's small updates are not rounded away. New weights (LoRA's A here; a reward head, made when the
    model is loaded, through load_model's seed) are drawn from train.seed, not from whatever the process
    drew before: the same recipe gives the same run, in a fresh process, a long-lived one, or each rank of
    several.
    """
    from transformers import set_seed

    set_seed(seed)
    if parent_adapter is not None:
        if quantized:
            model = prepare_model_for_kbit(model, checkpointing)
        elif checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = start_from_adapter(model, parent_adapter, task=task)
    elif lora is not None:
        model = attach_lora(model, lora, task=task, quantized=quantized, gradient_checkpointing=checkpointing)
    else:
        model.requires_grad_(True)
    for module in model.modules():
        fp32_trainable_modules(module)
    if quantized:
        keep_4bit_weights_trainable(model)
    fast_lora_layers(model)
    return model


def keep_4bit_weights_trainable(model: Any) -> None:
    """Work around bitsandbytes 0.50 on CPUs with AVX512-BF16: a Linear4bit in eval mode that sees a no-grad
    input (an evaluation pass, generation) repacks its weight for an inference kernel that has no autograd,
    and from then on passes no gradient to its input, so the LoRA layers below it train on wrong gradients.
    A model that trains keeps the trainable layout; its eval passes then run the training kernel."""
    for module in model.modules():
        if type(module).__module__.startswith("bitsandbytes") and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def on_cpu(model: Any) -> bool:
    """Whether the model's weights are on the CPU: where the CPU-measured speed-ups apply."""
    return all(p.device.type == "cpu" for p in model.parameters())


@dataclass(eq=False)
class LoraArithmetic:
    """How the patched LoRA layers of one model compute; every patched layer of the model holds the same one.

    exact: in the adapter weights' dtype (fp32), as peft does, instead of the activations' (see
      core.peft_patches._ActivationDtypeLinear for why PPO's sampling, scoring and training need it).
    optimizer_steps: steps taken by the optimizers that train the model (track_optimizer); a no-grad
      pass's cached low-precision copy of a weight is keyed on it.
    """

    exact: bool = False
    optimizer_steps: int = 0


def fast_lora_layers(model: Any) -> int:
    """Swap in faster forwards for the plain LoRA layers of `model`, in place (core.peft_patches.
    patch_lora_layer): their A and B multiply in the activation dtype, and where the update is computed in
    the adapters' own dtype instead (lora_arithmetic(model, "exact"), or an fp32 model), a plain Linear's
    update is one autograd node. Layers added since an earlier call share that call's LoraArithmetic.

    Only the speed changes on an fp32 model. Both were measured on CPUs (the benches named in their
    docstrings); a model on a GPU keeps peft's layers. Returns how many layers compute so.
    """
    if not on_cpu(model):
        return 0
    arithmetic = next(iter(peft_patches.arithmetic_of(model)), None) or LoraArithmetic()
    return sum(peft_patches.patch_lora_layer(m, arithmetic) for m in model.modules())


@contextmanager
def lora_arithmetic(model: Any, mode: Literal["exact", "fast"]) -> Iterator[None]:
    """Inside: the patched LoRA layers of `model` compute exactly (in their weights' dtype, as peft does) or
    fast (in the activations' dtype); other models keep theirs. A model without patched layers computes
    as peft does in either mode."""
    found = peft_patches.arithmetic_of(model)
    before = [a.exact for a in found]
    for a in found:
        a.exact = mode == "exact"
    try:
        yield
    finally:
        for a, exact in zip(found, before):
            a.exact = exact


def track_optimizer(model: Any, optimizer: Any) -> None:
    """Drop the cached no-grad weight casts of `model`'s patched LoRA layers after every step of `optimizer`.

    A fused AdamW updates the weights in place without bumping their version counters, so without this
    a pass after its step could still see the weights before it. Every optimizer that trains a model with
    patched layers goes through here, once the layers are patched (layers patched later join the same
    LoraArithmetic): Trainer's (core.trainer.fit), PPO's and GRPO's (ppo.loop.train).
    """
    found = peft_patches.arithmetic_of(model)
    if not found:
        return
    # accelerate wraps the optimizer; the torch optimizer inside is the one whose step runs.
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer

    def counted(*_args: Any) -> None:
        for a in found:
            a.optimizer_steps += 1

    optimizer.register_step_post_hook(counted)


def fp32_trainable_modules(module: Any, all_params: bool = False) -> None:
    """Cast a module's own trainable (or, with all_params, all) tensors to fp32 and feed it fp32 inputs.

    e.g. the reward head copied from a bf16 base: it then computes in fp32 on fp32 inputs.
    """
    own = [p for p in module.parameters(recurse=False) if (all_params or p.requires_grad) and p.dtype != torch.float32]
    for p in own:
        p.data = p.data.float()
    if own:
        module.register_forward_pre_hook(_inputs_to_fp32)


def _inputs_to_fp32(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def prepare_model_for_kbit(model: Any, checkpointing: bool) -> Any:
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
    )


