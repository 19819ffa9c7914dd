"""Every touch of peft's private attributes and classes, applied only on the peft versions they were tested on.

    if supported():                                   # peft inside PEFT_TESTED, else one warning
        patch_lora_layer(layer, arithmetic)           # faster forwards for one plain LoRA layer
    set_active_adapters(adapter_switchable_layers(peft_model), ["policy"])

The patches: the LoRA A and B matrices become _ActivationDtypeLinear (they multiply in the activations'
dtype) with peft's input cast (`cast_input_dtype_enabled`) off; a plain LoRA Linear becomes a subclass
whose update is one autograd node (_LoraUpdate); and the layers' active-adapter lists (`_active_adapter`)
are set directly where peft's set_adapter would walk the model. Outside the tested range none of them is
applied: peft computes with its own code (the numbers of an exact model, only slower) and its public
set_adapter switches adapters. tests/test_peft_patches.py checks each patch against peft's own result.

When the patched layers compute exactly and when their cached casts go stale is decided per model in
core.lora (LoraArithmetic); the attaching and training of adapters is core.lora too.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from rlhf_cli.core.lora import LoraArithmetic

log = logging.getLogger("rlhf")

# pyproject.toml's pin of peft; tests/test_peft_patches.py checks that the two agree.
PEFT_TESTED = ">=0.18,<0.22"


@functools.cache
def supported() -> bool:
    """Whether the installed peft is one these patches were tested on; warns once where it is not."""
    import peft
    from packaging.specifiers import SpecifierSet

    if peft.__version__ in SpecifierSet(PEFT_TESTED):
        return True
    log.warning("peft %s is outside the tested range %s: LoRA layers keep peft's own code (same results as "
                "peft computes them, slower)", peft.__version__, PEFT_TESTED)
    return False


class _ActivationDtypeLinear(torch.nn.Linear):
    """A LoRA A or B matrix kept in fp32 (AdamW's small steps would round away in bf16) that multiplies
    in its input's dtype, as autocast would, but for these layers alone.

    peft otherwise casts a bf16 activation to fp32 for every LoRA layer and the fp32 update back, and
    those casts and fp32 element-wise ops are a sizeable part of a LoRA training step on a bf16 base, and
    more of a sampling step (bench/sft_throughput.py times rlhf sft with them; bench/generation.py, given
    an adapter, would show sampling). In no-grad passes (generation, scoring) the low-precision copy of
    the weight is cached until the weight changes: a step of an optimizer that trains this model (a fused
    AdamW updates weights in place without bumping their version counter; core.lora.track_optimizer
    counts its steps), an in-place copy (loading a checkpoint bumps the version), or new storage.

    The model then sees its weights rounded to bf16, so an update smaller than that rounding shows only
    once enough of them add up. SFT does not mind (the held-out loss of the demo's SFT is the same either
    way), but PPO's trust region does: its ratio stays at 1 while the rounded weights stand still, then
    jumps, and the policy drifts further from the reference for the same reward (the kl of the PPO run of
    rlhf_cli/demo/tiny.py shows it). PPO therefore samples, scores and trains its policy under
    core.lora.lora_arithmetic(actor, "exact"); its reward model scores as train-rm trained it.
    """

    _lora_arithmetic: LoraArithmetic

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if x.dtype != weight.dtype:
            arithmetic = self._lora_arithmetic
            if arithmetic.exact:  # peft's own arithmetic: the input cast up, the update in the weights' dtype
                return torch.nn.functional.linear(x.to(weight.dtype), weight, bias)
            if torch.is_grad_enabled():
                weight = weight.to(x.dtype)
            else:
                key = (arithmetic.optimizer_steps, weight._version, weight.data_ptr(), x.dtype)
                cached = self.__dict__.get("_cast")
                if cached is None or cached[0] != key:
                    cached = (key, weight.detach().to(x.dtype))
                    self.__dict__["_cast"] = cached
                weight = cached[1]
            bias = None if bias is None else bias.to(x.dtype)
        return torch.nn.functional.linear(x, weight, bias)


class _LoraUpdate(torch.autograd.Function):
    """result + scaling * x A^T B^T in one autograd node, computed in the dtype of A and B.

    The scaling goes on the rank-r product instead of the [tokens, out] update, the update is added by
    addmm, and the input is saved as it came (bf16 on a bf16 base) and cast again for the backward.
    """

    @staticmethod
    def forward(ctx: Any, result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                scaling: float) -> torch.Tensor:
        h = (x.reshape(-1, x.shape[-1]).to(A.dtype) @ A.t()).mul_(scaling)
        out = torch.addmm(result.reshape(-1, result.shape[-1]).to(A.dtype), h, B.t())
        ctx.save_for_backward(x, h, A, B)
        ctx.scaling, ctx.result_dtype = scaling, result.dtype
        return out.view(*result.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, h, A, B = ctx.saved_tensors
        need_result, need_x, need_A, need_B = ctx.needs_input_grad[:4]
        g = grad.reshape(-1, grad.shape[-1]).to(A.dtype)
        grad_B = (g.t() @ h) if need_B else None
        gh = (g @ B).mul_(ctx.scaling)
        grad_A = (gh.t() @ x.reshape(-1, x.shape[-1]).to(A.dtype)) if need_A else None
        grad_x = (gh @ A).to(x.dtype).view(x.shape) if need_x else None
        grad_result = grad.to(ctx.result_dtype) if need_result else None
        return grad_result, grad_x, grad_A, grad_B, None


@functools.cache
def _fused_lora_linear() -> type:
    """peft's LoRA Linear with its update in one autograd node per adapter (_LoraUpdate) where the update
    is computed in the adapter weights' dtype: when its model computes exactly, or is all in one dtype.

    peft computes result + B(A(x)) * scaling with a cast of x, two matmuls, a multiply and an add over the
    [tokens, out] update, its cast back, and the autograd nodes of each. The fused node gives the same
    outputs and gradients (bitwise where the scaling is a power of two) in less time (bench/ppo_floor.py
    times the policy's forward and backward per minibatch, the pass it shortens). Its backward recasts the
    saved bf16 input instead of keeping peft's fp32 copy of it, which lowers the peak memory of a
    shared-base PPO (bench/ppo_step.py --layouts shared-base).

    Everything else goes through peft's own forward: bf16 arithmetic (the activation-dtype layers, where
    fusing gains little), disabled or merged adapters, DoRA and other variants, a LoRA bias, mixed-adapter
    batches. Dropout stays a node of its own, on the update's input.
    """
    from peft.tuners.lora.layer import Linear

    def forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        exact = self._lora_arithmetic.exact
        names = [a for a in self.active_adapters if a in self.lora_A]
        if (args or kwargs or self.disable_adapters or self.merged or self.lora_variant
                or any(self.lora_B[a].bias is not None or self.lora_B[a].weight.dtype != self.lora_A[a].weight.dtype
                       or not (exact or x.dtype == self.lora_A[a].weight.dtype) for a in names)):
            return Linear.forward(self, x, *args, **kwargs)
        result = self.base_layer(x)
        out_dtype = result.dtype
        for a in names:
            A, B = self.lora_A[a].weight, self.lora_B[a].weight
            result = _LoraUpdate.apply(result, self.lora_dropout[a](x), A, B, self.scaling[a])
        return result.to(out_dtype)

    cls = type("FusedLoraLinear", (Linear,), {"forward": forward, "__module__": __name__})
    globals()["FusedLoraLinear"] = cls  # a module attribute, so pickle finds it
    return cls


def patch_lora_layer(module: Any, arithmetic: LoraArithmetic) -> bool:
    """Swap in the faster forwards for one plain LoRA layer, in place, computing as `arithmetic` says: its A
    and B multiply in the activation dtype (_ActivationDtypeLinear), and a plain Linear's update is one
    autograd node where it is computed in the adapters' own dtype (_fused_lora_linear).

    Returns whether the layer computes so; layers with a LoRA variant (DoRA, ...) or other A and B
    matrices keep peft's own path, and so does every layer on an untested peft.
    """
    from peft.tuners.lora.layer import Linear as PeftLinear
    from peft.tuners.lora.layer import LoraLayer

    if not supported() or not isinstance(module, LoraLayer) or getattr(module, "lora_variant", None):
        return False
    linears = [m for d in (module.lora_A, module.lora_B) for m in d.values()]
    if not linears or not all(type(m) in (torch.nn.Linear, _ActivationDtypeLinear) for m in linears):
        return False
    for m in linears:
        m.__class__ = _ActivationDtypeLinear
        m._lora_arithmetic = arithmetic
    module.cast_input_dtype_enabled = False  # peft's cast of x to the adapter's dtype
    if type(module) is PeftLinear:  # not its 4-/8-bit subclasses, whose base layers dequantize
        module.__class__ = _fused_lora_linear()
    module._lora_arithmetic = arithmetic
    return True


def arithmetic_of(model: Any) -> list[LoraArithmetic]:
    """The LoraArithmetic objects the patched layers of `model` read (one per model, as a rule)."""
    found: dict[int, LoraArithmetic] = {}
    for m in model.modules():
        arithmetic = m.__dict__.get("_lora_arithmetic")
        if arithmetic is not None:
            found.setdefault(id(arithmetic), arithmetic)
    return list(found.values())


def adapter_switchable_layers(model: Any) -> list[Any]:
    """The tuner layers of `model` whose active adapters set_active_adapters can set, or [] where peft's
    own set_adapter must do it (an untested peft, or a layer that keeps its active adapters elsewhere)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not supported():
        return []
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    return layers if all(isinstance(getattr(m, "_active_adapter", None), (str, list)) for m in layers) else []


def set_active_adapters(layers: list[Any], adapters: list[str]) -> None:
    """Make these tuner layers apply exactly `adapters` (their updates add up), as peft's set_adapter does
    for each layer, without its requires_grad changes or its walks over the whole model."""
    for layer in layers:
        layer._active_adapter = list(adapters)
