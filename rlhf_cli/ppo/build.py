"""Loading an online RL run's roles as its layout plan says (each base once), and what is read of the
policy before that: its tokenizer, its context length, the dtype plan. The CPU-only tweaks applied while
loading sit here too, each with where it was measured.

    models = build_models(recipe, policy_resolved, plan)        # plan: rlhf_cli/ppo/layout.py
    models = build_models(recipe, policy_resolved, plan, critic=False, reference=method.reference)  # grpo

The role objects are rlhf_cli/ppo/roles.py; the layouts are described in rlhf_cli/ppo/layout.py.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf_cli.core.chat import ensure_chat_template
from rlhf_cli.core.device import Precision, plan_precision
from rlhf_cli.core.loading import load_model, load_tokenizer
from rlhf_cli.core.lora import attach_lora, fast_lora_layers, keep_4bit_weights_trainable, on_cpu
from rlhf_cli.core.reward import RewardFn, load_reward_model, trained_max_length
from rlhf_cli.errors import DataError
from rlhf_cli.ppo.adapter_files import add_frozen_adapter
from rlhf_cli.ppo.layout import LayoutPlan, same_path
from rlhf_cli.ppo.roles import POLICY, REWARD, VALUE, SeparateActor, SharedActor, SharedReward, new_value_head
from rlhf_cli.recipe import OnlineRecipe
from rlhf_cli.runs import ResolvedModel

log = logging.getLogger("rlhf")


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
                known = next((n for f, n in names.items() if same_path(f, folder)), None)
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
            keep_4bit_weights_trainable(actor)
        fast_lora_layers(actor.peft)
        actor.freeze_all_but_trainable()
    name = "shared-base+separate-reward" if recipe.lora is not None and plan.reward == "separate" else actor.layout
    layout: dict[str, Any] = {"name": name, "base_copies": copies, "quantized_bits": recipe.quant.bits,
                              "parent_adapters": plan.parents, "roles": roles, "precision": precision.as_json()}
    if plan.reward != "function":
        layout["reward_placement"] = plan.why
    log.info("%s layout %s: %d base cop%s in memory", recipe.stage.upper(), name, copies, "y" if copies == 1 else "ies")
    return Models(actor, scorer, layout)
