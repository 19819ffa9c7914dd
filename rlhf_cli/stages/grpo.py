"""rlhf grpo: critic-free RL of a policy against a rule-based reward (or a reward model).

    rlhf grpo --policy runs/sft --reward rlhf_cli.demo.rewards:arithmetic_exact --prompts arithmetic.jsonl
    rlhf grpo recipes/grpo-arithmetic.yaml --set grpo.advantage=rloo
    accelerate launch -m rlhf_cli grpo recipes/...yaml

For each prompt grpo.group_size answers are sampled and scored; each answer's advantage is its score
against its group's (GRPO, Shao et al. 2024, and its relatives: grpo.advantage), so no value model is
built or trained. It is the PPO loop of rlhf_cli/ppo/ without the critic (rlhf_cli/ppo/method.py).

A rule-based reward is `package.module:function(prompts, responses) -> list[float]`: `prompts[i]` is the
i-th prompt as in the data (a string, or a message list), `responses[i]` the decoded answer to it, and
the function returns one finite float per answer. The answers to one prompt come as group_size
consecutive entries. rlhf_cli/demo/rewards.py:arithmetic_exact is a worked example.

Parse -> check (nothing loaded yet, nothing written) -> build the roles -> train -> save -> manifest.
"""

from __future__ import annotations

import logging
from typing import Any

from rlhf_cli.errors import Interrupted
from rlhf_cli.recipe import GRPORecipe
from rlhf_cli.result import RunOptions, RunResult

log = logging.getLogger("rlhf")


def run(recipe: GRPORecipe, options: RunOptions) -> RunResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from rlhf_cli.core.artifacts import base_entry
    from rlhf_cli.core.chat import prompt_text
    from rlhf_cli.core.data import percentiles
    from rlhf_cli.core.device import peak_memory_bytes
    from rlhf_cli.core.models import count_parameters, resolve
    from rlhf_cli.core.trackers import check_installed
    from rlhf_cli.ppo.build import build_models, context_length, policy_tokenizer, ppo_precision
    from rlhf_cli.ppo.layout import plan_layout
    from rlhf_cli.ppo.loop import Prompts, train
    from rlhf_cli.ppo.method import method_of
    from rlhf_cli.ppo.prompts import check_lengths, check_reward_reads, read_prompts
    from rlhf_cli.recipe_load import dump_recipe
    from rlhf_cli.runs import is_main_process, prepare_run

    # 1. Resolve the policy and the reward, read and measure the prompts: every user error is raised here,
    #    before a weight is loaded or a file written.
    grpo, method = recipe.grpo, method_of(recipe)
    check_installed(grpo.report_to, "grpo.report_to")
    policy = resolve(recipe.policy)
    tokenizer = policy_tokenizer(recipe, policy)
    plan = plan_layout(recipe, policy, tokenizer)
    raw = read_prompts(recipe)
    texts = [prompt_text(tokenizer, p) for p in raw]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    check_lengths(lengths, recipe, context_length(policy), "the policy's")
    reward_max_length = check_reward_reads(plan, raw, recipe)
    lr, lr_why = recipe.learning_rate()
    details: dict[str, Any] = {
        "prompts": len(raw),
        "prompt_tokens": percentiles(lengths),
        "reward": recipe.reward.function or plan.why,
        "prompts_per_iteration": method.prompts_per_rollout,
        "samples_per_iteration": grpo.rollout_batch_size,
        "advantage": method.advantage,
        "kl": f"{method.kl_kind} in the {method.kl_in}, beta {grpo.kl_coef:g}" if method.reference else "none (kl_coef 0)",
        "optimizer_steps_per_iteration": grpo.ppo_epochs * grpo.rollout_batch_size // grpo.mini_batch_size,
        "learning_rate": {"value": lr, "why": lr_why},
        **({"reward_max_length": reward_max_length} if reward_max_length is not None else {}),
        "precision": ppo_precision(recipe).as_json(),
    }
    if options.dry_run:
        details["layout"] = "separate copies" if recipe.lora is None else (
            "shared base" + (", separate reward model" if plan.reward == "separate" else ""))
        details["parent_adapters"] = plan.parents
        return RunResult("grpo", "dry-run", recipe.output_dir, details=details)

    # 2. Claim the run directory and build the roles: policy, reference (unless kl_coef is 0) and reward.
    run_dir = prepare_run(
        recipe.output_dir, "grpo", dump_recipe(recipe), recipe.model_dump(mode="json"),
        resume=options.resume, overwrite=options.overwrite,
        base_model=base_entry(policy, recipe.policy.path), parent_run=policy.run_dir,
        inputs=[policy, plan.reward_resolved],
    )
    accelerator = Accelerator(gradient_accumulation_steps=grpo.grad_accum)
    set_seed(grpo.seed)
    try:
        models = build_models(recipe, policy, plan, critic=False, reference=method.reference)
        trainable, total = count_parameters(models.actor)
        log.info("trainable parameters: %d of %d (policy)", trainable, total)
        run_dir.update(layout=models.layout, trainable_parameters=trainable, learning_rate=details["learning_rate"])

        # 3. Train (resumes from run_dir.resume_from when set).
        metrics = train(recipe, models, tokenizer, Prompts(raw, texts), run_dir, accelerator)

        # 4. Save the policy where later stages look for it.
        shared = recipe.lora is not None
        policy_dir = run_dir.path / ("adapter" if shared else "model")
        if is_main_process():
            models.actor.save(policy_dir, run_dir.path / "value")  # no critic: nothing goes to value/
            tokenizer.save_pretrained(run_dir.path / "tokenizer")
        accelerator.wait_for_everyone()
    except Interrupted:
        raise
    except BaseException as e:
        run_dir.finish("interrupted" if isinstance(e, KeyboardInterrupt) else "failed")
        raise

    model_section: dict[str, Any] = {"kind": "adapter", "adapters": ["adapter"]} if shared else {"kind": "full", "path": "model"}
    model_section.update(tokenizer="tokenizer")
    metrics["peak_memory_gb"] = round(peak_memory_bytes() / 2**30, 3)
    run_dir.finish("completed", metrics=metrics, model=model_section)
    return RunResult("grpo", "completed", str(run_dir.path), metrics=metrics, details={"layout": models.layout["name"]})
