"""Arithmetic questions with one exact answer: the worked example of a rule-based ("verifiable") reward.

    python -m rlhf_cli.demo.arithmetic data/arithmetic.jsonl              # 1000 prompts, seed 0
    python -m rlhf_cli.demo.arithmetic data/arithmetic_eval.jsonl --n 200 --seed 1
    rlhf grpo recipes/grpo-arithmetic.yaml

Each line is `{"prompt": "What is 17 + 5? Answer with the number only."}`. The question alone determines
the answer, so the reward function (rlhf_cli.demo.rewards:arithmetic_exact) needs no answer column: it
reads the question back from the prompt it is given.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path
from typing import Any

OPERATORS = ("+", "-", "*")
QUESTION = re.compile(r"What is (-?\d+) ([+*-]) (-?\d+)\?")


def question(a: int, op: str, b: int) -> str:
    return f"What is {a} {op} {b}? Answer with the number only."


def arithmetic_records(n: int, seed: int, largest: int = 20) -> list[dict[str, str]]:
    """n questions with operands in 0..largest; products use single-digit operands so a small model can learn them."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        op = rng.choice(OPERATORS)
        top = 9 if op == "*" else largest
        out.append({"prompt": question(rng.randint(0, top), op, rng.randint(0, top))})
    return out


def answer_of(prompt: Any) -> int | None:
    """The exact answer to the question in a prompt (a string, or a message list whose last user turn asks
    it); None when the prompt holds no question of this form."""
    text = prompt if isinstance(prompt, str) else next(
        (m["content"] for m in reversed(prompt) if m.get("role") == "user"), "")
    match = QUESTION.search(text)
    if match is None:
        return None
    a, op, b = int(match[1]), match[2], int(match[3])
    return a + b if op == "+" else a - b if op == "-" else a * b


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write arithmetic prompts as JSONL.")
    parser.add_argument("output", type=Path)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--largest", type=int, default=20)
    args = parser.parse_args(argv)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    records = arithmetic_records(args.n, args.seed, args.largest)
    args.output.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


if __name__ == "__main__":
    main()
