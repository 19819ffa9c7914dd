"""The online RL loop that `rlhf ppo` and `rlhf grpo` share: the math (algo.py), the loop (loop.py), what
tells the methods apart (method.py), the roles and where their weights live (layout.py, roles.py,
build.py, adapter_files.py), and the stages' common steps (stage_steps.py). Sampling is core.generation's."""
