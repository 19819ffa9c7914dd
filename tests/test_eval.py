"""rlhf eval: metrics on tiny trained runs, JSON on stdout, eval.json, and CI gates (exit 0 / 2 / 4)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import fixtures_runs
import pytest
from fixtures_runs import of_family, random_lora, write_run
from test_runs import tree
from typer.testing import CliRunner

from rlhf_cli.cli import app

runner = CliRunner()
# Stage tests run on each tokenizer family (fixtures_runs.FAMILY_FIXTURES).
family, tiny_chatml = fixtures_runs.family, fixtures_runs.tiny_chatml
chatml_sft_run, chatml_reward_run = fixtures_runs.chatml_sft_run, fixtures_runs.chatml_reward_run


def _shuffled(sentence: str, rng: random.Random) -> str:
    words = sentence.split()
    rng.shuffle(words)
    return " ".join(words)


@pytest.fixture(scope="module")
def few_prompts(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "prompts.jsonl"
    path.write_text("".join(tiny["prompts_eval"].read_text().splitlines(keepends=True)[:12]))
    return path


@pytest.fixture(scope="module")
def small_update_run(sft_full_run, tmp_path_factory):
    """An adapter over the SFT run whose update is mostly below bf16 rounding of the weights it adds to
    (a short PPO run's): folded in, a quarter of 12 greedy answers to the eval prompts changed."""
    return random_lora(sft_full_run, tmp_path_factory.mktemp("runs") / "small", seed=4, scale=0.003)


@pytest.fixture
def great_fn(tmp_path, monkeypatch):
    """A rule-based reward function the user writes: 1 when the answer says "great"."""
    (tmp_path / "my_rewards.py").write_text(
        "def great(prompts, responses):\n    return [float('great' in r) for r in responses]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards:great"


def _eval(args: list[str], code: int = 0) -> tuple[dict, str]:
    result = runner.invoke(app, ["eval", *args])
    assert result.exit_code == code, result.stderr
    return json.loads(result.stdout), result.stderr


@pytest.mark.stage
def test_perplexity_lower_on_fixture_than_shuffled(sft_full_run, tiny):
    from rlhf_cli.core.inference import load_causal_lm
    from rlhf_cli.core.metrics import perplexity
    from rlhf_cli.recipe import ModelSpec

    loaded = load_causal_lm(ModelSpec(path=str(sft_full_run)))
    rng = random.Random(0)
    chats = [json.loads(line) for line in tiny["chat_eval"].read_text().splitlines()][:24]
    shuffled = [{"messages": [c["messages"][0], {**c["messages"][1], "content": _shuffled(c["messages"][1]["content"], rng)}]}
                for c in chats]
    ppl = lambda records, fmt: perplexity(loaded.model, loaded.tokenizer, records, fmt, max_length=128, batch_size=8)  # noqa: E731
    chat, chat_shuffled = ppl(chats, "messages"), ppl(shuffled, "messages")
    assert chat.perplexity < chat_shuffled.perplexity / 2, (chat, chat_shuffled)
    # Chat data scores the answer tokens only; text data scores every token.
    texts = [{"text": c["messages"][1]["content"]} for c in chats]
    text, text_shuffled = ppl(texts, "text"), ppl([{"text": _shuffled(t["text"], rng)} for t in texts], "text")
    assert text.perplexity < text_shuffled.perplexity / 2, (text, text_shuffled)
    assert chat.tokens == sum(len(loaded.tokenizer(t["text"])["input_ids"]) + 1 for t in texts)  # answers + <|end|>


@pytest.mark.stage
def test_all_metrics_against_itself_and_gates_that_hold(family, request, tiny, few_prompts, great_fn, tmp_path):
    sft_full_run, reward_run = of_family(request, family, "sft"), of_family(request, family, "reward")
    out = tmp_path / "eval"
    metrics = ["perplexity", "reward", "win_rate", "kl", "rm_accuracy", "length", "reward_fn"]
    result, stderr = _eval([
        "--model", str(sft_full_run), "--reference", str(sft_full_run), "--reward", str(reward_run),
        "--reward-fn", great_fn, "--prompts", str(few_prompts), "--text", str(tiny["chat_eval"]),
        "--preference", str(tiny["preference_eval"]), *[a for m in metrics for a in ("--metric", m)],
        "-n", "2", "--set", "generation.temperature=1.0", "--set", "generation.max_new_tokens=12", "--seed", "5",
        "--fail-under", "rm_accuracy=0.75", "--fail-over", "kl=0.001", "--output-dir", str(out),
    ])
    m = result["metrics"]
    assert list(m) == ["perplexity", "reward", "reward_std", "reward_length_corr", "win_rate", "tie_rate", "reference_reward", "kl",
                       "rm_accuracy", "rm_margin", "length", "eos_rate", "distinct_rate", "reward_fn", "reward_fn_std",
                       "reference_reward_fn", "reward_fn_gain_se"]
    assert 1 < m["perplexity"] < 5  # the run learnt the fixture (random init: ~384)
    assert m["rm_accuracy"] > 0.75 and m["rm_margin"] > 0  # trained RM, held-out pairs
    assert 0.25 <= m["win_rate"] <= 0.75  # a model against itself: about half
    # The reference's answers are other draws of the same model: their means are near the model's own.
    assert abs(m["reference_reward"] - m["reward"]) < 2 * m["reward_std"]
    assert 0 <= m["reference_reward_fn"] <= 1 and abs(m["reference_reward_fn"] - m["reward_fn"]) < 0.5
    # ... and the check's gain over them is within its noise, whose error eval gives.
    assert 0 < m["reward_fn_gain_se"] and abs(m["reward_fn"] - m["reference_reward_fn"]) <= 2 * m["reward_fn_gain_se"]
    assert abs(m["kl"]) < 1e-3  # KL of a model to itself
    assert 0 < m["length"] <= 12 and 0 <= m["eos_rate"] <= 1 and 0 <= m["reward_fn"] <= 1
    assert result["details"]["failed_gates"] == [] and result["details"]["answers"] == 24
    saved = json.loads((out / "eval.json").read_text())
    assert saved["metrics"] == m and saved["recipe"]["fail_over"] == {"kl": 0.001}
    # reward_length_corr is the rank correlation of the scores with the lengths of the answers eval.json lists.
    from rlhf_cli.core.checks import rank_correlation

    scored = saved["samples"]
    assert len({s["completion_tokens"] for s in scored}) > 1  # lengths vary, so the correlation is defined
    assert m["reward_length_corr"] == pytest.approx(
        rank_correlation([s["score"] for s in scored], [s["completion_tokens"] for s in scored]))
    assert -1 <= m["reward_length_corr"] <= 1
    assert "win_rate" in stderr  # the table is for people, on stderr


@pytest.mark.stage
@pytest.mark.stage
def test_one_answer_to_most_prompts_is_warned_and_counted(sft_full_run, tmp_path):
    """Greedy answers to one prompt asked four times, and to another: a policy that answers half its prompts
    with one text looks like this to eval."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["where is the cat?"] * 4 + ["where is the dog?"]))
    result, stderr = _eval(["--model", str(sft_full_run), "--prompts", str(prompts), "--metric", "length",
                            "--set", "generation.max_new_tokens=12"])
    assert result["metrics"]["distinct_rate"] == pytest.approx(2 / 5)
    assert "4 of 5 prompts get the same answer" in stderr


def test_failing_gate_exits_4_naming_metric_value_and_threshold(reward_run, tiny):
    result, stderr = _eval([
        "--reward", str(reward_run), "--preference", str(tiny["preference_eval"]), "--metric", "rm_accuracy",
        "--fail-under", "rm_accuracy=1.01", "--fail-over", "rm_margin=1000",
    ], code=4)
    acc = result["metrics"]["rm_accuracy"]
    assert f"error: rm_accuracy = {acc:.4g} is under the gate 1.01 (--fail-under rm_accuracy=1.01)" in stderr
    assert result["details"]["failed_gates"] == [f"rm_accuracy = {acc:.4g} is under the gate 1.01 (--fail-under rm_accuracy=1.01)"]


@pytest.mark.stage
def test_same_seed_same_metrics_and_kl_to_another_model(sft_full_run, tiny, few_prompts, great_fn):
    args = ["--model", str(sft_full_run), "--prompts", str(few_prompts), "--metric", "length", "--metric", "reward_fn",
            "--reward-fn", great_fn, "--set", "generation.temperature=1.0", "--set", "generation.max_new_tokens=12"]
    first, _ = _eval([*args, "--seed", "3"])
    again, _ = _eval([*args, "--seed", "3"])
    assert first["metrics"] == again["metrics"]
    # Against the untrained base the trained model's samples are far likelier: a large positive KL.
    kl, _ = _eval(["--model", str(sft_full_run), "--reference", str(tiny["model"]), "--prompts", str(few_prompts),
                   "--metric", "kl", "--set", "generation.max_new_tokens=12", "--fail-under", "kl=5"])
    assert kl["metrics"]["kl"] > 5


@pytest.mark.stage
def test_eval_scores_the_model_that_was_trained_with_its_adapter_live(small_update_run, reward_run, few_prompts):
    """A bf16 base and an update mostly below its rounding (a short PPO run's): eval's reward is the reward
    model's score of the answers `rlhf generate` gives with the adapter live, not of a merged model's."""
    same = ["--set", "model.dtype=bf16", "--set", "batch_size=12"]
    result, _ = _eval(["--model", str(small_update_run), "--reward", str(reward_run), "--prompts", str(few_prompts),
                       "--metric", "reward", "--set", "generation.temperature=0", "--set", "generation.max_new_tokens=12",
                       "--set", "data.max_length=64", *same])
    generated = runner.invoke(app, ["generate", str(small_update_run), "--prompts", str(few_prompts), "--greedy",
                                    "--max-new-tokens", "12", *same])
    assert generated.exit_code == 0, generated.stderr
    answers = [json.loads(line) for line in generated.stdout.splitlines()]

    from rlhf_cli.core.reward import load_reward_model

    scorer = load_reward_model(str(reward_run), max_length=64, batch_size=12)
    scores = scorer([a["prompt"] for a in answers], [a["response"] for a in answers])
    assert result["metrics"]["reward"] == pytest.approx(sum(scores) / len(scores), abs=1e-6)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--metric", "perplexity", "--model", "m", "--text", "t.jsonl", "--fail-over", "kl=8"],
         "fail_over: kl is not computed by the metrics asked for; available: perplexity"),
        (["--metric", "reward", "--prompts", "p.jsonl", "--model", "m", "--reward", "r", "--fail-under", "reward"],
         "--fail-under 'reward': expected metric=number"),
        (["--metric", "kl", "--model", "m", "--prompts", "p.jsonl"], "win_rate and kl compare against a reference"),
        (["--metric", "bleu", "--model", "m"], "metrics.0"),
    ],
)
def test_usage_errors_exit_2_before_loading_anything(args, message):
    result = runner.invoke(app, ["eval", *args])
    assert result.exit_code == 2 and message in result.stderr, result.stderr


def test_a_reward_function_that_cannot_be_imported_exits_2_before_any_model_loads(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    result = runner.invoke(app, ["eval", "--model", str(tmp_path / "no-such-model"), "--prompts", str(prompts),
                                 "--metric", "reward_fn", "--reward-fn", "no_such_module_xyz:score"])
    assert result.exit_code == 2, result.stderr
    assert "reward function no_such_module_xyz:score: cannot import no_such_module_xyz" in result.stderr


def _forbid_loading(monkeypatch) -> None:
    """Loading a model (or importing a reward function) fails the test: what is refused is refused first."""
    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    for module, name in (("rlhf_cli.core.inference", "load_causal_lm"), ("rlhf_cli.core.reward", "load_scorer"),
                         ("rlhf_cli.core.reward", "load_reward_model"), ("rlhf_cli.core.reward", "load_function")):
        monkeypatch.setattr(f"{module}.{name}", loaded)


@pytest.fixture
def no_model_loads(monkeypatch, tmp_path):
    _forbid_loading(monkeypatch)
    (tmp_path / "text.jsonl").write_text('{"text": "the cat is in the barn."}\n')


def _perplexity_into(tmp_path: Path, out: Path, *extra: str) -> object:
    return runner.invoke(app, ["eval", "--model", str(tmp_path / "run"), "--metric", "perplexity",
                               "--text", str(tmp_path / "text.jsonl"),
                               "--output-dir", str(out), *extra])


def _refused(result, *words: str) -> None:
    assert result.exit_code == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and all(w in result.stderr for w in words), result.stderr


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
@pytest.mark.parametrize("inside", ["", "evals"])
def test_a_run_directory_or_a_folder_inside_one_is_never_an_eval_output_dir(tmp_path, no_model_loads, overwrite, inside):
    """`rlhf eval --model runs/sft --output-dir runs/sft` wrote eval.json into the completed run, and again over it."""
    (tmp_path / "run").mkdir()
    run = write_run(tmp_path / "run", "sft", "base", {"kind": "full", "path": "model"})
    out = run / inside if inside else run
    before = tree(tmp_path)
    result = _perplexity_into(tmp_path, out, *overwrite)
    _refused(result, str(out), "run.json", "choose another --output-dir")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_folder_of_other_files_is_not_an_eval_output_dir(tmp_path, no_model_loads, overwrite):
    out = tmp_path / "d"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (tmp_path / "run").mkdir()
    before = tree(tmp_path)
    _refused(_perplexity_into(tmp_path, out, *overwrite), f"{out} is not empty and holds no eval (eval.json)")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("below", ["", "sub"])
def test_a_file_as_output_dir_is_refused_before_any_model_loads(tmp_path, no_model_loads, below):
    """It was found only when eval.json was written, after every metric had been computed."""
    (tmp_path / "run").mkdir()
    (tmp_path / "ppo.yaml").write_text("stage: ppo\n")
    before = tree(tmp_path)
    result = _perplexity_into(tmp_path, tmp_path / "ppo.yaml" / below if below else tmp_path / "ppo.yaml")
    _refused(result, f"{tmp_path / 'ppo.yaml'} is a file, not a directory", "choose another --output-dir")
    assert tree(tmp_path) == before


def test_an_output_dir_another_eval_holds_is_refused_and_left_as_it_was(tmp_path, no_model_loads):
    """Two evals into one new --output-dir both passed its check, and the one that ended last overwrote the
    other's eval.json without --overwrite. The directory is now held while an eval runs."""
    import subprocess
    import sys

    out = tmp_path / "eval"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from rlhf_cli.runs import hold; "
         f"hold(Path({str(out)!r})); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        (tmp_path / "run").mkdir()
        before = tree(tmp_path)
        _refused(_perplexity_into(tmp_path, out), f"{out} is in use by another process (pid {holder.pid}")
        assert tree(tmp_path) == before
    finally:
        holder.communicate("")


def test_a_failing_eval_removes_the_output_dir_it_made(tmp_path, no_model_loads):
    (tmp_path / "run").mkdir()
    result = _perplexity_into(tmp_path, tmp_path / "new" / "eval")
    assert isinstance(result.exception, AssertionError)  # no_model_loads: the load fails
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "text.jsonl"]


def test_an_earlier_eval_is_replaced_only_with_overwrite(reward_run, tiny, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "eval.json").write_text('{"stage": "eval", "metrics": {"rm_accuracy": 0.5}}\n')
    before = tree(tmp_path)
    args = ["--reward", str(reward_run), "--preference", str(tiny["preference_eval"]), "--metric", "rm_accuracy",
            "--output-dir", str(out)]
    with monkeypatch.context() as m:
        _forbid_loading(m)
        result = runner.invoke(app, ["eval", *args])
    _refused(result, f"{out} holds an earlier eval (eval.json)", "--overwrite")
    assert tree(tmp_path) == before
    replaced, _ = _eval([*args, "--overwrite"])
    saved = json.loads((out / "eval.json").read_text())
    assert saved["metrics"] == replaced["metrics"] and saved["metrics"]["rm_accuracy"] != 0.5
    assert sorted(p.name for p in out.iterdir()) == ["eval.json"]


@pytest.mark.parametrize("breaks", ["data", "disk"])
def test_a_failing_eval_leaves_the_earlier_eval_json_as_it_was(reward_run, tiny, tmp_path, monkeypatch, breaks):
    """eval.json is written last and atomically (temp file + rename): an eval that fails while it computes,
    or while it writes, leaves the earlier eval's file whole and no temp file beside it."""
    import errno
    import os

    out = tmp_path / "eval"
    out.mkdir()
    (out / "eval.json").write_text('{"stage": "eval", "metrics": {"rm_accuracy": 0.5}}\n')
    pairs = Path(tiny["preference_eval"])
    if breaks == "data":
        pairs = tmp_path / "pairs.jsonl"
        pairs.write_text(Path(tiny["preference_eval"]).read_text() + "{not json\n")
    else:
        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr("rlhf_cli.runs.os.fsync", full)
    before = tree(tmp_path)
    result = runner.invoke(app, ["eval", "--reward", str(reward_run), "--preference", str(pairs), "--metric", "rm_accuracy",
                                 "--output-dir", str(out), "--overwrite"])
    assert result.exit_code == (3 if breaks == "data" else 1), result.stderr
    assert ("pairs.jsonl" if breaks == "data" else "no space left") in result.stderr
    assert tree(tmp_path) == before


def test_rm_accuracy_skips_pairs_the_scorer_cannot_tell_apart_as_train_rm_does(tiny_chatml):
    # A pair of two equal answers (or equal within the reward model's max_length) scores a gap of exactly
    # 0, which counted as a wrong ranking: eval and train-rm's own evaluation disagreed on the same pairs.
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_cli.core.comparisons import comparison_samples
    from rlhf_cli.core.ranking import pair_margins
    from rlhf_cli.core.reward import RewardModel, score_rows
    from rlhf_cli.stages.eval import _pair_gaps

    tok = AutoTokenizer.from_pretrained(tiny_chatml["tokenizer"])
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_chatml["model"], num_labels=1).eval()
    scorer = RewardModel(model, tok, max_length=40)
    records = [json.loads(line) for line in Path(tiny_chatml["preference_eval"]).read_text().splitlines()[:8]]
    records.append({"prompt": "where is the cat?", "chosen": "the cat is in the barn.", "rejected": "the cat is in the barn."})
    long = "the cat is in the barn. " * 6
    records.append({"prompt": "where is the cat?", "chosen": long + "it is great.", "rejected": long + "it is bad."})

    gaps, prompts, skipped = _pair_gaps(scorer, records, "pairs.jsonl")
    assert (len(gaps), prompts, skipped) == (8, 8, 2) and 0.0 not in gaps
    samples, stats, _ = comparison_samples(tok, records, "preference", 40)
    rows, groups = [], []
    for s in samples:
        groups.append([(len(rows) + b, len(rows) + w) for b, w in s["pairs"]])
        rows.extend(s["response_ids"])
    margins = pair_margins(torch.tensor(score_rows(model, rows, tok.pad_token_id, 16)), groups)
    assert stats.no_signal == 2
    assert sum(g > 0 for g in gaps) / len(gaps) == pytest.approx(float((margins > 0).float().mean()))
    assert sorted(gaps) == pytest.approx(sorted(margins.tolist()), abs=1e-5)


def _strict_json(text: str) -> object:
    """json.loads as strict parsers (jq, JavaScript, Go) read: NaN and Infinity are not JSON."""
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.stage
def test_eval_json_stays_strict_json_when_a_sample_scores_nan(tiny, few_prompts, tmp_path, monkeypatch):
    (tmp_path / "unsure_eval.py").write_text(
        "def judge(prompts, responses):\n    return [float('nan') if i == 0 else 1.0 for i in range(len(responses))]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out, _ = _eval(["--model", str(tiny["model"]), "--reward-fn", "unsure_eval:judge", "--prompts", str(few_prompts),
                    "--metric", "reward_fn", "--set", "data.max_samples=3", "--set", "generation.max_new_tokens=4",
                    "--output-dir", str(tmp_path / "ev"), "--json"])
    assert out["metrics"]["reward_fn"] is None
    record = _strict_json((tmp_path / "ev" / "eval.json").read_text())
    assert [s["reward_fn"] for s in record["samples"]] == [None, 1.0, 1.0]


def test_a_reward_function_judges_conversational_pairs_by_their_answers_text(great_fn, tmp_path):
    """A function takes strings: pairs given as message lists reach it as the answers' contents."""
    rows = [{"chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": "it is great."}],
             "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": "it is fine."}]}
            for q in ("where is the cat?", "where is the dog?", "where is the owl?")]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, _ = _eval(["--reward", great_fn, "--preference", str(path), "--metric", "rm_accuracy", "--json"])
    assert out["metrics"] == {"rm_accuracy": 1.0, "rm_margin": 1.0}
    assert out["details"]["preference_pairs"] == 3


def test_rm_accuracy_says_how_many_rows_were_not_ranked_yet(great_fn, tmp_path):
    """The figure is over the ranked rows: a file half filled in was scored on half, without a word."""
    rows = [{"prompt": q, "responses": ["it is great.", "it is fine.", "no."], "ranking": [0, 1, 2]}
            for q in ("where is the cat?", "where is the dog?")]
    rows += [{"prompt": "where is the owl?", "responses": ["it is great.", "it is fine."]}] * 3
    path = tmp_path / "ranked.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, stderr = _eval(["--reward", great_fn, "--preference", str(path), "--metric", "rm_accuracy", "--json"])
    assert out["details"]["preference_pairs"] == 6
    assert f"{path}: 3 of 5 rows have no ranking or scores yet and are skipped" in stderr


def test_a_preference_file_whose_later_row_is_of_another_format_names_that_row(great_fn, tmp_path):
    """The first row decides the format; a later row without its columns is a data error, not a traceback."""
    rows = [{"prompt": "where is the cat?", "responses": ["it is great.", "it is fine."], "ranking": [0, 1]},
            {"prompt": "where is the dog?", "chosen": "it is great.", "rejected": "it is fine."}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = runner.invoke(app, ["eval", "--reward", great_fn, "--preference", str(path), "--metric", "rm_accuracy"])
    assert result.exit_code == 3, result.stderr
    assert f"{path}:2 lacks responses" in result.stderr
