"""The training plan's memory estimate for DPO: both answers of every pair count as tokens, trl's fused LM
head is one tile of logits (not the full [tokens, vocab] tensor), and the estimate is what turns
`gradient_checkpointing: auto` on."""

from __future__ import annotations

import pytest

from rlhf_cli.core.memory import GiB, estimate_memory

# SmolLM2-135M with LoRA r16 on all linear layers, bf16 base: bench/dpo_throughput.py's configuration.
SMOL = dict(total_params=139_399_488, trainable_params=4_884_480, weight_bytes=2, hidden=576, layers=30, vocab=49152,
            checkpointing=False)
TILE = (4096, 32768)
ROUNDING = GiB / 2000  # parts are reported in GiB to three decimals


def _part(est: dict, name: str) -> float:
    return est["parts_gib"][name] * GiB


def test_fused_head_holds_one_tile_of_logits():
    tokens = 2 * 8 * 222
    cpu = estimate_memory(**SMOL, tokens_per_step=tokens, head_tile=TILE)
    # The CPU fallback keeps eight fp32 copies of the tile and its bf16 buffer; the hidden states' fp32 gradient.
    assert _part(cpu, "logits") == pytest.approx(tokens * 32768 * (8 * 4 + 2) + tokens * 576 * 4, abs=ROUNDING)
    gpu = estimate_memory(**SMOL, tokens_per_step=tokens, head_tile=TILE, on_gpu=True)
    assert _part(gpu, "logits") == pytest.approx(tokens * 32768 * 2 + tokens * 576 * 4, abs=ROUNDING)
    # Past one tile of rows the head loops: its logits stop growing, the full logits do not.
    long = estimate_memory(**SMOL, tokens_per_step=4 * tokens, head_tile=TILE)
    assert _part(long, "logits") == pytest.approx(4096 * 32768 * 34 + 4 * tokens * 576 * 4, abs=ROUNDING)
    full = estimate_memory(**SMOL, tokens_per_step=tokens)
    assert _part(full, "logits") == pytest.approx(tokens * 49152 * 13, abs=ROUNDING)  # measured on a CPU
    full_gpu = estimate_memory(**SMOL, tokens_per_step=tokens, on_gpu=True)
    assert _part(full_gpu, "logits") == pytest.approx(tokens * 49152 * 10, abs=ROUNDING)
    assert "reference_weights" not in cpu["parts_gib"]
    ref = estimate_memory(**SMOL, tokens_per_step=tokens, head_tile=TILE, reference_bytes=2 * GiB)
    assert ref["parts_gib"]["reference_weights"] == 2 and ref["total_gib"] == pytest.approx(cpu["total_gib"] + 2, abs=0.01)


def test_dpo_tokens_count_chosen_and_rejected_of_every_pair():
    from rlhf_cli.core.dpo import tokens_per_step

    lengths = [30, 50, 41, 44]  # Stats.lengths: chosen and rejected transcript of each pair
    assert tokens_per_step(8, lengths, max_length=256) == 2 * 8 * 50
    assert tokens_per_step(8, lengths, max_length=40) == 2 * 8 * 40
    four, eight = (estimate_memory(**SMOL, tokens_per_step=tokens_per_step(n, lengths, 256), head_tile=TILE) for n in (4, 8))
    assert _part(eight, "activations") == pytest.approx(2 * _part(four, "activations"), abs=2 * ROUNDING)
    assert _part(eight, "activations") == pytest.approx(2 * 8 * 50 * 30 * 80 * 576, abs=ROUNDING)  # CPU, measured
    on_gpu = estimate_memory(**SMOL, tokens_per_step=tokens_per_step(8, lengths, 256), head_tile=TILE, on_gpu=True)
    assert _part(on_gpu, "activations") == pytest.approx(2 * 8 * 50 * 30 * 34 * 576, abs=ROUNDING)  # Korthikanti et al.


def test_a_quantized_base_keeps_its_embeddings_and_head_in_the_load_dtype(tiny):
    # bitsandbytes quantizes frozen Linear layers only. The tiny Llama holds most of its parameters in the
    # embeddings: 4-bit storage of every parameter put its weights at 0.65x what the loaded model holds.
    import torch

    from rlhf_cli.core.loading import count_parameters, load_model, resolve
    from rlhf_cli.core.lora import attach_lora
    from rlhf_cli.core.plan import empty_model, stored_weight_bytes
    from rlhf_cli.recipe import LoraSpec, ModelSpec, QuantSpec

    spec = ModelSpec(path=str(tiny["model"]))
    resolved = resolve(spec)
    loaded = load_model(resolved, dtype=torch.bfloat16, quant=QuantSpec(bits=4))
    held = sum(p.numel() * p.element_size() for p in loaded.parameters())
    planned = attach_lora(empty_model(resolved, spec, head="causal"), LoraSpec(r=8), task="CAUSAL_LM", quantized=False,
                          gradient_checkpointing=False)
    adapters, total = count_parameters(planned)
    estimate = total * stored_weight_bytes(planned, 4, 2) - adapters * 2  # the adapters are not in `loaded`
    # The estimate adds the block constants (0.07 byte per quantized weight) that are no parameters.
    assert held <= estimate <= 1.1 * held
    assert stored_weight_bytes(planned, None, 2) == 2
