"""Seconds per PPO iteration of trl 1.12.0's PPOTrainer (generation / scoring / training), tokens/s and peak memory.

The baseline for bench/ppo_step.py: trl 1.12.0 (the last trl release with a PPO trainer) in the configuration
that bench measures, to be run on the same machine in the same state. trl 1.12 does not install beside the
project's trl, so it runs from a virtual environment of its own (.venv-trl112, ignored by git):

    python3.11 -m venv .venv-trl112 && .venv-trl112/bin/pip install torch==2.13.0 trl==1.12.0 \
        "transformers==5.24.*" "peft==0.21.*" accelerate datasets
    (installed: torch 2.13.0+cpu, trl 1.12.0, transformers 5.24.0, peft 0.21.2, accelerate 1.15.0, datasets 5.2.0)

    PYTHONPATH=. python bench/ppo_step.py --layouts shared-base     # builds the models under .bench/ppo_step once
    .venv-trl112/bin/python bench/trl_ppo_baseline.py            # fp32 and bf16, 6 iterations each
    .venv-trl112/bin/python bench/trl_ppo_baseline.py --dtypes fp32 --iterations 2

or, with trl 1.12.0 put in a folder of its own (pip install --no-deps --target DIR trl==1.12.0) and the
project's packages otherwise, as bench/gpu_check.sh runs it:

    PYTHONPATH=DIR:. python bench/trl_ppo_baseline.py --model M --reward-model R --prompts P --device cuda \
        --bits 4 --dtypes bf16 --iterations 2 --rollout 32 --mini-batch 8 --epochs 2 --new-tokens 128 \
        --temperature 1.0 --json out.json

Default configuration (bench/ppo_step.py's): SmolLM2-135M-Instruct, prompts rendered with its chat template and
generation prompt (at most 64 tokens), a LoRA policy (r 16, alpha 32, dropout 0, all-linear) passed to trl as
peft_config, so the reference is the policy with its adapter disabled; a full AutoModelForSequenceClassification
copy of the base as the value model; bench's reward-model folder as the reward model. 8 prompts per rollout,
32 new tokens at temperature 0.7 stopping at EOS, 4 PPO epochs x 2 minibatches of 4, lr 1e-5, seed 0, no
missing-EOS penalty, no checkpoints, no evaluation. "bf16" loads all three models in bfloat16. --model,
--reward-model and --prompts replace bench/ppo_step.py's folders, the size flags its sizes; --bits 4 loads
the policy's and the reward model's bases in 4-bit NF4 (QLoRA; trl trains the value model in full, so it
stays in the dtype); --device cuda runs on the GPU and reports the CUDA allocator's peak instead of VmHWM.

Each dtype runs in its own process, so its peak RSS is its own. The first iteration is a warm-up and is left
out of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# bench/ppo_table.py (this script's folder is on sys.path)
from ppo_table import header, peak_memory, peak_rss, row

REPO = Path(__file__).resolve().parents[1]
DTYPES = ("fp32", "bf16")

COLUMNS = (
    "what the columns cover for trl (its train() is one loop; its module functions are wrapped with timers):\n"
    "  gen   = batch_generation(): the policy's generate() for the rollout's prompts\n"
    "  score = the no-grad forward passes between generation and the PPO epochs: forward() (reference log-probs,\n"
    "          adapter disabled), selective_log_softmax() (policy and reference log-probs), truncate_response()\n"
    "          and get_reward() (value model and reward model)\n"
    "  train = iteration wall time - gen - score: the PPO epochs x minibatches (forward, backward, AdamW on\n"
    "          LoRA + the full value model), plus trl's rewards/GAE/whitening, logging, lr scheduler and gc;\n"
    "          an iteration runs from one on_step_end callback to the next (the first from on_train_begin)\n"
    "  s/iter = gen + score + train, median (best in brackets); gen tok/s = response tokens up to and including\n"
    "          the first EOS / gen; train tok/s = epochs x (prompt + response tokens, padding excluded) / train\n"
    "  copies = copies of the base weights: policy + reference (one base, LoRA), value model, reward model\n"
    "  peak GB = VmHWM of the dtype's process (CUDA peak on cuda); CPU s = process CPU seconds per iteration (all threads);\n"
    "  load = 1-minute load average around the run; OMP = OMP_WAIT_POLICY of the environment"
)


def child(dtype: str, args: argparse.Namespace) -> None:
    """One dtype, in this process: train with trl's PPOTrainer and print the per-iteration figures as JSON."""
    import peft
    import torch
    import transformers
    import trl
    import trl.experimental.ppo.ppo_trainer as ppo_module
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BitsAndBytesConfig,
        TrainerCallback,
        set_seed,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    rss_start = peak_rss()
    base, reward_dir = Path(args.model), Path(args.reward_model)
    rollout, epochs, mini_batch = args.rollout, args.epochs, args.mini_batch
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    set_seed(0)

    # trl expects left-padded queries and tells padding apart by pad_token_id. SmolLM2's pad token is its EOS
    # (<|im_end|>), which also closes every turn of the rendered prompt: those tokens would be masked as padding.
    # Its unused <|endoftext|> token serves as pad instead (trl zeroes pad ids before the models see them).
    tokenizer = AutoTokenizer.from_pretrained(base, padding_side="left")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
    prompts = [json.loads(line)["prompt"] for line in Path(args.prompts).read_text().splitlines() if line]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if max(map(len, ids)) > args.max_prompt:
        sys.exit(f"a prompt is longer than {args.max_prompt} tokens ({max(map(len, ids))})")
    if any(tokenizer.pad_token_id in row for row in ids):
        sys.exit(f"the pad token {tokenizer.pad_token!r} occurs in a prompt")
    dataset = Dataset.from_dict({"input_ids": ids})

    # QLoRA as the peft and transformers documentation spell it: NF4, double quantization, compute in the dtype.
    # trl trains the value model in full, so only the policy's and the frozen reward model's bases are 4-bit.
    frozen = {} if args.bits is None else {"device_map": {"": args.device}, "quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch_dtype)}
    policy = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype, **frozen)
    value = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch_dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(reward_dir, num_labels=1, dtype=torch_dtype, **frozen)
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")

    config = PPOConfig(
        output_dir=str(Path(args.output_dir) / f"trl-1.12-{dtype}"),
        # trl's arithmetic: batch_size = per_device_train_batch_size x gradient_accumulation_steps x processes
        # = the prompts per rollout (8 by default), mini_batch_size = batch_size / num_mini_batches (4), and
        # each minibatch is one micro-batch (rows [0:8] of 4), one optimizer step. (4 x 2 accumulation steps
        # would also give 8 and 4, but accelerate would then step the optimizer once per two minibatches.)
        per_device_train_batch_size=rollout,
        gradient_accumulation_steps=1,
        num_mini_batches=rollout // mini_batch,
        num_ppo_epochs=epochs,
        total_episodes=rollout * args.iterations,
        response_length=args.new_tokens,
        temperature=args.temperature,
        stop_token="eos",  # stop at EOS like bench's generation (trl's default, None, always samples every token)
        missing_eos_penalty=None,
        learning_rate=1e-5,
        # trl's default is True, but its PPO train() never enables it; bench's PPO runs without it too.
        gradient_checkpointing=False,
        # trl's flag; PPOTrainer's own Accelerator takes no mixed precision from it. On a 4-bit policy the flag
        # makes trl cast the norms to fp32 (peft_module_casting_to_bf16), whose fp32 output then meets the bf16
        # lm_head and stops generation with a dtype error; left off there, every layer stays in the loaded dtype.
        bf16=dtype == "bf16" and args.bits is None,
        use_cpu=args.device == "cpu",
        num_sample_generations=0,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
    )
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=None, reward_model=reward,
                         train_dataset=dataset, value_model=value, peft_config=lora)
    assert (config.batch_size, config.mini_batch_size, config.local_mini_batch_size) == (rollout, mini_batch, mini_batch), (
        config.batch_size, config.mini_batch_size)

    # Timers around the module functions trl's train() calls (it looks them up in its module at call time).
    acc = {"generation": 0.0, "scoring": 0.0, "gen_tokens": 0, "all_tokens": 0}
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    real_generation = ppo_module.batch_generation

    def timed_generation(model, queries, *args, **kwargs):
        t0 = time.perf_counter()
        out = real_generation(model, queries, *args, **kwargs)
        acc["generation"] += time.perf_counter() - t0
        # Response tokens up to and including the first EOS (all of them where none came), as bench counts.
        response = out[0][:, queries.shape[1]:]
        is_eos = response == eos
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, response.shape[1])
        acc["gen_tokens"] += int(first.sum())
        acc["all_tokens"] += int(first.sum()) + int((queries != pad).sum())
        return out

    def timed_scoring(fn):
        def wrapper(*args, **kwargs):
            if torch.is_grad_enabled():  # the same functions inside the PPO epochs count as training
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                acc["scoring"] += time.perf_counter() - t0
        return wrapper

    ppo_module.batch_generation = timed_generation
    for name in ("forward", "selective_log_softmax", "truncate_response", "get_reward"):
        setattr(ppo_module, name, timed_scoring(getattr(ppo_module, name)))

    rows: list[dict] = []

    class IterationClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.t0, self.cpu0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            now, cpu = time.perf_counter(), time.process_time()
            wall, train = now - self.t0, now - self.t0 - acc["generation"] - acc["scoring"]
            rows.append({
                "step": state.global_step, "wall": wall, "time_generation": acc["generation"],
                "time_scoring": acc["scoring"], "time_training": train, "cpu_seconds": cpu - self.cpu0,
                "generated_tokens": acc["gen_tokens"],
                "tokens_per_s_generation": acc["gen_tokens"] / max(acc["generation"], 1e-9),
                "tokens_per_s_training": epochs * acc["all_tokens"] / max(train, 1e-9),
            })
            acc.update(generation=0.0, scoring=0.0, gen_tokens=0, all_tokens=0)
            self.t0, self.cpu0 = now, cpu

    trainer.add_callback(IterationClock())
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    print(json.dumps({
        "dtype": dtype, "bits": args.bits, "rows": rows, "wall_s": wall, "peak_memory": peak_memory(),
        "rss_at_start": rss_start,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "mixed_precision": trainer.accelerator.mixed_precision, "torch_threads": torch.get_num_threads(),
        "versions": {m.__name__: m.__version__ for m in (torch, transformers, trl, peft)},
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=str(REPO / ".bench" / "ppo_step"),
                    help="where bench/ppo_step.py prepared smollm2-135m, reward-model and prompts.jsonl")
    ap.add_argument("--model", help="base model folder of the policy and the value model (default: WORKDIR/smollm2-135m)")
    ap.add_argument("--reward-model", help="sequence-classification reward model folder (default: WORKDIR/reward-model)")
    ap.add_argument("--prompts", help='JSONL of {"prompt": ...} records (default: WORKDIR/prompts.jsonl)')
    ap.add_argument("--output-dir", help="where trl writes its run folders (default: WORKDIR/runs)")
    ap.add_argument("--iterations", type=int, default=6, help="PPO iterations per dtype (the first is a warm-up)")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated: fp32, bf16")
    ap.add_argument("--bits", type=int, choices=[4], help="load the policy's and reward model's bases in 4-bit (QLoRA)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the models run")
    ap.add_argument("--rollout", type=int, default=8, help="prompts per rollout")
    ap.add_argument("--mini-batch", type=int, default=4, help="samples per optimizer step; divides --rollout")
    ap.add_argument("--epochs", type=int, default=4, help="PPO epochs over each rollout")
    ap.add_argument("--new-tokens", type=int, default=32, help="most tokens sampled per response (stops at EOS)")
    ap.add_argument("--max-prompt", type=int, default=64, help="longest prompt in tokens; a longer one is an error")
    ap.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    ap.add_argument("--json", type=Path, help="also write the per-dtype results to this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    workdir = Path(args.workdir).resolve()
    args.model = args.model or str(workdir / "smollm2-135m")
    args.reward_model = args.reward_model or str(workdir / "reward-model")
    args.prompts = args.prompts or str(workdir / "prompts.jsonl")
    args.output_dir = args.output_dir or str(workdir / "runs")
    if args.child:
        child(args.child, args)
        return

    missing = [p for p in (Path(args.model) / "config.json", Path(args.reward_model) / "config.json", Path(args.prompts))
               if not p.exists()]
    if missing:
        sys.exit(f"{', '.join(map(str, missing))} missing: run `PYTHONPATH=. python bench/ppo_step.py` first")
    dtypes = args.dtypes.split(",")
    if bad := [d for d in dtypes if d not in DTYPES]:
        sys.exit(f"unknown dtype {bad[0]!r}: choose from {', '.join(DTYPES)}")
    if args.rollout % args.mini_batch:
        sys.exit(f"--mini-batch {args.mini_batch} does not divide --rollout {args.rollout}")

    print(f"trl 1.12.0 PPOTrainer, {Path(args.model).name}{' 4-bit' if args.bits else ''} on {args.device}, "
          f"{args.rollout} prompts/rollout, {args.new_tokens} new tokens, {args.epochs} PPO epochs x "
          f"{args.rollout // args.mini_batch} minibatches, {os.cpu_count()} CPUs, torch threads default; "
          f"median of iterations 2..{args.iterations} (best in brackets)")
    print(header("run"))
    print("-" * len(header("run")))
    # CPU only, as the project's runs here, unless the GPU is asked for.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else dict(os.environ)
    results = []
    for dtype in dtypes:
        load_before = os.getloadavg()[0]
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", dtype],
                              capture_output=True, text=True, env=env)
        if proc.returncode:
            print(f"{dtype}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        print(row(f"trl 1.12.0 {dtype}", 3, out, max(load_before, os.getloadavg()[0])))
        results.append(out)
    if results:
        versions = ", ".join(f"{k} {v}" for k, v in results[0]["versions"].items())
        print(f"{versions}; peak GB includes ~{min(r['rss_at_start'] for r in results) / 1e9:.2f} GB of "
              "torch/transformers/peft/trl once imported")
    print(COLUMNS)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if len(results) < len(dtypes):
        sys.exit(1)


if __name__ == "__main__":
    main()
