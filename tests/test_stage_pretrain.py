"""rlhf pretrain on fixture text: from scratch (loss falls, perplexity reported), then continued."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from stagekit import manifest, rlhf, train_losses, workdir  # noqa: F401

pytestmark = [pytest.mark.stage, pytest.mark.usefixtures("workdir")]


def test_pretrain_from_scratch_then_continue(tiny):
    out = rlhf("pretrain", "pretrain.yaml")
    assert out.code == 0, out
    losses = train_losses("runs/tiny/pretrain")
    assert losses[-1][1] < losses[0][1] - 1.5, losses  # random init starts near ln(384) = 5.95
    m = out.json["metrics"]
    assert m["eval_perplexity"] == pytest.approx(math.exp(m["eval_loss"]), rel=1e-6)
    assert m["eval_perplexity"] < 60

    run = manifest("runs/tiny/pretrain")
    assert run["model"]["kind"] == "full" and run["base_model"]["init"] == "from_config"
    assert run["data"]["truncated"] == 0 and run["data"]["tokens"] % 64 == 0  # packed into full blocks
    assert run["precision"]["weights"] == "fp32"  # a full run keeps fp32 master weights

    # The saved model is a plain transformers model with the eval perplexity the run reported.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_cli.core.batches import FlatCollator, text_blocks
    from rlhf_cli.core.data import read_splits
    from rlhf_cli.recipe_load import load_recipe

    model = AutoModelForCausalLM.from_pretrained("runs/tiny/pretrain/model").eval()
    tok = AutoTokenizer.from_pretrained("runs/tiny/pretrain/tokenizer")
    recipe = load_recipe("pretrain", Path("runs/tiny/pretrain/recipe.yaml"))
    _, held, _ = read_splits(recipe.data, ("text",), recipe.train.seed)
    blocks, _ = text_blocks(tok, held, recipe.data.max_length, keep_tail=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=run["precision"]["compute"] == "bf16"):
        loss = model(**FlatCollator()(blocks)).loss.item()
    assert loss == pytest.approx(m["eval_loss"], abs=0.05)

    # Continued pretraining starts from the run: lower loss from the first step on.
    out = rlhf("pretrain", "pretrain.yaml", "--set", "model.init=pretrained", "--set", "model.config=null",
               "--set", "model.path=runs/tiny/pretrain", "--set", "train.max_steps=5", "-o", "runs/tiny/pretrain2")
    assert out.code == 0, out
    again = manifest("runs/tiny/pretrain2")
    assert again["parent_run"].endswith("runs/tiny/pretrain")
    assert train_losses("runs/tiny/pretrain2")[0][1] < losses[0][1] - 1.5


def test_the_held_out_text_is_scored_on_all_its_tokens(tiny):
    # Training drops the stream's last partial block (GPT-2 style); the held-out set keeps it, so eval_loss
    # covers every held-out token.
    from transformers import AutoTokenizer

    from rlhf_cli.core.data import read_splits
    from rlhf_cli.recipe_load import load_recipe

    out = rlhf("pretrain", "pretrain.yaml", "--dry-run")
    assert out.code == 0, out
    recipe = load_recipe("pretrain", Path(__file__).parents[1] / "recipes" / "tiny" / "pretrain.yaml")
    _, held, _ = read_splits(recipe.data, ("text",), recipe.train.seed)
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    tokens = sum(len(tok(r["text"])["input_ids"]) + 1 for r in held)  # each document and its EOS
    assert tokens % 64  # a partial last block
    assert out.json["details"]["eval_blocks"] == -(-tokens // 64)
    assert out.json["details"]["train"]["tokens"] % 64 == 0  # training blocks stay full


def test_documents_are_separated_by_one_eos_when_the_tokenizer_ends_texts_with_it(tiny):
    from tokenizers import processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from rlhf_cli.core.batches import text_blocks

    backend = AutoTokenizer.from_pretrained(tiny["tokenizer"]).backend_tokenizer
    eos = backend.token_to_id("<|end|>")
    backend.post_processor = processors.TemplateProcessing(single="$A <|end|>", special_tokens=[("<|end|>", eos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end|>", pad_token="<pad>")
    blocks, stats = text_blocks(tok, [{"text": "the cat"}, {"text": "the dog"}], 64)
    assert tok.decode(blocks[0]["input_ids"]) == "the cat<|end|>the dog<|end|>"
    assert stats.lengths == [3, 3]
