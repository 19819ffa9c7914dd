"""core.dpo's answer-only LM head against trl's fused head on a random 2-layer Llama: the same per-token
log-probs, entropy, mean logits, top-1 flags and gradients, zero at the prompt and padding positions,
with the padded batch run as it is or, under core.attention's packed kernel, as one padding-free row."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from trl.trainer.utils import add_fused_lm_head

from rlhf_cli.core import attention
from rlhf_cli.core.dpo import _compact_lm_head

OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


def _model(packed: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    if packed:
        assert attention.use_packed_attention(model)
    add_fused_lm_head(model, outputs=OUTPUTS)
    return model


def _batch() -> dict[str, torch.Tensor]:
    # Two rows, right-padded: a prompt of 4 and answers of 3 and 5 tokens.
    input_ids = torch.randint(1, 96, (2, 9))
    attention = torch.tensor([[1] * 7 + [0] * 2, [1] * 9])
    answer = torch.tensor([[0] * 4 + [1] * 3 + [0] * 2, [0] * 4 + [1] * 5])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": input_ids.masked_fill(answer == 0, -100)}


def _scored(model: LlamaForCausalLM, batch: dict[str, torch.Tensor]) -> tuple[object, torch.Tensor]:
    model.zero_grad()
    out = model(**batch, use_cache=False, fused_lm_head=True)
    out.log_probs.sum().backward()
    return out, model.model.layers[0].self_attn.q_proj.weight.grad.clone()


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "padding-free"])
def test_answer_only_head_matches_trls_head_outputs_and_gradients(packed):
    model, batch = _model(packed), _batch()
    want, want_grad = _scored(model, batch)
    _compact_lm_head(model, OUTPUTS)
    got, got_grad = _scored(model, batch)

    scored = batch["labels"][:, 1:] != -100
    for name in OUTPUTS:
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape == scored.shape, name
        if a.dtype == torch.bool:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, msg=name)
        assert not a[~scored].any(), name  # zero where nothing is scored, as trl's
    assert got.log_probs[scored].lt(0).all()
    torch.testing.assert_close(got.loss, want.loss)
    torch.testing.assert_close(got_grad, want_grad)
    assert torch.equal(got.label_mask, want.label_mask)


def test_plain_calls_and_scaled_heads_keep_trls_forward():
    model, batch = _model(), _batch()
    _compact_lm_head(model, OUTPUTS)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape == (2, 9, 96)  # generation and the like: the model's own forward

    capped = _model()
    capped.config.final_logit_softcapping = 30.0
    before = capped.forward
    _compact_lm_head(capped, OUTPUTS)
    assert capped.forward == before


def test_a_separate_reference_gets_log_probs_only():
    model, batch = _model(), _batch()
    _compact_lm_head(model, ("log_probs",))
    with torch.no_grad():
        out = model(**batch, use_cache=False, fused_lm_head=True)
    assert out.log_probs is not None and out.entropy is None and out.is_top1 is None
