"""Comparison data for reward models: rankings, prompt column aliases, HH-RLHF transcripts, truncation that
keeps the answers, and train-rm on all of them."""

from __future__ import annotations

import json
import random

import pytest
from stagekit import manifest, rlhf, workdir  # noqa: F401

from rlhf_cli.core.comparisons import RankCollator, comparison_of, encode_answers, split_hh_pair
from rlhf_cli.errors import DataError

HH_CHOSEN = "\n\nHuman: where is the cat?\n\nAssistant: in the house.\n\nHuman: and then?\n\nAssistant: it is great."
HH_REJECTED = "\n\nHuman: where is the cat?\n\nAssistant: in the house.\n\nHuman: and then?\n\nAssistant: no."


def test_hh_transcripts_split_into_shared_turns_and_last_answers():
    prompt, chosen, rejected = split_hh_pair(HH_CHOSEN, HH_REJECTED)
    assert [m["role"] for m in prompt] == ["user", "assistant", "user"]
    assert prompt[0]["content"] == "where is the cat?" and prompt[2]["content"] == "and then?"
    assert (chosen, rejected) == ("it is great.", "no.")
    # Not transcripts, or transcripts that differ before the last turn: left as they are.
    assert split_hh_pair("it is great.", "no.") is None
    assert split_hh_pair(HH_CHOSEN, HH_REJECTED.replace("and then?", "why?")) is None
    c = comparison_of({"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, "preference")
    assert c.prompt == prompt and c.responses == ["it is great.", "no."] and c.pairs == [(0, 1)]


def test_rankings_scores_and_unranked_rows():
    row = {"prompt": "p", "responses": ["a", "b", "c"]}
    assert comparison_of({**row, "ranking": [2, 0, 1]}, "ranked").pairs == [(2, 0), (2, 1), (0, 1)]
    assert sorted(comparison_of({**row, "scores": [1, 3, 1]}, "ranked").pairs) == [(1, 0), (1, 2)]
    assert comparison_of({**row, "ranking": []}, "ranked") is None
    for bad in ({**row, "ranking": [0, 5]}, {**row, "ranking": [0, 0]}, {**row, "scores": [1, 2]},
                {"prompt": "p", "responses": ["only one"], "ranking": [0]}):
        with pytest.raises(DataError, match="record 7"):
            comparison_of(bad, "ranked", "f.jsonl: record 7")


def test_an_answer_not_scored_yet_takes_part_in_no_pair():
    row = {"prompt": "p", "responses": ["a", "b", "c"]}
    assert comparison_of({**row, "scores": [0.1, None, 0.9]}, "ranked").pairs == [(2, 0)]
    assert comparison_of({**row, "scores": [0.1, float("nan"), 0.9]}, "ranked").pairs == [(2, 0)]


def test_a_score_of_words_or_a_ranking_of_words_names_its_record():
    row = {"prompt": "p", "responses": ["a", "b", "c"]}
    for bad in ({**row, "scores": ["high", 1, 0]}, {**row, "ranking": [0, "b"]}, {**row, "ranking": [0, True]}):
        with pytest.raises(DataError, match="record 3"):
            comparison_of(bad, "ranked", "f.jsonl: record 3")


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_the_answers(tiny):
    from transformers import AutoTokenizer

    from rlhf_cli.core.chat import ensure_chat_template

    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    ensure_chat_template(tokenizer)
    prompt = "where is the cat? " * 20 + "tell me where the owl is."
    answers = ["the owl is in the barn. it is great.", "the owl is in the barn."]
    full, cut = encode_answers(tokenizer, prompt, answers, max_length=10_000)
    assert not cut
    short, cut = encode_answers(tokenizer, prompt, answers, max_length=40)
    assert cut and all(len(ids) == 40 for ids in short)
    assert short[0] != short[1]  # cut from the right, the two answers would have become identical
    head = 1 if short[0][0] == tokenizer.bos_token_id else 0
    for whole, kept in zip(full, short):
        assert whole[:head] == kept[:head] and whole[len(whole) - 40 + head:] == kept[head:]


def test_length_figures_are_the_transcripts_before_truncation(tiny):
    """train-rm's dry-run length percentiles say how long the data is, so that max_length can be chosen
    (sft and dpo count alike): lengths read after the cut all equalled max_length."""
    from transformers import AutoTokenizer

    from rlhf_cli.core.chat import ensure_chat_template
    from rlhf_cli.core.comparisons import comparison_samples

    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    ensure_chat_template(tokenizer)
    record = {"prompt": "where is the cat? " * 6, "chosen": "the cat is in the barn. it is great.", "rejected": "no."}
    full, _ = encode_answers(tokenizer, record["prompt"], [record["chosen"], record["rejected"]], max_length=10_000)
    samples, stats, lengths = comparison_samples(tokenizer, [record], "preference", max_length=24)
    assert stats.truncated == 1 and all(len(ids) <= 24 for ids in samples[0]["response_ids"])
    assert lengths == [len(ids) for ids in full] and min(lengths) > 24


def test_pairs_made_equal_by_the_cut_are_told_from_ties_and_repeats(tiny):
    """train-rm's warning and error say how many prompts truncation left without a pair that differs: not
    the rows skipped for tied scores or for two copies of one answer, which no max_length would save."""
    from transformers import AutoTokenizer

    from rlhf_cli.core.chat import ensure_chat_template
    from rlhf_cli.core.comparisons import comparison_samples

    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    ensure_chat_template(tokenizer)
    long = "the cat is in the barn. " * 6
    records = [
        {"prompt": "where is the cat?", "responses": ["in the barn.", "in the house."], "scores": [1, 1]},
        {"prompt": "where is the cat?", "responses": ["in the barn.", "in the barn."], "scores": [1, 0]},
        {"prompt": "where is the cat?", "responses": [long + "it is great.", long + "no."], "scores": [1, 0]},
    ]
    _, stats, _ = comparison_samples(tokenizer, records, "ranked", max_length=20)
    assert stats.no_signal == 3 and stats.truncated == 1 and stats.cut_equal == 1
    _, stats, _ = comparison_samples(tokenizer, records, "ranked", max_length=1000)
    assert stats.no_signal == 2 and stats.truncated == 0 and stats.cut_equal == 0


def test_answers_that_repeat_the_prompt_column_render_it_once(tiny):
    """HuggingFaceH4/ultrafeedback_binarized: a prompt column, and chosen/rejected as whole conversations that
    open with that prompt. train-rm, dpo and eval read it as the same pair without the repeat (they rendered
    the user turn twice, and dpo trained on the second copy as if it were part of the answer)."""
    from transformers import AutoTokenizer

    from rlhf_cli.core.chat import ensure_chat_template
    from rlhf_cli.core.comparisons import comparison_samples
    from rlhf_cli.core.dpo import pair_samples

    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    ensure_chat_template(tokenizer)
    user = {"role": "user", "content": "where is the fish?"}
    good, bad = {"role": "assistant", "content": "in the forest. it is great."}, {"role": "assistant", "content": "no."}
    for prompt in (user["content"], [user]):
        whole = {"prompt": prompt, "chosen": [user, good], "rejected": [user, bad]}
        plain = {"prompt": prompt, "chosen": [good], "rejected": [bad]}
        assert comparison_of(whole, "preference").responses == [[good], [bad]]
        assert comparison_samples(tokenizer, [whole], "preference", 64)[0] == comparison_samples(tokenizer, [plain], "preference", 64)[0]
        assert pair_samples(tokenizer, [whole], 64)[0] == pair_samples(tokenizer, [plain], 64)[0]
    # Answers that open with another turn are kept as they are.
    other = {"role": "user", "content": "and the owl?"}
    assert comparison_of({"prompt": "where is the fish?", "chosen": [other, good], "rejected": [other, bad]},
                         "preference").responses == [[other, good], [other, bad]]


def test_message_pairs_without_a_prompt_lose_their_shared_turns_first(tiny):
    """trl's conversational pairs carry the context in both lists: those turns are the prompt, so a pair too
    long for max_length is cut as the same pair with a prompt column is, and both answers survive."""
    from transformers import AutoTokenizer

    from rlhf_cli.core.chat import ensure_chat_template
    from rlhf_cli.core.comparisons import comparison_samples

    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    ensure_chat_template(tokenizer)
    user = {"role": "user", "content": "where is the fish? " * 6}
    answers = [{"role": "assistant", "content": "the fish is in the forest. it is great."},
               {"role": "assistant", "content": "the fish is in the forest."}]
    both = {"chosen": [user, answers[0]], "rejected": [user, answers[1]]}
    split = {"prompt": [user], "chosen": [answers[0]], "rejected": [answers[1]]}
    c = comparison_of(both, "preference")
    assert c.prompt == [user] and c.responses == [[answers[0]], [answers[1]]]
    for max_length in (30, 50):
        kept, stats, _ = comparison_samples(tokenizer, [both], "preference", max_length)
        expected, _, _ = comparison_samples(tokenizer, [split], "preference", max_length)
        assert stats.truncated == 1 and stats.no_signal == 0
        assert kept[0]["response_ids"] == expected[0]["response_ids"]
        assert all(ids[-1] == tokenizer.eos_token_id for ids in kept[0]["response_ids"])  # each answer's end of turn kept
    # Nothing shared, or one list inside the other: left whole.
    assert comparison_of({"chosen": [answers[0]], "rejected": [answers[1]]}, "preference").prompt is None
    assert comparison_of({"chosen": [user], "rejected": [user, answers[1]]}, "preference").prompt is None


def test_rank_collator_indexes_each_prompts_answers():
    batch = RankCollator(0)([{"response_ids": [[1, 2], [3], [4, 5, 6]], "pairs": [(0, 1), (0, 2)]},
                             {"response_ids": [[7], [8]], "pairs": [(1, 0)]}])
    assert batch["input_ids"].tolist() == [[1, 2, 0], [3, 0, 0], [4, 5, 6], [7, 0, 0], [8, 0, 0]]
    assert batch["attention_mask"].sum(1).tolist() == [2, 1, 3, 1, 1]
    assert batch["groups"] == [[(0, 1), (0, 2)], [(4, 3)]]


# --------------------------------------------------------------------------- train-rm on comparison data


def _rankings(tiny, path, k: int = 3, unranked: int = 0, source: str = "preference") -> str:
    """The preference fixture as K-way rankings: chosen, rejected and other prompts' rejected answers
    ranked below the chosen one (the "great" answer is best)."""
    pairs = [json.loads(line) for line in open(tiny[source])]
    rng = random.Random(0)
    rows = []
    for i, p in enumerate(pairs[:200]):
        others = [q["rejected"] for q in rng.sample(pairs, k - 2)]
        responses = [p["rejected"], *others, p["chosen"]]
        order = list(range(k))
        rng.shuffle(order)
        shuffled = [responses[j] for j in order]
        best = order.index(k - 1)
        ranking = [best] + [j for j in range(k) if j != best]  # the rest tie in truth: any order
        rows.append({"prompt": p["prompt"], "responses": shuffled, "ranking": [] if i < unranked else ranking})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.stage
@pytest.mark.usefixtures("workdir")
def test_train_rm_on_rankings_learns_pairs(tiny, tmp_path):
    data = _rankings(tiny, tmp_path / "ranked.jsonl", k=4, unranked=20)
    held_out = _rankings(tiny, tmp_path / "ranked_eval.jsonl", k=3, source="preference_eval")
    dry = rlhf("train-rm", "train-rm.yaml", "--data", data, "--set", f"data.eval={held_out}", "--dry-run")
    assert dry.code == 0, dry
    train = dry.json["details"]["train"]
    assert dry.json["details"]["format"] == "ranked"
    assert train["unranked"] == 20 and train["prompts"] == 180 and train["answers"] == 4 * 180
    # C(4, 2) = 6 pairs a ranking, less the few whose two answers happen to be the same text.
    assert 6 * 180 - 5 <= train["pairs"] <= 6 * 180
    out = rlhf("train-rm", "train-rm.yaml", "--data", data, "--set", f"data.eval={held_out}",
               "--set", "train.max_steps=25", "--set", "train.batch_size=4")
    assert out.code == 0, out
    assert "20 of 200 rows have no ranking" in out.stderr
    # Held-out pairwise accuracy: the chosen ("great") answer above every other is learnable.
    m = out.json["metrics"]
    assert m["eval_accuracy"] > 0.75 and m["eval_margin"] > 0, m
    assert manifest("runs/tiny/rm")["format"] == "ranked"


@pytest.mark.stage
@pytest.mark.usefixtures("workdir")
def test_query_column_is_read_as_the_prompt(tiny, tmp_path):
    pairs = [json.loads(line) for line in open(tiny["preference"])][:50]
    path = tmp_path / "query.jsonl"
    path.write_text("".join(json.dumps({"query": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"],
                                        "source": "fixture"}) + "\n" for p in pairs))
    dry = rlhf("train-rm", "train-rm.yaml", "--data", str(path), "--dry-run")
    assert dry.code == 0, dry
    assert pairs[0]["prompt"] in dry.json["details"]["sample_chosen"]  # the reward model sees the question
    assert "reading column query as the prompt" in dry.stderr
    assert "source" in dry.stderr and "not used by format preference" in dry.stderr


@pytest.mark.stage
@pytest.mark.usefixtures("workdir")
def test_hh_transcripts_are_rendered_with_the_chat_template(tmp_path):
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps({"chosen": HH_CHOSEN, "rejected": HH_REJECTED}) + "\n")
    dry = rlhf("train-rm", "train-rm.yaml", "--data", str(path), "--dry-run", "--set", "data.eval_fraction=0")
    assert dry.code == 0, dry
    sample = dry.json["details"]["sample_chosen"]
    assert "Human:" not in sample and "Assistant:" not in sample
    assert sample.count("where is the cat?") == 1 and sample.rstrip().endswith(("it is great.<|end|>", "it is great."))


@pytest.mark.stage
@pytest.mark.usefixtures("workdir")
def test_identical_pairs_are_named_as_such(tmp_path):
    path = tmp_path / "same.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "same answer", "rejected": "same answer"}) + "\n")
    out = rlhf("train-rm", "train-rm.yaml", "--data", str(path), "--set", "data.eval_fraction=0")
    assert out.code == 3 and "identical" in out.stderr and "max_length" not in out.stderr, out
    # A long ranking of tied answers is cut too, but no max_length would give it a pair.
    path = tmp_path / "tied.jsonl"
    path.write_text(json.dumps({"prompt": "where is the cat? " * 20, "responses": ["in the barn.", "in the house."],
                                "scores": [1, 1]}) + "\n")
    out = rlhf("train-rm", "train-rm.yaml", "--data", str(path), "--set", "data.eval=null", "--set", "data.eval_fraction=0")
    assert out.code == 3 and "ties" in out.stderr and "raise data.max_length" not in out.stderr, out


@pytest.mark.stage
@pytest.mark.usefixtures("workdir")
def test_train_rm_continues_from_an_earlier_reward_model(tiny):
    """Round 2 starts from round 1's adapter and head: its first loss is already far below log 2."""
    from stagekit import train_losses

    assert rlhf("train-rm", "train-rm.yaml", "--set", "train.max_steps=25").code == 0
    out = rlhf("train-rm", "train-rm.yaml", "--model", "runs/tiny/rm", "-o", "runs/tiny/rm2",
               "--set", "train.max_steps=2", "--set", "train.logging_steps=1")
    assert out.code == 0, out
    first = train_losses("runs/tiny/rm2")[0][1]
    assert first < 0.3, first
    run = manifest("runs/tiny/rm2")
    assert run["parent_run"].endswith("runs/tiny/rm") and run["model"]["kind"] == "reward-adapter"
    from rlhf_cli.core.reward import load_reward_model

    scorer = load_reward_model("runs/tiny/rm2", max_length=64)
    pairs = [json.loads(line) for line in open(tiny["preference_eval"])]
    prompts = [p["prompt"] for p in pairs]
    gaps = [c - r for c, r in zip(scorer(prompts, [p["chosen"] for p in pairs]), scorer(prompts, [p["rejected"] for p in pairs]))]
    assert sum(g > 0 for g in gaps) / len(gaps) >= 0.9


@pytest.mark.stage
def test_eval_rm_accuracy_on_rankings_with_the_reward_run_as_model(tiny, reward_run, tmp_path):
    """Pairwise accuracy over rankings equals the accuracy over the same pairs written one by one."""
    from typer.testing import CliRunner

    from rlhf_cli.cli import app

    ranked = _rankings(tiny, tmp_path / "ranked.jsonl", k=3, source="preference_eval")
    pairs_file = tmp_path / "pairs.jsonl"
    same = 0  # pairs of two equal answers: no signal, skipped as train-rm skips them
    with open(pairs_file, "w") as out:
        for line in open(ranked):
            row = json.loads(line)
            c = comparison_of(row, "ranked")
            for b, w in c.pairs:
                same += row["responses"][b] == row["responses"][w]
                out.write(json.dumps({"prompt": row["prompt"], "chosen": row["responses"][b],
                                      "rejected": row["responses"][w]}) + "\n")
    runner = CliRunner()
    results = []
    for data in (ranked, str(pairs_file)):
        result = runner.invoke(app, ["eval", "--model", str(reward_run), "--metric", "rm_accuracy", "--preference", data])
        assert result.exit_code == 0, result.stderr
        results.append(json.loads(result.stdout))
    by_ranking, by_pair = results
    assert by_ranking["details"]["preference_pairs"] == by_pair["details"]["preference_pairs"] == 3 * 50 - same
    assert by_ranking["details"]["preference_pairs_skipped"] == by_pair["details"]["preference_pairs_skipped"] == same
    assert by_ranking["details"]["preference_prompts"] == 50
    assert by_ranking["metrics"]["rm_accuracy"] == pytest.approx(by_pair["metrics"]["rm_accuracy"])
    assert by_ranking["metrics"]["rm_accuracy"] > 0.6
