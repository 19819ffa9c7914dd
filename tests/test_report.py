"""rlhf report: numbers, plots, side-by-side answers, escaping, exit codes.

Training runs are written by hand (their curves need many steps); the eval directory is real
`rlhf eval` output on the tiny runs of tests/fixtures_runs.py, so the report reads what eval writes.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlhf_cli.cli import app
from rlhf_cli.errors import DataError, RecipeError
from rlhf_cli.report import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SCRIPT = "<script>alert('x')</script> it is great."


def _write_run(path: Path, stage: str, records: list[dict], metrics: dict, status: str = "completed") -> Path:
    path.mkdir(parents=True)
    manifest = {
        "schema_version": 1, "stage": stage, "status": status,
        "started_at": "2025-01-01T10:00:00+00:00", "finished_at": "2025-01-01T10:03:25+00:00",
        "base_model": {"path": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "parent_run": None,
        "model": {"kind": "adapter", "adapters": ["adapter"], "tokenizer": "tokenizer"},
        "metrics": metrics, "recipe": {"stage": stage, "output_dir": str(path)},
    }
    (path / "run.json").write_text(json.dumps(manifest))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def real_eval(lora_run, sft_full_run, reward_run, tiny, tmp_path_factory) -> Path:
    """`rlhf eval --output-dir` of a LoRA run against its SFT parent: every metric the report shows."""
    out = tmp_path_factory.mktemp("eval") / "eval"
    prompts = tmp_path_factory.mktemp("eval") / "prompts.jsonl"
    prompts.write_text("".join(tiny["prompts_eval"].read_text().splitlines(keepends=True)[:6]))
    metrics = ["reward", "win_rate", "rm_accuracy", "reward_fn", "length"]
    result = CliRunner().invoke(app, [
        "eval", "--model", str(lora_run), "--reference", str(sft_full_run), "--reward", str(reward_run),
        "--reward-fn", "tests.ppo_support:says_great", "--prompts", str(prompts),
        "--preference", str(tiny["preference_eval"]), *[a for m in metrics for a in ("--metric", m)],
        "--set", "generation.max_new_tokens=12", "--output-dir", str(out)])
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture()
def pipeline(tmp_path, real_eval) -> dict[str, Path]:
    """A finished pipeline: hand-written training runs, a real eval directory and samples files."""
    sft = []
    for step in range(1, 21):
        sft.append({"step": step, "epoch": step / 20, "loss": 2.5 * math.exp(-step / 10) + 0.8,
                    "lr": 2e-4 * (1 - step / 20), "grad_norm": 3.0 / step})
        if step % 5 == 0:
            sft.append({"step": step, "epoch": step / 20, "eval_loss": 2.0 * math.exp(-step / 12) + 1.0})
    rm = []
    for step in range(1, 16):
        rm.append({"step": step, "loss": 0.69 - 0.02 * step, "accuracy": 0.5 + 0.02 * step, "margin": 0.1 * step})
        if step % 5 == 0:
            rm.append({"step": step, "eval_loss": 0.7 - 0.015 * step, "eval_accuracy": 0.55 + 0.02 * step})
    ppo = [
        {"iteration": i, "score_mean": 0.1 * i + 0.234, "score_std": 0.3, "kl": 0.01 * i, "entropy": 2.0 - 0.05 * i,
         "policy_loss": -0.01 * i, "value_loss": 1.0 / i, "clipfrac": 0.05, "response_length": 40 + i,
         "note": "text values are skipped"}
        for i in range(1, 11)
    ]
    runs = {
        "sft": _write_run(tmp_path / "runs/sft", "sft", sft, {"loss": 0.88, "eval_loss": 1.37}),
        "rm": _write_run(tmp_path / "runs/rm", "train-rm", rm, {"eval_accuracy": 0.8125, "eval_loss": 0.475}),
        "ppo": _write_run(tmp_path / "runs/ppo", "ppo", ppo, {"score_mean": 1.234, "kl": 0.1, "entropy": 1.5}),
    }
    prompts = ["How are you?", "What is the weather like?", "Tell me about cats.", "Only in sft", "Only in ppo"]
    sft_rows = [{"prompt": p, "response": f"sft answer {i}", "finish_reason": "stop", "completion_tokens": 3}
                for i, p in enumerate(prompts[:4])]
    ppo_rows = [{"prompt": p, "response": f"ppo answer {i}", "finish_reason": "stop", "completion_tokens": 3}
                for i, p in enumerate(prompts[:3] + prompts[4:])]
    ppo_rows[1]["response"] = SCRIPT
    (tmp_path / "samples").mkdir()
    runs["sft_samples"] = _jsonl(tmp_path / "samples/sft.jsonl", sft_rows)
    runs["ppo_samples"] = _jsonl(tmp_path / "samples/ppo.jsonl", ppo_rows)
    runs["eval"] = Path(shutil.copytree(real_eval, tmp_path / "runs/eval"))
    return runs


def _eval_json(p: dict[str, Path]) -> dict:
    return json.loads((p["eval"] / "eval.json").read_text())


class _Tables(HTMLParser):
    """Cells of every table, and the src of every <img>."""

    def __init__(self):
        super().__init__()
        self.tables: list[dict] = []
        self.images: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append({"class": attrs.get("class"), "rows": []})
        elif tag == "tr":
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1]["rows"][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _parse(html_text: str) -> _Tables:
    parser = _Tables()
    parser.feed(html_text)
    return parser


def _inputs(p: dict[str, Path]) -> list[Path]:
    return [p["sft"], p["rm"], p["ppo"], p["eval"], p["sft_samples"], p["ppo_samples"]]


def test_report_shows_the_pipeline_numbers_plots_and_answers(pipeline, tmp_path):
    out = tmp_path / "report"
    result = report(_inputs(pipeline), out)

    assert result.status == "completed" and result.output_dir == str(out)
    page = (out / "report.html").read_text()
    parsed = _parse(page)
    summary = {row[0]: row[1] for row in parsed.tables[0]["rows"][1:]}
    evaluated = _eval_json(pipeline)["metrics"]
    shown = {
        "Reward model accuracy on held-out preference pairs (eval)": "rm_accuracy",
        "Mean reward of the evaluated policy (held-out prompts)": "reward",
        "Mean reward of the reference policy (held-out prompts)": "reference_reward",
        "Win rate against the reference (reward model as judge)": "win_rate",
        "Independent rule-based check (reward_fn, e.g. VADER sentiment)": "reward_fn",
        "Rule-based check of the reference policy": "reference_reward_fn",
        "Mean response length (tokens)": "length",
    }
    assert {label: summary[label] for label in shown} == {label: f"{evaluated[k]:.4g}" for label, k in shown.items()}
    # run.json final metrics win over the last logged value (accuracy 0.85 at step 15).
    assert summary["Reward model accuracy on its eval split, last evaluation"] == "0.8125"
    assert summary["PPO rollout score, last iteration"] == "1.234"
    assert summary["SFT held-out loss, last evaluation"] == "1.37"
    assert summary["eos_rate"] == f"{evaluated['eos_rate']:.4g}"  # eval metrics without a label of their own
    assert result.metrics["rm_accuracy"] == evaluated["rm_accuracy"] and result.metrics["ppo_score"] == 1.234
    saved = json.loads((out / "summary.json").read_text())
    assert {r["key"]: r["value"] for r in saved["summary"]}["win_rate"] == evaluated["win_rate"]
    assert saved["evals"][0]["model"] == _eval_json(pipeline)["recipe"]["model"]["path"]

    # sft: loss, optimizer; train-rm: loss, accuracy; ppo: loss, score/kl/entropy, PPO diagnostics, rollouts.
    assert len(parsed.images) == result.details["plots"] == 8
    assert sorted(parsed.images) == sorted(p.name for p in out.glob("*.png"))
    assert any("ppo" in src and "reward" in src for src in parsed.images)


def test_the_independent_check_stands_beside_the_reward_model_win_rate(pipeline, tmp_path):
    out = tmp_path / "report"
    report(_inputs(pipeline), out)
    parsed = _parse((out / "report.html").read_text())
    m = _eval_json(pipeline)["metrics"]
    # In the summary the rule-based check's rows follow the win rate's.
    labels = [row[0] for row in parsed.tables[0]["rows"][1:]]
    at = labels.index("Win rate against the reference (reward model as judge)")
    assert labels[at + 1 : at + 3] == ["Independent rule-based check (reward_fn, e.g. VADER sentiment)",
                                       "Rule-based check of the reference policy"]
    table = next(t for t in parsed.tables if t["rows"][0][:3] == ["Eval", "Model vs reference", "Win rate (reward model)"])
    (row,) = table["rows"][1:]
    corr = m["reward_length_corr"]
    assert row[2] == f"{m['win_rate']:.4g}"
    assert row[3] == f"{m['reward']:.4g} / {m['reference_reward']:.4g}"
    assert row[4] == f"{m['reward_fn']:.4g} / {m['reference_reward_fn']:.4g}"
    assert row[5] == ("–" if corr is None else f"{corr:.4g}")  # null in eval.json when undefined
    claimed = m["reward"] > m["reference_reward"] or m["win_rate"] > 0.5
    gain = m["reward_fn"] - m["reference_reward_fn"]
    expected = ("the reward model sees no gain" if not claimed else
                "inconclusive" if abs(gain) <= 2 * m["reward_fn_gain_se"] else
                "confirmed" if gain > 0 else "not confirmed")
    assert row[6].startswith(expected), row
    saved = json.loads((out / "summary.json").read_text())["independent_checks"]
    assert [(c["win_rate"], c["reward_fn"], c["reference_reward_fn"]) for c in saved] == [
        (m["win_rate"], m["reward_fn"], m["reference_reward_fn"])]


@pytest.mark.parametrize(
    ("fn", "se", "verdict"),
    [
        (0.0654, 0.03, "inconclusive: the independent check differs by +0.0025, within two standard errors (0.06)"),
        (0.0604, 0.03, "inconclusive: the independent check differs by -0.0025"),
        (0.2629, 0.03, "confirmed"),
        (-0.1371, 0.03, "not confirmed"),
        (0.0654, None, "confirmed"),  # an eval.json from before the error was recorded: the plain comparison
        # recorded as null (NaN on one prompt): it was called confirmed on that one prompt
        (0.0654, "null", "inconclusive: the independent check differs by +0.0025 on fewer than 2 prompts"),
        (0.0654, float("nan"), "inconclusive: the independent check differs by +0.0025 on fewer than 2 prompts"),
    ],
)
def test_a_check_gain_within_its_noise_is_inconclusive_not_confirmed(tmp_path, fn, se, verdict):
    from rlhf_cli.report.collect import EvalResult, independent_check

    # The demo's DPO eval of one day: VADER 0.0654 against SFT's 0.0629 over 40 prompts was called confirmed.
    metrics = {"win_rate": 0.625, "reward": -1.60, "reference_reward": -1.65, "reward_fn": fn,
               "reference_reward_fn": 0.0629,
               **({"reward_fn_gain_se": None if se == "null" else se} if se is not None else {})}
    row = independent_check(EvalResult("eval_dpo", tmp_path, {"metrics": metrics}))
    assert row is not None and row["verdict"].startswith(verdict), row["verdict"]


def test_eval_records_the_check_gain_error_from_the_paired_answers(pipeline):
    evaluated = _eval_json(pipeline)
    from rlhf_cli.core.checks import paired_gain

    samples = evaluated["samples"]
    assert all("reference_reward_fn" in s for s in samples)
    mean, se = paired_gain([s["reward_fn"] for s in samples], [s["reference_reward_fn"] for s in samples])
    m = evaluated["metrics"]
    assert mean == pytest.approx(m["reward_fn"] - m["reference_reward_fn"])
    assert se == pytest.approx(m["reward_fn_gain_se"]) and se > 0


def test_plots_are_real_drawings(pipeline, tmp_path):
    from PIL import Image

    out = tmp_path / "report"
    report(_inputs(pipeline), out)
    pngs = sorted(out.glob("*.png"))
    assert pngs
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(png) as image:
            image.load()
            width, height = image.size
            colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert width >= 400 and height >= 300
        # Curves, labels and anti-aliasing give hundreds of colours; a blank figure has one.
        assert colours is None or len(colours) > 50, png.name


def test_side_by_side_rows_are_the_shared_prompts_and_text_is_escaped(pipeline, tmp_path):
    out = tmp_path / "report"
    report(_inputs(pipeline), out)
    page = (out / "report.html").read_text()
    tables = [t for t in _parse(page).tables if t["class"] == "sbs"]

    samples, evaluated = tables
    assert samples["rows"][0] == ["Prompt", "sft.jsonl", "ppo.jsonl"]
    assert samples["rows"][1:] == [
        ["How are you?", "sft answer 0finish_reason stop · completion_tokens 3",
         "ppo answer 0finish_reason stop · completion_tokens 3"],
        ["What is the weather like?", "sft answer 1finish_reason stop · completion_tokens 3",
         SCRIPT + "finish_reason stop · completion_tokens 3"],
        ["Tell me about cats.", "sft answer 2finish_reason stop · completion_tokens 3",
         "ppo answer 2finish_reason stop · completion_tokens 3"],
    ]
    # The eval's own answers, each with the reward model's score, against the reference's.
    first = _eval_json(pipeline)["samples"][0]
    assert evaluated["rows"][0] == ["Prompt", "lora (evaluated)", "sft (reference)"]
    prompt, answer, reference = evaluated["rows"][1]
    assert prompt == first["prompt"]
    assert answer.startswith(first["response"]) and f"score {first['score']:.4g}" in answer
    assert reference == (f"{first['reference_response']}score {first['reference_score']:.4g}"
                         f" · reward_fn {first['reference_reward_fn']:.4g}")
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page  # jinja2's autoescape (markupsafe)


def test_cli_json_and_exit_codes(pipeline, tmp_path):
    runner = CliRunner()
    out = tmp_path / "report"
    ok = runner.invoke(app, ["report", *map(str, _inputs(pipeline)), "--output", str(out), "--json"])
    assert ok.exit_code == 0, ok.output
    result = json.loads(ok.stdout)
    assert result["stage"] == "report" and result["metrics"]["win_rate"] == _eval_json(pipeline)["metrics"]["win_rate"]
    assert result["details"]["report"] == str(out / "report.html")

    not_a_run = tmp_path / "notes"
    not_a_run.mkdir()
    bad = runner.invoke(app, ["report", str(pipeline["sft"]), str(not_a_run), "--output", str(tmp_path / "r2")])
    assert bad.exit_code == 3
    assert "notes: not a run directory" in bad.stderr
    missing = runner.invoke(app, ["report", str(tmp_path / "runs/nope"), "--output", str(tmp_path / "r2")])
    assert missing.exit_code == 3 and "not found" in missing.stderr
    assert not (tmp_path / "r2").exists()


def test_failure_leaves_the_previous_report_untouched(pipeline, tmp_path, monkeypatch):
    from rlhf_cli.report import page

    out = tmp_path / "report"
    report([pipeline["sft"]], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "hi", "response": "a"}\n{"prompt": \n')
    with pytest.raises(DataError, match="broken.jsonl:2"):
        report([pipeline["sft"], pipeline["ppo"], broken], out)

    def fail(*args, **kwargs):  # the plots are already drawn into the temp folder at this point
        raise RuntimeError("disk full")

    monkeypatch.setattr(page, "render", fail)
    with pytest.raises(RuntimeError):
        report([pipeline["ppo"]], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    # A rerun replaces the old report as a whole.
    monkeypatch.undo()
    report([pipeline["ppo"]], out)
    assert sorted(p.name for p in out.glob("*.png")) == [
        "01-ppo-loss.png", "01-ppo-ppo.png", "01-ppo-reward.png", "01-ppo-rollout.png"
    ]


def test_refuses_to_write_over_a_directory_that_is_not_a_report(pipeline, tmp_path):
    with pytest.raises(RecipeError, match="not a report directory"):
        report([pipeline["ppo"]], pipeline["sft"])
    assert (pipeline["sft"] / "run.json").exists()


def test_odd_metrics_and_unknown_stages_do_not_break_the_report(tmp_path):
    run = _write_run(tmp_path / "dpo", "dpo", [], {"rewards/margins": 0.42, "label": "x"}, status="failed")
    (run / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 1.0, "flag": true, "name": "a"}\n'
        '{"loss": 0.9}\n'  # no step: not placeable on the x axis
        '{"step": 2, "loss": NaN, "rewards/chosen": 0.1}\n'
        '{"step": 3, "loss": 0.7, "rewards/chosen": 0.3}\n'
        '{"step": 4, "lo'  # torn last line of a killed run
    )
    result = report([run], tmp_path / "report")

    page = (tmp_path / "report/report.html").read_text()
    assert result.metrics == {"rewards/margins": 0.42}  # final metrics of a stage the summary does not know
    assert "failed" in page
    assert result.details["plots"] == 2  # loss (steps 1 and 3) and rewards/chosen


def test_missing_matplotlib_is_a_clear_install_hint(pipeline, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(RecipeError, match=r"pip install 'rlhf-cli\[report\]'"):
        report([pipeline["sft"]], tmp_path / "report")
    assert not (tmp_path / "report").exists()


def test_an_earlier_report_among_the_inputs_is_skipped(pipeline, tmp_path, monkeypatch):
    """`rlhf report runs/* -o runs/report`, run twice: the glob then also names the report itself."""
    monkeypatch.chdir(tmp_path)
    first = report([Path("runs/sft"), Path("runs/rm")], Path("runs/report"))
    again = report(sorted(Path("runs").iterdir()), Path("runs/report"))
    other = report(sorted(Path("runs").iterdir()), Path("elsewhere"))

    assert first.details["runs"] == 2
    assert again.details["runs"] == other.details["runs"] == 3 and again.details["evals"] == 1
    assert again.output_dir == "runs/report"


def _with_run_id(run: Path, run_id: str) -> Path:
    manifest = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**manifest, "run_id": run_id, "finished_at": "2026-12-02T10:00:00+00:00"}))
    return run


def test_figures_of_runs_trained_again_since_are_marked_out_of_date(lora_run, sft_full_run, reward_run, tiny, tmp_path):
    # An eval of runs/ppo, and runs/ppo itself, are figures of what those runs held then; once an input is
    # trained again (--overwrite) the report says so instead of showing them as the runs' own.
    policy = _with_run_id(Path(shutil.copytree(lora_run, tmp_path / "runs/policy")), "p1")
    reward = _with_run_id(Path(shutil.copytree(reward_run, tmp_path / "runs/rm")), "r1")
    prompts = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": "How are you?"}, {"prompt": "Tell me about cats."}])
    done = CliRunner().invoke(app, [
        "eval", "--model", str(policy), "--reference", str(sft_full_run), "--reward", str(reward), "--prompts",
        str(prompts), "--metric", "reward", "--metric", "win_rate", "--set", "generation.max_new_tokens=4",
        "--output-dir", str(tmp_path / "runs/eval")])
    assert done.exit_code == 0, done.stderr
    assert _eval_json({"eval": tmp_path / "runs/eval"})["inputs"] == {str(policy.resolve()): "p1", str(reward.resolve()): "r1"}
    later = _write_run(tmp_path / "runs/later", "ppo", [], {"score_mean": 1.0})
    manifest = json.loads((later / "run.json").read_text())
    (later / "run.json").write_text(json.dumps({**manifest, "inputs": {str(reward.resolve()): "r1"}}))

    inputs = [tmp_path / "runs/eval", later]
    assert report(inputs, tmp_path / "report").details["stale"] == 0
    assert "Out of date" not in (tmp_path / "report/report.html").read_text()

    _with_run_id(reward, "trained-again")
    result = report(inputs, tmp_path / "report")
    assert result.details["stale"] == 2
    summary = json.loads((tmp_path / "report/summary.json").read_text())
    assert summary["stale"] == [
        f"{later}: {reward.resolve()} was trained again (finished 2026-12-02T10:00:00+00:00) after this run read it: "
        f"train {later} again for a chain that fits together",
        f"{tmp_path / 'runs/eval'}: {reward.resolve()} was trained again (finished 2026-12-02T10:00:00+00:00) after "
        "this eval: its figures are of the run before; evaluate again",
    ]
    page = (tmp_path / "report/report.html").read_text()
    assert "Out of date" in page and "after this eval: its figures are of the run before" in page


def test_eval_files_from_two_directories_of_one_name_keep_both_figures(tmp_path):
    """a/ev/eval.json and b/ev/eval.json given as files are named as their directories would be: both
    evals' figures reach --json, neither overwrites the other."""
    for side, reward in (("a", 1.0), ("b", 2.0)):
        (tmp_path / side / "ev").mkdir(parents=True)
        (tmp_path / side / "ev" / "eval.json").write_text(json.dumps({"metrics": {"reward": reward}}))
    files = report([tmp_path / "a/ev/eval.json", tmp_path / "b/ev/eval.json"], tmp_path / "r1")
    dirs = report([tmp_path / "a/ev", tmp_path / "b/ev"], tmp_path / "r2")
    assert files.metrics == dirs.metrics
    assert files.metrics["a/ev/reward"] == 1.0 and files.metrics["b/ev/reward"] == 2.0


def test_a_best_of_all_file_shows_the_chosen_answer(tmp_path):
    """`generate --best-of --all` writes every candidate; the side-by-side column shows the one marked best."""
    rows = [{"index": 0, "sample": 0, "prompt": "p?", "response": "worse", "score": 0.1, "best": False},
            {"index": 0, "sample": 1, "prompt": "p?", "response": "chosen", "score": 0.9, "best": True},
            {"index": 0, "sample": 2, "prompt": "p?", "response": "other", "score": 0.5, "best": False}]
    plain = [{"index": 0, "sample": 0, "prompt": "p?", "response": "first"},
             {"index": 0, "sample": 1, "prompt": "p?", "response": "second"}]
    report([_jsonl(tmp_path / "best.jsonl", rows), _jsonl(tmp_path / "plain.jsonl", plain)], tmp_path / "report")
    (table,) = [t for t in _parse((tmp_path / "report/report.html").read_text()).tables if t["class"] == "sbs"]
    prompt, best, first = table["rows"][1]
    assert best.startswith("chosen") and "score 0.9" in best
    assert first.startswith("first")


def test_summary_json_stays_strict_json_when_an_input_holds_nan(tmp_path):
    """An eval.json written with NaN sample scores, and a run whose final metrics hold one, still give a
    summary.json that strict parsers read."""
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "eval.json").write_text(json.dumps({
        "metrics": {"reward": 0.5}, "recipe": {"model": {"path": "m"}, "reference": {"path": "r"}},
        "samples": [{"prompt": "p?", "response": "a", "score": math.nan, "reference_response": "b",
                     "reference_score": math.inf}]}))
    run = _write_run(tmp_path / "rm", "train-rm", [{"step": 1, "loss": 0.6}], {"eval_accuracy": 0.7, "eval_margin": math.nan})

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    report([tmp_path / "ev", run], tmp_path / "report")
    summary = json.loads((tmp_path / "report/summary.json").read_text(), parse_constant=refuse)
    assert summary["runs"][0]["final_metrics"]["eval_margin"] is None
    assert summary["side_by_side"][0]["rows"][0]["answers"][0]["score"] is None


def test_samples_with_unicode_line_separators_in_answers_are_read_whole(tmp_path):
    """`generate` writes JSON with ensure_ascii=False, so U+2028 or U+0085 in an answer stay raw inside
    its line: they do not end the line, and the answer reaches the page whole."""
    rows = [{"index": 0, "sample": 0, "prompt": "p?", "response": "one\u2028two"},
            {"index": 1, "sample": 0, "prompt": "q?", "response": "three\x85four"}]
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    result = report([path], tmp_path / "report")
    assert result.details["side_by_side_rows"] == 2
    summary = json.loads((tmp_path / "report/summary.json").read_text())
    answers = [row["answers"][0]["response"] for row in summary["side_by_side"][0]["rows"]]
    assert answers == ["one\u2028two", "three\x85four"]


def test_inputs_that_are_not_utf8_name_the_file_and_exit_3(tmp_path):
    """A samples file or eval.json in another encoding is a data error naming its line, not a traceback."""
    (tmp_path / "latin.jsonl").write_bytes('{"prompt": "café", "response": "oui"}\n'.encode("latin-1"))
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "eval.json").write_bytes('{"metrics": {"reward": 1.0}, "note": "café"}'.encode("latin-1"))
    for path in (tmp_path / "latin.jsonl", tmp_path / "ev"):
        result = CliRunner().invoke(app, ["report", str(path), "--output", str(tmp_path / "report")])
        assert result.exit_code == 3, result.output
        assert f"{path.name if path.is_file() else 'eval.json'}:1: not UTF-8" in result.stderr


def test_runs_whose_names_clash_two_folders_up_keep_their_own_metrics_and_figures(tmp_path):
    """x/a/sft and y/a/sft are told apart by as many parent folders as it takes: each keeps its own final
    loss in --json and its own figure on the page, where both were "a/sft" and one overwrote the other."""
    a = _write_run(tmp_path / "x/a/sft", "sft", [{"step": s, "loss": 2.0 - 0.1 * s} for s in range(1, 6)], {"loss": 1.5})
    b = _write_run(tmp_path / "y/a/sft", "sft", [{"step": s, "loss": 9.0 - 0.1 * s} for s in range(1, 6)], {"loss": 8.5})
    result = report([a, b], tmp_path / "report")
    assert result.metrics == {"x/a/sft/sft_loss": 1.5, "y/a/sft/sft_loss": 8.5}
    html = (tmp_path / "report/report.html").read_text()
    images = html.split('<img src="')[1:]
    assert [i.split('"')[0] for i in images] == ["01-x-a-sft-loss.png", "02-y-a-sft-loss.png"]


def test_a_rerun_replaces_only_the_reports_own_files(tmp_path):
    """A samples file saved inside the report folder (and read by the rerun) and notes beside the page stay;
    the old report's figures that the rerun does not draw go. Before, the whole folder was replaced."""
    run = _write_run(tmp_path / "sft", "sft", [{"step": s, "loss": 2.0 - 0.1 * s} for s in range(1, 6)], {"loss": 1.5})
    out = tmp_path / "report"
    report([run], out)
    assert (out / "01-sft-loss.png").is_file()
    samples = _jsonl(out / "ppo.jsonl", [{"prompt": "p?", "response": "from the folder"}])
    (out / "notes.md").write_text("keep me\n")
    report([samples], out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.md", "ppo.jsonl", "report.html", "summary.json"]
    assert (out / "notes.md").read_text() == "keep me\n"
    assert "from the folder" in (out / "report.html").read_text()

    # A file of the user's with a name the report writes is refused, and everything stays as it was.
    (out / "01-sft-loss.png").write_bytes(b"mine")
    with pytest.raises(RecipeError, match="01-sft-loss.png"):
        report([run], out)
    assert (out / "01-sft-loss.png").read_bytes() == b"mine" and (out / "notes.md").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_prompts_that_differ_only_in_their_system_turn_are_rows_of_their_own(tmp_path):
    """Two conversations ending in the same user turn were one row, keyed on that turn, and the second
    answer was dropped; a lone user turn still matches the same prompt given as text."""
    def chat(system: str) -> list[dict]:
        return [{"role": "system", "content": system}, {"role": "user", "content": "hi"}]

    a = _jsonl(tmp_path / "a.jsonl", [{"prompt": chat("Answer in French."), "response": "bonjour"},
                                      {"prompt": chat("Answer in English."), "response": "hello"},
                                      {"prompt": [{"role": "user", "content": "bye"}], "response": "au revoir"}])
    b = _jsonl(tmp_path / "b.jsonl", [{"prompt": chat("Answer in English."), "response": "hi there"},
                                      {"prompt": chat("Answer in French."), "response": "salut"},
                                      {"prompt": "bye", "response": "goodbye"}])
    result = report([a, b], tmp_path / "report")
    assert result.details["side_by_side_rows"] == 3
    summary = json.loads((tmp_path / "report/summary.json").read_text())
    rows = {row["prompt"]: [ans["response"] for ans in row["answers"]] for row in summary["side_by_side"][0]["rows"]}
    assert rows == {"system: Answer in French.\nuser: hi": ["bonjour", "salut"],
                    "system: Answer in English.\nuser: hi": ["hello", "hi there"], "bye": ["au revoir", "goodbye"]}


def test_a_run_given_twice_is_reported_once_under_its_own_keys(tmp_path):
    """`rlhf report runs/sft runs/*` names runs/sft twice: it is one run, and its keys stay unprefixed."""
    sft = _write_run(tmp_path / "runs/sft", "sft", [{"step": s, "loss": 2.0 - 0.1 * s} for s in range(1, 6)], {"loss": 1.5})
    rm = _write_run(tmp_path / "runs/rm", "train-rm", [{"step": s, "loss": 0.7 - 0.01 * s} for s in range(1, 6)],
                    {"accuracy": 0.7})
    result = report([sft, rm, tmp_path / "runs/../runs/sft"], tmp_path / "report")
    assert result.metrics == {"rm_train_accuracy": 0.7, "sft_loss": 1.5}
    assert result.details["runs"] == 2 and result.details["plots"] == 2


def test_the_reference_answers_show_their_independent_check_score_too(tmp_path):
    """eval.json's samples hold reference_reward_fn beside reward_fn: both columns show the rule-based score."""
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "eval.json").write_text(json.dumps({
        "metrics": {"reward": 0.5}, "recipe": {"model": {"path": "runs/ppo"}, "reference": {"path": "runs/sft"}},
        "samples": [{"prompt": "p?", "response": "a", "score": 0.9, "reward_fn": 0.75,
                     "reference_response": "b", "reference_score": 0.2, "reference_reward_fn": 0.25}]}))
    report([tmp_path / "ev"], tmp_path / "report")
    summary = json.loads((tmp_path / "report/summary.json").read_text())
    model, reference = summary["side_by_side"][0]["rows"][0]["answers"]
    assert (model["score"], model["reward_fn"]) == (0.9, 0.75)
    assert (reference["score"], reference["reward_fn"]) == (0.2, 0.25)
