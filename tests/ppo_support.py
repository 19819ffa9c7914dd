"""Helpers for the PPO and GRPO stage tests: rule-based reward functions (imported by the stage as
`tests.ppo_support:NAME`), the two scorers of a policy, the command that runs a stage, and the sampling
score and exact KL of a saved policy. Fixtures live in conftest.py."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

GOOD_WORD = "great"


def says_great(prompts, responses):
    """Verifiable reward: 1 for a response containing the target word, 0 otherwise."""
    return [1.0 if GOOD_WORD in r else 0.0 for r in responses]


def says_great_then_interrupt(prompts, responses):
    """says_great, and a SIGINT to this process on call number PPO_INTERRUPT_AT (to test checkpoint-on-signal)."""
    n = int(os.environ.get("PPO_CALLS", "0")) + 1
    os.environ["PPO_CALLS"] = str(n)
    if n == int(os.environ.get("PPO_INTERRUPT_AT", "0")):
        os.kill(os.getpid(), signal.SIGINT)
    return says_great(prompts, responses)


def scorers(rm: Path) -> dict:
    """The two rewards a policy is scored by: the tiny reward model ("rm") and says_great ("fn")."""
    from rlhf_cli.core.reward import load_scorer

    return {"rm": load_scorer(str(rm)), "fn": says_great}


def rl_command(stage: str, policy: Path, reward: str, prompts: Path, out: Path, sets: dict, resume: str | None = None):
    """`rlhf ppo|grpo --policy --reward --prompts --output-dir --json`, each of `sets` as --set KEY=VALUE,
    in this process (CliRunner's result)."""
    from typer.testing import CliRunner

    from rlhf_cli.cli import app

    args = [stage, "--policy", str(policy), "--reward", reward, "--prompts", str(prompts), "--output-dir", str(out), "--json"]
    args += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    if resume:
        args += ["--resume", resume]
    return CliRunner().invoke(app, args)


def _policy(run: Path):
    """(tokenizer padding left, model in fp32 and eval mode) of a run or model, as later stages load it."""
    import torch

    from rlhf_cli.core.loading import load_model, load_tokenizer
    from rlhf_cli.runs import resolve_model

    logging.getLogger("rlhf").handlers.clear()  # the last CLI call's handler wrote to a stream now closed
    resolved = resolve_model(str(run))
    return load_tokenizer(resolved, padding_side="left"), load_model(resolved, dtype=torch.float32).eval()


def _sample(model, tok, prompts_file: Path, max_new_tokens: int, seed: int):
    """(prompts, encoded prompts, prompts + one answer each sampled at temperature 0.7 from `seed`)."""
    import torch

    from rlhf_cli.core.chat import prompt_text
    from rlhf_cli.core.data import read_records

    prompts = [r["prompt"] for r in read_records(str(prompts_file))]
    enc = tok([prompt_text(tok, p) for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, temperature=0.7, top_k=0, max_new_tokens=max_new_tokens,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return prompts, enc, out


def sample_score(run_or_model: Path, prompts_file: Path, scorer, max_new_tokens: int = 16, seed: int = 0) -> float:
    """Mean score of one sampled answer per prompt, from the model as later stages load it (run.json)."""
    tok, model = _policy(run_or_model)
    prompts, enc, out = _sample(model, tok, prompts_file, max_new_tokens, seed)
    responses = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    scores = scorer(prompts, responses)
    return sum(scores) / len(scores)


def policy_kl(run: Path, reference: Path, prompts_file: Path, max_new_tokens: int = 16, seed: int = 0) -> float:
    """Exact KL(policy || reference) per answer, in nats: summed over the full vocabulary at every answer
    token, averaged over one sampled answer per prompt (no sampling noise in the per-token term)."""
    import torch

    from rlhf_cli.core.loading import load_model
    from rlhf_cli.runs import resolve_model

    tok, policy = _policy(run)
    ref = load_model(resolve_model(str(reference)), dtype=torch.float32).eval()
    _, enc, out = _sample(policy, tok, prompts_file, max_new_tokens, seed)
    with torch.no_grad():
        P = enc["input_ids"].shape[1]
        answer = out[:, P:]
        real = torch.cumsum((answer == tok.eos_token_id).long(), 1) - (answer == tok.eos_token_id).long() == 0
        mask = torch.cat([enc["attention_mask"], real.long()], 1)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        logp = [torch.log_softmax(m(input_ids=out, attention_mask=mask, position_ids=pos).logits[:, P - 1 : -1] / 0.7, -1)
                for m in (policy, ref)]
        kl = (logp[0].exp() * (logp[0] - logp[1])).sum(-1)
    return float((kl * real).sum(1).mean())
