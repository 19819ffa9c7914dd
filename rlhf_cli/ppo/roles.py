"""The roles of an online RL run (policy, value, reference, reward) as objects the loop calls; which of
them exist and where their weights come from is decided in rlhf_cli/ppo/layout.py and loaded in
rlhf_cli/ppo/build.py.

    logits, values = models.actor(ids, mask, pos, n_response)   # trainable pass
    ref_logits = models.actor.reference_logits(ids, mask, pos, n_response)
    scores = models.scorer(prompts, responses)

SharedActor holds policy and value as LoRA adapters on one base: switching roles only changes which
adapters the LoRA layers apply, so one forward + one backward trains policy and value together (what DDP
under `accelerate launch` expects). Activation checkpointing is off here: it would recompute a pass in
backward under whichever adapters were active last. SeparateActor holds full copies; SharedReward scores
with a reward run's adapter on the shared base.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rlhf_cli.core.device import device_type
from rlhf_cli.core.peft_patches import adapter_switchable_layers, set_active_adapters
from rlhf_cli.core.reward import pool_last
from rlhf_cli.errors import DataError
from rlhf_cli.ppo.adapter_files import load_adapter_weights, load_head, save_adapter, save_head

POLICY, VALUE, REWARD = "policy", "value", "reward"
VALUE_HEAD_FILE = "value_head.safetensors"


def trunk(causal_lm: Any) -> nn.Module:
    """The transformer body of a *ForCausalLM / *ForSequenceClassification model (no output head)."""
    return getattr(causal_lm, causal_lm.base_model_prefix)


def response_logits(causal_lm: Any, ids: Tensor, mask: Tensor, pos: Tensor, n_response: int) -> Tensor:
    """Logits predicting the last n_response tokens of `ids` ([B, n_response, vocab]).

    Only those positions go through the output head, picked by an index tensor: an int `logits_to_keep`
    slices the hidden states into a non-contiguous view, for which torch's linear falls back to a batched
    matmul that copies the vocabulary matrix once per row (measured: half the CPU time of a forward).
    """
    L = ids.shape[1]
    keep = torch.arange(L - n_response - 1, L - 1, device=ids.device)
    out = causal_lm(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep, use_cache=False)
    return out.logits


def token_values(body: nn.Module, head: nn.Linear, ids: Tensor, mask: Tensor, pos: Tensor, n_response: int) -> Tensor:
    """V(s_t) for every response token: the head on the hidden state that predicts that token."""
    hidden = body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
    h = hidden[:, -(n_response + 1) : -1]
    return head(h.to(head.weight.dtype)).squeeze(-1)


def new_value_head(hidden_size: int, device: Any) -> nn.Linear:
    # Zero init: V = 0 everywhere at the start, so the first advantages are the rewards themselves
    # (lm-human-preferences initialises its value head with scale 0; Huang et al. 2024).
    head = nn.Linear(hidden_size, 1, device=device, dtype=torch.float32)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


class SharedActor(nn.Module):
    """Policy and value as two LoRA adapters on one (possibly 4-bit) base; the policy alone without a critic
    (`value_head` None).

    `parents` are the policy run's own adapters when they are kept frozen instead of merged: every role
    applies them under its own adapter, and the reference applies them alone.
    """

    layout = "shared-base"

    def __init__(self, peft_model: Any, value_head: nn.Linear | None, parents: list[str]):
        super().__init__()
        self.peft = peft_model
        self.value_head = value_head
        self.parents = parents
        self.trainable_adapters = [POLICY] if value_head is None else [POLICY, VALUE]
        self._active: list[str] | None = None
        self._layers: list[Any] = []  # the LoRA layers, once freeze_all_but_trainable found them

    def use(self, adapters: list[str]) -> None:
        """Make the LoRA layers apply exactly these adapters (their updates add up), leaving requires_grad.

        peft's set_adapter also freezes every other adapter and walks all modules twice, several times per
        micro-batch, so after the first call only the tuner layers' active-adapter lists are set
        (core.peft_patches.set_active_adapters).
        """
        if adapters == self._active:
            return
        if self._layers:
            set_active_adapters(self._layers, adapters)
        else:
            self.peft.base_model.set_adapter(list(adapters))
            self.peft.set_requires_grad(self.trainable_adapters, True)
        self._active = list(adapters)

    def freeze_all_but_trainable(self) -> None:
        """Once every adapter is loaded: policy, value and the value head train; nothing else does."""
        for name, p in self.peft.named_parameters():
            p.requires_grad = _lora_adapter_of(name) in self.trainable_adapters
        if self.value_head is not None:
            self.value_head.requires_grad_(True)
        self._layers = adapter_switchable_layers(self.peft)
        self._active = None
        self.use(self.parents + [POLICY])

    def forward(self, ids: Tensor, mask: Tensor, pos: Tensor, n_response: int) -> tuple[Tensor, Tensor | None]:
        values = None if self.value_head is None else self.values(ids, mask, pos, n_response)
        return self.policy_logits(ids, mask, pos, n_response), values

    def policy_logits(self, ids: Tensor, mask: Tensor, pos: Tensor, n_response: int) -> Tensor:
        self.use(self.parents + [POLICY])
        return response_logits(self.peft, ids, mask, pos, n_response)

    def values(self, ids: Tensor, mask: Tensor, pos: Tensor, n_response: int) -> Tensor:
        assert self.value_head is not None, "a run without a critic has no values"
        self.use(self.parents + [VALUE])
        try:
            return token_values(trunk(self.peft.get_base_model()), self.value_head, ids, mask, pos, n_response)
        finally:
            self.use(self.parents + [POLICY])

    @torch.no_grad()
    def reference_logits(self, ids: Tensor, mask: Tensor, pos: Tensor, n_response: int) -> Tensor:
        self.use(self.parents)
        try:
            return response_logits(self.peft, ids, mask, pos, n_response)
        finally:
            self.use(self.parents + [POLICY])

    def generator(self) -> Any:
        self.use(self.parents + [POLICY])
        return self.peft

    def compute(self) -> contextlib.AbstractContextManager[None]:
        """The frozen base already computes in its loaded dtype; peft runs the fp32 adapters on it."""
        return contextlib.nullcontext()

    def save(self, policy_dir: Path, value_dir: Path) -> None:
        """The policy adapter, and the value adapter and head when there is a critic (value_dir unused otherwise)."""
        save_adapter(self.peft, POLICY, policy_dir)
        if self.value_head is not None:
            save_adapter(self.peft, VALUE, value_dir)
            save_head(self.value_head, value_dir / VALUE_HEAD_FILE)

    def load(self, policy_dir: Path, value_dir: Path) -> None:
        load_adapter_weights(self.peft, POLICY, policy_dir)
        if self.value_head is not None:
            load_adapter_weights(self.peft, VALUE, value_dir)
            load_head(self.value_head, value_dir / VALUE_HEAD_FILE)


def _lora_adapter_of(name: str) -> str | None:
    """The adapter a LoRA parameter belongs to (peft names them <module>.lora_A.<adapter>.weight), None for
    other parameters; read from its place in the name, since a module may itself be called `value` (RWKV)."""
    parts = name.split(".")
    return next((parts[i + 1] for i in range(len(parts) - 1) if parts[i].startswith("lora_")), None)


class SeparateActor(nn.Module):
    """Full fine-tuning: policy, value model and frozen reference are separate copies (no value model
    without a critic, no reference copy when no reference pass is made)."""

    layout = "separate"

    def __init__(self, policy: Any, value_model: Any | None, reference: Any | None, autocast: torch.dtype | None = None):
        super().__init__()
        self.policy = policy
        self.value_model = value_model  # *ForSequenceClassification: its body + `score` as the value head
        self.reference = [reference]  # a list keeps it out of parameters(), state_dict() and DDP
        self.autocast = autocast  # the plan's compute dtype over fp32 weights; None = compute as loaded

    @contextlib.contextmanager
    def compute(self) -> Iterator[None]:
        """Mixed precision for every pass (sampling too): fp32 master weights, matmuls in the plan's dtype."""
        if self.autocast is None:
            yield
            return
        with torch.autocast(device_type(), dtype=self.autocast):
            yield

    def forward(self, ids: Tensor, mask: Tensor, pos: Tensor, n_response: int) -> tuple[Tensor, Tensor | None]:
        values = None if self.value_model is None else self.values(ids, mask, pos, n_response)
        return self.policy_logits(ids, mask, pos, n_response), values

    def policy_logits(self, ids: Tensor, mask: Tensor, pos: Tensor, n_response: int) -> Tensor:
        with self.compute():
            return response_logits(self.policy, ids, mask, pos, n_response)

    def values(self, ids: Tensor, mask: Tensor, pos: Tensor, n_response: int) -> Tensor:
        with self.compute():
            return token_values(trunk(self.value_model), self.value_model.score, ids, mask, pos, n_response)

    @torch.no_grad()
    def reference_logits(self, ids: Tensor, mask: Tensor, pos: Tensor, n_response: int) -> Tensor:
        with self.compute():
            return response_logits(self.reference[0], ids, mask, pos, n_response)

    def generator(self) -> Any:
        return self.policy

    def save(self, policy_dir: Path, value_dir: Path) -> None:
        self.policy.save_pretrained(policy_dir, safe_serialization=True)
        if self.value_model is not None:
            self.value_model.save_pretrained(value_dir, safe_serialization=True)

    def load(self, policy_dir: Path, value_dir: Path) -> None:
        from safetensors.torch import load_file

        roles = [(self.policy, policy_dir)] + ([(self.value_model, value_dir)] if self.value_model is not None else [])
        for module, folder in roles:
            state = {}
            for f in sorted(Path(folder).glob("*.safetensors")):
                state.update(load_file(f))
            # Tied embeddings are saved once; strict=False lets the tied twin keep its shared storage.
            missing, unexpected = module.load_state_dict(state, strict=False)
            if unexpected:
                raise DataError(f"{folder}: checkpoint does not fit the model (unexpected {unexpected[:3]})")


class SharedReward:
    """A reward run's LoRA adapter(s) and score head, loaded onto the shared base.

    Answers are encoded and pooled as train-rm trained on them (core.comparisons.encode_for_scoring within
    the run's data.max_length; core.reward.pool_last), like every other scorer.
    """

    def __init__(self, actor: SharedActor, adapters: list[str], head: nn.Linear, tokenizer: Any, max_length: int,
                 batch_size: int = 8):
        self.actor, self.adapters, self.head, self.tokenizer = actor, adapters, head, tokenizer
        self.max_length, self.batch_size = max_length, batch_size

    @torch.no_grad()
    def __call__(self, prompts: list[Any], responses: list[str]) -> list[float]:
        from rlhf_cli.core.comparisons import encode_for_scoring

        rows = [encode_for_scoring(self.tokenizer, p, r, self.max_length) for p, r in zip(prompts, responses)]
        body = trunk(self.actor.peft.get_base_model())
        device = self.head.weight.device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out: list[float] = []
        self.actor.use(self.adapters)
        try:
            for i in range(0, len(rows), self.batch_size):
                chunk = rows[i : i + self.batch_size]
                width = max(len(r) for r in chunk)
                ids = torch.tensor([r + [pad] * (width - len(r)) for r in chunk], device=device)
                mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk], device=device)
                hidden = body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                pooled = pool_last(hidden, mask)  # where train-rm pooled (core.reward.sequence_scores)
                out.extend(self.head(pooled.to(self.head.weight.dtype))[:, 0].float().tolist())
        finally:
            self.actor.use(self.actor.parents + [POLICY])
        return out
