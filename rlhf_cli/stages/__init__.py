"""One leaf module per subcommand: run(recipe, options) -> RunResult. Only the CLI imports these."""
