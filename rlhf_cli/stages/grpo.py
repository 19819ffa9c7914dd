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

Parse -> check (nothing loaded yet, nothing written) -> build the roles -> train -> save -> manifest;
the steps are rlhf_cli/ppo/stage_steps.py, shared with rlhf ppo.
"""

from __future__ import annotations

from rlhf_cli.recipe import GRPORecipe
from rlhf_cli.result import RunOptions, RunResult


def run(recipe: GRPORecipe, options: RunOptions) -> RunResult:
    from rlhf_cli.ppo import stage_steps

    return stage_steps.run(recipe, options)
