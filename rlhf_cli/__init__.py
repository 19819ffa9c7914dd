"""rlhf: command-line RLHF pipelines (pretrain -> sft -> train-rm -> ppo, eval, generate)."""

__version__ = "0.1.0"
