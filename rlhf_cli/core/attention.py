"""Attention over padding-free batches on the CPU: each packed sample attends to itself, computed alone.

    use_packed_attention(model)    # before LoRA is attached; CPU only

A flattened batch (core.batches.FlatCollator) is one row of samples with restarting position_ids.
transformers' sdpa path turns that into one T x T block-diagonal mask, and the CPU kernels then work
through the whole T x T square, masked blocks included (quadratic in the batch's total tokens, and slow
with a mask). Here the row is cut at the position resets and each sample runs causal attention on
its own: the work is the sum of the samples' squares, with no mask. Short samples use plain matmul +
softmax, which beats the fused CPU kernel's per-call cost at these sizes (SmolLM2-135M LoRA, ~80-token
chats: 300 against 245 tokens per CPU-second); long ones use the fused kernel, which never stores the
score matrix. Everything that is not a packed row (padded batches, generation with a KV cache) goes
to transformers' own sdpa function with its usual mask.

The attention-function registry is a transformers 5 API: this module is the only place that uses it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger("rlhf")

NAME = "rlhf_packed_sdpa"
# Segments longer than this use the fused kernel (no stored L x L scores); shorter ones plain matmuls.
_FUSED_FROM = 512
_registered = False


def _segment_bounds(position_ids: torch.Tensor) -> list[int]:
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    return [*starts, position_ids.shape[1]]


def packed_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     position_ids: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    packed = (
        query.shape[0] == 1
        and position_ids is not None
        and query.shape[2] == key.shape[2] == position_ids.shape[1]
        and not kwargs.get("output_attentions")
    )
    bounds = _segment_bounds(position_ids) if packed else []
    if len(bounds) < 3 or bounds[0] != 0:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    n_rep = query.shape[1] // key.shape[1]
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        if end - start >= _FUSED_FROM:
            outs.append(torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, dropout_p=dropout, enable_gqa=n_rep > 1))
            continue
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        scores = torch.matmul(q, k.transpose(2, 3)) * scale
        future = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device).triu(1)
        probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1, dtype=torch.float32).to(q.dtype)
        if dropout:
            probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
        outs.append(torch.matmul(probs, v))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def use_packed_attention(model: Any) -> bool:
    """Switch a CPU model from sdpa to packed_attention; True when it did."""
    global _registered
    if torch.cuda.is_available() or getattr(model.config, "_attn_implementation", None) != "sdpa":
        # GPUs: sdpa / flash-attention kernels handle packed rows themselves.
        return False
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask

        if not _registered:
            AttentionInterface.register(NAME, packed_attention)
            # The fallback path needs exactly the masks sdpa gets.
            AttentionMaskInterface.register(NAME, sdpa_mask)
            _registered = True
        model.set_attn_implementation(NAME)
    except (ImportError, AttributeError, ValueError) as e:
        log.debug("packed attention unavailable (%s); keeping sdpa", e)
        return False
    return model.config._attn_implementation == NAME

