"""rlhf eval scores what training scored: the reward run's own input length, one encoding, one pooling,
and progress while it scores."""

from __future__ import annotations

import json
import random

import pytest
from stagekit import manifest, rlhf, workdir  # noqa: F401

from rlhf_cli.core.comparisons import encode_answers, encode_for_scoring


def _mixed_length_pairs(tiny, path, n: int, source: str, seed: int, flipped: float = 0.0) -> str:
    """The fixture's pairs, a third of them behind a long preamble that max_length 24 cuts; `flipped` of
    them with chosen and rejected swapped (so that a right model is not right on all of them)."""
    rng = random.Random(seed)
    rows = [json.loads(line) for line in open(tiny[source])][:n]
    for row in rows:
        if rng.random() < 0.33:
            row["prompt"] = "the red cat sees the dog in the park. " * rng.randint(1, 3) + row["prompt"]
        if rng.random() < flipped:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_an_answer_is_encoded_alike_alone_and_beside_its_siblings(tiny):
    from transformers import AutoTokenizer

    from rlhf_cli.core.chat import ensure_chat_template

    tok = AutoTokenizer.from_pretrained(tiny["model"])
    ensure_chat_template(tok)
    prompt = "the red cat sees the dog in the park. " * 4 + "where is the cat?"
    answers = ["the cat is in the park. it is great.", "the cat is in the park.", "the cat is in the park. it is fine."]
    for limit in (12, 24, 200):
        together, _ = encode_answers(tok, prompt, answers, limit)
        assert together == [encode_for_scoring(tok, prompt, a, limit) for a in answers]
        assert all(len(ids) <= limit for ids in together)


@pytest.mark.stage
@pytest.mark.usefixtures("workdir")
def test_eval_rm_accuracy_equals_train_rms_evaluation_of_the_same_pairs(tiny, tmp_path):
    train = _mixed_length_pairs(tiny, tmp_path / "train.jsonl", 400, "preference", 0)
    held = _mixed_length_pairs(tiny, tmp_path / "held.jsonl", 50, "preference_eval", 1, flipped=0.3)
    out = rlhf("train-rm", "train-rm.yaml", "--data", train, "--set", f"data.eval={held}",
               "--set", "data.max_length=24", "--set", "train.max_steps=3")
    assert out.code == 0, out
    assert out.json["details"]["truncated"] > 50  # long prompts were cut from the left to fit 24 tokens
    trained = manifest("runs/tiny/rm")["metrics"]
    assert 0.5 < trained["eval_accuracy"] < 0.9, trained

    got = rlhf("eval", None, "--reward", "runs/tiny/rm", "--preference", held, "--metric", "rm_accuracy")
    assert got.code == 0, got
    m = got.json["metrics"]
    assert m["rm_accuracy"] == pytest.approx(trained["eval_accuracy"], abs=1e-3)
    assert m["rm_margin"] == pytest.approx(trained["eval_margin"], abs=1e-3)
    assert got.json["details"]["reward_inputs"] == {"max_length": 24, "from": "data.max_length of runs/tiny/rm's recipe"}
    # Progress while scoring: timestamped lines on a non-terminal stderr.
    assert "eval rm_accuracy answer 100/100" in got.stderr

    # A flag still overrides, and says so.
    longer = rlhf("eval", None, "--reward", "runs/tiny/rm", "--preference", held, "--metric", "rm_accuracy",
                  "--set", "data.max_length=64")
    assert longer.code == 0 and longer.json["details"]["reward_inputs"] == {"max_length": 64, "from": "given"}
