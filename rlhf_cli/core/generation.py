"""The one sampler: batched sampling for `rlhf generate`, `rlhf eval`, best-of-n candidates and the PPO rollout.

    spec = GenerationSpec(max_new_tokens=64, temperature=0.7, stop=["\\n\\n"])
    for sample in sample_texts(model, tokenizer, prompts, spec, batch_size=8, seed=1):
        sample.text, sample.finish_reason, sample.completion_tokens
    batch = generate_batch(model, tokenizer, prompts, spec)      # tensors too, for PPO
    logp = response_logprobs(model, batch)                       # [B, T] log-probs of the sampled tokens

Prompts are left-padded so every row's answer starts at the same column and the KV cache serves the
whole batch. A row is finished at its first EOS (`finish_reason="eos"`), at the first stop string in
its answer (`"stop"`; the answer is cut before the string), or after max_new_tokens (`"length"`).
`response_mask` covers exactly the tokens that count: the answer up to and including the EOS or the
token that completed the stop string. The same seed, prompts and batch size give the same samples.

Here live how prompts are encoded for sampling, which ids end an answer, the positions that skip left
padding, where an answer stops and the log-probs of its tokens. The PPO-specific layout of a rollout
and its scoring passes (policy, reference, values) live in rlhf_cli/ppo/rollout.py.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from rlhf_cli.recipe import GenerationSpec

log = logging.getLogger("rlhf")

FinishReason = Literal["eos", "stop", "length"]


@dataclass
class Sample:
    """One answer, as text and counts."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


@dataclass
class GeneratedBatch:
    """One generate call: left-padded prompts followed by answers, and what each row means."""

    sequences: torch.Tensor  # [B, P + T] token ids
    prompt_mask: torch.Tensor  # [B, P] 1 on prompt tokens, 0 on left padding
    response_mask: torch.Tensor  # [B, T] 1 on answer tokens up to and including EOS / the stop token
    samples: list[Sample]

    @property
    def prompt_length(self) -> int:
        return self.prompt_mask.shape[1]

    @property
    def responses(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length :]

    @property
    def attention_mask(self) -> torch.Tensor:
        """Prompt mask then ones: tokens after a row's end are never attended to by counted tokens (causality)."""
        ones = torch.ones_like(self.responses, dtype=self.prompt_mask.dtype)
        return torch.cat([self.prompt_mask, ones], dim=1)


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The ids that end an answer: EOS of the tokenizer and of the model's generation config, and the special
    token the chat template closes an assistant turn with. A base checkpoint with a ChatML template keeps
    eos <|endoftext|>, while sft taught it to end turns with <|im_end|>: without that id it ran on to
    max_new_tokens."""
    ids: list[int] = []
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id,
                   end_of_turn_id(tokenizer)):
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


_ANSWER = "rlhfanswerendmark"


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The token that follows an assistant message in the chat template (ChatML's <|im_end|>, Llama 3's
    <|eot_id|>, Gemma's <end_of_turn>) when it is a special token, else None (a template that closes turns
    with plain text, or none at all)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _ANSWER}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template with demands of its own (a system turn, ...): no end-of-turn to add
        return None
    after = text[text.rfind(_ANSWER) + len(_ANSWER):] if _ANSWER in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    return _special_id(tokenizer, ids[0]) if ids else None


def _special_id(tokenizer: Any, token_id: int) -> int | None:
    """token_id if it is a special token (one that decoding with skip_special_tokens erases), else None."""
    return int(token_id) if tokenizer.decode([token_id], skip_special_tokens=True) == "" else None


def special_stop_ids(tokenizer: Any, stop: Sequence[str]) -> dict[str, int]:
    """Stop strings that are one special token (<|im_end|>, <|user|>), by id: answers are decoded without
    special tokens, so such a string is never found in their text, and the id stops the row instead."""
    found = {}
    for s in stop:
        ids = tokenizer(s, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and _special_id(tokenizer, ids[0]) is not None:
            found[s] = int(ids[0])
    return found


def generation_config(spec: GenerationSpec, eos_ids: list[int], pad_id: int) -> Any:
    """A GenerationConfig set from the recipe. generate() still fills every field left None from the
    model's own generation_config (a checkpoint's no_repeat_ngram_size, min_p, suppress_tokens, ...), so
    generate_batch also puts this config in the model's place for the call (_recipe_config_only)."""
    from transformers import GenerationConfig

    greedy = spec.temperature == 0
    return GenerationConfig(
        max_new_tokens=spec.max_new_tokens,
        do_sample=not greedy,
        # Greedy decoding ignores the sampling knobs; neutral values keep transformers from warning about them.
        temperature=1.0 if greedy else spec.temperature,
        top_p=1.0 if greedy else spec.top_p,
        top_k=None if greedy else spec.top_k,
        repetition_penalty=1.0,
        num_beams=1,
        use_cache=True,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
    )


@contextlib.contextmanager
def _recipe_config_only(model: Any, config: Any) -> Iterator[None]:
    """The model's generation_config is `config` for the duration: nothing of the checkpoint's own is merged
    in. PPO and GRPO score answers with the plain tempered softmax, so a sampler constrained by, say,
    no_repeat_ngram_size would draw them from another distribution than the one whose ratio and KL they use."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = target.generation_config
    target.generation_config = config
    try:
        yield
    finally:
        target.generation_config = saved


class _StopStrings:
    """Stopping criterion: a row is done once its answer (not its prompt) contains a stop string.

    Not transformers' `stop_strings`: that one matches vocabulary strings across the whole sequence, so a
    stop string may begin in the prompt (a generation prompt ending in "\\n" plus an answer's first "\\n"
    stops at "\\n\\n"), and what it matches may differ from the decoded text the answer is cut on.
    Decoding a short tail per step keeps "stopped" and "where the answer is cut" the same decision.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_length: int):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.prompt_length = prompt_length
        # A stop string spans at most this many tokens (every non-special token decodes to >= 1 char).
        self.window = max(len(s) for s in self.stop) + 2

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        tail = input_ids[:, self.prompt_length :][:, -self.window :]
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)


def encode_prompts(tokenizer: Any, prompts: Sequence[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Left-padded input_ids / attention_mask. Prompts are already rendered (chat template applied),
    so no special tokens are added a second time."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


@torch.no_grad()
def generate_batch(
    model: Any, tokenizer: Any, prompts: Sequence[str], spec: GenerationSpec, *, eval_mode: bool = True
) -> GeneratedBatch:
    """Sample one answer per prompt (one `model.generate` call with the KV cache).

    The model samples in eval mode (no dropout) and gets its mode back afterwards; eval_mode=False leaves
    the modes as the caller set them (PPO sets them once, without dropout).
    """
    from transformers import StoppingCriteriaList

    device = next(model.parameters()).device
    enc = encode_prompts(tokenizer, prompts, device)
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    prompt_length = enc["input_ids"].shape[1]
    by_id = special_stop_ids(tokenizer, spec.stop)
    stop_ids = [i for i in by_id.values() if i not in eos_ids]
    texts = [s for s in spec.stop if s not in by_id]
    criteria = StoppingCriteriaList([_StopStrings(tokenizer, texts, prompt_length)] if texts else [])
    was_training = model.training
    if eval_mode:
        model.eval()
    config = generation_config(spec, eos_ids + stop_ids, pad_id)
    try:
        with _recipe_config_only(model, config):
            out = model.generate(**enc, generation_config=config, stopping_criteria=criteria)
    finally:
        if eval_mode:
            model.train(was_training)
    responses = out[:, prompt_length:]
    response_mask = torch.zeros_like(responses, dtype=torch.long)
    samples = []
    for row in range(responses.shape[0]):
        sample = _finish(tokenizer, responses[row].tolist(), eos_ids, pad_id, texts, stop_ids)
        sample.prompt_tokens = int(enc["attention_mask"][row].sum())
        response_mask[row, : sample.completion_tokens] = 1
        samples.append(sample)
    return GeneratedBatch(sequences=out, prompt_mask=enc["attention_mask"], response_mask=response_mask, samples=samples)


def _finish(tokenizer: Any, tokens: list[int], eos_ids: list[int], pad_id: int, stop: Sequence[str],
            stop_ids: Sequence[int] = ()) -> Sample:
    """Where a row's answer ends and why (stop_ids: special tokens given as stop strings)."""
    end = next((i for i, t in enumerate(tokens) if t in eos_ids or t in stop_ids), None)
    body = tokens if end is None else tokens[:end]
    text = tokenizer.decode(body, skip_special_tokens=True)
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    if hits:
        # Fewest tokens whose text already holds a stop string (prefix text grows with the prefix).
        lo, hi = 1, len(body)
        while lo < hi:
            mid = (lo + hi) // 2
            if any(s in tokenizer.decode(body[:mid], skip_special_tokens=True) for s in stop):
                hi = mid
            else:
                lo = mid + 1
        return Sample(text[: min(hits)], "stop", 0, lo)
    if end is not None:
        return Sample(text, "eos" if tokens[end] in eos_ids else "stop", 0, end + 1)
    if stop and pad_id not in eos_ids:
        # The batch ran on after this row stopped (a stop string split oddly by decoding): drop the padding.
        # Without stop strings only an end id finishes a row, so a pad token here is one the model sampled:
        # it stays in the answer PPO scores and trains on.
        while body and body[-1] == pad_id:
            body = body[:-1]
    return Sample(text, "length", 0, len(body))


def _batch_seed(seed: int, index: int) -> int:
    # Each batch gets its own seed, so a batch's samples do not depend on what ran before it.
    return (seed * 1_000_003 + index) % (2**63)


def sample_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    spec: GenerationSpec,
    *,
    batch_size: int,
    seed: int,
    on_batch: Callable[[int], None] | None = None,
) -> Iterator[Sample]:
    """Answers to `prompts` in order, generated `batch_size` at a time; `on_batch(done)` reports progress."""
    for n, start in enumerate(range(0, len(prompts), batch_size)):
        torch.manual_seed(_batch_seed(seed, n))
        batch = generate_batch(model, tokenizer, prompts[start : start + batch_size], spec)
        yield from batch.samples
        if on_batch is not None:
            on_batch(min(start + batch_size, len(prompts)))


def sample_batches(
    model: Any, tokenizer: Any, prompts: Sequence[str], spec: GenerationSpec, *, batch_size: int, seed: int,
    first_batch: int = 0,
) -> Iterator[GeneratedBatch]:
    """Like sample_texts, but the tensors too (for log-probs of the sampled tokens). first_batch: begin at
    that batch (a resumed run), sampled with the seed it has in a run from the start."""
    for n, start in enumerate(range(0, len(prompts), batch_size)):
        if n < first_batch:
            continue
        torch.manual_seed(_batch_seed(seed, n))
        yield generate_batch(model, tokenizer, prompts[start : start + batch_size], spec)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` computes them (so scores match what was sampled)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# Not trl's selective_log_softmax: as fast on fp32, but off by 0.16 on bf16 logits (bench/library_choices.py).
def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(target) per position under softmax(logits / temperature), float32 or wider, differentiable.

    The one place a sampled token is scored: eval's KL and perplexity, answer log-probs, and PPO's
    rollout and training passes. Computed as `logits[target] - logsumexp(logits)` one row at a time, so
    neither a [B, L, vocab] log-softmax nor a float32 copy of all the logits is ever made; half-precision
    rows are upcast (bf16 log-softmax alone is off by ~1e-2). `temperature` is the sampling temperature,
    so the log-probs are those of the distribution the tokens were drawn from (Huang et al. 2024); it
    divides after the upcast, as transformers' sampling does (a bf16 quotient would round every tempered
    logit to 8 mantissa bits). Alignment is the caller's: for a causal LM, `logits[:, :-1]` score
    `targets = ids[:, 1:]`.
    """
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"labels shape {tuple(targets.shape)} does not match logits {tuple(logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if logits.dim() < 2 or logits.shape[0] == 0:
        return _row_logprobs(logits, targets, temperature)
    return torch.stack([_row_logprobs(row, t, temperature) for row, t in zip(logits, targets, strict=True)])


def _row_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def response_logprobs(model: Any, batch: GeneratedBatch, temperature: float = 1.0) -> torch.Tensor:
    """[B, T] log-probs of the sampled answer tokens under `model` (zero outside response_mask)."""
    device = next(model.parameters()).device
    seq = batch.sequences.to(device)
    mask = batch.attention_mask.to(device)
    logits = model(input_ids=seq, attention_mask=mask, position_ids=position_ids(mask)).logits
    p = batch.prompt_length
    # Logits at position i predict token i + 1: the answer's tokens are predicted from P - 1 to the end - 1.
    logp = token_logprobs(logits[:, p - 1 : -1], seq[:, p:], temperature)
    return logp * batch.response_mask.to(device)
