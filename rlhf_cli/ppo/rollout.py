"""PPO rollouts: the policy's answers laid out for scoring and training, and their per-token scores.

    rollout = sample_rollout(policy, tokenizer, prompt_texts, generation)
    logp, ref_logp, values, entropy = token_stats(actor, actor.reference_logits, rollout, temperature, chunk)

Sequences are laid out as [left-padded prompt | right-padded response]; position ids count real tokens
only, so a left-padded row sees the same positions in these passes as during generation.

Sampling itself (prompt encoding, EOS ids, stop strings, where an answer ends) is the shared sampler's,
rlhf_cli/core/generation.py, so PPO's answers end where `rlhf generate` and `rlhf eval` end theirs; the
math of advantages and losses is in rlhf_cli/ppo/algo.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rlhf_cli.core.generation import generate_batch, position_ids, token_logprobs
from rlhf_cli.ppo.algo import entropy_from_logits
from rlhf_cli.recipe import GenerationSpec


@dataclass
class Rollout:
    input_ids: Tensor  # [B, P + R]: prompt, then response; pad after its end
    attention_mask: Tensor  # [B, P + R]
    position_ids: Tensor  # [B, P + R]
    response_ids: Tensor  # [B, R]
    mask: Tensor  # [B, R] bool: real response tokens, through the EOS or the token that completed a stop string
    ended: Tensor  # [B] bool: the response emitted EOS (or a stop string)
    texts: list[str]  # decoded responses, special tokens removed
    seconds: float  # wall time of generation

    @property
    def n_response(self) -> int:
        return self.response_ids.shape[1]

    def rows(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.input_ids[idx], self.attention_mask[idx], self.position_ids[idx]


@torch.no_grad()
def sample_rollout(model: Any, tokenizer: Any, prompts: list[str], gen: GenerationSpec) -> Rollout:
    """One answer per rendered prompt, from the shared sampler, in PPO's layout.

    The model's train/eval modes are left as PPO set them (generate_batch's eval_mode=False).
    """
    t0 = time.perf_counter()
    batch = generate_batch(model, tokenizer, prompts, gen, eval_mode=False)
    seconds = time.perf_counter() - t0
    lengths = batch.response_mask.sum(dim=1)
    # Drop the columns no row uses, and blank everything after a row's end.
    width = max(int(lengths.max()), 1)
    mask = batch.response_mask[:, :width].bool()
    response = torch.where(mask, batch.responses[:, :width], tokenizer.pad_token_id)
    attention = torch.cat([batch.prompt_mask, mask.long()], dim=1)
    ids = torch.cat([batch.sequences[:, : batch.prompt_length], response], dim=1)
    ended = torch.tensor([s.finish_reason != "length" for s in batch.samples], device=mask.device)
    texts = [s.text for s in batch.samples]
    return Rollout(ids, attention, position_ids(attention), response, mask, ended, texts, seconds)


@torch.no_grad()
def token_stats(
    actor: Any, reference: Any | None, rollout: Rollout, temperature: float, chunk: int
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
    """Per-token log-probs under the policy and the reference, values, and policy entropy ([B, R] each).

    `actor(ids, mask, pos, R)` gives (policy logits, values or None without a critic) and
    `reference(ids, mask, pos, R)` the reference logits; reference None makes no reference pass, and the
    reference log-probs come back None, as do the values without a critic. The log-probs and entropy are
    those of the tempered distribution the tokens were drawn from (Huang et al. 2024), tempered after the
    fp32 upcast (core.generation.token_logprobs).
    """
    logps, ref_logps, values, entropies = [], [], [], []
    labels_all = rollout.response_ids
    R = rollout.n_response
    for i in range(0, labels_all.shape[0], chunk):
        idx = torch.arange(i, min(i + chunk, labels_all.shape[0]), device=labels_all.device)
        ids, mask, pos = rollout.rows(idx)
        logits, v = actor(ids, mask, pos, R)
        logps.append(token_logprobs(logits, labels_all[idx], temperature))
        entropies.append(entropy_from_logits(logits, temperature))
        if v is not None:
            values.append(v.float())
        if reference is not None:
            ref_logps.append(token_logprobs(reference(ids, mask, pos, R), labels_all[idx], temperature))
    return (torch.cat(logps), torch.cat(ref_logps) if ref_logps else None, torch.cat(values) if values else None,
            torch.cat(entropies))
