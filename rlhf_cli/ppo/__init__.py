"""Our PPO: pure math (advantages, losses, KL) and a flat loop."""
