"""Rollouts: sample responses from the policy, cut them at the first EOS, and score them token by token.

    batch = encode_prompts(tokenizer, texts, device)
    rollout = generate(policy, tokenizer, batch, generation, eos_ids)
    logp, ref_logp, values, entropy = token_stats(actor, actor.reference_logits, rollout, temperature, chunk)

Sequences are laid out as [left-padded prompt | right-padded response]; position ids count real tokens
only, so a left-padded row sees the same positions in these passes as during generation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rlhf_cli.ppo.algo import entropy_from_logits, first_eos_mask, logprobs_from_logits
from rlhf_cli.recipe import GenerationSpec


@dataclass
class PromptBatch:
    input_ids: Tensor  # [B, P], left-padded
    attention_mask: Tensor


@dataclass
class Rollout:
    input_ids: Tensor  # [B, P + R]: prompt, then response; pad after the first EOS
    attention_mask: Tensor  # [B, P + R]
    position_ids: Tensor  # [B, P + R]
    response_ids: Tensor  # [B, R]
    mask: Tensor  # [B, R] bool: real response tokens, through the first EOS
    ended: Tensor  # [B] bool: the response emitted EOS (or a stop string)
    texts: list[str]  # decoded responses, special tokens removed
    seconds: float  # wall time of generation

    @property
    def n_response(self) -> int:
        return self.response_ids.shape[1]

    def rows(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.input_ids[idx], self.attention_mask[idx], self.position_ids[idx]


def encode_prompts(tokenizer: Any, texts: list[str], device: Any) -> PromptBatch:
    """Tokenize rendered prompts (the chat template already holds BOS/special tokens), left-padded."""
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return PromptBatch(enc["input_ids"].to(device), enc["attention_mask"].to(device))


def eos_token_ids(tokenizer: Any, model: Any) -> list[int]:
    """EOS of the tokenizer plus whatever the model's generation config also stops on (end-of-turn ids)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if isinstance(i, int))


def positions(attention_mask: Tensor) -> Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def generate(model: Any, tokenizer: Any, batch: PromptBatch, gen: GenerationSpec, eos_ids: list[int]) -> Rollout:
    from transformers import GenerationConfig

    # A config of our own: the model's generation_config may carry defaults (top_k=50, repetition
    # penalties) that would make the samples differ from the distribution PPO scores.
    config = GenerationConfig(
        do_sample=True,
        temperature=gen.temperature,
        top_k=gen.top_k,
        top_p=gen.top_p,
        max_new_tokens=gen.max_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    extra = {"stop_strings": gen.stop, "tokenizer": tokenizer} if gen.stop else {}
    t0 = time.perf_counter()
    out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, generation_config=config, **extra)
    seconds = time.perf_counter() - t0
    P = batch.input_ids.shape[1]
    response = out[:, P:]
    cut = first_eos_mask(response, eos_ids, tokenizer.pad_token_id)
    texts = [tokenizer.decode(r[: int(n)], skip_special_tokens=True) for r, n in zip(response, cut.lengths)]
    ended = cut.ended
    if gen.stop:
        ended = ended | torch.tensor([any(s in t for s in gen.stop) for t in texts], device=ended.device)
        texts = [_cut_at_stop(t, gen.stop) for t in texts]
    # Drop the columns no row uses, and blank everything after a row's first EOS.
    width = max(int(cut.lengths.max()), 1)
    mask = cut.mask[:, :width]
    response = torch.where(mask, response[:, :width], tokenizer.pad_token_id)
    attention = torch.cat([batch.attention_mask, mask.long()], dim=1)
    ids = torch.cat([batch.input_ids, response], dim=1)
    return Rollout(ids, attention, positions(attention), response, mask, ended, texts, seconds)


def _cut_at_stop(text: str, stops: list[str]) -> str:
    ends = [text.find(s) for s in stops if s in text]
    return text[: min(ends)] if ends else text


@torch.no_grad()
def token_stats(
    actor: Any, reference: Any | None, rollout: Rollout, temperature: float, chunk: int
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
    """Per-token log-probs under the policy and the reference, values, and policy entropy ([B, R] each).

    `actor(ids, mask, pos, R)` gives (policy logits, values or None without a critic) and
    `reference(ids, mask, pos, R)` the reference logits; reference None makes no reference pass, and the
    reference log-probs come back None, as do the values without a critic. The log-probs and entropy are
    those of the tempered distribution the tokens were drawn from (Huang et al. 2024), tempered after the
    fp32 upcast (algo.logprobs_from_logits).
    """
    logps, ref_logps, values, entropies = [], [], [], []
    labels_all = rollout.response_ids
    R = rollout.n_response
    for i in range(0, labels_all.shape[0], chunk):
        idx = torch.arange(i, min(i + chunk, labels_all.shape[0]), device=labels_all.device)
        ids, mask, pos = rollout.rows(idx)
        logits, v = actor(ids, mask, pos, R)
        logps.append(logprobs_from_logits(logits, labels_all[idx], temperature))
        entropies.append(entropy_from_logits(logits, temperature))
        if v is not None:
            values.append(v.float())
        if reference is not None:
            ref_logps.append(logprobs_from_logits(reference(ids, mask, pos, R), labels_all[idx], temperature))
    return (torch.cat(logps), torch.cat(ref_logps) if ref_logps else None, torch.cat(values) if values else None,
            torch.cat(entropies))
