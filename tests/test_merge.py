"""rlhf merge: a LoRA run becomes a plain transformers directory with the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import fixtures_runs
import pytest
import torch
from fixtures_runs import of_family
from safetensors import safe_open
from typer.testing import CliRunner

from rlhf_cli.cli import app
from rlhf_cli.demo.tiny import CHAT_TEMPLATE

pytestmark = pytest.mark.stage
runner = CliRunner()
# Reward runs of each tokenizer family (fixtures_runs.FAMILY_FIXTURES).
family, tiny_chatml = fixtures_runs.family, fixtures_runs.tiny_chatml
chatml_sft_run, chatml_reward_run = fixtures_runs.chatml_sft_run, fixtures_runs.chatml_reward_run


def _inputs(tokenizer):
    texts = ["<|user|>where is the cat?<|end|><|assistant|>the cat is in the garden.", "<|user|>where is the owl?<|end|>"]
    tokenizer.padding_side = "right"
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def _live_logits(run, enc, head="causal"):
    """Base + adapters as peft applies them at inference (the last adapter live, not merged)."""
    from rlhf_cli.core.inference import load_causal_lm
    from rlhf_cli.recipe import ModelSpec

    loaded = load_causal_lm(ModelSpec(path=str(run), dtype="fp32"), merge=False)
    with torch.no_grad():
        return loaded.model(**enc).logits


def _merge(run, out, *extra, code=0):
    result = runner.invoke(app, ["merge", str(run), "--output", str(out), "--json", *extra])
    assert result.exit_code == code, result.stderr
    return (json.loads(result.stdout) if code == 0 else None), result.stderr


def test_merged_model_matches_base_plus_adapter(lora_chain_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_cli.runs import resolve_model

    out = tmp_path / "merged"
    result, _ = _merge(lora_chain_run, out, "--dtype", "fp32")
    assert result["details"]["adapters"] == 2 and result["details"]["dequantized_base"] is False
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # plain transformers, no peft
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    with safe_open(out / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "lora" in k]
    enc = _inputs(tokenizer)
    with torch.no_grad():
        merged = model(**enc).logits
    live = _live_logits(lora_chain_run, enc)
    mask = enc["attention_mask"].bool()
    assert torch.allclose(merged[mask], live[mask], atol=1e-4)
    # The adapters matter: the merged weights are not the base's.
    base = AutoModelForCausalLM.from_pretrained(resolve_model(str(lora_chain_run)).base)
    with torch.no_grad():
        assert not torch.allclose(base(**enc).logits[mask], merged[mask], atol=1e-2)
    assert not list(tmp_path.glob(".merged.*"))  # no temp directory left behind


def test_refuses_non_empty_output_without_overwrite(lora_run, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    _, stderr = _merge(lora_run, out, code=2)
    assert "exists and is not empty: pass --overwrite" in stderr
    _, stderr = _merge(lora_run, out, "--overwrite", code=2)  # not a model directory: never deleted
    assert "not a model directory" in stderr and (out / "notes.txt").read_text() == "keep me"
    _, stderr = _merge(lora_run, lora_run.parent, "--overwrite", code=2)
    assert "holds the run being merged" in stderr


def test_overwrite_never_replaces_the_base_the_run_is_built_on(tiny, tmp_path):
    # `--output <base> --overwrite` wrote base + adapters over the base: the run then loaded its adapters on
    # top of their own merge, and so did every other run trained on that base.
    import shutil

    from fixtures_runs import random_lora

    base = tmp_path / "base"
    shutil.copytree(tiny["model"], base)
    run = random_lora(random_lora(base, tmp_path / "a", seed=1), tmp_path / "b", seed=2)
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    _, stderr = _merge(run, base, "--overwrite", code=2)
    assert f"holds {base}, which the run is built on" in stderr
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before
    _, stderr = _merge(run, tmp_path, "--overwrite", code=2)  # a folder above the base and the parent run
    assert "which the run is built on" in stderr or "holds the run being merged" in stderr


def test_overwrite_keeps_the_earlier_merge_until_the_new_one_is_in_place(lora_run, tmp_path, monkeypatch):
    """--overwrite deleted the earlier merged model before moving the new one in: interrupted while it
    deleted (seconds for a real model), both were gone. Now the earlier one is deleted last."""
    import shutil

    out = tmp_path / "merged"
    _merge(lora_run, out, "--dtype", "fp32")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = shutil.rmtree

    def interrupted(path, *args, **kwargs):
        if ".tmp" in str(path):  # the clean-up of a temp directory
            return real(path, *args, **kwargs)
        # the earlier model's removal, stopped half-way
        next(p for p in sorted(Path(path).rglob("*")) if p.is_file()).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr("rlhf_cli.stages.merge.shutil.rmtree", interrupted)
    result = runner.invoke(app, ["merge", str(lora_run), "--output", str(out), "--dtype", "bf16", "--overwrite"])
    assert result.exit_code != 0
    monkeypatch.setattr("rlhf_cli.stages.merge.shutil.rmtree", real)
    merged = {p.name: p.read_bytes() for p in out.iterdir()}
    # Either model whole: the new one (bf16, interrupted only while the old copy went) or the earlier one.
    assert set(merged) == set(before)
    assert merged != before and json.loads(merged["config.json"])["dtype"] == "bfloat16"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.") and p.name.endswith(".tmp")]


def test_qlora_run_merges_into_dequantized_base(qlora_run, tmp_path, caplog):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    result, stderr = _merge(qlora_run, out)
    assert result["details"]["dequantized_base"] is True and result["details"]["dtype"] == "fp32"  # the base's own dtype
    assert "QLoRA run: merging into the dequantized base at fp32" in stderr
    model = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(model.config, "quantization_config", None) is None
    enc = _inputs(AutoTokenizer.from_pretrained(out))
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(json.loads((qlora_run / "run.json").read_text())["base_model"]["path"])
    full_precision = PeftModel.from_pretrained(base, qlora_run / "adapter")
    mask = enc["attention_mask"].bool()
    with torch.no_grad():
        assert torch.allclose(model(**enc).logits[mask], full_precision(**enc).logits[mask], atol=1e-4)


def test_reward_run_merges_into_a_sequence_classifier(reward_run, tiny, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_cli.core.reward import load_reward_model

    out = tmp_path / "rm"
    result, _ = _merge(reward_run, out, "--dtype", "fp32")
    assert result["details"]["head"] == "reward"
    merged = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32)
    enc = _inputs(AutoTokenizer.from_pretrained(out))
    run_scorer = load_reward_model(str(reward_run), dtype="fp32")
    with torch.no_grad():
        assert torch.allclose(merged(**enc).logits, run_scorer.model(**enc).logits, atol=1e-4)


def test_a_merged_reward_model_scores_padded_rows_as_rlhf_does(family, request, tmp_path):
    """transformers pools a merged reward model at the rightmost token that is not config.pad_token_id: the
    chatml family's base config names <|endoftext|> there while its tokenizer pads with <|pad|>, so without
    the tokenizer's pad id in the saved config a short row of a padded batch was scored on padding."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_cli.core.comparisons import encode_for_scoring
    from rlhf_cli.core.reward import load_reward_model

    run = of_family(request, family, "reward")
    out = tmp_path / "rm"
    _merge(run, out, "--dtype", "fp32")
    merged = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompts, answers = ["where is the cat?", "where is the owl?"], ["the cat is in the garden, I think.", "owl."]
    rows = [encode_for_scoring(tokenizer, p, a, 1024) for p, a in zip(prompts, answers)]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        scores = merged(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert scores.tolist() == pytest.approx(load_reward_model(str(run), dtype="fp32")(prompts, answers), abs=1e-4)


def test_a_run_directory_that_does_not_exist_is_named_as_missing(tmp_path):
    _, stderr = _merge(tmp_path / "nope", tmp_path / "out", code=3)
    assert stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nope'}: run directory not found (merge takes the directory of a LoRA run)"]
    assert not (tmp_path / "out").exists()
