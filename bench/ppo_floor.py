"""The passes every PPO iteration of bench/ppo_step.py's configuration needs, timed one by one.

    PYTHONPATH=. python bench/ppo_step.py --layouts shared-base   # builds the models under .bench/ppo_step once
    PYTHONPATH=. python bench/ppo_floor.py                        # fp32 and auto
    PYTHONPATH=. python bench/ppo_floor.py --dtypes fp32 --repeats 5

Whatever else an implementation does, an iteration of this configuration (SmolLM2-135M-Instruct, LoRA r16 on
every linear layer, 8 prompts, 32 new tokens, 4 PPO epochs x 2 minibatches of 4) must
- sample 8 responses of 32 tokens from the policy (adapter applied),
- run the frozen reference over the 8 sequences (for the KL penalty),
- run the policy forward and backward over each of the 8 minibatches; with an adapter in the first layer the
  backward goes through every layer, and
- run the reward model over the 8 sequences.
Their sum is the floor of any PPO with this policy, critic or not. The rest of what rlhf does per iteration is
timed too: the policy's no-grad pass for the old log-probs and the value adapter's passes (no-grad for the
rollout's values, forward and backward per minibatch).

Every pass is rlhf's own (the shared-base layout of bench/ppo_step.py: one base, policy / value / reward
adapters, fp32 LoRA updates), in one process, medians of --repeats after one warm-up. Generation is forced
to 32 tokens (min_new_tokens), so the floor does not depend on where the samples stop.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROLLOUT, MINI, MINI_BATCHES, EPOCHS, NEW_TOKENS = 8, 4, 2, 4, 32


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds)


def bf16_steps_kept(base: Path, lr: float) -> float:
    """Fraction of the base's weights, held in bf16, that an optimizer step of size lr changes at all.

    Adam's first step moves every weight by lr exactly; where lr is under half a bf16 spacing of the
    weight, rounding gives the old value back. A model trained in bf16 (trl's PPO critic in bf16) learns
    only through the weights that can move; rlhf's trainable weights are fp32 in every dtype.
    """
    import torch
    from safetensors.torch import load_file

    kept = total = 0
    for t in load_file(str(base / "model.safetensors")).values():
        if t.dim() != 2:
            continue
        w = t.to(torch.bfloat16)
        wf = w.float()
        for step in (lr, -lr):
            kept += int(((wf + step).to(torch.bfloat16) != w).sum())
        total += 2 * w.numel()
    return kept / total


def child(dtype: str, workdir: Path, repeats: int) -> None:
    import torch

    from rlhf_cli.core.chat import prompt_text
    from rlhf_cli.core.generation import encode_prompts, position_ids, token_logprobs
    from rlhf_cli.core.loading import resolve
    from rlhf_cli.core.lora import lora_arithmetic
    from rlhf_cli.ppo.build import build_models, policy_tokenizer
    from rlhf_cli.ppo.layout import plan_layout
    from rlhf_cli.ppo.prompts import read_prompts
    from rlhf_cli.recipe import PPORecipe

    paths = json_paths(workdir)
    recipe = PPORecipe(
        policy={"path": str(paths["base"]), "dtype": dtype},
        reward={"path": str(paths["reward_run"]), "dtype": dtype},
        lora={"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        data={"train": str(paths["prompts"]), "max_prompt_length": 64},
        generation={"max_new_tokens": NEW_TOKENS, "temperature": 0.7},
        output_dir=str(workdir / "runs" / "floor"),
    )
    resolved = resolve(recipe.policy)
    tokenizer = policy_tokenizer(recipe, resolved)
    models = build_models(recipe, resolved, plan_layout(recipe, resolved, tokenizer))
    actor = models.actor
    raw = read_prompts(recipe)[:ROLLOUT]
    batch = encode_prompts(tokenizer, [prompt_text(tokenizer, p) for p in raw], "cpu")
    policy = actor.generator()

    def sample() -> torch.Tensor:
        with torch.no_grad(), lora_arithmetic(actor, "exact"):
            return policy.generate(**batch, do_sample=True,
                                   temperature=0.7, top_k=0, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                   pad_token_id=tokenizer.pad_token_id)

    ids = sample()
    P = batch["input_ids"].shape[1]
    mask = torch.cat([batch["attention_mask"], torch.ones_like(ids[:, P:])], dim=1)
    pos = position_ids(mask)
    texts = tokenizer.batch_decode(ids[:, P:], skip_special_tokens=True)
    R = NEW_TOKENS
    mb = slice(0, MINI)

    def no_grad(fn: Callable[..., torch.Tensor], rows: slice) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad(), lora_arithmetic(actor, "exact"):
                return fn(ids[rows], mask[rows], pos[rows], R)
        return run

    labels = ids[mb, -R:]

    def train(fn: Callable[..., torch.Tensor], loss: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        def run() -> None:
            with lora_arithmetic(actor, "exact"):
                loss(fn(ids[mb], mask[mb], pos[mb], R)).backward()
            actor.zero_grad(set_to_none=True)
        return run

    def policy_loss(logits: torch.Tensor) -> torch.Tensor:  # the log-probs of the sampled tokens, as PPO takes them
        return -token_logprobs(logits, labels, 0.7).mean()

    every = slice(0, ROLLOUT)
    steps = EPOCHS * MINI_BATCHES
    t = {
        "generation": timed(sample, repeats),
        "reference": timed(no_grad(actor.reference_logits, every), repeats),
        "policy_train": steps * timed(train(actor.policy_logits, policy_loss), repeats),
        "reward": timed(lambda: models.scorer(raw, texts), repeats),
        "policy_old_logp": timed(no_grad(actor.policy_logits, every), repeats),
        "value_rollout": timed(no_grad(actor.values, every), repeats),
        "value_train": steps * timed(train(actor.values, lambda v: v.float().square().mean()), repeats),
    }
    print(json.dumps({"dtype": dtype, "seconds": t}))


def json_paths(workdir: Path) -> dict[str, Path]:
    return {k: Path(v) for k, v in json.loads((workdir / "paths.json").read_text()).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=".bench/ppo_step", help="where bench/ppo_step.py built its models")
    ap.add_argument("--dtypes", default="fp32,auto")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    workdir = Path(args.workdir).resolve()
    if args.child:
        child(args.child, workdir, args.repeats)
        return
    if not (workdir / "paths.json").exists():
        sys.exit(f"{workdir}/paths.json not found: run PYTHONPATH=. python bench/ppo_step.py --layouts shared-base first")

    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", ".")}
    floor_parts = ("generation", "reference", "policy_train", "reward")
    rest_parts = ("policy_old_logp", "value_rollout", "value_train")
    print(f"SmolLM2-135M-Instruct, LoRA r16 all-linear, {ROLLOUT} prompts x {NEW_TOKENS} new tokens, {EPOCHS} epochs x "
          f"{MINI_BATCHES} minibatches of {MINI}; seconds per iteration, medians of {args.repeats}; {os.cpu_count()} CPUs")
    print(f"{'dtype':6} {'gen':>6} {'ref':>6} {'pol f+b':>8} {'reward':>6} {'FLOOR':>6} | {'old lp':>6} {'val':>6} "
          f"{'val f+b':>8} {'all':>6}")
    for dtype in args.dtypes.split(","):
        proc = subprocess.run([sys.executable, __file__, "--child", dtype, "--workdir", str(workdir),
                               "--repeats", str(args.repeats)], capture_output=True, text=True, env=env)
        if proc.returncode:
            print(f"{dtype}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        t = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
        floor = sum(t[k] for k in floor_parts)
        print(f"{dtype:6} {t['generation']:>6.2f} {t['reference']:>6.2f} {t['policy_train']:>8.2f} {t['reward']:>6.2f} "
              f"{floor:>6.2f} | {t['policy_old_logp']:>6.2f} {t['value_rollout']:>6.2f} {t['value_train']:>8.2f} "
              f"{floor + sum(t[k] for k in rest_parts):>6.2f}")
    lr = 1e-5
    print(f"weights of the base, held in bf16, that one optimizer step of {lr:g} (bench/ppo_step.py's lr) changes: "
          f"{100 * bf16_steps_kept(json_paths(workdir)['base'], lr):.1f}%")
    print("FLOOR = generation + reference pass + policy forward/backward of every minibatch + reward pass: what any PPO "
          "of this configuration computes; pol f+b and val f+b are one minibatch's time x 8; "
          "all = FLOOR + rlhf's old log-probs and value passes (compare with bench/ppo_step.py's s/iter)")


if __name__ == "__main__":
    main()
