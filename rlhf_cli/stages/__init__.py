"""One leaf module per training or scoring subcommand: run(recipe, options) -> RunResult. Only the CLI imports
these; `rlhf report`, which trains nothing, lives in rlhf_cli/report/."""
