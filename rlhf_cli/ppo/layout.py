"""Which copies of the base an online RL run (ppo, grpo) keeps, decided before any weight loads: where
the policy run's own adapters go and where the reward lives. What sits in those copies (the roles) is
rlhf_cli/ppo/roles.py; loading them is rlhf_cli/ppo/build.py.

    plan = plan_layout(recipe, policy_resolved, tokenizer)     # a wrong --reward fails here, exit 2

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

Without a critic (rlhf grpo) there is no value adapter, value head or value copy: policy + reference
(+ reward adapter) on one base.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_cli.core.chat import conversation_text
from rlhf_cli.core.device import resolve_dtype
from rlhf_cli.core.hub import check_resolved
from rlhf_cli.core.loading import load_tokenizer
from rlhf_cli.core.reward import RewardFn, load_function
from rlhf_cli.errors import RecipeError
from rlhf_cli.recipe import OnlineRecipe
from rlhf_cli.runs import ResolvedModel, resolve_model

log = logging.getLogger("rlhf")


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
    check_resolved(resolved)
    tokenizer = _reward_tokenizer(resolved, policy_tokenizer)

    def separate(why: str) -> LayoutPlan:
        return LayoutPlan(parents, "separate", resolved, tokenizer, why)

    if recipe.lora is None:
        return separate("full PPO keeps separate copies")
    if not resolved.adapters or not resolved.run_dir:
        return separate("the reward model is a full model, not an adapter")
    if not all(_is_lora(a) for a in resolved.adapters):
        return separate("the reward adapter is not LoRA")
    if not (same_path(resolved.base, policy.base) and resolved.gguf_file == policy.gguf_file):
        return separate("the reward run was trained on another base model than the policy")
    if resolve_dtype(src.dtype) != resolve_dtype(recipe.policy.dtype):
        return separate("reward.dtype differs from policy.dtype")
    on_merged = len(resolved.adapters) - 1 == len(policy.adapters) and all(
        same_path(a, b) for a, b in zip(resolved.adapters[:-1], policy.adapters))
    if parents == "merged" and not on_merged:
        # e.g. a reward run trained from the base while the policy is base + SFT: keep the SFT adapter
        # frozen instead of merging it, and both fit on the one base.
        parents = "stacked"
    return LayoutPlan(parents, "shared", resolved, tokenizer, "reward adapter and head on the shared base")


def _is_lora(folder: str) -> bool:
    config = Path(folder) / "adapter_config.json"
    return config.is_file() and json.loads(config.read_text()).get("peft_type") == "LORA"


def same_path(a: str, b: str) -> bool:
    """The same file or folder (resolved when both exist on disk; otherwise the same string)."""
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
