"""rlhf ppo: PPO of a policy against a reward model (or a rule-based reward function).

    rlhf ppo --policy runs/sft --reward runs/rm --prompts data/prompts.jsonl --set ppo.kl_coef=0.05
    rlhf ppo recipes/tiny/ppo.yaml
    accelerate launch -m rlhf_cli ppo recipes/...yaml

Parse -> check (nothing loaded yet, nothing written) -> build the roles -> train -> save -> manifest;
the steps are rlhf_cli/ppo/stage_steps.py, shared with rlhf grpo.
The algorithm and the model layouts live in rlhf_cli/ppo/.
"""

from __future__ import annotations

from rlhf_cli.recipe import PPORecipe
from rlhf_cli.result import RunOptions, RunResult


def run(recipe: PPORecipe, options: RunOptions) -> RunResult:
    from rlhf_cli.ppo import stage_steps as steps

    # 1. Resolve the policy and the reward, read and measure the prompts: every user error is raised here,
    #    before a weight is loaded or a file written.
    checked = steps.check(recipe)
    if options.dry_run:
        return steps.dry_run(recipe, checked)

    # 2. Claim the run directory; build the roles (policy, value, reference, reward), train, and save the
    #    policy where later stages look for it and the value model for reference.
    run_dir = steps.claim_run_dir(recipe, checked, options)
    models, metrics = steps.train_and_save(recipe, checked, run_dir)

    # 3. The manifest names the policy, its tokenizer and the value model.
    return steps.completed(recipe, run_dir, models, metrics)
