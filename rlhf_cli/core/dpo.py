"""DPO pairs and trl's DPOTrainer: the one module that touches trl's DPO API (trl 1.10-1.16).

    pairs, stats = pair_samples(tokenizer, records, max_length=1024)     # {prompt_ids, chosen_ids, rejected_ids}
    tile = logprob_tile()                                                 # core.plan's estimate of the LM head's memory
    args = dpo_args(recipe.train, recipe.dpo, run / "checkpoints", precision=plan.precision, ...)
    trainer = dpo_trainer(model, args, tokenizer, pairs, held_out, ref_model=None)
    fit(trainer, run, "dpo")                                              # core.trainer: resume, metrics.jsonl, signals
    policy = trained_policy(trainer)                                      # what the run directory saves

What trl does here: the losses (sigmoid, ipo, hinge, robust), the reference pass or its precomputation,
the fused LM head's kernel (log-probs without materialising the logits), and the per-step metrics
rewards/chosen, rewards/rejected (beta x log-ratio), rewards/accuracies, rewards/margins, logps/chosen,
logps/rejected, with entropy, logits/* and mean_token_accuracy over the answer tokens.
What it does not: tokenization (pairs are rendered and truncated here, exactly as train-rm renders them,
so --dry-run counts what trains), which positions the head scores off Triton devices (the answer tokens
only, not trl's every position: _compact_lm_head), and padding-free batches: trl 1.16 turns padding_free
off and right-pads, and under core.attention's packed kernel the backbone runs each padded batch as one
padding-free row (_backbone).

The reference is the starting policy, never the raw base. trl finds it three ways, and we pick which:
- an adapter over a frozen base (LoRA, and a parent run's adapter merged into the base first): trl copies
  the adapter as it is before training into a frozen "ref" adapter, so the reference is exactly what the
  policy was at step 0, including a parent's adapter that keeps training on a quantized base;
- a full fine-tune: an explicit ref_model, loaded like the policy (trl would otherwise reload
  config._name_or_path, the raw base, and drop a merged parent adapter);
- precompute_ref: the policy itself scores the data before the first step.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from trl import DPOConfig, DPOTrainer

from rlhf_cli.core import attention
from rlhf_cli.core import trainer as fitting
from rlhf_cli.core.batches import Stats
from rlhf_cli.core.chat import conversation_text, prompt_text
from rlhf_cli.core.comparisons import split_hh_pair, without_repeated_prompt
from rlhf_cli.core.device import Precision
from rlhf_cli.core.lora import fast_lora_layers
from rlhf_cli.recipe import DPOSpec, TrainSpec

REF_ADAPTER = "ref"  # the name trl gives its frozen copy of the starting adapter


# --------------------------------------------------------------------------- pairs


def _common_prefix(a: list[Any], b: list[Any]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def split_pair(tokenizer: Any, record: dict[str, Any]) -> tuple[list[int], list[int], int]:
    """(chosen ids, rejected ids, prompt length): full transcripts as train-rm renders them, and where the
    answers start.

    An explicit prompt ends after the chat template's generation prompt. Without one, what both answers
    share is the prompt: the common leading messages of message lists, else the common leading tokens.
    """
    prompt, chosen, rejected = record.get("prompt"), record["chosen"], record["rejected"]
    hh = split_hh_pair(chosen, rejected) if prompt in (None, "") else None
    if hh is not None:  # HH-RLHF transcripts: the shared turns are the prompt (core.comparisons)
        prompt, chosen, rejected = hh
    chosen, rejected = without_repeated_prompt(prompt, [chosen, rejected])
    if prompt in (None, "") and isinstance(chosen, list) and isinstance(rejected, list):
        n = _common_prefix(chosen, rejected)
        prompt, chosen, rejected = chosen[:n] or None, chosen[n:], rejected[n:]
    ids = [tokenizer(conversation_text(tokenizer, prompt, r), add_special_tokens=False)["input_ids"] for r in (chosen, rejected)]
    shared = _common_prefix(ids[0], ids[1])
    if prompt in (None, "", []):
        return ids[0], ids[1], min(shared, len(ids[0]) - 1, len(ids[1]) - 1)
    prompt_ids = tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    # A template may render the prompt alone slightly differently from inside the transcript: the answer
    # starts where they part (trl's rule too).
    return ids[0], ids[1], min(_common_prefix(prompt_ids, ids[0]), _common_prefix(prompt_ids, ids[1]))


def pair_samples(tokenizer: Any, records: list[dict[str, Any]], max_length: int) -> tuple[list[dict[str, list[int]]], Stats]:
    """Tokenized pairs in trl's layout. A pair longer than max_length loses the start of its prompt first (a
    leading BOS stays), then the ends of its answers: what is compared survives, as in train-rm. It is
    counted; a pair left without an answer token, or with identical answers, is dropped and counted."""
    bos = getattr(tokenizer, "bos_token_id", None)
    samples, stats = [], Stats()
    for record in records:
        chosen, rejected, cut = split_pair(tokenizer, record)
        stats.lengths += [len(chosen), len(rejected)]
        stats.truncated += max(len(chosen), len(rejected)) > max_length
        prompt, answers = chosen[:cut], [chosen[cut:], rejected[cut:]]
        room = max_length - max(len(a) for a in answers)
        if len(prompt) > room:
            head = 1 if prompt and prompt[0] == bos else 0
            keep = max(room - head, 0)
            prompt = prompt[:head] + (prompt[len(prompt) - keep :] if keep else [])
        answers = [a[: max_length - len(prompt)] for a in answers]
        if not all(answers) or answers[0] == answers[1]:
            stats.dropped += 1
            continue
        samples.append({"prompt_ids": prompt, "chosen_ids": answers[0], "rejected_ids": answers[1]})
        stats.samples += 1
        stats.tokens += 2 * len(prompt) + len(answers[0]) + len(answers[1])
        stats.loss_tokens += len(answers[0]) + len(answers[1])
    return samples, stats


def tokens_per_step(pairs: int, lengths: list[int], max_length: int) -> int:
    """Tokens a micro-batch of `pairs` pairs runs through the model at most: trl concatenates chosen and
    rejected into one batch of 2 x pairs rows, each padded to the longest transcript (Stats.lengths)."""
    return 2 * pairs * min(max_length, max(lengths))


# --------------------------------------------------------------------------- trainer


def logprob_tile() -> tuple[int, int] | None:
    """(token rows, vocabulary columns) of one tile of trl's fused LM head, which computes the log-probs
    without materialising the [2 x pairs, length, vocab] logits; None for a trl without it (full logits)."""
    try:
        from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE
    except ImportError:
        return None
    return TOKEN_CHUNK_SIZE, _CHUNKED_LOGPROB_CHUNK_SIZE


def dpo_args(train: TrainSpec, dpo: DPOSpec, output_dir: Any, *, precision: Precision, has_eval: bool,
             checkpointing: bool, max_length: int) -> DPOConfig:
    """Our train: and dpo: sections as trl's DPOConfig (core.trainer.training_args maps the train: part)."""
    return fitting.training_args(
        train, output_dir, precision=precision, has_eval=has_eval, gradient_checkpointing=checkpointing,
        count_tokens="non_padding", args_class=DPOConfig,
        beta=dpo.beta, loss_type=[dpo.loss], label_smoothing=dpo.label_smoothing,
        precompute_ref_log_probs=dpo.precompute_ref, max_length=max_length,
        # No dropout in policy or reference: the log-ratios at step 0 are exactly zero (trl's default, kept explicit).
        disable_dropout=True,
    )


class _DPOTrainer(DPOTrainer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._eval_weights: list[tuple[float, list[float]]] = []
        super().__init__(*args, **kwargs)
        _compact_heads(self)

    def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
        # Pairs arrive tokenized by pair_samples; trl's own pass would render strings without the chat template.
        return dataset

    def compute_ref_log_probs(self, model: Any, inputs: dict[str, Any]) -> Any:
        # Also what precompute_ref runs, inside trl's __init__: before dpo_trainer can prepare the "ref" layers.
        _fast_ref_layers(self.model)
        _compact_heads(self)
        return super().compute_ref_log_probs(model, inputs)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        # trl writes a hub README into every checkpoint; run.json describes the run.
        return None

    # trl logs one mean per evaluation batch and averages those means, so a small last batch weighs as much
    # as a full one (5 pairs in batches of 4: the fifth pair counted as four). Each batch's per-pair means are
    # weighed here by their pairs; the token-level figures are sums over the answer tokens, divided once.
    _PER_TOKEN = {"entropy": (0, 1), "logits/chosen": (2, 3), "logits/rejected": (4, 5), "mean_token_accuracy": (6, 3)}

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if self.model.training:  # trl's own test for an evaluation batch
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Under several processes the last evaluation batch is padded with pairs from the start of the held-out
        # set, and trl gathers its per-pair figures (rewards/*, logps/*) with plain gather, which keeps them:
        # 10 pairs in global batches of 8 were 16, eval_accuracy 13/16 for 8/10. Its per-pair gathers drop
        # them here as gather_for_metrics does. Its token-level figures are each process's token sums, which
        # hold the repeats: those are summed here from the same head outputs, without the repeated pairs.
        gather = self.accelerator.gather
        pairs = inputs["completion_mask"].shape[0] // 2
        policy = _Forward(model)
        self.accelerator.gather = lambda data: _without_padding(self.accelerator, gather(data))
        try:
            loss = super().compute_loss(policy, inputs, return_outputs, num_items_in_batch)
        finally:
            del self.accelerator.gather  # the class's own again
        real = torch.arange(pairs, device=inputs["completion_mask"].device) < fitting.real_samples(self.accelerator, pairs)
        sums = _token_sums(policy.outputs, inputs["completion_mask"][:, 1:] * real.repeat(2)[:, None])
        self._eval_weights.append((float(gather(real.float()).sum()), gather(sums[None]).sum(0).tolist()))
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        weights, self._eval_weights = self._eval_weights, []
        figures = self._metrics["eval"]
        if not self.model.training and weights:
            sums = [sum(column) for column in zip(*(tokens for _, tokens in weights))]
            for key, values in figures.items():
                if key in self._PER_TOKEN:
                    total, count = (sums[i] for i in self._PER_TOKEN[key])
                    figures[key] = [total / count if count > 0 else 0.0]
                elif len(values) == len(weights):  # not num_tokens: one running total, not a mean per batch
                    w = [pairs for pairs, _ in weights]
                    figures[key] = [sum(v * x for v, x in zip(values, w)) / max(sum(w), 1.0)]
        # trl's running num_tokens starts at 0 in each process, so a resumed run's restarted from 0. It counts
        # what Trainer's num_input_tokens_seen counts (non-padding tokens, over every process), which a
        # checkpoint keeps.
        for mode in ("train", "eval"):
            if "num_tokens" in self._metrics[mode]:
                self._metrics[mode]["num_tokens"] = [self.state.num_input_tokens_seen]
        super().log(logs, start_time)


class _Forward:
    """The policy as trl calls it, keeping the outputs of its first forward (the policy's; trl runs a
    reference through self.model or ref_model)."""

    def __init__(self, model: Any):
        self.model, self.outputs = model, None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        outputs = self.model(*args, **kwargs)
        if self.outputs is None:
            self.outputs = outputs
        return outputs

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def _token_sums(outputs: Any, mask: torch.Tensor) -> torch.Tensor:
    """The sums behind trl's token-level figures, over the answer tokens `mask` marks ([chosen; rejected]
    rows, shifted): entropy and its tokens, chosen and rejected mean logits and their tokens, chosen top-1
    hits (DPOTrainer._compute_loss's definitions)."""
    T = mask.shape[1]  # prompt-learning PEFT prepends virtual tokens to the outputs
    mask = mask.float()
    entropy, mean_logits, top1 = (x[:, -T:].float() for x in (outputs.entropy, outputs.mean_logits, outputs.is_top1))
    (chosen, rejected), (chosen_logits, rejected_logits) = mask.chunk(2), mean_logits.chunk(2)
    return torch.stack([(entropy * mask).sum(), mask.sum(), (chosen_logits * chosen).sum(), chosen.sum(),
                        (rejected_logits * rejected).sum(), rejected.sum(), (top1.chunk(2)[0] * chosen).sum()]).double()


def _without_padding(accelerator: Any, gathered: Any) -> Any:
    """Gathered per-sample rows without the samples accelerate repeats to even out the last batch (the rows
    are in rank order, the repeats after the `remainder` real ones: gather_for_metrics' rule)."""
    from accelerate.utils import recursively_apply

    state = accelerator.gradient_state
    if not state.end_of_dataloader or state.remainder <= 0:
        return gathered
    return recursively_apply(lambda t: t[: state.remainder] if t.ndim else t, gathered)


def dpo_trainer(model: Any, args: DPOConfig, tokenizer: Any, train: list[dict[str, Any]], held_out: list[dict[str, Any]],
                *, ref_model: Any = None) -> DPOTrainer:
    from datasets import Dataset

    trainer = _DPOTrainer(model=model, ref_model=ref_model, args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_list(train),
                          eval_dataset=Dataset.from_list(held_out) if held_out else None)
    # trl casts a quantized model's trainable adapter to bf16 (QLoRA's recipe); ours stay fp32 so AdamW's
    # small steps are not rounded away (core.lora.make_trainable). The optimizer does not exist yet. The
    # cast rounded a kept parent adapter, so it starts again from trl's fp32 "ref" copy, taken before the
    # cast: policy and reference are the same model at step 0.
    params = dict(trainer.model.named_parameters())
    for name, p in params.items():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
            ref = params.get(name.replace(".default.", f".{REF_ADAPTER}.")) if ".default." in name else None
            if ref is not None and ref.shape == p.shape and ref.dtype == torch.float32:
                p.data.copy_(ref.data)
    _fast_ref_layers(trainer.model)
    return trainer


def _fast_ref_layers(model: Any) -> None:
    """trl's "ref" adapter is added after make_trainable: its layers take the policy's activation-dtype path
    too (peft's input cast is off for the whole layer, so a plain fp32 "ref" matrix would meet bf16 inputs)."""
    if REF_ADAPTER in getattr(model, "peft_config", {}) and not getattr(model, "_ref_layers_fast", False):
        fast_lora_layers(model)
        model._ref_layers_fast = True


def _compact_heads(trainer: DPOTrainer) -> None:
    """The policy's and the reference's fused LM heads, projecting only the answer tokens (see _compact_lm_head).

    The policy head keeps the per-token outputs trl asked for (its metrics entropy, logits/*,
    mean_token_accuracy, and WPO's weights); a separate reference only needs log-probs."""
    policy = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1") + (("log_sum_sq_probs",) if trainer.use_weighting else ())
    _compact_lm_head(policy, outputs)
    if trainer.ref_model is not None:
        _compact_lm_head(trainer.ref_model, ("log_probs",))


def _compact_lm_head(model: Any, outputs: tuple[str, ...]) -> None:
    """Score only the positions whose next token is an answer token, where trl scores every position.

    trl 1.16's fused LM head (trl.trainer.utils.add_fused_lm_head) projects the hidden states through the
    vocabulary in tiles and folds each tile into log-probs, entropy, mean logit and top-1 in fp32. On Triton
    devices it keeps only the positions with a label; elsewhere it scores every position, prompt and padding
    included, so that tile shapes stay fixed for compilers (Neuron). Eager CPU compiles nothing, and in a DPO
    batch the prompts and the padding are most of the positions: on SmolLM2-135M the head was half of a step.
    Here the backbone runs through _backbone and the same kernel gets the answer positions only; outputs are
    zero elsewhere, as trl's are, so losses and metrics read the same tensors. Heads that scale or cap their logits,
    MoE models, multimodal wrappers and pre-shifted labels keep trl's forward.
    """
    if getattr(model, "_answer_only_head", False) or next(model.parameters()).device.type in ("cuda", "xpu"):
        return
    try:
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, FusedCausalLMOutput
    except ImportError:  # a trl without the fused head: nothing to compact
        return
    config = model.config
    scaled = any(getattr(config, key, None) is not None for key in
                 ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"))
    if scaled or config.get_text_config() is not config or getattr(config, "output_router_logits", False):
        return
    trl_forward = model.forward

    def forward(self: Any, *args: Any, fused_lm_head: bool = False, labels: Any = None, shift_labels: Any = None,
                num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        if not fused_lm_head or shift_labels is not None or kwargs.get("output_router_logits"):
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        lm_head = self.get_output_embeddings()
        hidden = _backbone(self, args, kwargs)[:, :-1].to(lm_head.weight.device)
        labels = labels[:, 1:].to(lm_head.weight.device)
        mask = labels != -100
        per_token = ChunkedLogProbFunction.apply(hidden[mask], lm_head.weight, lm_head.bias, labels[mask], 1.0,
                                                 _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, outputs)
        # masked_scatter keeps an all-prompt batch connected to the graph (trl's own rule)
        log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = (
            None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in per_token)
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq_probs,
                                   mean_logits=mean_logits, is_top1=is_top1, label_mask=mask)

    model.forward = types.MethodType(forward, model)
    model._answer_only_head = True


def _backbone(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The last hidden states of a right-padded batch, [rows, T, hidden].

    With core.attention's packed kernel (use_packed_attention), the real tokens run as one padding-free row
    with restarting position_ids, each sequence attending to itself as in sft, and come back in the padded
    layout (zeros at the pads, which nothing scores): trl 1.16 turns DPO's padding_free off, and the pads
    of a batch of pairs are often as many as its tokens. Positions are the padded batch's (0.. per row)."""
    mask = kwargs.get("attention_mask")
    packable = (
        not args and mask is not None and kwargs.get("input_ids") is not None and kwargs.get("position_ids") is None
        and getattr(model.config, "_attn_implementation", None) == attention.NAME
        and bool(mask[:, 0].all()) and bool((mask[:, 1:] <= mask[:, :-1]).all())
    )
    if not packable:
        return model.base_model(*args, **kwargs).last_hidden_state
    real = kwargs.pop("attention_mask").bool()
    ids = kwargs.pop("input_ids")
    positions = real.long().cumsum(1) - 1
    flat = model.base_model(input_ids=ids[real][None], position_ids=positions[real][None], **kwargs).last_hidden_state
    return flat.new_zeros(*ids.shape, flat.shape[-1]).index_put((real,), flat[0])


def trained_policy(trainer: DPOTrainer) -> Any:
    """The policy to save: without trl's frozen copy of the starting adapter."""
    model = trainer.model
    if REF_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(REF_ADAPTER)
    return model


def reference_log_probs(trainer: DPOTrainer, pairs: list[dict[str, list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs of chosen and rejected under the reference trl trains against."""
    batch = trainer._prepare_inputs(trainer.data_collator(pairs))
    model = trainer.ref_model if trainer.ref_model is not None else trainer.model
    return trainer.compute_ref_log_probs(model, batch)
