"""Attention over padding-free batches: each packed sample attends to itself, computed alone.

    kernel = use_packed_attention(model)    # before LoRA is attached; recorded in run.json

A flattened batch (core.batches.FlatCollator) is one row of samples with restarting position_ids.
transformers' sdpa path turns that into one T x T block-diagonal mask, and the CPU kernels then work
through the whole T x T square, masked blocks included (quadratic in the batch's total tokens, and slow
with a mask). Here the row is cut at the position resets and each sample runs causal attention on
its own: the work is the sum of the samples' squares, with no mask. Short samples use plain matmul +
softmax, which beats the fused CPU kernel's per-call cost at these sizes (measured in training tokens
per CPU-second on SmolLM2-135M LoRA with chats of about 80 tokens); long ones use the fused kernel,
which never stores the score matrix. Everything that is not a packed row (padded batches, generation with a KV cache) goes
to transformers' own sdpa function with its usual mask.

On CUDA the same packed rows would otherwise reach sdpa as one dense block-diagonal mask (no flash
kernel, attention cost (sum L)^2). There the kernel is chosen by what is installed (attention_kernel):
transformers' flash_attention_2 when the flash-attn package is importable (it reads the position resets
itself), else torch's varlen_attn (torch.nn.attention.varlen, a flash kernel over cumulative sequence
lengths) for bf16/fp16 tensors, else the per-sample loop above with sdpa's fused kernel per sample (sum
L^2, no mask). The CPU keeps the per-sample loop: varlen and flash-attn kernels are CUDA-only.

The attention-function registry is a transformers 5 API: this module is the only place that uses it.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from typing import Any, Literal

import torch

log = logging.getLogger("rlhf")

NAME = "rlhf_packed_sdpa"
# Segments longer than this use the fused kernel (no stored L x L scores); shorter ones plain matmuls.
_FUSED_FROM = 512
_registered = False
Kernel = Literal["flash_attention_2", "varlen", "per_sample"]


def attention_kernel(device: str, *, flash_attn: bool, varlen: bool) -> Kernel:
    """Which kernel runs padding-free rows on `device`, given what is importable.

    CUDA: flash-attn's varlen kernel through transformers (it handles position resets itself), else
    torch's varlen_attn, else sdpa per sample. Elsewhere the per-sample loop, which beat the fused CPU
    kernel on short samples (module docstring).
    """
    if device != "cuda":
        return "per_sample"
    if flash_attn:
        return "flash_attention_2"
    return "varlen" if varlen else "per_sample"


def _torch_varlen() -> Any:
    """torch.nn.attention.varlen.varlen_attn where this torch has it (2.10 and later), else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _varlen_packed(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: list[int],
                   scale: float) -> torch.Tensor:
    """Causal attention of every packed sample in one varlen call; (1, H, T, D) in, (1, T, H, D) out.

    The signature moved between torch releases (is_causal in 2.10-2.11, window_size (-1, 0) later; GQA
    flag and scale not in every one), so the call is built from what this torch's function takes.
    """
    from transformers.integrations.sdpa_attention import repeat_kv

    varlen_attn = _torch_varlen()
    params = inspect.signature(varlen_attn).parameters
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1 and "enable_gqa" not in params:
        key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    kwargs: dict[str, Any] = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = n_rep > 1 and key.shape[1] != query.shape[1]
    if "scale" in params:
        kwargs["scale"] = scale
    cu = torch.tensor(bounds, dtype=torch.int32, device=query.device)
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D)
    out = varlen_attn(q, k, v, cu, cu, longest, longest, **kwargs)
    return out.unsqueeze(0)


def _segment_bounds(position_ids: torch.Tensor) -> list[int]:
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    return [*starts, position_ids.shape[1]]


def _hidden(n: int, window: int | None, device: Any) -> torch.Tensor:
    """What each of a sample's n tokens may not see: the future, and with a window what lies `window` or more
    tokens back. Built only where it is used: the fused causal kernel needs none."""
    hidden = torch.ones(n, n, dtype=torch.bool, device=device).triu(1)
    if window is not None:
        hidden |= torch.ones(n, n, dtype=torch.bool, device=device).tril(-window)
    return hidden


def packed_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     position_ids: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    packed = (
        query.shape[0] == 1
        and position_ids is not None
        and query.shape[2] == key.shape[2] == position_ids.shape[1]
        and not kwargs.get("output_attentions")
        and kwargs.get("softcap") is None  # sdpa refuses it too, with its own message
    )
    bounds = _segment_bounds(position_ids) if packed else []
    if len(bounds) < 3 or bounds[0] != 0:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # A sliding-window layer (Mistral, Gemma 2/3's local layers) sees only the last `window` tokens, itself
    # included, as sdpa's mask has it; causal attention alone would let longer samples see further back.
    window = kwargs.get("sliding_window")
    windowed = window is not None and max(b - a for a, b in zip(bounds[:-1], bounds[1:])) > window
    if (query.is_cuda and not dropout and not windowed and query.dtype in (torch.float16, torch.bfloat16)
            and _torch_varlen()):
        return _varlen_packed(query, key, value, bounds, scale), None
    n_rep = query.shape[1] // key.shape[1]
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        n = end - start
        banded = window is not None and n > window
        if n >= _FUSED_FROM:
            outs.append(torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=~_hidden(n, window, q.device) if banded else None, is_causal=not banded,
                scale=scale, dropout_p=dropout, enable_gqa=n_rep > 1))
            continue
        hidden = _hidden(n, window if banded else None, q.device)
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        scores = torch.matmul(q, k.transpose(2, 3)) * scale
        probs = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1, dtype=torch.float32).to(q.dtype)
        if dropout:
            probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
        outs.append(torch.matmul(probs, v))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def use_packed_attention(model: Any) -> Kernel | None:
    """Give a model that uses sdpa the kernel attention_kernel chooses for packed rows; returns it, or None
    where the model keeps its own attention (not sdpa, or the registry is missing)."""
    global _registered
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return None
    kernel = attention_kernel("cuda" if torch.cuda.is_available() else "cpu",
                              flash_attn=importlib.util.find_spec("flash_attn") is not None,
                              varlen=_torch_varlen() is not None)
    try:
        if kernel == "flash_attention_2":
            model.set_attn_implementation("flash_attention_2")
            return kernel if model.config._attn_implementation == "flash_attention_2" else None
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
        return None
    return kernel if model.config._attn_implementation == NAME else None
