"""Run directories built by short direct training loops on the tiny fixture (no stage code needed).

Each builder writes a completed run following the run.json contract (rlhf_cli/core/artifacts.py,
runs.resolve_model), so generate / eval / merge read them like the output of a real stage:

    sft_full_run       full fine-tune of the tiny Llama on the chat fixture (kind "full")
    lora_run           LoRA adapter over sft_full_run (parent run), random non-zero update
    lora_chain_run     a second adapter over lora_run (adapters applied in order)
    qlora_run          adapter whose recipe says quant.bits: 4 (a QLoRA run)
    reward_run         Bradley-Terry reward model: LoRA + score head over sft_full_run (kind "reward-adapter")

The same two runs exist for the "chatml" family (rlhf_cli/demo/tiny.py: a tokenizer and config that
behave like real models'); a test asks for `family` and reads the runs of each through of_family().
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch


def write_run(path: Path, stage: str, base: str, model: dict[str, Any], recipe: dict[str, Any] | None = None) -> Path:
    manifest = {
        "schema_version": 1,
        "stage": stage,
        "status": "completed",
        "base_model": {"path": str(base)},
        "parent_run": str(base) if (Path(base) / "run.json").exists() else None,
        "model": model,
        "recipe": recipe or {},
    }
    (path / "run.json").write_text(json.dumps(manifest, indent=2))
    return path


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models train fastest on one thread when the cores are shared (no oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _batches(texts: list[str], tokenizer: Any, batch_size: int, steps: int, seed: int):
    rng = random.Random(seed)
    tokenizer.padding_side = "right"
    for _ in range(steps):
        enc = tokenizer(rng.sample(texts, batch_size), return_tensors="pt", padding=True, add_special_tokens=False)
        yield enc["input_ids"], enc["attention_mask"]


@one_thread()
def train_sft_full(tiny: dict[str, Path], out: Path, steps: int = 30, seed: int = 0, tokenizer: Path | None = None) -> Path:
    """Full fine-tune on the chat transcripts (all tokens), saved as a `full` sft run.

    tokenizer: another tokenizer directory of the same vocabulary; without a chat template it gets
    rlhf's fallback, as the sft stage would give it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_cli.core.chat import ensure_chat_template

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(tokenizer or tiny["tokenizer"])
    ensure_chat_template(tok)
    model = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in _jsonl(tiny["chat"])]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for ids, mask in _batches(texts, tok, 8, steps, seed):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 2, losses
    out.mkdir(parents=True)
    model.save_pretrained(out / "model", safe_serialization=True)
    tok.save_pretrained(out / "tokenizer")
    return write_run(out, "sft", str(tiny["model"]), {"kind": "full", "path": "model", "tokenizer": "tokenizer"})


@one_thread()
def random_lora(base: Path, out: Path, *, seed: int, quant_bits: int | None = None, scale: float = 0.3) -> Path:
    """An adapter run over `base` (a run or model directory) with a random, clearly non-zero update."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_cli.runs import resolve_model

    torch.manual_seed(seed)
    resolved = resolve_model(str(base))
    model = AutoModelForCausalLM.from_pretrained(resolved.base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * scale)
    out.mkdir(parents=True)
    model.save_pretrained(out / "adapter", safe_serialization=True)
    AutoTokenizer.from_pretrained(resolved.tokenizer_path).save_pretrained(out / "tokenizer")
    recipe = {"stage": "sft", "quant": {"bits": quant_bits, "quant_type": "nf4", "double_quant": True, "compute_dtype": "auto"}}
    return write_run(out, "sft", str(base), {"kind": "adapter", "adapters": ["adapter"], "tokenizer": "tokenizer"}, recipe)


@one_thread()
def train_reward(tiny: dict[str, Path], base: Path, out: Path, steps: int = 24, seed: int = 0) -> Path:
    """Bradley-Terry reward model (LoRA + score head) on the preference fixture, as a reward-adapter run."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_cli.runs import resolve_model

    torch.manual_seed(seed)
    resolved = resolve_model(str(base))
    tok = AutoTokenizer.from_pretrained(resolved.tokenizer_path)
    model = AutoModelForSequenceClassification.from_pretrained(resolved.base, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="SEQ_CLS", modules_to_save=["score"])
    model = get_peft_model(model, config)
    pairs = _jsonl(tiny["preference"])
    render = lambda p, r: tok.apply_chat_template(  # noqa: E731
        [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    rng = random.Random(seed)
    tok.padding_side = "right"
    losses = []
    for _ in range(steps):
        batch = rng.sample(pairs, 8)
        texts = [render(b["prompt"], b["chosen"]) for b in batch] + [render(b["prompt"], b["rejected"]) for b in batch]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        scores = model(**enc).logits[:, 0]
        loss = -torch.nn.functional.logsigmoid(scores[:8] - scores[8:]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    out.mkdir(parents=True)
    model.save_pretrained(out / "adapter", safe_serialization=True)
    tok.save_pretrained(out / "tokenizer")
    model_section = {"kind": "reward-adapter", "adapters": ["adapter"], "tokenizer": "tokenizer"}
    return write_run(out, "train-rm", str(base), model_section, {"stage": "train-rm", "quant": {"bits": None}})


# --------------------------------------------------------------------------- session fixtures


@pytest.fixture(autouse=True)
def _fresh_rlhf_logging():
    """The CLI points the "rlhf" logger at the sys.stderr of its call; a CliRunner closes that stream
    afterwards, so drop the handler before code outside the CLI logs again."""
    yield
    import logging

    logging.getLogger("rlhf").handlers.clear()


FAMILY_FIXTURES = {
    "tiny": {"assets": "tiny", "sft": "sft_full_run", "reward": "reward_run"},
    "chatml": {"assets": "tiny_chatml", "sft": "chatml_sft_run", "reward": "chatml_reward_run"},
}


@pytest.fixture(scope="session", params=list(FAMILY_FIXTURES))
def family(request) -> str:
    """Each tokenizer/config family of rlhf_cli/demo/tiny.py in turn."""
    return request.param


def of_family(request: Any, family: str, what: str) -> Any:
    """The assets ("assets"), sft run ("sft") or reward run ("reward") of a family, built on first use."""
    return request.getfixturevalue(FAMILY_FIXTURES[family][what])


@pytest.fixture(scope="session")
def tiny_chatml(tmp_path_factory) -> dict[str, Path]:
    from rlhf_cli.demo.tiny import build_all

    return build_all(tmp_path_factory.mktemp("chatml"), family="chatml")


@pytest.fixture(scope="session")
def chatml_sft_run(tiny_chatml, tmp_path_factory) -> Path:
    return train_sft_full(tiny_chatml, tmp_path_factory.mktemp("runs") / "sft")


@pytest.fixture(scope="session")
def chatml_reward_run(tiny_chatml, chatml_sft_run, tmp_path_factory) -> Path:
    return train_reward(tiny_chatml, chatml_sft_run, tmp_path_factory.mktemp("runs") / "rm")


@pytest.fixture(scope="session")
def sft_full_run(tiny, tmp_path_factory) -> Path:
    return train_sft_full(tiny, tmp_path_factory.mktemp("runs") / "sft")


@pytest.fixture(scope="session")
def lora_run(sft_full_run, tmp_path_factory) -> Path:
    return random_lora(sft_full_run, tmp_path_factory.mktemp("runs") / "lora", seed=1)


@pytest.fixture(scope="session")
def lora_chain_run(lora_run, tmp_path_factory) -> Path:
    return random_lora(lora_run, tmp_path_factory.mktemp("runs") / "lora2", seed=2)


@pytest.fixture(scope="session")
def qlora_run(tiny, tmp_path_factory) -> Path:
    return random_lora(tiny["model"], tmp_path_factory.mktemp("runs") / "qlora", seed=3, quant_bits=4, scale=0.1)


@pytest.fixture(scope="session")
def reward_run(tiny, sft_full_run, tmp_path_factory) -> Path:
    return train_reward(tiny, sft_full_run, tmp_path_factory.mktemp("runs") / "rm")
