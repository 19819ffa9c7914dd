"""Each patch of peft's private attributes and classes (rlhf_cli/core/peft_patches.py) against peft's own
computation, the per-model LoRA arithmetic (core.lora.lora_arithmetic, track_optimizer), and the check of
peft's version against pyproject.toml's pin."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from rlhf_cli.core import peft_patches
from rlhf_cli.recipe import LoraSpec


@pytest.fixture
def peft_version(monkeypatch):
    """Set peft's reported version; the check is computed again before and after."""
    import peft

    def set_version(version: str) -> None:
        monkeypatch.setattr(peft, "__version__", version)
        peft_patches.supported.cache_clear()

    yield set_version
    monkeypatch.undo()
    peft_patches.supported.cache_clear()


def _lora_model(tiny, **config):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny["model"])
    return get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                            init_lora_weights=False, **config)).eval()


def test_tested_range_is_pyprojects_pin():
    from packaging.requirements import Requirement

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    pins = [Requirement(d) for d in re.findall(r'^\s*"(peft[^"]*)"', pyproject, re.M)]
    assert len(pins) == 1 and pins[0].specifier == Requirement(f"peft{peft_patches.PEFT_TESTED}").specifier
    assert peft_patches.supported()  # the installed peft is a tested one


def test_untested_peft_keeps_peft_code_and_warns_once(tiny, peft_version):
    """Outside the tested range nothing is patched: the layers stay peft's (its own arithmetic), adapters
    switch through peft's set_adapter, and one warning says so."""
    from peft.tuners.lora.layer import Linear as PeftLinear
    from peft.tuners.lora.layer import LoraLayer

    from rlhf_cli.core.lora import fast_lora_layers

    peft_version("0.99.0")
    model = _lora_model(tiny)
    with mock.patch.object(peft_patches.log, "warning") as warning:
        assert fast_lora_layers(model) == 0
        assert peft_patches.adapter_switchable_layers(model) == []
    assert warning.call_count == 1 and "0.99.0" in warning.call_args.args
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(type(m) is PeftLinear and m.cast_input_dtype_enabled for m in layers)
    assert all(type(lin) is torch.nn.Linear for m in layers for lin in [*m.lora_A.values(), *m.lora_B.values()])
    assert peft_patches.arithmetic_of(model) == []

    peft_version("0.21.2")
    assert fast_lora_layers(model) == len(layers)


def test_set_active_adapters_does_what_peft_set_adapter_does(tiny):
    """Setting the layers' active-adapter lists gives the layers peft's set_adapter would give them (as
    peft's active_adapters reports) and the same outputs, and leaves requires_grad alone."""
    from peft import LoraConfig

    model = _lora_model(tiny)
    model.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    layers = peft_patches.adapter_switchable_layers(model)
    assert layers
    for adapters in (["default", "second"], ["second"], []):
        model.base_model.set_adapter(adapters)
        peft_active = [list(m.active_adapters) for m in layers]
        with torch.no_grad():
            reference = model(input_ids=ids).logits
        model.base_model.set_adapter(["default"])
        grads = {n: p.requires_grad for n, p in model.named_parameters()}
        peft_patches.set_active_adapters(layers, adapters)
        assert [list(m.active_adapters) for m in layers] == peft_active == [adapters] * len(layers)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, reference, rtol=0, atol=0)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def test_lora_computes_in_the_activation_dtype_with_fp32_weights(tiny):
    """The activation-dtype patch (A and B as _ActivationDtypeLinear, peft's input cast off): on a bf16
    base the LoRA matrices stay fp32 and trainable, but multiply in bf16; the result is peft's
    fp32-adapter result up to bf16 rounding, gradients reach the fp32 weights, and the cached bf16 copy
    used without grad follows a step of a tracked optimizer and a checkpoint load."""
    from transformers import AutoModelForCausalLM

    from rlhf_cli.core.lora import fast_lora_layers, make_trainable, track_optimizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.bfloat16)
    model = make_trainable(base, lora=LoraSpec(r=4, dropout=0.0), task="CAUSAL_LM", quantized=False,
                           checkpointing=False, seed=0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # a non-zero update, so the adapters change the logits
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    model.eval()
    fast = model(input_ids=ids).logits.float()

    from peft.tuners.lora.layer import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for m in layers:  # back to peft's own path for the reference
        m.cast_input_dtype_enabled = True
        for lin in [*m.lora_A.values(), *m.lora_B.values()]:
            lin.__class__ = torch.nn.Linear
    reference = model(input_ids=ids).logits.float()
    assert fast_lora_layers(model) == len(layers) > 0
    assert (fast - reference).abs().max() < 0.05 * reference.abs().max()

    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)

    # fused: updates in place without bumping the weights' version counters. accelerate's wrapper (a
    # stand-in here) is looked through: the torch optimizer inside is the one that steps.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, fused=True)
    track_optimizer(model, SimpleNamespace(optimizer=optimizer))
    saved = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    with torch.no_grad():
        before = model(input_ids=ids).logits.float()
        optimizer.step()
        after = model(input_ids=ids).logits.float()
        with torch.enable_grad():
            fresh = model(input_ids=ids).logits.float()
        assert not torch.equal(before, after)  # the no-grad cache saw the step
        assert torch.equal(after, fresh)
        model.load_state_dict(saved, strict=False)  # a checkpoint load copies in place
        assert torch.equal(model(input_ids=ids).logits.float(), before)


def test_exact_arithmetic_matches_peft_and_sees_updates_below_bf16_rounding(tiny):
    """Under lora_arithmetic(model, "exact") a bf16 model's LoRA layers give peft's fp32-adapter result, so
    a weight change smaller than bf16 rounding still changes the output (PPO's ratio depends on it);
    outside, it does not. The mode belongs to the model: another model computes as before meanwhile."""
    from transformers import AutoModelForCausalLM

    from rlhf_cli.core.lora import lora_arithmetic, make_trainable

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.bfloat16)
    model = make_trainable(base, lora=LoraSpec(r=4, dropout=0.0), task="CAUSAL_LM", quantized=False,
                           checkpointing=False, seed=0).eval()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    with torch.no_grad():
        for p in lora:  # values bf16 can hold exactly, so a small enough change rounds back to them
            p.copy_(torch.randn_like(p).mul(0.5).bfloat16().float())
    ids = torch.randint(0, model.config.vocab_size, (2, 12))

    def logits(exact: bool) -> torch.Tensor:
        with torch.no_grad():
            if exact:
                with lora_arithmetic(model, "exact"):
                    return model(input_ids=ids).logits.float()
            return model(input_ids=ids).logits.float()

    before_fast, before_exact = logits(False), logits(True)
    with torch.no_grad():
        for p in lora:
            p.mul_(1 + 2**-12)  # below half of bf16's relative step (2**-8): the bf16 copies do not change
    assert torch.equal(logits(False), before_fast)
    assert not torch.equal(logits(True), before_exact)

    other = make_trainable(AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.bfloat16),
                           lora=LoraSpec(r=4, dropout=0.0), task="CAUSAL_LM", quantized=False, checkpointing=False,
                           seed=0).eval()
    with torch.no_grad():
        for p in (p for n, p in other.named_parameters() if "lora_" in n):
            p.copy_(torch.randn_like(p).mul(0.5).bfloat16().float().add_(1e-3))  # not bf16-exact: modes differ
        other_fast = other(input_ids=ids).logits.float()
        with lora_arithmetic(model, "exact"):
            assert torch.equal(other(input_ids=ids).logits.float(), other_fast)
            with lora_arithmetic(other, "exact"):
                assert not torch.equal(other(input_ids=ids).logits.float(), other_fast)
            assert torch.equal(other(input_ids=ids).logits.float(), other_fast)


@pytest.mark.parametrize("case", ["bf16-exact", "fp32", "bf16-exact-two-adapters", "dropout"])
def test_fused_lora_update_matches_peft(tiny, case):
    """The fused-Linear patch: the one-node LoRA update gives peft's outputs and gradients (its own forward
    being the reference): fp32 adapters on a bf16 base computing exactly, an fp32 model, two adapters
    applied together, and dropout (the same mask from the same seed). Computing fast, a bf16 model keeps
    the unfused path."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear
    from transformers import AutoModelForCausalLM

    from rlhf_cli.core import peft_patches
    from rlhf_cli.core.lora import fast_lora_layers, lora_arithmetic, make_trainable

    torch.manual_seed(0)
    dtype = torch.float32 if case == "fp32" else torch.bfloat16
    base = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=dtype)
    model = make_trainable(base, lora=LoraSpec(r=4, alpha=5.0, dropout=0.3 if case == "dropout" else 0.0),
                           task="CAUSAL_LM", quantized=False, checkpointing=False, seed=0)
    if case == "bf16-exact-two-adapters":
        model.add_adapter("second", LoraConfig(r=2, lora_alpha=3, target_modules="all-linear", lora_dropout=0.0))
        model.base_model.set_adapter(["default", "second"])
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            torch.nn.init.normal_(p, std=0.3)  # non-zero updates, with a scaling that is not a power of two
            p.requires_grad_(True)
    fast_lora_layers(model)
    layers = [m for m in model.modules() if isinstance(m, PeftLinear)]
    assert layers and all(type(m) is not PeftLinear for m in layers)  # all fused
    fused_class = type(layers[0])
    model.train(case == "dropout")
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    calls = []
    real_apply = peft_patches._LoraUpdate.apply

    def counted(*args):
        calls.append(1)
        return real_apply(*args)

    def run(fused: bool, exact: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        for m in layers:
            m.__class__ = fused_class if fused else PeftLinear
        model.zero_grad()
        torch.manual_seed(1)
        calls.clear()
        with lora_arithmetic(model, "exact" if exact else "fast"), mock.patch.object(peft_patches._LoraUpdate, "apply", counted):
            logits = model(input_ids=ids).logits.float()
            logits.logsumexp(-1).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return logits.detach(), grads

    reference, ref_grads = run(fused=False)
    fused, fused_grads = run(fused=True)
    assert len(calls) == len(layers) * (2 if case == "bf16-exact-two-adapters" else 1)
    assert ref_grads and ref_grads.keys() == fused_grads.keys()
    # fp32 all through: equal to fp32 rounding. On a bf16 base the updates are fp32 too, but a last-bit
    # difference of one can flip a bf16 rounding of the activations, which the layers above carry on.
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert (fused - reference).abs().max() <= tol * reference.abs().max()
    for n, g in ref_grads.items():
        assert g.dtype == torch.float32 and g.abs().sum() > 0, n
        assert (fused_grads[n] - g).norm() <= tol * g.norm(), n
    if dtype == torch.bfloat16:
        run(fused=True, exact=False)
        assert not calls  # bf16 arithmetic: the activation-dtype layers, unfused


