"""The four PPO roles (policy, value, reference, reward) and where their weights live; a critic-free run
(GRPO) builds no value role at all.

    plan = plan_layout(recipe, policy_resolved, tokenizer)     # where everything lives (no weights yet)
    models = build_models(recipe, policy_resolved, plan)        # loads each base once
    logits, values = models.actor(ids, mask, pos, n_response)   # trainable pass
    ref_logits = models.actor.reference_logits(ids, mask, pos, n_response)
    scores = models.scorer(prompts, responses)

Layouts (recorded in run.json):

- shared-base (LoRA): one base model in memory. The policy and the value model are two LoRA adapters
  on it ("policy", and "value" plus a scalar head), both starting at zero; the reference is the base
  with neither. The policy run's own adapters (an SFT LoRA) are either merged into the base first, or,
  on a quantized base where merging would round them away, loaded as frozen adapters that every role
  stacks under its own ("stacked"). A reward run trained on the same base (`rlhf train-rm --model
  runs/sft`, or from the base) loads its adapter ("reward") and score head onto it too. With
  `quant.bits: 4` the shared base is 4-bit.
- shared-base+separate-reward: as above, with a reward model on another base (or in another dtype, or
  a full model) loaded on its own.
- separate (full fine-tuning, `lora: null`): policy, reference and value are full copies, planned as SFT
  plans a full fine-tune (core.device.plan_precision): fp32 weights, so AdamW's small steps are not
  rounded to bf16, computing under bf16 autocast on a GPU and in fp32 on a CPU.

Without a critic (`build_models(..., critic=False)`, rlhf grpo) there is no value adapter, value head or
value copy: policy + reference (+ reward adapter) on one base. Switching roles only changes which adapters
the LoRA layers apply, so one forward + one backward trains policy and value together (what DDP under
`accelerate launch` expects). Activation checkpointing is off
here: it would recompute a pass in backward under whichever adapters were active last.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rlhf_cli.core.chat import conversation_text, ensure_chat_template
from rlhf_cli.core.device import Precision, device_type, plan_precision, resolve_dtype
from rlhf_cli.core.loading import load_model, load_tokenizer
from rlhf_cli.core.lora import attach_lora, fast_lora_layers, on_cpu
from rlhf_cli.core.peft_patches import adapter_switchable_layers, set_active_adapters
from rlhf_cli.core.reward import RewardFn, load_function, load_reward_model, pool_last, trained_max_length
from rlhf_cli.errors import DataError, RecipeError
from rlhf_cli.recipe import OnlineRecipe
from rlhf_cli.runs import ResolvedModel, resolve_model

log = logging.getLogger("rlhf")

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

        peft's set_adapter also freezes every other adapter and walks all modules twice (~20 ms on a 135M
        model, several times per micro-batch), so after the first call only the tuner layers'
        active-adapter lists are set (core.peft_patches.set_active_adapters).
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
            p.requires_grad = "lora_" in name and any(f".{a}." in name for a in self.trainable_adapters)
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


# --------------------------------------------------------------------------- adapter files


def save_adapter(peft_model: Any, name: str, folder: Path) -> None:
    """One named adapter as a plain peft folder (adapter_config.json + adapter_model.safetensors)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(peft_model, adapter_name=name)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / "adapter_model.safetensors"))
    config = copy.deepcopy(peft_model.peft_config[name])
    config.inference_mode = True
    config.save_pretrained(str(folder))


def load_adapter_weights(peft_model: Any, name: str, folder: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(peft_model, load_file(str(folder / "adapter_model.safetensors")), adapter_name=name)
    if result.unexpected_keys:
        raise DataError(f"{folder}: adapter does not fit the model (unexpected {list(result.unexpected_keys)[:3]})")


def save_head(head: nn.Linear, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(path))


def load_head(head: nn.Linear, path: Path) -> None:
    from safetensors.torch import load_file

    head.load_state_dict(load_file(str(path)))


def add_frozen_adapter(peft_model: Any, name: str, folder: Path) -> dict[str, Tensor]:
    """Load a saved LoRA adapter (SFT or reward) onto the shared model under `name`, frozen.

    A reward adapter's score head is not a layer of the causal model: its weights are returned instead,
    for a head of our own. Returns {} for an adapter without one.
    """
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = copy.deepcopy(LoraConfig.from_pretrained(str(folder)))
    config.modules_to_save = None
    config.task_type = "CAUSAL_LM"
    config.inference_mode = True
    peft_model.add_adapter(name, config)
    state = load_file(str(folder / "adapter_model.safetensors"))
    head = {k.split(".")[-1]: state.pop(k) for k in [k for k in state if k.split(".")[-2] == "score"]}
    result = set_peft_model_state_dict(peft_model, state, adapter_name=name)
    if result.unexpected_keys:
        raise DataError(f"{folder}: adapter does not fit the policy's base (unexpected {list(result.unexpected_keys)[:3]})")
    return head


# --------------------------------------------------------------------------- reward


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


@dataclass
class LayoutPlan:
    """Where every role lives, decided before any weight loads (a wrong --reward fails fast, exit 2)."""

    parents: str  # none | merged | stacked: what happens to the policy run's own adapters
    reward: str  # function | shared | separate
    reward_resolved: ResolvedModel | None = None
    reward_tokenizer: Any = None  # the reward model's, with the chat template it was trained with
    reward_function: RewardFn | None = None  # imported here, so a wrong package.module:function exits 2 first
    why: str = ""


def plan_layout(recipe: OnlineRecipe, policy: ResolvedModel, policy_tokenizer: Any) -> LayoutPlan:
    src = recipe.reward
    quantized = recipe.quant.bits is not None
    # Folding a LoRA into 4/8-bit weights rounds it away (core.plan keeps parents the same way).
    parents = "none" if not policy.adapters else ("stacked" if quantized and recipe.lora is not None else "merged")
    if src.function is not None:
        return LayoutPlan(parents, "function", reward_function=load_function(src.function),
                          why=f"rule-based reward {src.function}")
    assert src.path is not None
    resolved = resolve_model(src.path, src.gguf_file, src.trust_remote_code)
    if resolved.run_dir and resolved.kind != "reward":
        raise RecipeError(
            f"--reward {src.path} is a {resolved.kind} run (run.json model.kind), not a reward model: "
            "pass a train-rm run directory, a sequence-classification model, or package.module:function"
        )
    tokenizer = _reward_tokenizer(resolved, policy_tokenizer)

    def separate(why: str) -> LayoutPlan:
        return LayoutPlan(parents, "separate", resolved, tokenizer, why)

    if recipe.lora is None:
        return separate("full PPO keeps separate copies")
    if not resolved.adapters or not resolved.run_dir:
        return separate("the reward model is a full model, not an adapter")
    if not all(_is_lora(a) for a in resolved.adapters):
        return separate("the reward adapter is not LoRA")
    if not (_same_path(resolved.base, policy.base) and resolved.gguf_file == policy.gguf_file):
        return separate("the reward run was trained on another base model than the policy")
    if resolve_dtype(src.dtype) != resolve_dtype(recipe.policy.dtype):
        return separate("reward.dtype differs from policy.dtype")
    on_merged = len(resolved.adapters) - 1 == len(policy.adapters) and all(
        _same_path(a, b) for a, b in zip(resolved.adapters[:-1], policy.adapters))
    if parents == "merged" and not on_merged:
        # e.g. a reward run trained from the base while the policy is base + SFT: keep the SFT adapter
        # frozen instead of merging it, and both fit on the one base.
        parents = "stacked"
    return LayoutPlan(parents, "shared", resolved, tokenizer, "reward adapter and head on the shared base")


def _is_lora(folder: str) -> bool:
    config = Path(folder) / "adapter_config.json"
    return config.is_file() and json.loads(config.read_text()).get("peft_type") == "LORA"


def _same_path(a: str, b: str) -> bool:
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def _reward_tokenizer(resolved: ResolvedModel, policy_tokenizer: Any) -> Any:
    """The reward model's tokenizer with the chat template it was trained with."""
    tok = load_tokenizer(resolved, padding_side="right")
    if not getattr(tok, "chat_template", None):
        if tok.get_vocab() != policy_tokenizer.get_vocab():
            raise RecipeError(
                f"reward model {resolved.run_dir or resolved.base} has no chat template and another vocabulary than the "
                "policy, so its input format is unknown: give it a tokenizer with a chat template (train it with rlhf train-rm)"
            )
        log.info("reward tokenizer has no chat template; using the policy's (same vocabulary)")
        tok.chat_template = policy_tokenizer.chat_template
    tok.padding_side = "right"
    return tok


def check_reward_template(tokenizer: Any, prompt: Any) -> None:
    """Render one pair the way the reward model will read it, so a mismatch fails before training."""
    try:
        conversation_text(tokenizer, prompt, "ok")
    except Exception as e:  # jinja raises TemplateError subclasses and plain exceptions from raise_exception()
        raise RecipeError(
            f"the reward model's chat template cannot render a policy prompt + response ({type(e).__name__}: {e}); "
            "the policy and reward chat templates do not match: train the reward model from the policy run"
        ) from None


# --------------------------------------------------------------------------- building


def keep_4bit_layers_in_train_mode(model: nn.Module) -> None:
    """Work around bitsandbytes 0.50 on CPU: a Linear4bit in eval mode that sees a no-grad input (as in
    generation) repacks its weight for an inference kernel that has no autograd, and from then on passes
    no gradient to its input, so every LoRA layer below it silently stops learning. Train mode skips the
    repacking; a Linear4bit has no dropout, so nothing else changes."""
    for module in model.modules():
        if type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4") and type(module).__module__.startswith("bitsandbytes"):
            module.train()


def use_eager_attention_for_short_sequences(model: Any, max_length: int) -> None:
    """On CPU, for the short sequences of PPO, plain attention trains faster than SDPA: SDPA's CPU flash
    kernel took ~30% of a bf16 PPO micro-batch on SmolLM2-135M at 69 tokens, eager attention a few percent.
    Eager attention holds the full [heads, L, L] scores, so only below 2048 tokens; a GPU keeps its
    fused kernels (sdpa / flash), which this was not measured against."""
    setter = getattr(model, "set_attn_implementation", None)
    if max_length <= 2048 and setter is not None and on_cpu(model):
        try:
            setter("eager")
        except (ValueError, ImportError):  # an architecture without an eager path keeps its default
            pass


def policy_tokenizer(recipe: OnlineRecipe, resolved: ResolvedModel) -> Any:
    """The policy's tokenizer, left-padded for batched generation, with a chat template."""
    tok = load_tokenizer(resolved, recipe.data.chat_template, padding_side="left")
    ensure_chat_template(tok)
    return tok


def context_length(resolved: ResolvedModel) -> int | None:
    """max_position_embeddings from the config alone (no weights loaded); None when the config has none."""
    from transformers import AutoConfig

    kwargs = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(resolved.base, trust_remote_code=resolved.trust_remote_code, **kwargs)
    except (OSError, ValueError):
        return None
    n = getattr(config.get_text_config(), "max_position_embeddings", None)
    return int(n) if n else None


@dataclass
class Models:
    actor: SharedActor | SeparateActor
    scorer: RewardFn
    layout: dict[str, Any] = field(default_factory=dict)


def ppo_precision(recipe: OnlineRecipe) -> Precision:
    """The dtype plan of the trained roles, decided as for SFT and reward training (core.device)."""
    return plan_precision(recipe.policy.dtype, adapters=recipe.lora is not None, quantized=recipe.quant.bits is not None)


def build_models(recipe: OnlineRecipe, policy_res: ResolvedModel, plan: LayoutPlan, critic: bool = True,
                 reference: bool = True) -> Models:
    """Load every role, sharing one base where the plan says so; the value role only with a critic, and a
    full reference copy only when a reference pass is made (a LoRA run's reference is its base: no copy)."""
    precision = ppo_precision(recipe)
    dtype = precision.load
    base = load_model(policy_res, dtype=dtype, quant=recipe.quant, merge_parent=plan.parents != "stacked")
    device = next(base.parameters()).device
    base.eval()  # no dropout anywhere in PPO: it would make rollout and training log-probs disagree (Huang et al. 2024)
    if device.type == "cpu":
        use_eager_attention_for_short_sequences(base, recipe.data.max_prompt_length + recipe.generation.max_new_tokens)
    roles: dict[str, str] = {}
    if recipe.lora is not None:
        peft = attach_lora(base, recipe.lora, task="CAUSAL_LM", quantized=recipe.quant.bits is not None,
                           gradient_checkpointing=False, adapter_name=POLICY)
        if critic:
            peft.add_adapter(VALUE, copy.deepcopy(peft.peft_config[POLICY]))
        names = {}  # adapter folder -> name on the shared model
        if plan.parents == "stacked":
            for i, folder in enumerate(policy_res.adapters):
                add_frozen_adapter(peft, f"parent{i}", Path(folder))
                names[folder] = f"parent{i}"
        head = new_value_head(base.config.hidden_size, device) if critic else None
        actor: SharedActor | SeparateActor = SharedActor(peft, head, parents=list(names.values()))
        on_top = " on top of the policy run's frozen adapters" if names else ""
        roles = {"policy": f"LoRA adapter 'policy'{on_top}"}
        if critic:
            roles["value"] = f"LoRA adapter 'value' + scalar head{on_top}"
        if reference:
            roles["reference"] = "the shared base" + (" with the policy run's frozen adapters" if names else ", no adapters")
        copies = 1
    else:
        # The reference in the policy's dtype too: at the first iteration the policy is the reference, and
        # a bf16 copy would put its rounding into the KL penalty.
        frozen = load_model(policy_res, dtype=dtype).eval().requires_grad_(False) if reference else None
        value_model = load_model(policy_res, dtype=dtype, head="reward").eval() if critic else None
        if value_model is not None:
            nn.init.zeros_(value_model.score.weight)  # V = 0 at the start, as for the value adapter's head
        actor = SeparateActor(base, value_model, frozen, autocast=precision.autocast)
        roles = {"policy": "full model"}
        if reference:
            roles["reference"] = "frozen full copy"
        if critic:
            roles["value"] = "full copy + scalar head"
        copies = 1 + int(reference) + int(critic)

    if plan.reward == "function":
        assert plan.reward_function is not None
        scorer: RewardFn = plan.reward_function
        roles["reward"] = f"function {recipe.reward.function}"
    elif plan.reward == "shared":
        assert plan.reward_resolved is not None and isinstance(actor, SharedActor)
        rm = plan.reward_resolved
        if plan.parents == "merged":
            stack = [REWARD]  # its parents are the policy's, already merged into the base
        else:
            # Its own parents: the policy's frozen adapters where they are the same folders, else loaded too.
            stack = []
            for i, folder in enumerate(rm.adapters[:-1]):
                known = next((n for f, n in names.items() if _same_path(f, folder)), None)
                if known is None:
                    known = f"reward_parent{i}"
                    add_frozen_adapter(actor.peft, known, Path(folder))
                stack.append(known)
            stack.append(REWARD)
        head_state = add_frozen_adapter(actor.peft, REWARD, Path(rm.adapters[-1]))
        if "weight" not in head_state:
            raise DataError(f"{rm.adapters[-1]}: reward adapter has no score head (expected a `score` weight saved with it)")
        head = nn.Linear(head_state["weight"].shape[1], 1, bias="bias" in head_state, device=device, dtype=torch.float32)
        head.load_state_dict({k: v.float() for k, v in head_state.items()})
        head.requires_grad_(False)
        scorer = SharedReward(actor, stack, head, plan.reward_tokenizer, max_length=trained_max_length(rm) or 1024)
        roles["reward"] = f"LoRA adapter 'reward' + score head of {rm.run_dir} on the shared base"
    else:
        assert plan.reward_resolved is not None and recipe.reward.path is not None
        rm_model = load_reward_model(recipe.reward.path, dtype=recipe.reward.dtype, gguf_file=recipe.reward.gguf_file,
                                     trust_remote_code=recipe.reward.trust_remote_code)
        rm_model.tokenizer = plan.reward_tokenizer
        scorer = rm_model
        roles["reward"] = f"separate model {recipe.reward.path}"
        copies += 1
    if isinstance(actor, SharedActor):
        actor.eval()
        if recipe.quant.bits is not None:
            keep_4bit_layers_in_train_mode(actor)
        fast_lora_layers(actor.peft)
        actor.freeze_all_but_trainable()
    name = "shared-base+separate-reward" if recipe.lora is not None and plan.reward == "separate" else actor.layout
    layout: dict[str, Any] = {"name": name, "base_copies": copies, "quantized_bits": recipe.quant.bits,
                              "parent_adapters": plan.parents, "roles": roles, "precision": precision.as_json()}
    if plan.reward != "function":
        layout["reward_placement"] = plan.why
    log.info("%s layout %s: %d base cop%s in memory", recipe.stage.upper(), name, copies, "y" if copies == 1 else "ies")
    return Models(actor, scorer, layout)
