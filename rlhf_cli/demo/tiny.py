"""Tiny, fully local assets: a BPE tokenizer, a 2-layer Llama and learnable fixture data.

    python -m rlhf_cli.demo.tiny OUT_DIR            # family "tiny"
    build_all(out, family="chatml")                  # the same data, a tokenizer/config like real models'

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

# The "chatml" family behaves like the models users train (Qwen2.5, Llama-3): pad, eos and the config's
# pad are three different tokens, the config names two eos ids, the template opens with BOS and a
# default system turn and ends turns with "<|im_end|>\n", encoding with special tokens adds BOS, and
# the tokenizer pads on the left unless told otherwise. The "tiny" family agrees on all of these.
CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nbe brief.<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_SPECIAL = ["<|endoftext|>", "<|pad|>", "<|bos|>", "<|im_start|>", "<|im_end|>", "<unk>"]


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


def _bpe(special: list[str], vocab_size: int, extra: list[str]) -> object:
    """Byte-level BPE trained on the fixture corpus (plus `extra` lines)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    corpus = [_sentence(rng) for _ in range(2000)]
    corpus += [_answer(a, p, w) for a in ANIMALS for p in PLACES for w in [None, *GOOD, "bad"]]
    corpus += [f"where is the {a}?" for a in ANIMALS] + extra
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def build_tokenizer(out_dir: Path, vocab_size: int = 384) -> Path:
    """Byte-level BPE trained on the fixture corpus, saved as a transformers fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=_bpe(SPECIAL, vocab_size, []),
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return out_dir


def build_chatml_tokenizer(out_dir: Path, vocab_size: int = 384) -> Path:
    """The "chatml" family's tokenizer (see CHATML_TEMPLATE): same corpus, real-model conventions."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _bpe(CHATML_SPECIAL, vocab_size, ["system", "user", "assistant", "be brief."])
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                       special_tokens=[("<|bos|>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
        padding_side="left",
    )
    fast.chat_template = CHATML_TEMPLATE
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
        **_special_ids(tok),
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


def _special_ids(tok: object) -> dict[str, object]:
    """The config's bos/eos/pad: the tokenizer's own, or for the chatml family what real configs hold
    (eos also <|endoftext|>, pad <|endoftext|>: neither the tokenizer's pad nor its eos)."""
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    end_of_text = tok.convert_tokens_to_ids("<|endoftext|>")
    if tok.eos_token == "<|im_end|>" and end_of_text != tok.unk_token_id:
        ids.update(eos_token_id=[tok.eos_token_id, end_of_text], pad_token_id=end_of_text)
    return ids


def build_all(out: Path, n: int = 400, family: str = "tiny") -> dict[str, Path]:
    """Everything the tests and demo-tiny use, under `out`; family "chatml" swaps in a tokenizer and
    config that behave like real models' (see CHATML_TEMPLATE)."""
    out = Path(out)
    tok = {"tiny": build_tokenizer, "chatml": build_chatml_tokenizer}[family](out / "tokenizer")
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
