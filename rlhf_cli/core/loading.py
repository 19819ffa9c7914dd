"""Load tokenizers and models from a hub id, a local directory, a GGUF file or a run directory.

    resolved = resolve(recipe.model)                      # run dirs -> base + adapters + tokenizer
    tokenizer = load_tokenizer(resolved)
    model = load_model(resolved, dtype=..., quant=recipe.quant, head="causal")

Adapters of a parent run are merged into the base before a new adapter starts at zero, so every run
is "base + its own adapter" on top of whatever its parent was (recorded in run.json). Also here: the
bitsandbytes config, a new model of a recipe's shape (pretraining from scratch) and parameter counts.
Attaching, training and computing LoRA adapters is core.lora; patches of peft's own classes are
core.peft_patches.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch

from rlhf_cli.core.device import resolve_dtype
from rlhf_cli.core.hub import check_resolved
from rlhf_cli.core.lora import merge_adapters
from rlhf_cli.errors import DataError, RecipeError, TrainingError
from rlhf_cli.recipe import ModelSpec, QuantSpec
from rlhf_cli.runs import ResolvedModel, resolve_model

log = logging.getLogger("rlhf")

Head = Literal["causal", "reward"]


def resolve(spec: ModelSpec | Any, head: Head = "causal") -> ResolvedModel:
    """Resolve a ModelSpec-like object (path, gguf_file, trust_remote_code, tokenizer) for the head that will
    load it. A reward run has no language-model head to sample or train (a causal LM would load its base and
    drop the score head without a word), so it is refused unless a reward head is wanted."""
    resolved = resolve_model(spec.path, getattr(spec, "gguf_file", None), getattr(spec, "trust_remote_code", False))
    if head == "causal" and resolved.kind == "reward":
        raise RecipeError(
            f"{spec.path} is a reward model run (run.json model.kind), not a language model: pass an sft, dpo, ppo "
            "or pretrain run, or a causal LM directory (a reward model goes to --reward)"
        )
    tokenizer = getattr(spec, "tokenizer", None)
    if tokenizer:
        resolved = ResolvedModel(**{**resolved.__dict__, "tokenizer": tokenizer})
    check_resolved(resolved)
    return resolved


def _hub_errors(ref: str, err: Exception) -> DataError:
    return DataError(
        f"{ref}: cannot load ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
        "give a local model directory, a run directory, or a hub id that is cached locally"
    )


def load_tokenizer(resolved: ResolvedModel, chat_template: str | None = None, padding_side: str = "right") -> Any:
    """Tokenizer with a pad token and, when given, the recipe's chat template."""
    from transformers import AutoTokenizer

    path = resolved.tokenizer_path
    kwargs: dict[str, Any] = {"trust_remote_code": resolved.trust_remote_code}
    if resolved.tokenizer is None and resolved.gguf_file:
        kwargs["gguf_file"] = resolved.gguf_file
    try:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise _hub_errors(path, e) from None
    if chat_template:
        tok.chat_template = chat_template
    if tok.pad_token is None:
        # Padding positions are masked out of the loss and attention, so reusing EOS is safe.
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def bnb_config(quant: QuantSpec, compute_dtype: torch.dtype) -> Any:
    if quant.bits is None:
        return None
    from transformers import BitsAndBytesConfig

    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = compute_dtype if quant.compute_dtype == "auto" else resolve_dtype(quant.compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute,
        # Keep the quantized weights' storage type float32-free on CPU and GPU alike.
        bnb_4bit_quant_storage=torch.uint8,
    )


def check_quantizable(resolved: ResolvedModel, quant: QuantSpec) -> None:
    if resolved.gguf_file and quant.bits is not None:
        raise RecipeError(
            "quant.bits with a GGUF model: transformers dequantizes GGUF files on load and cannot re-quantize them "
            "with bitsandbytes; set quant.bits: null, or use a safetensors checkpoint"
        )


def load_model(
    resolved: ResolvedModel,
    *,
    dtype: torch.dtype,
    quant: QuantSpec | None = None,
    head: Head = "causal",
    device_map: Any = None,
    merge_parent: bool = True,
    seed: int | None = None,
) -> Any:
    """Base weights (optionally quantized) with the parent run's adapters merged in.

    merge_parent=False leaves the parent's adapters out, for a caller that keeps the parent's adapter as
    its starting adapter (core.lora.start_from_adapter). seed: what the weights the checkpoint lacks (a new
    reward head) are drawn from; without it they come from whatever the process's generator holds, which
    differs from process to process.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, set_seed

    quant = quant or QuantSpec()
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": resolved.trust_remote_code}
    check_quantizable(resolved, quant)
    if resolved.gguf_file:
        from transformers import GgufConfig

        # dequantize=True gives plain dense Linear layers that train and save_pretrained like any model;
        # load in fp32 and cast afterwards (asking the GGUF loader for bf16 is slower).
        kwargs.update(gguf_file=resolved.gguf_file, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32)
    qconf = bnb_config(quant, dtype)
    if qconf is not None:
        kwargs["quantization_config"] = qconf
        kwargs["device_map"] = device_map or {"": _default_device()}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    if head == "reward":
        # One scalar per sequence: the Bradley-Terry reward head (Ouyang et al. 2022).
        kwargs["num_labels"] = 1
        cls: Any = AutoModelForSequenceClassification
    else:
        cls = AutoModelForCausalLM
    if seed is not None:
        set_seed(seed)
    try:
        model = cls.from_pretrained(resolved.base, **kwargs)
    except (OSError, ValueError) as e:
        if "bitsandbytes" in str(e) or "quantiz" in str(e).lower():
            raise TrainingError(f"4/8-bit loading failed: {str(e).splitlines()[0]}") from None
        raise _hub_errors(resolved.base, e) from None
    if resolved.gguf_file:
        _forget_gguf_quantizer(model)
        if dtype != torch.float32:
            model = model.to(dtype)
    if not qconf and device_map is None and torch.cuda.is_available():
        model = model.to(_default_device())
    if head == "reward" and model.config.pad_token_id is None:
        # transformers refuses batches of a head without a pad id; the id does not decide where scores
        # are read (core.reward.sequence_scores pools by the attention mask).
        model.config.pad_token_id = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    if head == "causal":
        contiguous_head_input(model)
    return merge_adapters(model, resolved.adapters) if merge_parent else model


def contiguous_head_input(model: Any) -> None:
    """Hand the output head a contiguous input.

    Generation asks for the logits of the last position only, a strided slice of the hidden states; for
    such a view torch's linear falls back to a batched matmul that first copies the vocabulary matrix once
    per row, a visible share of a short generation (bench/ppo_floor.py times sampling through load_model,
    so with this hook). Copying the slice is a few kilobytes.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Linear):
        head.register_forward_pre_hook(_contiguous_input)


def _contiguous_input(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    if args and torch.is_tensor(args[0]) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def _forget_gguf_quantizer(model: Any) -> None:
    """Make a GGUF-loaded model an ordinary one.

    Without the `kernels` package transformers dequantizes every GGUF weight into a plain nn.Linear, but
    still marks the model as GGUF-quantized, which makes Trainer refuse to train it and save_pretrained
    refuse to write it. The weights are ordinary tensors, so the marks are dropped.
    """
    packed = [name for name, m in model.named_modules() if type(m).__name__.lower().startswith("gguf")]
    if packed:
        raise TrainingError(
            f"GGUF weights stayed packed ({packed[0]}, ...), which cannot be trained: "
            "load the model without the `kernels` package installed, or convert it to safetensors first"
        )
    model.hf_quantizer = None
    model.is_quantized = False
    model.__dict__.pop("quantization_method", None)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _default_device() -> str:
    from rlhf_cli.core.distributed import local_rank

    # Under torchrun / accelerate launch each process owns the GPU of its local rank.
    return f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu"


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total); 4-bit weights count as their logical number of parameters."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if getattr(p, "quant_state", None) is not None or p.dtype == torch.uint8:
            n *= 2  # two 4-bit values per stored byte
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def build_from_config(spec: ModelSpec, tokenizer: Any, dtype: torch.dtype, seed: int | None) -> Any:
    """A new, randomly initialised model of the recipe's shape (pretraining from scratch), drawn from `seed`
    (None: on the meta device, where nothing is drawn)."""
    from transformers import LlamaConfig, LlamaForCausalLM, set_seed

    if seed is not None:
        set_seed(seed)

    c = spec.config
    assert c is not None
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size or _mlp_width(c.hidden_size),
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads or c.num_heads,
        max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).to(dtype)


def _mlp_width(hidden: int) -> int:
    # Llama's SwiGLU width: 8/3 x hidden, rounded up to a multiple of 64.
    return (int(8 * hidden / 3) + 63) // 64 * 64
