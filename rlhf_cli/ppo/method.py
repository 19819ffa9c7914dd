"""What tells the online RL loop's methods apart, decided once from the recipe: PPO with a critic, or a
critic-free group method (GRPO, Dr. GRPO, RLOO, REINFORCE++).

    method = method_of(recipe)    # the loop reads method.*, never the recipe's stage

Everything else (sampling, scoring, the clipped surrogate, checkpoints, metrics) is the same loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_cli.ppo.algo import Aggregation
from rlhf_cli.recipe import KLEstimator, OnlineRecipe, OnlineRLSpec, PPORecipe, PPOSpec

# How each estimator's paper averages the per-token loss (algo.aggregate): GRPO per answer (Shao et al.
# 2024), Dr. GRPO over a constant token budget (Liu et al. 2025), RLOO and REINFORCE++ per token as PPO
# does here (Ahmadian et al. 2024 optimise whole sequences; OpenRLHF, where REINFORCE++ comes from,
# averages tokens).
AGGREGATION: dict[str, Aggregation] = {
    "gae": "token", "grpo": "sequence", "dr_grpo": "budget", "rloo": "token", "reinforce_pp": "token",
}


@dataclass(frozen=True)
class Method:
    stage: str  # "ppo" | "grpo": the recipe section that keys name, and the run's stage
    spec: OnlineRLSpec  # the shared settings: batch sizes, epochs, lr, clip, kl_coef, checkpoints, trackers
    ppo: PPOSpec | None  # the critic's settings (value loss, GAE, adaptive KL); None = no critic
    advantage: str  # gae | grpo | dr_grpo | rloo | reinforce_pp
    group_size: int  # answers sampled per prompt (1 for PPO)
    kl_in: str  # "reward" (per-token penalty, as PPO) or "loss" (a k3 loss term, as GRPO)
    kl_kind: KLEstimator

    @property
    def critic(self) -> bool:
        return self.ppo is not None

    @property
    def reference(self) -> bool:
        """Whether a reference pass is made: always for PPO (its reported KL and adaptive controller need it),
        and for a critic-free method only when the KL weighs something."""
        return self.ppo is not None or self.spec.kl_coef > 0

    @property
    def aggregation(self) -> Aggregation:
        return AGGREGATION[self.advantage]

    @property
    def prompts_per_rollout(self) -> int:
        return self.spec.rollout_batch_size // self.group_size


def method_of(recipe: OnlineRecipe) -> Method:
    if isinstance(recipe, PPORecipe):
        return Method("ppo", recipe.ppo, recipe.ppo, "gae", 1, "reward", recipe.ppo.kl_estimator)
    g = recipe.grpo
    return Method("grpo", g, None, g.advantage, g.group_size, g.kl_placement, g.kl_kind)
