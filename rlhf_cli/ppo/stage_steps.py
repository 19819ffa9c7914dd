"""The steps `rlhf ppo` and `rlhf grpo` take alike around the loop, written once: check everything before
anything loads, claim the run directory, build the roles, train, save the policy, write the manifest.

    checked = check(recipe)                          # every user error is raised here
    run_dir = claim_run_dir(recipe, checked, options)
    models, metrics = train_and_save(recipe, checked, run_dir)
    return completed(recipe, run_dir, models, metrics)

Where the two differ (a value role or none, a group of answers per prompt, the KL's place) is read from
rlhf_cli/ppo/method.py; the stages themselves (rlhf_cli/stages/ppo.py, grpo.py) say which steps run in
which order. The loop is rlhf_cli/ppo/loop.py, the roles' layout rlhf_cli/ppo/layout.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from rlhf_cli.core.chat import prompt_text
from rlhf_cli.core.data import percentiles
from rlhf_cli.ppo.build import Models, build_models, context_length, policy_tokenizer, ppo_precision
from rlhf_cli.ppo.layout import LayoutPlan, plan_layout
from rlhf_cli.ppo.loop import Prompts, train
from rlhf_cli.ppo.method import method_of
from rlhf_cli.ppo.prompts import check_lengths, check_reward_reads, read_prompts
from rlhf_cli.recipe import OnlineRecipe
from rlhf_cli.result import RunOptions, RunResult
from rlhf_cli.runs import ResolvedModel, RunDir

log = logging.getLogger("rlhf")


@dataclass(frozen=True)
class Checked:
    """What the checks found, before a weight is loaded or a file written."""

    policy: ResolvedModel
    tokenizer: Any  # the policy's, left-padded for sampling
    plan: LayoutPlan
    prompts: Prompts
    details: dict[str, Any]  # what a dry run reports; learning_rate goes to run.json too


def check(recipe: OnlineRecipe) -> Checked:
    """Resolve the policy and the reward, read and measure the prompts: every user error is raised here."""
    from rlhf_cli.core.loading import resolve
    from rlhf_cli.core.trackers import check_installed

    method = method_of(recipe)
    spec = method.spec
    check_installed(spec.report_to, f"{method.stage}.report_to")
    policy = resolve(recipe.policy)
    tokenizer = policy_tokenizer(recipe, policy)
    plan = plan_layout(recipe, policy, tokenizer)
    raw = read_prompts(recipe)
    texts = [prompt_text(tokenizer, p) for p in raw]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    check_lengths(lengths, recipe, context_length(policy), "the policy's")
    reward_max_length = check_reward_reads(plan, raw, recipe)
    lr, lr_why = recipe.learning_rate()
    # A critic-free run also says how many prompts it samples for, its advantage estimator and its KL.
    group = not method.critic
    kl = f"{method.kl_kind} in the {method.kl_in}, beta {spec.kl_coef:g}" if method.reference else "none (kl_coef 0)"
    details: dict[str, Any] = {
        "prompts": len(raw),
        "prompt_tokens": percentiles(lengths),
        "reward": recipe.reward.function or plan.why,
        **({"prompts_per_iteration": method.prompts_per_rollout} if group else {}),
        "samples_per_iteration": spec.rollout_batch_size,
        **({"advantage": method.advantage, "kl": kl} if group else {}),
        "optimizer_steps_per_iteration": spec.ppo_epochs * spec.rollout_batch_size // spec.mini_batch_size,
        "learning_rate": {"value": lr, "why": lr_why},
        **({"reward_max_length": reward_max_length} if reward_max_length is not None else {}),
        "precision": ppo_precision(recipe).as_json(),
    }
    return Checked(policy, tokenizer, plan, Prompts(raw, texts), details)


def dry_run(recipe: OnlineRecipe, checked: Checked) -> RunResult:
    """The checks' findings and the layout that would be built, without building it."""
    plan = checked.plan
    details = {
        **checked.details,
        "layout": "separate copies" if recipe.lora is None else (
            "shared base" + (", separate reward model" if plan.reward == "separate" else "")),
        "parent_adapters": plan.parents,
    }
    return RunResult(method_of(recipe).stage, "dry-run", recipe.output_dir, details=details)


def claim_run_dir(recipe: OnlineRecipe, checked: Checked, options: RunOptions) -> RunDir:
    from rlhf_cli.core.artifacts import base_entry
    from rlhf_cli.core.data import fingerprint
    from rlhf_cli.recipe_load import dump_recipe
    from rlhf_cli.runs import prepare_run

    policy = checked.policy
    return prepare_run(
        recipe.output_dir, method_of(recipe).stage, dump_recipe(recipe), recipe.model_dump(mode="json"),
        resume=options.resume, overwrite=options.overwrite,
        base_model=base_entry(policy, recipe.policy.path), parent_run=policy.run_dir,
        inputs=[policy, checked.plan.reward_resolved], data_fingerprint=fingerprint(checked.prompts.raw),
    )


def train_and_save(recipe: OnlineRecipe, checked: Checked, run_dir: RunDir) -> tuple[Models, dict[str, Any]]:
    """Build the roles (a value role only with a critic, a reference only when a reference pass is made),
    train (resuming from run_dir.resume_from when set), and save the policy where later stages look for it
    and the value model, if any, for reference. A failure marks the run failed (or interrupted)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from rlhf_cli.core.loading import count_parameters
    from rlhf_cli.core.trainer import failure_marked
    from rlhf_cli.runs import is_main_process

    method = method_of(recipe)
    with failure_marked(run_dir):  # run.json says failed, with the error, or interrupted
        accelerator = Accelerator(gradient_accumulation_steps=method.spec.grad_accum)
        set_seed(method.spec.seed)
        models = build_models(recipe, checked.policy, checked.plan, critic=method.critic, reference=method.reference)
        trainable, total = count_parameters(models.actor)
        log.info("trainable parameters: %d of %d (%s)", trainable, total, "policy + value" if method.critic else "policy")
        run_dir.update(layout=models.layout, trainable_parameters=trainable, learning_rate=checked.details["learning_rate"])

        metrics = train(recipe, models, checked.tokenizer, checked.prompts, run_dir, accelerator)

        policy_dir = run_dir.path / ("adapter" if recipe.lora is not None else "model")
        if is_main_process():
            models.actor.save(policy_dir, run_dir.path / "value")  # without a critic nothing goes to value/
            checked.tokenizer.save_pretrained(run_dir.path / "tokenizer")
        accelerator.wait_for_everyone()
    return models, metrics


def completed(recipe: OnlineRecipe, run_dir: RunDir, models: Models, metrics: dict[str, Any]) -> RunResult:
    """The manifest's model section (the value folder with a critic), peak memory, status completed."""
    from rlhf_cli.core.device import peak_memory_bytes

    method = method_of(recipe)
    shared = recipe.lora is not None
    model_section: dict[str, Any] = {"kind": "adapter", "adapters": ["adapter"]} if shared else {"kind": "full", "path": "model"}
    model_section["tokenizer"] = "tokenizer"
    if method.critic:
        model_section["value"] = "value"
    metrics["peak_memory_gb"] = round(peak_memory_bytes() / 2**30, 3)
    run_dir.finish("completed", metrics=metrics, model=model_section)
    return RunResult(method.stage, "completed", str(run_dir.path), metrics=metrics, details={"layout": models.layout["name"]})


def run(recipe: OnlineRecipe, options: RunOptions) -> RunResult:
    """The whole of `rlhf ppo` and `rlhf grpo`: the method object (ppo/method.py) says which roles exist."""
    # 1. Resolve the policy and the reward, read and measure the prompts: every user error is raised here,
    #    before a weight is loaded or a file written.
    checked = check(recipe)
    if options.dry_run:
        return dry_run(recipe, checked)

    # 2. Claim the run directory; build the roles (policy, value unless critic-free, reference unless
    #    kl_coef is 0, reward), train, and save the policy where later stages look for it.
    run_dir = claim_run_dir(recipe, checked, options)
    models, metrics = train_and_save(recipe, checked, run_dir)

    # 3. The manifest names the policy, its tokenizer and (PPO) the value model.
    return completed(recipe, run_dir, models, metrics)

