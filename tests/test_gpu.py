"""On a CUDA machine: bitsandbytes 4-bit bases on the GPU, a QLoRA step, bf16 by default, a QLoRA `rlhf sft`.

Skipped without CUDA (tests/conftest.py); bench/gpu_check.sh runs them with the GPU figures.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.gpu


def test_dtype_auto_is_bf16_on_a_cuda_device_with_bf16():
    import torch

    from rlhf_cli.core.device import plan_precision, resolve_dtype

    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    assert resolve_dtype("auto") == expected
    # A 4-bit base computes in the chosen dtype.
    assert plan_precision("auto", adapters=True, quantized=True).load == expected


def test_4bit_base_on_cuda_and_a_qlora_step_moves_only_the_adapter(tiny):
    import bitsandbytes as bnb
    import torch

    from rlhf_cli.core.loading import load_model
    from rlhf_cli.core.lora import attach_lora
    from rlhf_cli.recipe import LoraSpec, QuantSpec
    from rlhf_cli.runs import resolve_model

    model = load_model(resolve_model(str(tiny["model"])), dtype=torch.bfloat16, quant=QuantSpec(bits=4))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.device.type == "cuda" for m in layers)
    model = attach_lora(model, LoraSpec(r=8, alpha=16, dropout=0.0), task="CAUSAL_LM", quantized=True,
                        gradient_checkpointing=False)
    model.train()  # as Trainer does (bitsandbytes repacks eval-mode 4-bit layers for a kernel without autograd)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before_lora = {n: p.detach().clone() for n, p in trainable.items()}
    torch.manual_seed(0)
    ids = torch.randint(10, 300, (4, 32), device="cuda")
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(input_ids=ids).logits.float()

    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()

    # lora_B starts at zero, so it is what the first step moves (lora_A's gradient is zero until B is not).
    b_weights = [n for n in trainable if "lora_B" in n]
    moved = [n for n in b_weights if not torch.equal(trainable[n].detach(), before_lora[n])]
    assert b_weights and moved == b_weights
    with torch.no_grad(), model.disable_adapter():
        after = model(input_ids=ids).logits.float()
    assert torch.allclose(after, base_logits, atol=1e-3), "the 4-bit base must stay frozen"


def test_qlora_sft_on_cuda_trains_and_records_bf16(tiny, tmp_path):
    from typer.testing import CliRunner

    from rlhf_cli.cli import app

    out = tmp_path / "sft"
    args = ["sft", "--model", str(tiny["model"]), "--data", str(tiny["chat"]), "--output-dir", str(out), "--json",
            "--set", "quant.bits=4", "--set", "train.max_steps=30", "--set", "train.batch_size=16",
            "--set", "train.lr=3e-3", "--set", "train.logging_steps=5", "--set", "data.max_length=64",
            "--set", "train.warmup_ratio=0.0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "completed" and manifest["quantization"]["bits"] == 4
    assert manifest["precision"]["compute"] == "bf16"
    # The allocator's peak of a 2-layer 4-bit model on batches of 16 x 64 tokens is a few MiB: a graph or
    # cache that grows with the steps would show here.
    assert 0 < manifest["peak_memory_gb"] < 0.5
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses[-1] < losses[0] - 0.5, losses
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
