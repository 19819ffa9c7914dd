"""The Python half of bench/gpu_check.sh: build a random ~1B Llama with its data, run every measurement in its
own time-boxed process, and print one table of what each produced.

    python bench/gpu_check.py run WORK [--small] [--out OUT] [--budget-s 450]   # everything below
    python bench/gpu_check.py prepare WORK [--small]                            # the model, data and recipes only

The model is Llama-shaped (hidden 2048, 16 layers, 32 heads, MLP 5632, vocabulary 32000: ~1.0B
parameters), randomly initialised and saved in bf16; the tokenizer is the tiny fixture BPE
(rlhf_cli.demo.tiny), whose ids all fall inside the larger vocabulary, so the logits cost what a real
32k-vocabulary model's do. --small builds a 2-layer, hidden-64 model and tiny sizes instead, to check the
script on a CPU. Nothing is downloaded. The reward model is the same base with a random score head, saved as
a train-rm style LoRA run (so rlhf shares the policy's base) and as a plain model (trl's separate copy).

Rows, in order, each one process (so its peak memory is its own):
  gpu tests     pytest -m gpu (4-bit layers on CUDA, bf16 defaults, a QLoRA rlhf sft)
  build         the model, the reward models, the data and the recipes
  sft           rlhf sft against bench/trl_sft.py (a plain trl SFTTrainer), LoRA then QLoRA: same model,
                data, batch, max_length, LoRA config, lr and steps; tokens/s are real tokens over train time
  ppo           rlhf ppo (policy, reference, value and reward on one shared base) against trl 1.12.0's
                PPOTrainer (bench/trl_ppo_baseline.py, from the folder in $TRL_OLD_SITE), LoRA then QLoRA:
                same prompts, rollout, minibatch, epochs, new tokens, temperature, lr; the second iteration
                is the one reported (the first is a warm-up)
  grpo          rlhf grpo in the same configuration, once the command exists
A row that fails or runs past its time box is marked so and the next one runs; the exit code is 1 if any did.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from rlhf_cli.demo import tiny

REPO = Path(__file__).resolve().parents[1]
FULL = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 32,
        "intermediate_size": 5632, "vocab_size": 32000, "max_position_embeddings": 2048}
SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 128, "vocab_size": 1024, "max_position_embeddings": 1024}
# Sizes and time boxes (seconds). Full sizes on one H200, estimated: build 30 s; each SFT run ~25 s (20 steps
# of 8 samples of 320-500 tokens, max_length 512, after ~15 s of start-up and loading); each PPO run ~40 s (2
# iterations of 32 prompts x 128 new tokens, generation ~4 s an iteration, 4-bit slower). With the tests (~40 s) and the shell's wheel
# install and import check (~30 s): ~6 minutes, ~7 with grpo; the boxes leave headroom within --budget-s.
SIZES = {
    "full": {"shape": FULL, "chats": 400, "sentences": (30, 48), "max_length": 512, "sft_steps": 20, "batch": 8,
             "rollout": 32, "mini_batch": 8, "ppo_epochs": 2, "new_tokens": 128, "iterations": 2,
             "box": {"tests": 90, "build": 90, "sft": 75, "ppo": 90}},
    "small": {"shape": SMALL, "chats": 64, "sentences": (2, 4), "max_length": 128, "sft_steps": 4, "batch": 4,
              "rollout": 8, "mini_batch": 4, "ppo_epochs": 2, "new_tokens": 16, "iterations": 2,
              "box": {"tests": 300, "build": 300, "sft": 300, "ppo": 300}},
}
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
MAX_PROMPT, TEMPERATURE, SFT_LR, PPO_LR = 64, 1.0, 2e-4, 1e-5


# --------------------------------------------------------------------------- prepare


def chats(n: int, seed: int, sentences: tuple[int, int]) -> list[dict]:
    """Question + a long answer of fixture sentences, as conversational prompt/completion records: both rlhf
    and trl then put the loss on the answers only."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        question, animal, place = tiny._question(rng)
        answer = " ".join([tiny._answer(animal, place, rng.choice(tiny.GOOD))] +
                          [tiny._sentence(rng) for _ in range(rng.randint(*sentences))])
        out.append({"prompt": [{"role": "user", "content": question}],
                    "completion": [{"role": "assistant", "content": answer}]})
    return out


def build_model(work: Path, shape: dict) -> int:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(work / "tokenizer")
    config = LlamaConfig(**shape, tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, dtype="bfloat16")
    torch.manual_seed(0)
    # Initialised on the GPU when there is one: a billion parameters initialise in seconds there.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(work / "model", safe_serialization=True)
    tok.save_pretrained(work / "model")
    return sum(p.numel() for p in model.parameters())


def recipes(work: Path, size: dict) -> dict[str, str]:
    lora = f"{{r: {LORA['r']}, alpha: {LORA['alpha']}, dropout: {LORA['dropout']}, target_modules: all-linear}}"
    out = {}
    for name, bits in (("lora", "null"), ("qlora", 4)):
        out[f"sft-{name}"] = f"""\
stage: sft
model: {{path: {work / 'model'}, dtype: auto}}
quant: {{bits: {bits}, quant_type: nf4, double_quant: true}}
lora: {lora}
data: {{train: {work / 'chat.jsonl'}, eval: null, eval_fraction: 0.0, max_length: {size['max_length']}}}
train: {{max_steps: {size['sft_steps']}, batch_size: {size['batch']}, lr: {SFT_LR}, warmup_ratio: 0.0, logging_steps: 5,
        save_steps: 100000, seed: 42}}
output_dir: {work / 'runs' / f'sft-{name}'}
"""
        # dropout 0 in PPO, as in bench/ppo_step.py and trl's baseline: the rollout's log-probs must be the policy's.
        out[f"ppo-{name}"] = f"""\
stage: ppo
policy: {{path: {work / 'model'}, dtype: auto}}
reward: {{path: {work / 'reward-run'}, dtype: auto}}
quant: {{bits: {bits}}}
lora: {{r: {LORA['r']}, alpha: {LORA['alpha']}, dropout: 0.0, target_modules: all-linear}}
data: {{train: {work / 'prompts.jsonl'}, max_prompt_length: {MAX_PROMPT}}}
generation: {{max_new_tokens: {size['new_tokens']}, temperature: {TEMPERATURE}, top_p: 1.0}}
ppo: {{iterations: {size['iterations']}, rollout_batch_size: {size['rollout']}, mini_batch_size: {size['mini_batch']},
      ppo_epochs: {size['ppo_epochs']}, lr: {PPO_LR}, save_steps: 100000}}
output_dir: {work / 'runs' / f'ppo-{name}'}
"""
    return out


def prepare(work: Path, small: bool) -> None:
    # bench/ppo_step.py (this script's folder is on sys.path)
    import torch
    from ppo_step import save_reward_models

    t0 = time.perf_counter()
    size = SIZES["small" if small else "full"]
    work.mkdir(parents=True, exist_ok=True)
    tiny.build_tokenizer(work / "tokenizer")
    params = build_model(work, size["shape"])
    save_reward_models(work / "model", work / "reward-run", work / "reward-model", torch.bfloat16,
                       "cuda" if torch.cuda.is_available() else "cpu")
    tiny.write_jsonl(work / "chat.jsonl", chats(size["chats"], 1, size["sentences"]))
    tiny.write_jsonl(work / "prompts.jsonl", tiny.prompt_records(max(64, 2 * size["rollout"]), 2))
    for name, text in recipes(work, size).items():
        (work / f"{name}.yaml").write_text(text)
    print(json.dumps({"params": params, "seconds": time.perf_counter() - t0}))


# --------------------------------------------------------------------------- run


@dataclass
class Row:
    step: str
    status: str = "ok"  # ok | failed (...) | skipped (...)
    wall_s: float | None = None
    tokens_per_s: float | None = None
    iteration: str = ""  # seconds per iteration (generation / scoring / training)
    peak_gib: float | None = None
    notes: str = ""

    @property
    def failed(self) -> bool:
        return self.status.startswith("failed")


class Runner:
    """Runs each step as a process with a time box inside one overall deadline, and logs what it printed."""

    def __init__(self, budget_s: float, log: Path, env: dict[str, str]):
        self.deadline = time.monotonic() + budget_s
        self.log = log
        self.env = env

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, row: Row, argv: list[str], box_s: float, env: dict[str, str] | None = None) -> str:
        """The step's stdout; row.status says when the step failed, timed out or did not start."""
        box = min(box_s, self.left())
        if box < 10:
            row.status = "failed (no time left in the budget)"
            return ""
        t0 = time.monotonic()
        with self.log.open("a") as log:
            start = log.tell()
            log.write(f"\n== {row.step}: {' '.join(argv)}\n")
            log.flush()
            # A session of its own, so a timeout ends the step's children too (trl's baseline runs one).
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO,
                                    env=env or self.env, start_new_session=True)
            timed_out = False
            try:
                stdout, _ = proc.communicate(timeout=box)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                stdout, _ = proc.communicate()
                timed_out = True
            row.wall_s = time.monotonic() - t0
            log.write(stdout)
            log.write(f"== {row.step}: exit {proc.returncode} after {row.wall_s:.1f} s\n")
        if timed_out:
            row.status = f"failed (timed out after {box:.0f} s)"
        elif proc.returncode != 0:
            row.status = f"failed (exit {proc.returncode}; see the log)"
        if row.failed:
            # The end of what it said, where the console shows it (the whole of it is in the log).
            tail = self.log.read_bytes()[start:].decode(errors="replace").splitlines()[-15:]
            print(f"{row.step}: {row.status}\n  " + "\n  ".join(tail), file=sys.stderr, flush=True)
        return stdout


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def iteration_split(r: dict) -> str:
    total = r["time_generation"] + r["time_scoring"] + r["time_training"]
    return f"{total:.2f} ({r['time_generation']:.2f} / {r['time_scoring']:.2f} / {r['time_training']:.2f})"


def tests_row(runner: Runner, py: str, box: float) -> Row:
    row = Row("gpu tests (pytest -m gpu)")
    out = runner.run(row, [py, "-m", "pytest", "-q", "-m", "gpu", "tests/", "-p", "no:cacheprovider", "-rs"], box)
    # The counts go in the table, failed or not; the failing tests' names are in the log.
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary)}
    row.notes = ", ".join(f"{n} {k}" for k, n in counts.items())
    if not row.failed and not counts.get("passed"):
        row.status = "skipped (no CUDA)" if counts.get("skipped") else "failed (no test ran)"
    return row


def sft_rows(runner: Runner, py: str, work: Path, size: dict, variant: str, trl_version: str) -> list[Row]:
    box = size["box"]["sft"]
    ours = Row(f"sft {variant} · rlhf")
    name = f"sft-{variant.lower()}"
    runner.run(ours, [py, "-m", "rlhf_cli", "sft", str(work / f"{name}.yaml"), "--json", "--overwrite"], box)
    if not ours.failed:
        run = json.loads((work / "runs" / name / "run.json").read_text())
        ours.tokens_per_s = run["metrics"]["train_tokens_per_s"]
        ours.peak_gib = run["peak_memory_gb"]
        ours.notes = (f"{run['metrics']['steps']} steps, {run['precision']['compute']}, attention {run['attention']}, "
                      f"checkpointing {run['gradient_checkpointing']}, {run['data']['truncated']} truncated")
    theirs = Row(f"sft {variant} · trl {trl_version} SFTTrainer")
    argv = [py, str(REPO / "bench" / "trl_sft.py"), str(work / "model"), str(work / "chat.jsonl"),
            str(work / "runs" / f"trl-{name}"), "--steps", str(size["sft_steps"]), "--batch-size", str(size["batch"]),
            "--max-length", str(size["max_length"]), "--lr", str(SFT_LR), "--lora-r", str(LORA["r"]),
            "--lora-alpha", str(LORA["alpha"]), "--lora-dropout", str(LORA["dropout"]),
            # the model's own dtype, which rlhf's dtype auto also holds the frozen base in on a bf16 device
            "--dtype", "bfloat16"]
    out = runner.run(theirs, argv + (["--bits", "4"] if variant == "QLoRA" else []), box)
    if not theirs.failed:
        trl = last_json(out)
        theirs.tokens_per_s = trl["tokens_per_s"]
        theirs.peak_gib = trl["peak_memory"] / 2**30
        theirs.notes = f"{trl['steps']} steps, weights {trl['weights']}, checkpointing {trl['checkpointing']}, padded"
    if ours.tokens_per_s and theirs.tokens_per_s:
        ours.notes += f"; {ours.tokens_per_s / theirs.tokens_per_s:.2f}x trl's tokens/s"
    return [ours, theirs]


def ppo_rows(runner: Runner, py: str, work: Path, size: dict, variant: str, trl_old: Path | None,
             device: str) -> list[Row]:
    box = size["box"]["ppo"]
    ours = Row(f"ppo {variant} · rlhf")
    name = f"ppo-{variant.lower()}"
    runner.run(ours, [py, "-m", "rlhf_cli", "ppo", str(work / f"{name}.yaml"), "--json", "--overwrite"], box)
    if not ours.failed:
        run_dir = work / "runs" / name
        run, last = json.loads((run_dir / "run.json").read_text()), metric_rows(run_dir)[-1]
        ours.iteration = iteration_split(last)
        ours.tokens_per_s = last["tokens_per_s_generation"]
        ours.peak_gib = run["metrics"]["peak_memory_gb"]
        ours.notes = (f"layout {run['layout']['name']}, {run['layout']['base_copies']} base copy, "
                      f"{last['response_length']:.0f} tokens/response")
    theirs = Row(f"ppo {variant} · trl 1.12.0 PPOTrainer")
    if trl_old is None:
        theirs.status = "skipped (trl 1.12 not found)"
        return [ours, theirs]
    out_json = work / f"trl-{name}.json"
    argv = [py, str(REPO / "bench" / "trl_ppo_baseline.py"), "--model", str(work / "model"),
            "--reward-model", str(work / "reward-model"), "--prompts", str(work / "prompts.jsonl"),
            "--output-dir", str(work / "runs"), "--dtypes", "bf16", "--device", device,
            "--iterations", str(size["iterations"]), "--rollout", str(size["rollout"]),
            "--mini-batch", str(size["mini_batch"]), "--epochs", str(size["ppo_epochs"]),
            "--new-tokens", str(size["new_tokens"]), "--max-prompt", str(MAX_PROMPT), "--temperature", str(TEMPERATURE),
            "--json", str(out_json)] + (["--bits", "4"] if variant == "QLoRA" else [])
    env = {**runner.env, "PYTHONPATH": f"{trl_old}{os.pathsep}{runner.env['PYTHONPATH']}"}
    runner.run(theirs, argv, box, env)
    if not theirs.failed:
        trl = json.loads(out_json.read_text())[0]
        last = trl["rows"][-1]
        theirs.iteration = iteration_split(last)
        theirs.tokens_per_s = last["tokens_per_s_generation"]
        theirs.peak_gib = trl["peak_memory"] / 2**30
        theirs.notes = (f"trl {trl['versions']['trl']}, policy+reference one base, value and reward models "
                        f"separate copies{' (reward 4-bit, value bf16)' if variant == 'QLoRA' else ''}")
    return [ours, theirs]


def grpo_row(runner: Runner, py: str, work: Path, size: dict) -> Row:
    """`rlhf grpo` on the PPO rows' base, reward and prompts. Its recipe is not known here beyond the keys every
    stage shares, so the PPO sizes go in through --set only where `rlhf schema grpo` has a field of that name."""
    row = Row("grpo LoRA · rlhf")
    probe = subprocess.run([py, "-m", "rlhf_cli", "grpo", "--help"], capture_output=True, cwd=REPO, env=runner.env)
    if probe.returncode != 0:
        row.status = "skipped (not available)"
        return row
    schema = json.loads(subprocess.run([py, "-m", "rlhf_cli", "schema", "grpo"], capture_output=True, text=True,
                                       cwd=REPO, env=runner.env, check=True).stdout)
    wanted = {"generation.max_new_tokens": size["new_tokens"], "generation.temperature": TEMPERATURE,
              "data.max_prompt_length": MAX_PROMPT, "lora.r": LORA["r"], "lora.alpha": LORA["alpha"],
              "lora.dropout": 0.0, "grpo.iterations": size["iterations"], "grpo.rollout_batch_size": size["rollout"],
              "grpo.mini_batch_size": size["mini_batch"], "grpo.ppo_epochs": size["ppo_epochs"], "grpo.lr": PPO_LR,
              "grpo.save_steps": 100000}
    sets = [f"{key}={value}" for key, value in wanted.items() if schema_has(schema, key)]
    name = "grpo-lora"
    argv = [py, "-m", "rlhf_cli", "grpo", "--policy", str(work / "model"), "--reward", str(work / "reward-run"),
            "--prompts", str(work / "prompts.jsonl"), "--output-dir", str(work / "runs" / name), "--overwrite", "--json"]
    runner.run(row, argv + [a for s in sets for a in ("--set", s)], size["box"]["ppo"])
    if row.failed:
        return row
    run_dir = work / "runs" / name
    run, last = json.loads((run_dir / "run.json").read_text()), metric_rows(run_dir)[-1]
    if {"time_generation", "time_scoring", "time_training"} <= last.keys():
        row.iteration = iteration_split(last)
    row.tokens_per_s = last.get("tokens_per_s_generation")
    row.peak_gib = run["metrics"].get("peak_memory_gb")
    row.notes = f"set: {', '.join(s.split('=')[0] for s in sets)}; the rest grpo's defaults"
    return row


def schema_has(schema: dict, dotted: str) -> bool:
    """Whether a JSON Schema (pydantic's, with $defs) has the property path `a.b`."""
    node = schema
    for part in dotted.split("."):
        while "$ref" in node or "anyOf" in node:
            if "$ref" in node:
                node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
            else:
                node = next((n for n in node["anyOf"] if "$ref" in n or "properties" in n), {})
        if part not in node.get("properties", {}):
            return False
        node = node["properties"][part]
    return True


def table(rows: list[Row]) -> str:
    def num(v: float | None, fmt: str) -> str:
        return "" if v is None else format(v, fmt)

    lines = ["| step | status | wall s | tokens/s | s/iteration (generation / scoring / training) | peak GiB | notes |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r.step} | {r.status} | {num(r.wall_s, '.1f')} | {num(r.tokens_per_s, ',.0f')} | {r.iteration} "
                     f"| {num(r.peak_gib, '.2f')} | {r.notes} |")
    return "\n".join(lines)


def run_all(work: Path, small: bool, out: Path | None, budget_s: float) -> int:
    size = SIZES["small" if small else "full"]
    py = sys.executable
    log = (out or work) / "steps.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # One OpenMP wait policy for every row (the environment's, or libgomp's default): the rows then differ in
    # training only. On CPUs that other jobs share, run with OMP_WAIT_POLICY=PASSIVE (spinning threads made
    # trl's small SFT 25x slower there).
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO))}
    runner = Runner(budget_s, log, env)
    started = datetime.now(timezone.utc)

    machine = Row("machine")
    probe = runner.run(machine, [py, "-c", MACHINE], 60)
    facts = {} if machine.failed else last_json(probe)
    device = "cuda" if facts.get("cuda") else "cpu"
    site = os.environ.get("TRL_OLD_SITE")
    trl_old = Path(site) if site and (Path(site) / "trl" / "__init__.py").exists() else None

    rows = ([machine] if machine.failed else []) + [tests_row(runner, py, size["box"]["tests"])]
    build = Row(f"build {'2-layer' if small else '~1B'} Llama, reward models, data")
    done = runner.run(build, [py, __file__, "prepare", str(work)] + (["--small"] if small else []), size["box"]["build"])
    if not build.failed:
        params = last_json(done)["params"]
        build.notes = f"{params / 1e9:.2f} B parameters, bf16" if params > 1e8 else f"{params / 1e6:.2f} M parameters, bf16"
    rows.append(build)
    if build.failed:
        for what in ("sft LoRA", "sft QLoRA", "ppo LoRA", "ppo QLoRA", "grpo LoRA"):
            rows.append(Row(what, "failed (no model: the build failed)"))
    else:
        for variant in ("LoRA", "QLoRA"):
            rows += sft_rows(runner, py, work, size, variant, facts.get("trl", "?"))
        for variant in ("LoRA", "QLoRA"):
            rows += ppo_rows(runner, py, work, size, variant, trl_old, device)
        rows.append(grpo_row(runner, py, work, size))

    head = (f"rlhf gpu_check ({'small' if small else 'full'} sizes), {started:%Y-%m-%d %H:%M} UTC, "
            f"{facts.get('device', 'unknown device')}; " + ", ".join(f"{k} {facts[k]}" for k in VERSIONS if k in facts)
            + f"; OMP_WAIT_POLICY {env.get('OMP_WAIT_POLICY', 'default')}")
    sizes = (f"SFT: {size['sft_steps']} steps of {size['batch']} x {size['max_length']} tokens, LoRA r{LORA['r']} "
             f"alpha {LORA['alpha']} dropout {LORA['dropout']} all-linear, lr {SFT_LR}. PPO: iteration 2 of "
             f"{size['iterations']}, {size['rollout']} prompts x {size['new_tokens']} new tokens at temperature "
             f"{TEMPERATURE}, {size['ppo_epochs']} epochs of minibatch {size['mini_batch']}, lr {PPO_LR}, bf16. "
             "tokens/s: SFT training tokens, PPO generated tokens. Peak: the CUDA allocator's peak on a GPU, "
             "peak RSS on a CPU.")
    text = f"{head}\n{sizes}\n\n{table(rows)}\n"
    print(text)
    failed = [r.step for r in rows if r.failed]
    if failed:
        print(f"failed: {', '.join(failed)} (their output is in {log})", file=sys.stderr)
    if out is not None:
        (out / "table.md").write_text(text)
        (out / "results.json").write_text(json.dumps({"facts": facts, "rows": [asdict(r) for r in rows]}, indent=1))
    return 1 if failed else 0


VERSIONS = ("python", "torch", "cuda_version", "transformers", "peft", "accelerate", "trl", "bitsandbytes", "datasets")
MACHINE = """
import json, platform, accelerate, bitsandbytes, datasets, peft, torch, transformers, trl
cuda = torch.cuda.is_available()
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__, "cuda_version": torch.version.cuda,
                  "transformers": transformers.__version__, "peft": peft.__version__, "accelerate": accelerate.__version__,
                  "trl": trl.__version__, "bitsandbytes": bitsandbytes.__version__, "datasets": datasets.__version__,
                  "cuda": cuda, "device": torch.cuda.get_device_name(0) if cuda else "CPU only"}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("what", choices=("run", "prepare"), help="run every step, or build the model and data only")
    parser.add_argument("work", type=Path, help="scratch folder for the model, data and runs")
    parser.add_argument("--small", action="store_true", help="2-layer model and tiny sizes: check the script on a CPU")
    parser.add_argument("--out", type=Path, help="also write table.md, results.json and steps.log here")
    parser.add_argument("--budget-s", type=float, default=450, help="seconds all steps together may take")
    args = parser.parse_args()
    if args.what == "prepare":
        prepare(args.work, args.small)
        return 0
    return run_all(args.work.resolve(), args.small, args.out, args.budget_s)


if __name__ == "__main__":
    sys.exit(main())
