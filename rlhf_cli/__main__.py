"""`python -m rlhf_cli ...` (also what `accelerate launch -m rlhf_cli` runs)."""

from rlhf_cli.cli import main

if __name__ == "__main__":
    main()
