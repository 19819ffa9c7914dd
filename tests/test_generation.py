"""core/generation.py and core/metrics.py: batched sampling (the PPO rollout's too), finish reasons, log-probs, pairwise wins, gates."""

from __future__ import annotations

import math

import fixtures_runs
import pytest
import torch

from rlhf_cli.core import generation as gen
from rlhf_cli.core.metrics import check_gates, compare, mean_std, sequence_kl
from rlhf_cli.recipe import GenerationSpec, ModelSpec

tiny_chatml, chatml_sft_run = fixtures_runs.tiny_chatml, fixtures_runs.chatml_sft_run


@pytest.fixture(scope="module")
def sft(sft_full_run):
    from rlhf_cli.core.chat import prompt_text
    from rlhf_cli.core.inference import load_causal_lm

    loaded = load_causal_lm(ModelSpec(path=str(sft_full_run), dtype="fp32"))
    questions = ["where is the cat?", "where is the big brown dog today, please tell me?", "where is the owl?"]
    return loaded, [prompt_text(loaded.tokenizer, q) for q in questions]


@pytest.mark.stage
def test_left_padded_batch_matches_prompts_alone(sft):
    loaded, prompts = sft
    spec = GenerationSpec(max_new_tokens=12, temperature=0)
    batch = gen.generate_batch(loaded.model, loaded.tokenizer, prompts, spec)
    alone = [gen.generate_batch(loaded.model, loaded.tokenizer, [p], spec).samples[0] for p in prompts]
    assert batch.prompt_mask[0].tolist().count(0) > 0  # the short prompt really was left-padded
    assert [s.text for s in batch.samples] == [s.text for s in alone]
    assert [s.prompt_tokens for s in batch.samples] == [s.prompt_tokens for s in alone]
    # The trained model answers in the fixture's pattern and stops on its own.
    assert batch.samples[0].text.startswith("the ") and batch.samples[0].finish_reason == "eos"


@pytest.mark.stage
def test_a_tokenizer_without_a_chat_template_learns_to_stop(tiny, tmp_path):
    """The fallback template ends turns with a token the model can emit and the sampler stops at (EOS);
    ChatML's <|im_end|>, not a token of this vocabulary (nor of Gemma-3's), left every answer running."""
    import json

    from fixtures_runs import train_sft_full
    from transformers import AutoTokenizer
    from typer.testing import CliRunner

    from rlhf_cli.cli import app

    bare = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    bare.chat_template = None
    bare.save_pretrained(tmp_path / "bare")
    run = train_sft_full(tiny, tmp_path / "sft", steps=80, tokenizer=tmp_path / "bare")
    result = CliRunner().invoke(app, ["generate", str(run), "-p", "where is the cat?", "-p", "where is the owl?",
                                      "--greedy", "--max-new-tokens", "24"])
    assert result.exit_code == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["finish_reason"] for a in answers] == ["eos", "eos"], answers
    assert all(a["response"].startswith("the ") for a in answers), answers


@pytest.mark.stage
def test_finish_reasons_masks_and_token_counts(sft):
    loaded, prompts = sft
    tok = loaded.tokenizer
    batch = gen.generate_batch(loaded.model, tok, prompts[:1], GenerationSpec(max_new_tokens=20, temperature=0))
    s = batch.samples[0]
    row = batch.responses[0].tolist()
    assert row[s.completion_tokens - 1] == tok.eos_token_id  # EOS is the last counted token
    assert batch.response_mask[0].sum() == s.completion_tokens
    assert tok.decode(row[: s.completion_tokens - 1]) == s.text

    cut = gen.generate_batch(loaded.model, tok, prompts[:1], GenerationSpec(max_new_tokens=20, temperature=0, stop=[" in "]))
    c = cut.samples[0]
    assert c.finish_reason == "stop" and c.text == s.text[: s.text.index(" in ")]
    assert " in " in tok.decode(cut.responses[0, : c.completion_tokens].tolist())
    assert " in " not in tok.decode(cut.responses[0, : c.completion_tokens - 1].tolist())

    short = gen.generate_batch(loaded.model, tok, prompts[:1], GenerationSpec(max_new_tokens=3, temperature=0))
    assert short.samples[0].finish_reason == "length" and short.samples[0].completion_tokens == 3


@pytest.mark.stage
def test_ppo_rollout_ends_answers_where_generate_does(sft):
    """A PPO rollout is the shared sampler's batch in PPO's layout: a stop string ends a row as in
    `rlhf generate` (text cut before it, mask through the token that completed it, counted as ended),
    where PPO used to stop on transformers' stop_strings and cut on its own."""
    from rlhf_cli.ppo.rollout import sample_rollout

    loaded, prompts = sft
    tok = loaded.tokenizer
    spec = GenerationSpec(max_new_tokens=20, temperature=0, stop=[" in "])
    batch = gen.generate_batch(loaded.model, tok, prompts, spec)
    rollout = sample_rollout(loaded.model, tok, prompts, spec)
    assert "stop" in [s.finish_reason for s in batch.samples]
    assert rollout.texts == [s.text for s in batch.samples]
    assert rollout.mask.sum(1).tolist() == [s.completion_tokens for s in batch.samples]
    assert rollout.ended.tolist() == [s.finish_reason != "length" for s in batch.samples]
    P = batch.prompt_length
    for row, s in enumerate(batch.samples):
        n = s.completion_tokens
        assert rollout.response_ids[row, :n].tolist() == batch.responses[row, :n].tolist()
        assert (rollout.response_ids[row, n:] == tok.pad_token_id).all() and not rollout.attention_mask[row, P + n :].any()
        if s.finish_reason == "stop":
            assert " in " in tok.decode(rollout.response_ids[row, :n].tolist())
            assert " in " not in tok.decode(rollout.response_ids[row, : n - 1].tolist())
    assert torch.equal(rollout.position_ids, gen.position_ids(rollout.attention_mask))


def test_finish_on_token_lists(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    body = tok("the cat is in the garden. it is great.", add_special_tokens=False)["input_ids"]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    s = gen._finish(tok, body + [eos, pad, pad], [eos], pad, [])
    assert (s.text, s.finish_reason, s.completion_tokens) == ("the cat is in the garden. it is great.", "eos", len(body) + 1)
    s = gen._finish(tok, body + [eos], [eos], pad, ["garden", "great"])
    assert s.text == "the cat is in the " and s.finish_reason == "stop"
    assert "garden" in tok.decode(body[: s.completion_tokens]) and "garden" not in tok.decode(body[: s.completion_tokens - 1])
    s = gen._finish(tok, body, [eos], pad, ["dog"])
    assert (s.finish_reason, s.completion_tokens) == ("length", len(body))
    # A row that ran to max_new_tokens sampled its trailing pad tokens (pad != eos): they count. Only a stop
    # string finishes a row that generate then pads.
    s = gen._finish(tok, body + [pad, pad], [eos], pad, [])
    assert (s.text, s.finish_reason, s.completion_tokens) == ("the cat is in the garden. it is great.", "length", len(body) + 2)
    s = gen._finish(tok, body + [pad, pad], [eos], pad, ["dog"])
    assert (s.finish_reason, s.completion_tokens) == ("length", len(body))


@pytest.mark.stage
def test_same_seed_same_samples(sft):
    loaded, prompts = sft
    spec = GenerationSpec(max_new_tokens=10, temperature=1.5)
    run = lambda seed: [s.text for s in gen.sample_texts(loaded.model, loaded.tokenizer, prompts * 2, spec, batch_size=4, seed=seed)]  # noqa: E731
    first = run(1)
    assert run(1) == first
    assert run(2) != first


@pytest.mark.stage
def test_response_logprobs_ignore_padding_and_match_kl_zero(sft):
    loaded, prompts = sft
    spec = GenerationSpec(max_new_tokens=8, temperature=1.0)
    torch.manual_seed(0)
    batch = gen.generate_batch(loaded.model, loaded.tokenizer, prompts, spec)
    logp = gen.response_logprobs(loaded.model, batch)
    assert torch.isfinite(logp).all() and (logp <= 0).all()
    assert (logp[batch.response_mask == 0] == 0).all() and (logp[batch.response_mask == 1] < 0).any()
    # Row 0 scored inside a left-padded batch equals row 0 scored alone (positions skip the padding).
    p0 = int(batch.prompt_mask[0].sum())
    alone = gen.GeneratedBatch(
        sequences=batch.sequences[:1, batch.prompt_length - p0 :],
        prompt_mask=batch.prompt_mask[:1, batch.prompt_length - p0 :],
        response_mask=batch.response_mask[:1],
        samples=batch.samples[:1],
    )
    assert torch.allclose(gen.response_logprobs(loaded.model, alone)[0], logp[0], atol=1e-4)
    assert sequence_kl(logp, logp, batch.response_mask).abs().max() == 0


def test_compare_counts_ties_half():
    c = compare([1.0, 2.0, 0.5, 3.0], [0.0, 2.0, 1.0, 1.0], ["a", "b", "c", "same"], ["x", "y", "z", "same"])
    assert (c.wins, c.ties, c.losses) == (1, 2, 1)  # equal score, and identical answers, are ties
    assert c.win_rate == pytest.approx(0.5) and c.tie_rate == pytest.approx(0.5)


def test_sequence_kl_sums_answer_tokens_only():
    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-2.0, -2.5, -9.0]])
    assert sequence_kl(logp, ref, torch.tensor([[1, 1, 0]])).item() == pytest.approx(1.5)


def test_gates_name_metric_value_and_threshold():
    metrics = {"reward": 0.31, "kl": 9.2, "win_rate": 0.6, "length": math.nan}
    assert check_gates(metrics, {"win_rate": 0.5}, {"kl": 10}) == []
    failed = check_gates(metrics, {"reward": 0.5, "length": 1}, {"kl": 8})
    assert failed == [
        "reward = 0.31 is under the gate 0.5 (--fail-under reward=0.5)",
        "length = nan is under the gate 1 (--fail-under length=1)",
        "kl = 9.2 is over the gate 8 (--fail-over kl=8)",
    ]
    assert mean_std([1.0, 3.0]) == (2.0, 1.0)
    # A gate on a metric that was not computed fails with a sentence, instead of a KeyError that lost eval.json.
    assert check_gates(metrics, {}, {"reward_fn_gain_se": 0.1}) == ["reward_fn_gain_se was not computed, so its gate cannot hold"]


@pytest.mark.stage
@pytest.mark.parametrize("run", ["sft_full_run", "lora_run"])
def test_the_checkpoints_own_generation_settings_do_not_change_sampling(run, request):
    # generate() fills what the recipe leaves unset from model.generation_config: a checkpoint's
    # no_repeat_ngram_size banned the answer's second "the", so PPO sampled from another distribution
    # than the one it scores.
    from rlhf_cli.core.chat import prompt_text
    from rlhf_cli.core.inference import load_causal_lm

    loaded = load_causal_lm(ModelSpec(path=str(request.getfixturevalue(run)), dtype="fp32"))
    prompts = [prompt_text(loaded.tokenizer, "where is the cat?")]
    spec = GenerationSpec(max_new_tokens=12, temperature=0)
    plain = gen.generate_batch(loaded.model, loaded.tokenizer, prompts, spec).samples[0].text
    ids = loaded.tokenizer(plain, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(set(ids)), plain  # a token repeats: what no_repeat_ngram_size=1 would ban
    target = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model
    own = target.generation_config
    own.no_repeat_ngram_size, own.min_new_tokens = 1, 12
    assert gen.generate_batch(loaded.model, loaded.tokenizer, prompts, spec).samples[0].text == plain
    assert target.generation_config is own  # the checkpoint's config is given back


@pytest.mark.stage
def test_answers_end_at_the_templates_end_of_turn_token_and_at_special_stop_strings(chatml_sft_run):
    """A base checkpoint with a ChatML template keeps eos <|endoftext|>, while sft taught it to end turns
    with <|im_end|>: the sampler stops there too. A stop string that is one special token stops the row."""
    from rlhf_cli.core.chat import prompt_text
    from rlhf_cli.core.inference import load_causal_lm

    loaded = load_causal_lm(ModelSpec(path=str(chatml_sft_run), dtype="fp32"))
    model, tok = loaded.model, loaded.tokenizer
    end_of_turn, end_of_text = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert gen.end_of_turn_id(tok) == end_of_turn
    prompts = [prompt_text(tok, q) for q in ("where is the cat?", "where is the owl?")]
    spec = GenerationSpec(max_new_tokens=40, temperature=0)
    want = gen.generate_batch(model, tok, prompts, spec).samples
    assert all(s.finish_reason == "eos" and s.completion_tokens < 40 for s in want)

    tok.eos_token = "<|endoftext|>"
    model.generation_config.eos_token_id = end_of_text  # as a base checkpoint's config names it
    assert gen.eos_token_ids(model, tok) == [end_of_text, end_of_turn]
    got = gen.generate_batch(model, tok, prompts, spec)
    assert [(s.text, s.finish_reason, s.completion_tokens) for s in got.samples] == \
        [(s.text, s.finish_reason, s.completion_tokens) for s in want]
    assert all(got.responses[i, s.completion_tokens - 1] == end_of_turn for i, s in enumerate(got.samples))

    # The same answers, cut where a special stop string is emitted: by its id, as "stop".
    model.generation_config.eos_token_id = tok.eos_token_id = None
    tok.chat_template = None  # no template: only the stop string can end the row
    assert gen.eos_token_ids(model, tok) == []
    tok.pad_token = "<|pad|>"
    stopped = gen.generate_batch(model, tok, prompts, GenerationSpec(max_new_tokens=40, temperature=0, stop=["<|im_end|>"]))
    assert [(s.text, s.finish_reason, s.completion_tokens) for s in stopped.samples] == \
        [(s.text, "stop", s.completion_tokens) for s in want]
