"""Memory a training run will need, estimated before anything is loaded (shown by --dry-run).

    estimate_memory(total_params=..., trainable_params=..., weight_bytes=2, hidden=576, layers=30,
                    vocab=49152, tokens_per_step=2048, checkpointing=False)

Assumptions, stated so the figure can be judged:
- weights: total_params x weight_bytes, a mean (4-bit: 0.5 byte plus ~0.07 for block constants; 8-bit: 1 byte;
  for the quantized Linear layers only, the rest at the load dtype: core.plan.stored_weight_bytes);
- every trainable parameter holds an fp32 value, an fp32 gradient and two fp32 AdamW moments: 16 bytes
  (for a full fine-tune the fp32 weights are these 4 bytes, so weight_bytes is 0 on top);
- activations kept for backward, per token and layer: on a GPU 34 x hidden x act_bytes / 2 bytes
  (Korthikanti et al. 2022, "Reducing Activation Recomputation", without the attention-score term that
  fused / flash attention does not store); on a CPU 80 x hidden x act_bytes / 2, measured: the process's
  RSS grows by 65-90 x hidden bytes per token and layer over one forward and backward of SmolLM2-135M with
  LoRA in bf16 (1,024 and 2,048 tokens; the CPU allocator keeps what eager attention and the MLP free);
  with checkpointing only each layer's input (hidden x act_bytes) plus one layer's full set;
- logits: tokens x vocab x (act_bytes + 4 + 4) on a GPU: the logits, their fp32 upcast in the loss and its
  gradient; on a CPU act_bytes + 11 (13.3 bytes per logit measured in bf16). A reward model's score head
  has one output, not a vocabulary: its caller passes vocab=1. Or, for a chunked log-prob head (trl's DPOTrainer, `head_tile`), one tile of at most rows x columns logits
  at a time: on a GPU its buffer (act_bytes per logit, Triton folds the tile in place), on a CPU the torch
  fallback's eight live fp32 copies of the tile in the backward plus the buffer (32 + act_bytes per logit;
  a 2-layer SmolLM2-shape model, 16 sequences of 206 tokens: 4.04 GiB peak RSS against 4.12 estimated),
  plus the fp32 gradient of the hidden states (tokens x hidden x 4);
- a frozen copy of the weights as a separate reference model (DPO's full fine-tune), reference_bytes;
- a fixed 0.5 GiB for the framework (CUDA context / allocator slack or the Python process).
It is an estimate for one device and one micro-batch; real peaks vary by some tens of percent.
bench/memory_estimate.py compares it with the measured peak of sft, train-rm and dpo runs.
"""

from __future__ import annotations

from typing import Any

GiB = 1024**3
_OVERHEAD = int(0.5 * GiB)


def estimate_memory(
    *,
    total_params: int,
    trainable_params: int,
    weight_bytes: float,
    hidden: int,
    layers: int,
    vocab: int,
    tokens_per_step: int,
    checkpointing: bool,
    act_bytes: int = 2,
    full_finetune: bool = False,
    head_tile: tuple[int, int] | None = None,
    on_gpu: bool = False,
    reference_bytes: int = 0,
    logit_tokens: int | None = None,
) -> dict[str, Any]:
    """Bytes per component and the total, in GiB, for a micro-batch of tokens_per_step tokens.

    head_tile: (rows, columns) of a chunked log-prob head's tile, None when the loss sees the full logits;
    logit_tokens: the tokens whose logits the loss computes (default: all of them)."""
    weights = 0 if full_finetune else int(total_params * weight_bytes)
    optimizer = trainable_params * 16
    per_layer_full = (34 if on_gpu else 80) * hidden * act_bytes // 2
    if checkpointing:
        activations = tokens_per_step * (layers * hidden * act_bytes + per_layer_full)
    else:
        activations = tokens_per_step * layers * per_layer_full
    if head_tile is None:
        scored = tokens_per_step if logit_tokens is None else min(logit_tokens, tokens_per_step)
        logits = scored * vocab * (act_bytes + (8 if on_gpu else 11))
    else:
        tile = min(tokens_per_step, head_tile[0]) * min(vocab, head_tile[1])
        logits = tile * (act_bytes if on_gpu else 8 * 4 + act_bytes) + tokens_per_step * hidden * 4
    parts = {
        "weights": weights,
        "trainable_and_adam": optimizer,
        "activations": activations,
        "logits": logits,
        "overhead": _OVERHEAD,
    }
    if reference_bytes:
        parts["reference_weights"] = reference_bytes
    total = sum(parts.values())
    return {
        "total_gib": round(total / GiB, 2),
        "parts_gib": {k: round(v / GiB, 3) for k, v in parts.items()},
        "tokens_per_step": tokens_per_step,
        "checkpointing": checkpointing,
    }


def weight_bytes_for(bits: int | None, load_bytes: int) -> float:
    """Bytes per stored weight: 4-bit NF4/FP4 with its block constants, 8-bit, or the load dtype."""
    if bits == 4:
        return 0.5 + 0.07
    if bits == 8:
        return 1.0 + 0.03
    return float(load_bytes)


def model_shape(config: Any) -> tuple[int, int, int]:
    """(hidden, layers, vocab) of a transformers config, text part for multimodal ones."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.hidden_size), int(text.num_hidden_layers), int(text.vocab_size)


# The host allocator fails with a plain RuntimeError (c10's alloc_cpu), not torch.OutOfMemoryError
# (matched by name below, so that this module needs no torch import).
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory")


def out_of_memory(e: BaseException) -> bool:
    """Whether an exception means a device or the host ran out of memory, whatever class torch gave it."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    return isinstance(e, RuntimeError) and any(m in str(e) for m in _OOM_MESSAGES)
