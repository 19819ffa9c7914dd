"""Best-of-n (`rlhf generate --best-of`) and `rlhf compare`: several answers per prompt and their scores."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlhf_cli.cli import app
from rlhf_cli.core.candidates import best_index

runner = CliRunner()
GREAT = "tests.ppo_support:says_great"  # 1 when the answer contains "great" (tests/ppo_support.py)
PROMPTS = ["where is the cat?", "where is the dog?", "where is the owl?", "where is the fox?"]


def _run(*args: str) -> list[dict]:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def _prompt_args() -> list[str]:
    return [a for p in PROMPTS for a in ("--prompt", p)]


def test_best_index_prefers_the_first_of_equal_scores():
    assert best_index([0.1, 0.7, 0.7, -2.0]) == 1
    assert best_index([-1.0]) == 0


def test_best_index_never_keeps_an_answer_scored_nan():
    nan = float("nan")
    assert best_index([nan, 1.0, 0.5]) == 1
    assert best_index([0.5, nan, 1.0]) == 2
    assert best_index([nan, nan]) == 0


@pytest.mark.stage
def test_best_of_raises_the_reward_over_single_samples(sft_full_run, reward_run):
    """The best of 6 answers scores at least as high as every candidate, and above the average sample."""
    common = ["generate", str(sft_full_run), *_prompt_args(), "-n", "6", "--temperature", "1.3",
              "--max-new-tokens", "12", "--seed", "3", "--best-of", "--reward", str(reward_run)]
    every = _run(*common, "--all")
    best = _run(*common)
    assert len(every) == 6 * len(PROMPTS) and len(best) == len(PROMPTS)
    for i, record in enumerate(best):
        group = [r for r in every if r["index"] == i]
        assert record["score"] == pytest.approx(max(r["score"] for r in group))
        assert [r for r in group if r["best"]][0]["response"] == record["response"]
        assert record["candidates"] == 6 and record["prompt"] == PROMPTS[i]
    mean_single = sum(r["score"] for r in every) / len(every)
    mean_best = sum(r["score"] for r in best) / len(best)
    spread = max(r["score"] for r in every) - min(r["score"] for r in every)
    assert spread > 0 and mean_best > mean_single, (mean_best, mean_single)


@pytest.mark.stage
def test_best_of_with_a_rule_based_reward(sft_full_run):
    records = _run("generate", str(sft_full_run), *_prompt_args(), "-n", "4", "--temperature", "1.5",
                   "--max-new-tokens", "12", "--best-of", "--reward", GREAT, "--all")
    for i in range(len(PROMPTS)):
        group = [r for r in records if r["index"] == i]
        assert sum(r["best"] for r in group) == 1
        assert all(r["score"] == float("great" in r["response"]) for r in group)
        assert [r for r in group if r["best"]][0]["score"] == max(r["score"] for r in group)


def test_best_of_needs_a_reward_and_several_samples():
    for args, words in ((["--best-of", "-n", "4"], "best_of needs"), (["--best-of", "--reward", GREAT], "num_samples"),
                        (["--reward", GREAT], "used by best_of only")):
        result = runner.invoke(app, ["generate", "no-such-model", "--prompt", "x", *args])
        assert result.exit_code == 2 and words in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.stage
def test_compare_writes_scored_rankings(sft_full_run, tmp_path):
    rows = _run("compare", str(sft_full_run), "--prompts", _prompts_file(tmp_path), "-n", "3",
                "--reward", GREAT, "--max-new-tokens", "12", "--seed", "5")
    assert [r["prompt"] for r in rows] == PROMPTS
    for row in rows:
        assert len(row["responses"]) == 3 and row["scores"] == [float("great" in r) for r in row["responses"]]


@pytest.mark.stage
def test_compare_for_labelling_shuffles_and_leaves_the_ranking_empty(sft_full_run, tmp_path):
    args = ["compare", str(sft_full_run), "--prompts", _prompts_file(tmp_path), "-n", "4",
            "--max-new-tokens", "12", "--seed", "5"]
    labelled = _run(*args, "--for-labelling")
    scored = _run(*args, "--reward", GREAT)
    assert all(r["ranking"] == [] and "scores" not in r for r in labelled)
    # The same answers (same seed), in another order for at least one prompt.
    assert all(sorted(a["responses"]) == sorted(b["responses"]) for a, b in zip(labelled, scored))
    assert any(a["responses"] != b["responses"] for a, b in zip(labelled, scored))


def test_compare_needs_exactly_one_judge(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "x"}\n')
    for extra in ([], ["--reward", GREAT, "--for-labelling"]):
        result = runner.invoke(app, ["compare", "m", "--prompts", str(prompts), *extra])
        assert result.exit_code == 2 and "exactly one judge" in result.stderr, result.stderr


def test_compare_refuses_greedy_answers(tmp_path):
    """At temperature 0 the K answers of a prompt are one answer K times: a file with no pair in it."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "x"}\n')
    for judge in (["--for-labelling"], ["--reward", GREAT]):
        result = runner.invoke(app, ["compare", "m", "--prompts", str(prompts), "--temperature", "0", *judge])
        assert result.exit_code == 2 and "generation.temperature is 0" in result.stderr, result.stderr


@pytest.mark.parametrize(("kind", "status", "code", "words"), [
    ("full", "completed", 2, "is a causal-lm run, not a reward model: pass a train-rm run directory"),
    ("reward-full", "failed", 3, "run is failed, not completed"),
])
def test_compare_checks_a_reward_model_before_sampling_any_answer(tmp_path, monkeypatch, kind, status, code, words):
    """`compare runs/sft --reward runs/sft` sampled every answer before it found runs/sft is no reward model."""
    from fixtures_runs import write_run

    def loaded(*args, **kwargs):
        raise AssertionError("the policy was loaded before the reward model was checked")

    monkeypatch.setattr("rlhf_cli.core.inference.load_causal_lm", loaded)
    judge = tmp_path / "judge"
    (judge / "model").mkdir(parents=True)
    (judge / "model" / "config.json").write_text("{}")
    write_run(judge, "sft" if kind == "full" else "train-rm", "base", {"kind": kind, "path": "model"})
    manifest = json.loads((judge / "run.json").read_text())
    (judge / "run.json").write_text(json.dumps({**manifest, "status": status}))
    result = runner.invoke(app, ["compare", str(judge), "--prompts", _prompts_file(tmp_path), "--reward", str(judge)])
    assert result.exit_code == code and f"{judge}" in result.stderr and words in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _prompts_file(folder: Path) -> str:
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return str(path)


@pytest.mark.stage
def test_eval_reports_best_of_n_beside_a_single_sample(sft_full_run, reward_run, tmp_path):
    prompts = _prompts_file(tmp_path)
    result = runner.invoke(app, ["eval", "--model", str(sft_full_run), "--reward", str(reward_run), "--prompts", prompts,
                                 "--metric", "reward", "--metric", "best_of_n", "--set", "best_of_n=6",
                                 "--set", "generation.max_new_tokens=12", "--fail-under", "best_of_n_reward=-100"])
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    m, d = out["metrics"], out["details"]
    assert d["best_of_n"] == 6 and d["best_of_n_temperature"] == 1.0  # eval's greedy default: sampled at 1
    assert m["best_of_n_reward"] > m["sample_reward"], m
    assert "eval best-of-6 answers" in result.stderr


@pytest.mark.stage
def test_eval_best_of_n_alone_loads_its_reward_model(tiny, tmp_path):
    # Any sequence-classification model scores; the tiny base gets a fresh one-output head.
    result = runner.invoke(app, ["eval", "--model", str(tiny["model"]), "--reward", str(tiny["model"]),
                                 "--prompts", _prompts_file(tmp_path), "--metric", "best_of_n", "--set", "best_of_n=2",
                                 "--set", "generation.max_new_tokens=4", "--json"])
    assert result.exit_code == 0, result.stderr
    m = json.loads(result.stdout)["metrics"]
    assert set(m) == {"best_of_n_reward", "sample_reward"} and m["best_of_n_reward"] >= m["sample_reward"], m


@pytest.mark.stage
def test_a_best_of_line_stays_strict_json_when_every_answer_scores_nan(tiny, tmp_path, monkeypatch):
    (tmp_path / "unsure_best_of.py").write_text("def judge(prompts, responses):\n    return [float('nan')] * len(responses)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = runner.invoke(app, ["generate", str(tiny["model"]), "--prompt", "where is the cat?", "-n", "2", "--best-of",
                                 "--reward", "unsure_best_of:judge", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.stderr

    [line] = _strict_rows(result.stdout)
    assert line["score"] is None and line["sample"] == 0


@pytest.mark.stage
def test_compare_writes_a_score_its_judge_could_not_give_as_null_which_pairs_with_nothing(tiny, tmp_path, monkeypatch):
    from rlhf_cli.core.comparisons import comparison_of

    rows = _compare_with_judge(tiny, tmp_path, monkeypatch, "[float('nan') if i % 3 == 1 else float(i) for i in range(n)]", 3)
    assert rows[0]["scores"] == [0.0, None, 2.0]
    assert comparison_of(rows[0], "ranked").pairs == [(2, 0)]


@pytest.mark.stage
def test_compare_keeps_every_pair_of_an_answer_its_judge_scored_infinite(tiny, tmp_path, monkeypatch):
    """-inf ("never") was written as null, as NaN is: the worst answer then lost every pair it is the worse of."""
    from rlhf_cli.core.comparisons import comparison_of
    from rlhf_cli.core.ranking import pairs_from_scores

    row = _compare_with_judge(tiny, tmp_path, monkeypatch, "[[1.0, -math.inf, 0.5, math.inf][i % 4] for i in range(n)]", 4)[0]
    assert comparison_of(row, "ranked").pairs == pairs_from_scores([1.0, -float("inf"), 0.5, float("inf")])
    assert len(comparison_of(row, "ranked").pairs) == 6


def _strict_rows(stdout: str) -> list[dict]:
    """JSONL as strict parsers (jq, JavaScript, Go) read it: NaN and Infinity are not JSON."""
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in stdout.splitlines()]


def _compare_with_judge(tiny, tmp_path, monkeypatch, scores: str, n: int) -> list[dict]:
    """`rlhf compare -n N` with a judge whose scores are the expression `scores` of n (the answers' count)."""
    module = "judge_" + re.sub(r"\W", "_", tmp_path.name)  # one module name per test: imports are cached
    (tmp_path / f"{module}.py").write_text(
        f"import math\ndef judge(prompts, responses):\n    n = len(responses)\n    return {scores}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = runner.invoke(app, ["compare", str(tiny["model"]), "--prompts", _prompts_file(tmp_path), "-n", str(n),
                                 "--reward", f"{module}:judge", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.stderr
    return _strict_rows(result.stdout)


def test_group_batches_yields_each_batch_s_groups_and_a_resumed_run_s_are_a_full_run_s(monkeypatch):
    """Groups come out as the generate call that completes them returns; started at prompt s, the groups are
    those of a run from prompt 0, also where a batch holds answers of two prompts (batch size not a multiple of n)."""
    from types import SimpleNamespace

    import rlhf_cli.core.candidates as candidates

    calls = []

    def batches(model, tokenizer, prompts, spec, *, batch_size, seed, first_batch=0):
        for b, start in enumerate(range(0, len(prompts), batch_size)):
            if b >= first_batch:
                calls.append(b)
                yield SimpleNamespace(samples=[(i, b) for i in range(start, min(start + batch_size, len(prompts)))])

    monkeypatch.setattr(candidates, "sample_batches", batches)
    texts = [f"p{i}" for i in range(5)]
    for n, batch_size in ((3, 4), (2, 2), (2, 5), (4, 3)):
        def run(start, n=n, batch_size=batch_size):
            calls.clear()
            return list(candidates.group_batches(None, None, texts, n=n, spec=None, batch_size=batch_size, seed=0,
                                                 start=start))
        full = run(0)
        assert [[a for a, _ in g] for _, gs in full for g in gs] == [list(range(i * n, i * n + n)) for i in range(5)]
        assert len(full) == len({-(-(i * n + n) // batch_size) for i in range(5)})  # one yield per completing batch
        for start in range(1, 6):
            resumed = run(start)
            assert [g for _, gs in resumed for g in gs] == [g for _, gs in full for g in gs][start:]
            assert [first for first, _ in resumed][:1] == ([start] if start < 5 else [])
            assert calls[:1] == ([start * n // batch_size] if start < 5 else [])  # finished batches are not sampled


def _prompts_arg(tmp_path) -> list[str]:
    return ["--prompts", _prompts_file(tmp_path), "-n", "3", "--max-new-tokens", "4", "--set", "batch_size=4"]


def _strict_lines(path: Path) -> list[dict]:
    return _strict_rows(path.read_text())


@pytest.mark.stage
def test_compare_writes_each_batch_s_lines_before_the_next_batch_is_judged(tiny, tmp_path, monkeypatch):
    """A judge that fails at the third prompt: the lines of the first two were on stdout already (every
    answer was sampled and judged before the first line came out)."""
    (tmp_path / "judge_fails_at_owl.py").write_text(
        "def judge(prompts, responses):\n    assert 'where is the owl?' not in prompts, 'judge down'\n"
        "    return [float(len(r)) for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = runner.invoke(app, ["compare", str(tiny["model"]), *_prompts_arg(tmp_path), "--reward", "judge_fails_at_owl:judge"])
    assert result.exit_code == 1 and "judge down" in str(result.exception)
    rows = _strict_rows(result.stdout)
    assert [r["prompt"] for r in rows] == PROMPTS[:2]
    assert all(r["scores"] == [float(len(a)) for a in r["responses"]] and len(r["responses"]) == 3 for r in rows)


@pytest.mark.stage
def test_compare_output_keeps_the_finished_lines_and_a_rerun_completes_them(tiny, tmp_path, monkeypatch):
    """Interrupted by a failing judge, then a torn last line: the rerun appends the missing prompts' lines,
    and the file is byte for byte an uninterrupted run's."""
    (tmp_path / "judge_moody.py").write_text(
        "import os\ndef judge(prompts, responses):\n"
        "    assert os.environ.get('JUDGE_REFUSES') not in prompts, 'judge down'\n"
        "    return [float(len(r) % 5) for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["compare", str(tiny["model"]), *_prompts_arg(tmp_path), "--reward", "judge_moody:judge"]
    whole = tmp_path / "whole.jsonl"
    assert runner.invoke(app, [*args, "--output", str(whole)]).exit_code == 0
    out = tmp_path / "round2.jsonl"
    monkeypatch.setenv("JUDGE_REFUSES", PROMPTS[2])
    result = runner.invoke(app, [*args, "--output", str(out)])
    assert result.exit_code == 1 and result.stdout == ""
    assert [r["prompt"] for r in _strict_lines(out)] == PROMPTS[:2]
    assert out.read_text() == "".join(whole.read_text().splitlines(keepends=True)[:2])
    with out.open("a") as f:
        f.write('{"prompt": "where is the ow')  # killed while writing a line
    monkeypatch.delenv("JUDGE_REFUSES")
    result = runner.invoke(app, [*args, "--output", str(out)])
    assert result.exit_code == 0 and result.stdout == "", result.stderr
    assert out.read_text() == whole.read_text()
    assert [r["prompt"] for r in _strict_lines(out)] == PROMPTS
    assert runner.invoke(app, [*args, "--output", str(out)]).exit_code == 0  # complete: nothing to add
    assert out.read_text() == whole.read_text()


@pytest.mark.stage
def test_an_interrupted_labelling_run_continues_with_the_shuffles_of_an_uninterrupted_one(tiny, tmp_path, monkeypatch):
    import rlhf_cli.core.generation as generation

    args = ["compare", str(tiny["model"]), *_prompts_arg(tmp_path), "--for-labelling"]
    whole = tmp_path / "whole.jsonl"
    assert runner.invoke(app, [*args, "--output", str(whole)]).exit_code == 0
    real, calls = generation.generate_batch, []

    def ctrl_c_at_the_third_batch(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(generation, "generate_batch", ctrl_c_at_the_third_batch)
    out = tmp_path / "to_rank.jsonl"
    result = runner.invoke(app, [*args, "--output", str(out)])
    assert result.exit_code == 130 and f"{out} holds the lines of 2 of 4 prompts" in result.stderr, result.stderr
    assert len(_strict_lines(out)) == 2
    assert runner.invoke(app, [*args, "--output", str(out)]).exit_code == 0
    assert out.read_text() == whole.read_text()


@pytest.mark.stage
def test_a_reward_model_run_resumes_its_sampled_answers_then_its_scores(tiny, tmp_path, monkeypatch):
    """Phase 1 (sampling) keeps its answers in FILE.answers.jsonl; phase 2 (scoring) appends to FILE. Stopped in
    either, the rerun samples and scores only what is missing; the answers file goes once FILE is complete."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import rlhf_cli.core.generation as generation
    import rlhf_cli.core.reward as reward

    # A score head saved with the model: the tiny base alone would get a freshly drawn one at each load.
    judge = tmp_path / "judge"
    AutoModelForSequenceClassification.from_pretrained(tiny["model"], num_labels=1).save_pretrained(judge)
    AutoTokenizer.from_pretrained(tiny["model"]).save_pretrained(judge)
    args = ["compare", str(tiny["model"]), *_prompts_arg(tmp_path), "--reward", str(judge)]
    whole = tmp_path / "whole.jsonl"
    assert runner.invoke(app, [*args, "--output", str(whole)]).exit_code == 0
    out = tmp_path / "round2.jsonl"
    answers = tmp_path / "round2.jsonl.answers.jsonl"

    def stop_at(module, name, call):
        real, calls = getattr(module, name), []

        def stopping(*a, **kw):
            calls.append(1)
            if len(calls) == call:
                raise KeyboardInterrupt
            return real(*a, **kw)

        monkeypatch.setattr(module, name, stopping)
        return calls

    stop_at(generation, "generate_batch", 3)  # sampling: the first two prompts' answers are done
    assert runner.invoke(app, [*args, "--output", str(out)]).exit_code == 130
    assert not out.exists() and [r["prompt"] for r in _strict_lines(answers)] == PROMPTS[:2]
    monkeypatch.undo()
    sampled = stop_at(generation, "generate_batch", 0)
    stop_at(reward, "score_rows", 3)  # scoring: one prompt a slice (batch_size 4 // 3 answers)
    assert runner.invoke(app, [*args, "--output", str(out)]).exit_code == 130
    assert len(sampled) == 2  # the batches from the third prompt's first answer on
    assert [r["prompt"] for r in _strict_lines(answers)] == PROMPTS
    assert out.read_text() == "".join(whole.read_text().splitlines(keepends=True)[:2])
    monkeypatch.undo()
    loaded = stop_at(generation, "generate_batch", 0)
    assert runner.invoke(app, [*args, "--output", str(out)]).exit_code == 0
    assert loaded == [] and not answers.exists()
    assert out.read_text() == whole.read_text()


def test_compare_refuses_an_output_written_for_other_prompts_or_settings(tmp_path, monkeypatch):
    def loaded(*args, **kwargs):
        raise AssertionError("the policy was loaded before the output file was checked")

    monkeypatch.setattr("rlhf_cli.core.inference.load_causal_lm", loaded)
    prompts = _prompts_file(tmp_path)
    out = tmp_path / "round2.jsonl"
    for lines, words in (
        ([{"prompt": PROMPTS[1], "responses": ["a", "b", "c"], "scores": [1, 2, 3]}], "line 1 answers another prompt"),
        ([{"prompt": PROMPTS[0], "responses": ["a", "b"], "scores": [1, 2]}], "line 1 holds 2 answers with scores"),
        ([{"prompt": PROMPTS[0], "responses": ["a", "b", "c"], "ranking": []}], "line 1 holds 3 answers with ranking"),
        ([{"prompt": p, "responses": ["a", "b", "c"], "scores": [1, 2, 3]} for p in PROMPTS * 2], "holds 8 lines"),
    ):
        text = "".join(json.dumps(line) + "\n" for line in lines)
        out.write_text(text)
        result = runner.invoke(app, ["compare", "m", "--prompts", prompts, "-n", "3", "--reward", GREAT, "--output", str(out)])
        assert result.exit_code == 2 and words in result.stderr and str(out) in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert out.read_text() == text and sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl", "round2.jsonl"]


def test_a_jsonl_file_drops_its_torn_last_line_and_has_one_writer(tmp_path):
    from rlhf_cli.core.jsonl import JsonlFile
    from rlhf_cli.errors import RecipeError

    path = tmp_path / "out.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": ')
    out = JsonlFile(path)
    assert out.records == [{"a": 1}, {"a": 2}] and path.read_text().endswith('{"a": ')  # cut only when appending
    with pytest.raises(RecipeError, match="being written by another process"):
        JsonlFile(path)
    out.append({"a": 3})
    out.close()
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n{"a": 3}\n'


def test_a_compare_that_fails_before_its_first_line_leaves_no_output_file(tiny, tmp_path):
    # A folder that holds no model: found, and refused only when the policy loads, after the file opened.
    (tmp_path / "not-a-model").mkdir()
    out = tmp_path / "round2.jsonl"
    result = runner.invoke(app, ["compare", str(tmp_path / "not-a-model"), *_prompts_arg(tmp_path),
                                 "--reward", "rlhf_cli.demo.rewards:tiny_judge", "--output", str(out)])
    assert result.exit_code != 0 and not out.exists()
