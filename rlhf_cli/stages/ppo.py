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
    from rlhf_cli.ppo import stage_steps

    return stage_steps.run(recipe, options)
