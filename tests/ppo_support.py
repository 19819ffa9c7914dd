"""Helpers for the PPO stage tests: tiny policy and reward runs trained by short direct loops, and
rule-based reward functions (imported by the stage as `tests.ppo_support:NAME`)."""

from __future__ import annotations

import os
import random
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


def _claim(out: Path, stage: str, base: Path):
    from rlhf_cli.runs import prepare_run

    return prepare_run(out, stage, "", {}, resume="never", overwrite=True, base_model={"path": str(Path(base).resolve())})


def train_sft_run(tiny: dict, out: Path, steps: int = 120, batch: int = 8, seed: int = 0) -> Path:
    """Full fine-tune of the tiny model on the fixture chat data (a random model has nothing for LoRA to adapt)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_cli.core.chat import record_messages, render_conversation
    from rlhf_cli.core.data import read_records

    run = _claim(out, "sft", tiny["model"])
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    model = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
    rows = [render_conversation(tok, record_messages(r, "messages"), 64) for r in read_records(str(tiny["chat"]))]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    losses = []
    for _ in range(steps):
        picked = rng.sample(rows, batch)
        width = max(len(r.input_ids) for r in picked)
        ids = torch.tensor([r.input_ids + [tok.pad_token_id] * (width - len(r.input_ids)) for r in picked])
        labels = torch.tensor([r.labels + [-100] * (width - len(r.labels)) for r in picked])
        loss = model(input_ids=ids, attention_mask=(labels != -100) | (ids != tok.pad_token_id), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.save_pretrained(out / "model", safe_serialization=True)
    tok.save_pretrained(out / "tokenizer")
    run.finish("completed", metrics={"loss_start": losses[0], "loss_end": sum(losses[-10:]) / 10},
               model={"kind": "full", "path": "model", "tokenizer": "tokenizer"})
    return out


def train_reward_run(tiny: dict, base_run: Path, out: Path, steps: int = 80, batch: int = 8, seed: int = 0) -> tuple[Path, float]:
    """A LoRA reward adapter (score head in modules_to_save) on base_run, Bradley-Terry on the preference
    fixture; written with the run-dir contract of `rlhf train-rm` (model.kind reward-adapter). Returns
    (run dir, held-out pairwise accuracy)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from rlhf_cli.core.chat import conversation_text
    from rlhf_cli.core.data import read_records
    from rlhf_cli.core.models import load_model, load_tokenizer
    from rlhf_cli.runs import resolve_model

    resolved = resolve_model(str(base_run))
    run = _claim(out, "train-rm", base_run)
    torch.manual_seed(seed)
    tok = load_tokenizer(resolved, padding_side="right")
    model = load_model(resolved, dtype=torch.float32, head="reward")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="SEQ_CLS",
                                             modules_to_save=["score"]))

    def encode(records):
        texts = [conversation_text(tok, r["prompt"], r[k]) for r in records for k in ("chosen", "rejected")]
        return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)

    def margins(records):
        scores = model(**encode(records)).logits[:, 0].view(-1, 2)
        return scores[:, 0] - scores[:, 1]

    pairs = read_records(str(tiny["preference"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    rng = random.Random(seed)
    for _ in range(steps):
        loss = -torch.nn.functional.logsigmoid(margins(rng.sample(pairs, batch))).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        accuracy = float((margins(read_records(str(tiny["preference_eval"]))) > 0).float().mean())
    model.save_pretrained(out / "adapter", safe_serialization=True)
    tok.save_pretrained(out / "tokenizer")
    run.finish("completed", metrics={"accuracy": accuracy},
               model={"kind": "reward-adapter", "adapters": ["adapter"], "tokenizer": "tokenizer"})
    return out, accuracy


def sample_score(run_or_model: Path, prompts_file: Path, scorer, max_new_tokens: int = 16, seed: int = 0) -> float:
    """Mean score of one sampled answer per prompt, from the model as later stages load it (run.json)."""
    import torch

    from rlhf_cli.core.chat import prompt_text
    from rlhf_cli.core.data import read_records
    from rlhf_cli.core.models import load_model, load_tokenizer
    from rlhf_cli.runs import resolve_model

    resolved = resolve_model(str(run_or_model))
    tok = load_tokenizer(resolved, padding_side="left")
    model = load_model(resolved, dtype=torch.float32).eval()
    prompts = [r["prompt"] for r in read_records(str(prompts_file))]
    enc = tok([prompt_text(tok, p) for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, temperature=0.7, top_k=0, max_new_tokens=max_new_tokens,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    responses = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    scores = scorer(prompts, responses)
    return sum(scores) / len(scores)
