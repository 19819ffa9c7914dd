"""rlhf train-rm on learnable preferences: above-chance accuracy, and the saved run scores like the
trained model did (through core.reward.load_reward_model, without knowing head or adapter layout)."""

from __future__ import annotations

import json
import re
import statistics

import fixtures_runs
import pytest
from fixtures_runs import of_family
from safetensors import safe_open
from stagekit import manifest, rlhf, train_losses, workdir  # noqa: F401

# Stage tests run on each tokenizer family (fixtures_runs.FAMILY_FIXTURES).
family, tiny_chatml = fixtures_runs.family, fixtures_runs.tiny_chatml
pytestmark = [pytest.mark.stage, pytest.mark.usefixtures("workdir")]


def _eval_pairs(tiny) -> list[dict]:
    return [json.loads(line) for line in open(tiny["preference_eval"])]


def test_reward_model_learns_and_reloads_with_the_same_scores(tiny, family, request):
    model = of_family(request, family, "assets")["model"]
    out = rlhf("train-rm", "train-rm.yaml", "--model", str(model), "--set", "train.max_steps=25")
    assert out.code == 0, out
    m = out.json["metrics"]
    assert m["eval_accuracy"] >= 0.9 and m["eval_margin"] > 1.0, m
    losses = train_losses("runs/tiny/rm")
    assert losses[0][1] == pytest.approx(0.693, abs=0.05)  # log 2: the fresh head cannot tell pairs apart
    assert losses[-1][1] < 0.3

    run = manifest("runs/tiny/rm")
    assert run["model"]["kind"] == "reward-adapter"
    # The frozen base is held in the compute dtype; what trained (LoRA and the score head) is saved fp32.
    from rlhf_cli.core.device import dtype_name, resolve_dtype

    assert run["precision"]["weights"] == dtype_name(resolve_dtype("auto"))
    with safe_open("runs/tiny/rm/adapter/adapter_model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert any(".score." in k for k in dtypes) and set(dtypes.values()) == {"F32"}, dtypes

    from rlhf_cli.core.reward import load_reward_model

    scorer = load_reward_model("runs/tiny/rm", max_length=64)
    pairs = _eval_pairs(tiny)
    chosen = scorer([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    rejected = scorer([p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    margins = [c - r for c, r in zip(chosen, rejected)]
    assert statistics.mean(margins) == pytest.approx(m["eval_margin"], rel=0.02, abs=0.02)
    assert sum(x > 0 for x in margins) / len(margins) == pytest.approx(m["eval_accuracy"], abs=0.05)


def test_the_new_score_head_comes_from_train_seed_not_from_what_the_process_drew_before(tiny):
    """Two runs of one recipe in one process, with the process's generator in two other states: the same run
    (a fresh `rlhf train-rm` process starts from a generator state of its own, so runs differed)."""
    import torch

    heads = []
    for state, out in ((1, "runs/a"), (2, "runs/b")):
        torch.manual_seed(state)
        result = rlhf("train-rm", "train-rm.yaml", "--set", "train.max_steps=2", "--set", "train.logging_steps=1",
                      "--output-dir", out)
        assert result.code == 0, result
        with safe_open(f"{out}/adapter/adapter_model.safetensors", "pt") as f:
            heads.append({k: f.get_tensor(k) for k in f.keys() if ".score." in k})
    assert train_losses("runs/a") == train_losses("runs/b")
    assert heads[0].keys() == heads[1].keys() and heads[0]
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


def test_reward_model_from_an_sft_run_merges_its_adapter(tiny):
    assert rlhf("sft", "sft.yaml", "--set", "train.max_steps=3").code == 0
    out = rlhf("train-rm", "train-rm.yaml", "--model", "runs/tiny/sft", "--set", "train.max_steps=3")
    assert out.code == 0, out
    run = manifest("runs/tiny/rm")
    assert run["parent_adapters"] == "merged" and run["parent_run"].endswith("runs/tiny/sft")
    # The reward run resolves to the SFT adapter (merged) plus its own.
    from rlhf_cli.runs import resolve_model

    resolved = resolve_model("runs/tiny/rm")
    assert resolved.kind == "reward" and [a.split("/")[-2] for a in resolved.adapters] == ["sft", "rm"]


def test_malformed_preference_data_is_exit_3(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b"}\n')
    out = rlhf("train-rm", "train-rm.yaml", "--data", str(path))
    assert out.code == 3, out
    assert "chosen+rejected" in out.stderr and "records have: chosen, prompt" in out.stderr


def test_the_memory_estimate_of_a_reward_model_counts_no_vocabulary_logits():
    # The score head has one output: the [tokens, vocab] logits a causal LM computes never exist here.
    est = rlhf("train-rm", "train-rm.yaml", "--dry-run").json["details"]["memory_estimate"]
    assert est["parts_gib"]["logits"] * 1024**3 <= est["tokens_per_step"] * 13 + 1024**3 / 2000
    assert est["parts_gib"]["activations"] > 0


def test_the_truncation_warning_counts_the_ranked_prompts_it_speaks_of(tmp_path):
    """Rows still waiting for a ranking are skipped before any is tokenized: "2 of 4 prompts", not "2 of 7"."""
    long = "great " * 60
    rows = [{"prompt": f"q{i}", "responses": [f"{long}{i}" if i < 2 else "it is great.", "no."], "ranking": [0, 1]}
            for i in range(4)]
    rows += [{"prompt": f"u{i}", "responses": ["it is great.", "no."], "ranking": []} for i in range(3)]
    path = tmp_path / "ranked.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = rlhf("train-rm", "train-rm.yaml", "--data", str(path), "--set", "data.eval=null",
               "--set", "data.eval_fraction=0", "--dry-run")
    assert out.code == 0, out
    said = re.search(r"(\d+) of (\d+) (?:ranked )?prompts have answers longer than data.max_length 64", out.stderr)
    assert said and said.groups() == ("2", "4"), out.stderr
