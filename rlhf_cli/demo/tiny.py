"""Tiny, fully local assets: a BPE tokenizer, a 2-layer Llama and learnable fixture data.

    python -m rlhf_cli.demo.tiny OUT_DIR

Tests and `make demo-tiny` build everything from code here, so no file comes from a model hub and the
provenance of every fixture is visible. The data carries signals a tiny model can learn in seconds:
- text / chat: short templated sentences about animals and colours (loss falls quickly);
- preferences: the chosen answer contains the word "great", the rejected one does not;
- prompts: questions whose SFT answers sometimes contain "great", so PPO has something to amplify.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ANIMALS = ["cat", "dog", "bird", "fish", "horse", "cow", "fox", "owl", "bear", "frog"]
COLOURS = ["red", "blue", "green", "black", "white", "brown", "yellow", "grey"]
PLACES = ["garden", "house", "field", "river", "forest", "barn", "hill", "park"]
VERBS = ["sees", "likes", "finds", "follows", "watches", "meets"]
GOOD = ["great", "nice", "fine", "good"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
SPECIAL = ["<pad>", "<s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<unk>"]


def _sentence(rng: random.Random) -> str:
    return (
        f"the {rng.choice(COLOURS)} {rng.choice(ANIMALS)} {rng.choice(VERBS)} "
        f"the {rng.choice(ANIMALS)} in the {rng.choice(PLACES)}."
    )


def _question(rng: random.Random) -> tuple[str, str, str]:
    animal, place = rng.choice(ANIMALS), rng.choice(PLACES)
    return f"where is the {animal}?", animal, place


def _answer(animal: str, place: str, word: str | None) -> str:
    base = f"the {animal} is in the {place}."
    return f"{base} it is {word}." if word else base


def text_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": " ".join(_sentence(rng) for _ in range(rng.randint(2, 5)))} for _ in range(n)]


def chat_records(n: int, seed: int) -> list[dict]:
    """SFT demonstrations; a quarter of the answers end with "it is great." (what PPO later amplifies)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q, animal, place = _question(rng)
        word = "great" if rng.random() < 0.25 else rng.choice([None, "nice", "fine"])
        out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": _answer(animal, place, word)}]})
    return out


def preference_records(n: int, seed: int) -> list[dict]:
    """Learnable preference: the chosen answer says "great", the rejected one says something else."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q, animal, place = _question(rng)
        other = rng.choice([None, "nice", "fine", "bad"])
        out.append({"prompt": q, "chosen": _answer(animal, place, "great"), "rejected": _answer(animal, place, other)})
    return out


def prompt_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": _question(rng)[0]} for _ in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def build_tokenizer(out_dir: Path, vocab_size: int = 384) -> Path:
    """Byte-level BPE trained on the fixture corpus, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [_sentence(rng) for _ in range(2000)]
    corpus += [_answer(a, p, w) for a in ANIMALS for p in PLACES for w in [None, *GOOD, "bad"]]
    corpus += [f"where is the {a}?" for a in ANIMALS]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return out_dir


def build_model(out_dir: Path, tokenizer_dir: Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A randomly initialised Llama small enough to train in seconds on two CPU cores."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


def build_all(out: Path, n: int = 400) -> dict[str, Path]:
    """Everything the tests and demo-tiny use, under `out`."""
    out = Path(out)
    tok = build_tokenizer(out / "tokenizer")
    paths = {
        "tokenizer": tok,
        "model": build_model(out / "model", tok),
        "text": write_jsonl(out / "text.jsonl", text_records(n, 1)),
        "chat": write_jsonl(out / "chat.jsonl", chat_records(n, 2)),
        "chat_eval": write_jsonl(out / "chat_eval.jsonl", chat_records(max(n // 8, 16), 3)),
        "preference": write_jsonl(out / "preference.jsonl", preference_records(n, 4)),
        "preference_eval": write_jsonl(out / "preference_eval.jsonl", preference_records(max(n // 8, 16), 5)),
        "prompts": write_jsonl(out / "prompts.jsonl", prompt_records(max(n // 4, 32), 6)),
        "prompts_eval": write_jsonl(out / "prompts_eval.jsonl", prompt_records(max(n // 8, 16), 7)),
    }
    return paths


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else ".assets/tiny")
    for name, path in build_all(target).items():
        sys.stderr.write(f"{name}: {path}\n")
