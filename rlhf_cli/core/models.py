"""Load tokenizers and models from a hub id, a local directory, a GGUF file or a run directory.

    resolved = resolve(recipe.model)                      # run dirs -> base + adapters + tokenizer
    tokenizer = load_tokenizer(resolved)
    model = load_model(resolved, dtype=..., quant=recipe.quant, head="causal")
    model = attach_lora(model, recipe.lora, task="CAUSAL_LM")

Adapters of a parent run are merged into the base before a new adapter starts at zero, so every run
is "base + its own adapter" on top of whatever its parent was (recorded in run.json).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch

from rlhf_cli.core.device import resolve_dtype
from rlhf_cli.errors import DataError, RecipeError, TrainingError
from rlhf_cli.recipe import LoraSpec, ModelSpec, QuantSpec
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
) -> Any:
    """Base weights (optionally quantized) with the parent run's adapters merged in.

    merge_parent=False leaves the parent's adapters out, for a caller that keeps the parent's adapter as
    its starting adapter (see start_from_adapter).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    quant = quant or QuantSpec()
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": resolved.trust_remote_code}
    check_quantizable(resolved, quant)
    if resolved.gguf_file:
        from transformers import GgufConfig

        # dequantize=True gives plain dense Linear layers that train and save_pretrained like any model;
        # load in fp32 and cast afterwards (asking the GGUF loader for bf16 is ~2.5x slower).
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
    per row (SmolLM2-135M, 8 prompts: a 226 MB copy, 13% of a 32-token generation). Copying the slice is
    a few kilobytes.
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


def merge_adapters(model: Any, adapters: tuple[str, ...] | list[str]) -> Any:
    """Fold adapters into the weights in order (a parent run's training becomes part of the base)."""
    if not adapters:
        return model
    from peft import PeftConfig, PeftModel

    task = "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else "CAUSAL_LM"
    for path in adapters:
        if not Path(path).is_dir():
            raise DataError(f"{path}: adapter directory not found (was the run moved?)")
        config = PeftConfig.from_pretrained(path)
        if config.task_type != task:
            # A policy adapter folded into a reward model (sft -> train-rm): same layers, another head.
            # peft's task wrappers assume their own head, so the plain wrapper does the merge.
            config.task_type = None
            config.modules_to_save = None
        model = PeftModel.from_pretrained(model, path, config=config).merge_and_unload()
    log.info("merged %d parent adapter(s) into the base", len(adapters))
    return model


def apply_adapters(model: Any, adapters: tuple[str, ...] | list[str]) -> Any:
    """Wrap the model with saved adapters, live and frozen, their updates adding up in order.

    A reward adapter's score head (modules_to_save) comes with it. Each LoRA layer then computes as in
    training (fast_lora_layers).
    """
    if not adapters:
        return model
    from peft import PeftModel

    for path in adapters:
        if not Path(path).is_dir():
            raise DataError(f"{path}: adapter directory not found (was the run moved?)")
    names = [f"adapter{i}" for i in range(len(adapters))] if len(adapters) > 1 else ["default"]
    model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:]):
        model.load_adapter(path, adapter_name=name)
    if len(names) > 1:
        model.base_model.set_adapter(names, inference_mode=True)
    fast_lora_layers(model)
    return model


def start_from_adapter(model: Any, path: str, *, task: Literal["CAUSAL_LM", "SEQ_CLS"], load_weights: bool = True) -> Any:
    """Wrap the model with a parent run's adapter, trainable, as the starting point of this run.

    Used where merging is not exact (a quantized base): the parent's LoRA keeps training instead of being
    folded into 4-bit weights. A causal adapter may start a reward model: same layers, plus a new score head.
    """
    from peft import LoraConfig, get_peft_model, load_peft_weights, set_peft_model_state_dict

    if not Path(path).is_dir():
        raise DataError(f"{path}: adapter directory not found (was the run moved?)")
    config = LoraConfig.from_pretrained(path)
    config.inference_mode = False
    if config.task_type != task:
        config.task_type = task
        config.modules_to_save = ["score"] if task == "SEQ_CLS" else None
    model = get_peft_model(model, config)
    if not load_weights:
        return model
    weights = load_peft_weights(path, device=str(next(model.parameters()).device))
    if task == "SEQ_CLS" and not any(".score." in k for k in weights):
        log.info("parent adapter has no score head: the reward head starts fresh")
    set_peft_model_state_dict(model, weights)
    return model


def _default_device() -> str:
    from rlhf_cli.core.distributed import local_rank

    # Under torchrun / accelerate launch each process owns the GPU of its local rank.
    return f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu"


def attach_lora(
    model: Any,
    lora: LoraSpec,
    *,
    task: Literal["CAUSAL_LM", "SEQ_CLS"],
    quantized: bool,
    gradient_checkpointing: bool,
    adapter_name: str = "default",
) -> Any:
    """Wrap the model with a fresh LoRA adapter (all base weights frozen)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        # Casts norms to fp32 and enables input grads so checkpointed k-bit layers backprop (Dettmers et al. 2023).
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task,
        # The reward head is new: it trains fully and is saved with the adapter.
        modules_to_save=["score"] if task == "SEQ_CLS" else None,
    )
    return get_peft_model(model, config, adapter_name=adapter_name)


def make_trainable(
    model: Any,
    *,
    lora: LoraSpec | None,
    task: Literal["CAUSAL_LM", "SEQ_CLS"],
    quantized: bool,
    checkpointing: bool,
    seed: int,
    parent_adapter: str | None = None,
) -> Any:
    """The recipe's trainable setup: the parent's adapter trained on (kept), a fresh LoRA, or all weights.

    Trainable tensors end up fp32 whatever the base dtype (the reward head copied from a bf16 base too),
    so AdamW's small updates are not rounded away. New weights (LoRA's A, a reward head) are drawn from
    train.seed, not from whatever the process drew before: the same recipe gives the same run, in a fresh
    process, a long-lived one, or each rank of several.
    """
    from transformers import set_seed

    set_seed(seed)
    if parent_adapter is not None:
        if quantized:
            model = prepare_model_for_kbit(model, checkpointing)
        elif checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = start_from_adapter(model, parent_adapter, task=task)
    elif lora is not None:
        model = attach_lora(model, lora, task=task, quantized=quantized, gradient_checkpointing=checkpointing)
    else:
        model.requires_grad_(True)
    for module in model.modules():
        fp32_trainable_modules(module)
    fast_lora_layers(model)
    return model


_optimizer_steps = 0  # optimizer steps taken in this process (see _count_optimizer_steps)


def _count_optimizer_steps(*_args: Any) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


class _ActivationDtypeLinear(torch.nn.Linear):
    """A LoRA A or B matrix kept in fp32 (AdamW's small steps would round away in bf16) that multiplies
    in its input's dtype, as autocast would, but for these layers alone.

    peft otherwise casts a bf16 activation to fp32 for every LoRA layer and the fp32 update back: on a
    bf16 SmolLM2-135M those casts and fp32 element-wise ops were a tenth of a LoRA training step and a
    fifth of a generation step. In no-grad passes (generation, scoring) the low-precision copy of the
    weight is cached until the weight changes: an optimizer step anywhere in the process (a fused AdamW
    updates weights in place without bumping their version counter), an in-place copy (loading a
    checkpoint bumps the version), or new storage.

    The model then sees its weights rounded to bf16, so an update smaller than that rounding shows only
    once enough of them add up. SFT does not mind (the demo's held-out SFT loss was 2.50 either way), but
    PPO's trust region does: its ratio stays at 1 while the rounded weights stand still, then jumps, and
    on the demo-tiny chain the policy ended 14-25 nats from the reference instead of 7-12 for the same
    reward. PPO therefore samples, scores and trains under exact_lora() (the fast path barely sped up
    its sampling); its reward model scores as train-rm trained it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if x.dtype != weight.dtype:
            if _exact_lora:  # peft's own arithmetic: the input cast up, the update in the weights' dtype
                return torch.nn.functional.linear(x.to(weight.dtype), weight, bias)
            if torch.is_grad_enabled():
                weight = weight.to(x.dtype)
            else:
                key = (_optimizer_steps, weight._version, weight.data_ptr(), x.dtype)
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
    is computed in the adapter weights' dtype: under exact_lora(), or on a model all in one dtype.

    peft computes result + B(A(x)) * scaling with a cast of x, two matmuls, a multiply and an add over the
    [tokens, out] update, its cast back, and the autograd nodes of each. On a bf16 SmolLM2-135M with fp32
    adapters (r 16, all linear layers), a forward and backward of 4 x 71 tokens took 586 ms fused against
    peft's 660 (medians of 12, interleaved), with the same outputs and gradients (bitwise where the
    scaling is a power of two). Its backward recasts the saved bf16 input instead of keeping peft's fp32
    copy of it: bench/ppo_step.py's shared-base PPO peaked at 1.60-1.64 GB instead of 1.77-1.80 (three
    runs each; its seconds per iteration moved less than the machine's run-to-run spread).

    Everything else goes through peft's own forward: bf16 arithmetic (the activation-dtype layers; fusing
    gained 1% there), disabled or merged adapters, DoRA and other variants, a LoRA bias, mixed-adapter
    batches. Dropout stays a node of its own, on the update's input.
    """
    from peft.tuners.lora.layer import Linear

    def forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        names = [a for a in self.active_adapters if a in self.lora_A]
        if (args or kwargs or self.disable_adapters or self.merged or self.lora_variant
                or any(self.lora_B[a].bias is not None or self.lora_B[a].weight.dtype != self.lora_A[a].weight.dtype
                       or not (_exact_lora or x.dtype == self.lora_A[a].weight.dtype) for a in names)):
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


_step_hook: Any = None
_exact_lora = False


@contextmanager
def exact_lora() -> Iterator[None]:
    """Inside: LoRA layers compute in their weights' dtype (fp32), as peft does, not in the activations'
    (see _ActivationDtypeLinear for why PPO's scoring and training need this)."""
    global _exact_lora
    before, _exact_lora = _exact_lora, True
    try:
        yield
    finally:
        _exact_lora = before


def on_cpu(model: Any) -> bool:
    """Whether the model's weights are on the CPU: where the CPU-measured speed-ups apply."""
    return all(p.device.type == "cpu" for p in model.parameters())


def fast_lora_layers(model: Any) -> int:
    """Swap in faster forwards for the plain LoRA layers of `model`, in place: their A and B multiply in
    the activation dtype (see _ActivationDtypeLinear), and where the update is computed in the adapters'
    own dtype instead (under exact_lora(), or on an fp32 model), a plain Linear's update is one autograd
    node (see _fused_lora_linear).

    Only the speed changes on an fp32 model. Layers with a LoRA variant (DoRA, ...) keep peft's own path.
    Both were measured on CPUs (the figures in their docstrings); a model on a GPU keeps peft's layers.
    Returns how many layers changed.
    """
    if not on_cpu(model):
        return 0
    from peft.tuners.lora.layer import Linear as PeftLinear
    from peft.tuners.lora.layer import LoraLayer
    from torch.optim.optimizer import register_optimizer_step_post_hook

    global _step_hook
    if _step_hook is None:
        _step_hook = register_optimizer_step_post_hook(_count_optimizer_steps)
    changed = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or getattr(module, "lora_variant", None):
            continue
        linears = [m for d in (module.lora_A, module.lora_B) for m in d.values()]
        if linears and all(type(m) in (torch.nn.Linear, _ActivationDtypeLinear) for m in linears):
            for m in linears:
                m.__class__ = _ActivationDtypeLinear
            module.cast_input_dtype_enabled = False  # peft's cast of x to the adapter's dtype
            if type(module) is PeftLinear:  # not its 4-/8-bit subclasses, whose base layers dequantize
                module.__class__ = _fused_lora_linear()
            changed += 1
    return changed


def fp32_trainable_modules(module: Any, all_params: bool = False) -> None:
    """Cast a module's own trainable (or, with all_params, all) tensors to fp32 and feed it fp32 inputs.

    e.g. the reward head copied from a bf16 base: it then computes in fp32 on fp32 inputs.
    """
    own = [p for p in module.parameters(recurse=False) if (all_params or p.requires_grad) and p.dtype != torch.float32]
    for p in own:
        p.data = p.data.float()
    if own:
        module.register_forward_pre_hook(_inputs_to_fp32)


def _inputs_to_fp32(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def prepare_model_for_kbit(model: Any, checkpointing: bool) -> Any:
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
    )


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
