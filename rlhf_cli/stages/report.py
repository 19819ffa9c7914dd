"""rlhf report: one HTML page with the curves, a summary table and side-by-side answers of a pipeline.

    rlhf report runs/* samples/sft.jsonl samples/ppo.jsonl --output report

Inputs, in any order: run directories (run.json + metrics.jsonl, any stage), eval directories
(eval.json written by `rlhf eval --output-dir`), and generation samples (`rlhf generate` JSONL files).
Writes report/report.html (self-contained, plots as PNG files next to it) and report/summary.json.
Metric names still vary between stages, so every numeric series in metrics.jsonl is plotted and the
summary looks up the keys listed in SUMMARY_KEYS, falling back to a run's final metrics.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from rlhf_cli.errors import DataError, RecipeError
from rlhf_cli.result import RunResult
from rlhf_cli.runs import read_manifest

log = logging.getLogger("rlhf")

# Summary table rows, in order: row key -> (label, candidates). A candidate is (source, metric):
# source "eval" reads the metrics of eval.json, a stage name reads that run's final metrics in run.json
# (else the last value logged in metrics.jsonl). The first candidate found gives the row; it gets one
# row per run / eval directory that has it.
SUMMARY_KEYS: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "rm_accuracy": ("Reward model accuracy on held-out preference pairs (eval)", (("eval", "rm_accuracy"),)),
    "rm_eval_accuracy": ("Reward model accuracy on its eval split, last evaluation", (("train-rm", "eval_accuracy"),)),
    "rm_train_accuracy": ("Reward model accuracy on training pairs (last logged)", (("train-rm", "accuracy"),)),
    "reward": ("Mean reward of the evaluated policy (held-out prompts)", (("eval", "reward"),)),
    "reference_reward": ("Mean reward of the reference policy (held-out prompts)", (("eval", "reference_reward"),)),
    "win_rate": ("Win rate against the reference (reward model as judge)", (("eval", "win_rate"),)),
    "reward_fn": ("Independent rule-based check (reward_fn, e.g. VADER sentiment)", (("eval", "reward_fn"),)),
    "reference_reward_fn": ("Rule-based check of the reference policy", (("eval", "reference_reward_fn"),)),
    "reward_length_corr": ("Reward model score vs answer length (Spearman, evaluated answers)",
                           (("eval", "reward_length_corr"),)),
    "kl": ("KL(policy || reference) on held-out prompts", (("eval", "kl"),)),
    "perplexity": ("Perplexity", (("eval", "perplexity"),)),
    "length": ("Mean response length (tokens)", (("eval", "length"),)),
    "ppo_score": ("PPO rollout score, last iteration", (("ppo", "score_mean"), ("ppo", "score"), ("ppo", "reward"))),
    "ppo_kl": ("PPO KL to the reference, last iteration", (("ppo", "kl"),)),
    "ppo_entropy": ("PPO policy entropy, last iteration", (("ppo", "entropy"),)),
    "grpo_score": ("GRPO rollout score, last iteration", (("grpo", "score_mean"),)),
    "grpo_kl": ("GRPO KL to the reference, last iteration", (("grpo", "kl"),)),
    "grpo_zero_std_groups": ("GRPO share of prompts whose answers all scored the same, last iteration",
                             (("grpo", "zero_std_groups"),)),
    "sft_eval_loss": ("SFT held-out loss, last evaluation", (("sft", "eval_loss"),)),
    "sft_loss": ("SFT training loss, last logged", (("sft", "loss"), ("sft", "train_loss"))),
    "rm_eval_loss": ("Reward model held-out loss, last evaluation", (("train-rm", "eval_loss"),)),
    "pretrain_eval_loss": ("Pretraining held-out loss, last evaluation", (("pretrain", "eval_loss"),)),
    "pretrain_loss": ("Pretraining loss, last logged", (("pretrain", "loss"), ("pretrain", "train_loss"))),
}

# Keys that count progress; the first one a run logs is the x axis of its curves.
X_KEYS = ("iteration", "step", "global_step")
# Logged numbers that are not curves worth a plot.
NOT_PLOTTED = {"epoch", "timestamp", "time", "wall_time", "elapsed", "elapsed_s", *X_KEYS}
# One figure per group and run; a metric goes to the first group whose pattern matches its name
# (without an eval_/train_ prefix).
FIGURE_GROUPS: tuple[tuple[str, str, str], ...] = (
    ("loss", "Loss", r"loss"),
    ("accuracy", "Accuracy and margin", r"acc|margin"),
    ("optim", "Optimizer", r"^lr$|learning_rate|grad_norm|kl_coef|^beta$"),
    ("reward", "Score, KL and entropy", r"score|reward|^kl$|^kl_|entropy"),
    ("ppo", "PPO update diagnostics", r"clipfrac|approx_kl|ratio|explained_var|value|advantage|return"),
    ("rollout", "Rollouts and throughput", r"length|eos|token|per_s|second|runtime|throughput|memory|samples"),
    ("other", "Other metrics", r""),
)
# Order of a run's figures on the page: what the stage optimizes first.
FIGURE_ORDER = ("reward", "accuracy", "loss", "ppo", "rollout", "optim", "other")
MAX_SIDE_BY_SIDE = 8  # prompts shown per side-by-side table
MAX_RESPONSE_CHARS = 1500


@dataclass
class Run:
    name: str
    path: Path
    manifest: dict[str, Any]
    records: list[dict[str, Any]]

    @property
    def stage(self) -> str:
        return str(self.manifest.get("stage") or "?")

    @property
    def final(self) -> dict[str, Any]:
        metrics = self.manifest.get("metrics")
        return metrics if isinstance(metrics, dict) else {}

    def last(self, key: str) -> float | None:
        """Final value of a metric: run.json's final metrics first, else the last logged value."""
        value = _number(self.final.get(key))
        if value is not None:
            return value
        for record in reversed(self.records):
            value = _number(record.get(key))
            if value is not None:
                return value
        return None


@dataclass
class EvalResult:
    name: str
    path: Path
    data: dict[str, Any]

    @property
    def metrics(self) -> dict[str, Any]:
        return _flatten(self.data.get("metrics") if isinstance(self.data.get("metrics"), dict) else {})

    def model_path(self, role: str) -> str | None:
        """recipe.model.path / recipe.reference.path of the eval (see stages/eval.py)."""
        spec = (self.data.get("recipe") or {}).get(role)
        return spec.get("path") if isinstance(spec, dict) else None


@dataclass
class Column:
    """Answers of one model (one samples file, or one side of an eval): prompt -> answer."""

    title: str
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)


def report(runs: list[Path], output: Path) -> RunResult:
    output = Path(output)
    found_runs, evals, sample_files = _collect(runs, output)
    if not (found_runs or evals or sample_files):
        raise DataError("nothing to report: pass run directories, eval directories or samples .jsonl files")
    mpl = _matplotlib()

    rows = _summary_rows(found_runs, evals)
    checks = [c for c in map(_independent_check, evals) if c is not None]
    tables = _side_by_side_tables(sample_files, evals)
    if output.exists() and not output.is_dir():
        raise RecipeError(f"--output {output}: is a file; choose a directory")
    if output.is_dir() and any(output.iterdir()) and not _is_report(output):
        raise RecipeError(f"--output {output}: exists and is not a report directory; choose another --output")

    # Built next to the target and moved into place at the end: a failure leaves no half-written report.
    target = output.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        plots: dict[str, list[tuple[str, str]]] = {}
        for i, run in enumerate(found_runs, 1):
            plots[run.name] = _plot_run(run, i, tmp, mpl)
        n_plots = sum(len(p) for p in plots.values())
        summary = {
            "generated_at": datetime.now().astimezone().isoformat(timespec="seconds"),
            "inputs": {"runs": [str(r.path) for r in found_runs], "evals": [str(e.path) for e in evals],
                       "samples": [str(p) for p in sample_files]},
            "summary": rows,
            "independent_checks": checks,
            "runs": [_run_overview(r) for r in found_runs],
            "evals": [{"name": e.name, "path": str(e.path), "model": e.model_path("model"),
                       "reference": e.model_path("reference"), "metrics": e.metrics} for e in evals],
            "side_by_side": tables,
            "plots": [name for p in plots.values() for name, _ in p],
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
        (tmp / "report.html").write_text(_html(summary, found_runs, evals, plots, tables), encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a report is meant to be shared
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s (%d plots)", output / "report.html", n_plots)
    return RunResult(
        stage="report",
        status="completed",
        output_dir=str(output),
        metrics=_flat_metrics(rows),
        details={"report": str(output / "report.html"), "plots": n_plots, "runs": len(found_runs),
                 "evals": len(evals), "side_by_side_rows": sum(len(t["rows"]) for t in tables)},
    )


# --------------------------------------------------------------------------- inputs


def _collect(paths: list[Path], output: Path) -> tuple[list[Run], list[EvalResult], list[Path]]:
    runs: list[Run] = []
    evals: list[EvalResult] = []
    samples: list[Path] = []
    names = _unique_names([Path(p) for p in paths])
    for path, name in zip(map(Path, paths), names):
        if not path.exists():
            raise DataError(f"{path}: not found (expected a run directory, an eval directory or a samples .jsonl file)")
        if path.resolve() == output.resolve():
            log.info("skipping %s: it is the report output directory", path)
            continue
        if path.is_dir() and _is_report(path):  # an earlier report caught by `rlhf report runs/*`
            log.warning("skipping %s: it is a report, not a run", path)
            continue
        if path.is_file():
            if path.name == "eval.json":
                evals.append(EvalResult(path.parent.name, path.parent, _read_eval(path)))
            elif path.suffix == ".jsonl":
                samples.append(path)
            else:
                raise DataError(f"{path}: not a samples .jsonl file or eval.json")
            continue
        manifest = read_manifest(path)
        has_eval = (path / "eval.json").is_file()
        if manifest is None and not has_eval:
            raise DataError(f"{path}: not a run directory (no run.json) nor an eval directory (no eval.json)")
        if manifest is not None:
            runs.append(Run(name, path, manifest, _read_metrics(path / "metrics.jsonl")))
        if has_eval:
            evals.append(EvalResult(name, path, _read_eval(path / "eval.json")))
    return runs, evals, samples


def _is_report(path: Path) -> bool:
    return (path / "report.html").is_file() and (path / "summary.json").is_file() and not (path / "run.json").exists()


def _unique_names(paths: list[Path]) -> list[str]:
    """Directory or file names, with the parent folder added where two would clash."""
    names = [p.name or str(p) for p in paths]
    return [f"{p.parent.name}/{n}" if names.count(n) > 1 and p.parent.name else n for p, n in zip(paths, names)]


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl records; a torn line (a run killed mid-write) is skipped with a warning."""
    if not path.is_file():
        return []
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: not valid JSON; line skipped", path, lineno)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _read_eval(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: eval.json is not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with a metrics section")
    return data


def _read_samples(path: Path) -> list[dict[str, Any]]:
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if isinstance(row, dict) and "prompt" in row and isinstance(row.get("response"), str):
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no samples with prompt and response (expected `rlhf generate` JSONL output)")
    return rows


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# --------------------------------------------------------------------------- summary


def _summary_rows(runs: list[Run], evals: list[EvalResult]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    used: set[tuple[str, str]] = set()  # (source name, metric) already shown
    for row_key, (label, candidates) in SUMMARY_KEYS.items():
        for source, metric in candidates:
            found = [(e.name, _number(e.metrics.get(metric))) for e in evals] if source == "eval" else [
                (r.name, r.last(metric)) for r in runs if r.stage == source
            ]
            found = [(name, value) for name, value in found if value is not None]
            for name, value in found:
                rows.append({"key": row_key, "label": label, "value": value, "source": name, "metric": metric})
                used.add((name, metric))
            if found:
                break
    # Eval metrics are all summary-worthy, known names or not.
    for e in evals:
        for metric, value in e.metrics.items():
            if (e.name, metric) not in used and _number(value) is not None:
                rows.append({"key": metric, "label": metric, "value": _number(value), "source": e.name, "metric": metric})
    # A run that gave no row (a stage the table does not know) shows its final metrics instead.
    for run in runs:
        if not any(row["source"] == run.name for row in rows):
            for metric, value in run.final.items():
                if _number(value) is not None:
                    rows.append({"key": metric, "label": f"{metric} ({run.stage})", "value": _number(value),
                                 "source": run.name, "metric": metric})
    return rows


def _independent_check(e: EvalResult) -> dict[str, Any] | None:
    """The reward model's verdict on a model against its reference, beside the rule-based check's (reward_fn)
    on the same answers: whether an outside judge sees the gain the reward model claims."""
    m = {k: _number(v) for k, v in e.metrics.items()}
    if m.get("win_rate") is None:
        return None
    row: dict[str, Any] = {
        "eval": e.name, "model": e.model_path("model"), "reference": e.model_path("reference"),
        **{k: m.get(k) for k in ("win_rate", "reward", "reference_reward", "reward_fn", "reference_reward_fn",
                                 "reward_length_corr", "length")},
    }
    rm_gain = row["reward"] is not None and row["reference_reward"] is not None and row["reward"] > row["reference_reward"]
    if row["reward_fn"] is None or row["reference_reward_fn"] is None:
        row["verdict"] = "no independent check (eval ran without --reward-fn)"
    elif not rm_gain and not row["win_rate"] > 0.5:
        row["verdict"] = "the reward model sees no gain"
    elif row["reward_fn"] > row["reference_reward_fn"]:
        row["verdict"] = "confirmed: the independent check also scores the model higher"
    else:
        row["verdict"] = "not confirmed: the independent check scores the model no higher than the reference"
    return row


def _flat_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Summary rows as one flat dict; a key that several sources give is prefixed by the source."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["key"]] = counts.get(row["key"], 0) + 1
    return {row["key"] if counts[row["key"]] == 1 else f"{row['source']}/{row['key']}": row["value"] for row in rows}


def _run_overview(run: Run) -> dict[str, Any]:
    m = run.manifest
    return {
        "name": run.name,
        "path": str(run.path),
        "stage": run.stage,
        "status": m.get("status"),
        "base_model": _model_name(m.get("base_model")),
        "parent_run": _model_name(m.get("parent_run")),
        "duration_s": _duration_s(m.get("started_at"), m.get("finished_at")),
        "logged_records": len(run.records),
        "final_metrics": run.final,
    }


def _model_name(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("path") or value.get("name")
    return None if value is None else str(value)


def _duration_s(start: Any, end: Any) -> float | None:
    try:
        return (datetime.fromisoformat(str(end)) - datetime.fromisoformat(str(start))).total_seconds()
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------- plots


def _matplotlib():
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise RecipeError("rlhf report needs matplotlib: pip install 'rlhf-cli[report]'") from None
    return SimpleNamespace(Figure=Figure, Canvas=FigureCanvasAgg, MaxNLocator=MaxNLocator, style=matplotlib.rc_context)


# A local style (rc_context): the report leaves matplotlib's global settings as they were.
_STYLE = {"axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
          "font.size": 10, "axes.titlesize": 11, "axes.formatter.limits": (-3, 4)}  # 2e-4, not 0.000200


def _series(run: Run) -> tuple[str, dict[str, list[tuple[float, float]]]]:
    """x key and every numeric series of a run: metric -> [(x, y)], in logged order."""
    x_key = next((k for k in X_KEYS if any(k in r for r in run.records)), "")
    series: dict[str, list[tuple[float, float]]] = {}
    for index, record in enumerate(run.records, 1):
        x = _number(record.get(x_key)) if x_key else float(index)
        if x is None:
            continue
        for key, value in record.items():
            y = _number(value)
            if y is not None and key not in NOT_PLOTTED:
                series.setdefault(key, []).append((x, y))
    return x_key or "record", {k: v for k, v in series.items() if len(v) >= 2}


def _base(key: str) -> str:
    return re.sub(r"^(eval|train)_", "", key)


def _panels(series: dict[str, list]) -> dict[str, list[list[str]]]:
    """group -> panels; a panel is the metrics drawn on one axes (loss with eval_loss, score_mean with score_std)."""
    by_base: dict[str, list[str]] = {}
    for key in series:
        if key.endswith("_std") and key[:-4] + "_mean" in series:
            continue  # drawn as a band around its _mean
        by_base.setdefault(_base(key), []).append(key)
    groups: dict[str, list[list[str]]] = {}
    for base, keys in by_base.items():
        group = next(g for g, _, pattern in FIGURE_GROUPS if re.search(pattern, base))
        groups.setdefault(group, []).append(sorted(keys, key=lambda k: (k.startswith("eval_"), k)))
    return {g: groups[g] for g in FIGURE_ORDER if g in groups}


def _plot_run(run: Run, index: int, folder: Path, mpl: SimpleNamespace) -> list[tuple[str, str]]:
    """One PNG per metric group; returns [(file name, caption)]."""
    x_key, series = _series(run)
    titles = {g: t for g, t, _ in FIGURE_GROUPS}
    out = []
    for group, panels in _panels(series).items():
        name = f"{index:02d}-{_slug(run.name)}-{group}.png"
        caption = f"{_label(run)}: {titles[group]}"
        with mpl.style(_STYLE):
            _figure(mpl, caption, x_key, series, panels).savefig(folder / name)
        out.append((name, caption))
    return out


def _figure(mpl: SimpleNamespace, title: str, x_key: str, series: dict[str, list], panels: list[list[str]]):
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = mpl.Figure(figsize=(4.6 * ncols, 3.4 * nrows + 0.5), dpi=110, layout="constrained")
    mpl.Canvas(fig)
    fig.suptitle(title, fontsize=13, fontweight="bold")
    for i, keys in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        labelled = [
            _draw(ax, key, series[key], series.get(key[:-5] + "_std") if key.endswith("_mean") else None)
            for key in keys
        ]
        ax.set_title(_base(keys[0]) if len(keys) > 1 else keys[0])
        ax.set_xlabel(x_key)
        ax.set_ylabel(_base(keys[0]))
        if x_key != "record":
            ax.xaxis.set_major_locator(mpl.MaxNLocator(integer=True))
        if len(keys) > 1 or any(labelled):
            ax.legend(fontsize=9)
    return fig


def _draw(ax, key: str, points: list[tuple[float, float]], std: list[tuple[float, float]] | None) -> bool:
    """Draw one metric; True when the drawing needs a legend to be read (smoothing, a std band)."""
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    few = len(points) <= 40
    if len(points) > 60:
        # Noisy long curves: the raw values faint, a moving average on top.
        (raw,) = ax.plot(xs, ys, alpha=0.3, linewidth=1)
        w = max(2, len(ys) // 30)
        smooth = [sum(ys[max(0, i - w + 1): i + 1]) / len(ys[max(0, i - w + 1): i + 1]) for i in range(len(ys))]
        ax.plot(xs, smooth, color=raw.get_color(), linewidth=1.8, label=f"{key} (moving avg, {w})")
    else:
        ax.plot(xs, ys, marker="o" if few else None, markersize=3, linewidth=1.6, label=key)
    if std:
        by_x = dict(std)
        pts = [(x, y, by_x[x]) for x, y in points if x in by_x]
        ax.fill_between([p[0] for p in pts], [p[1] - p[2] for p in pts], [p[1] + p[2] for p in pts],
                        alpha=0.2, label=f"± {key[:-5]}_std")
    return len(points) > 60 or bool(std)


def _label(run: Run) -> str:
    return run.name if run.name == run.stage else f"{run.name} ({run.stage})"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "run"


# --------------------------------------------------------------------------- side by side


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):  # messages: show the last user turn
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if users and isinstance(users[-1], str):
            return users[-1]
    return json.dumps(prompt, ensure_ascii=False)


def _side_by_side_tables(sample_files: list[Path], evals: list[EvalResult]) -> list[dict[str, Any]]:
    """One table for the samples files (a column each), one per eval directory with samples."""
    groups: list[tuple[str, list[Column]]] = []
    if sample_files:
        titles = _unique_names(sample_files)
        columns = []
        for path, title in zip(sample_files, titles):
            column = Column(title)
            for row in _read_samples(path):
                # With several samples per prompt the first stands for the model.
                column.answers.setdefault(_prompt_text(row["prompt"]), row)
            columns.append(column)
        groups.append(("Side by side: generation samples", columns))
    for e in evals:
        samples = [s for s in e.data.get("samples") or [] if isinstance(s, dict) and "prompt" in s]
        if not samples:
            continue
        model = Column(f"{Path(e.model_path('model') or 'model').name} (evaluated)")
        reference = Column(f"{Path(e.model_path('reference') or 'reference').name} (reference)")
        for s in samples:
            prompt = _prompt_text(s["prompt"])
            if isinstance(s.get("response"), str):
                model.answers.setdefault(prompt, s)
            if isinstance(s.get("reference_response"), str):
                reference.answers.setdefault(prompt, {"response": s["reference_response"],
                                                      "score": s.get("reference_score")})
        groups.append((f"Side by side: eval samples of {e.name}", [c for c in (model, reference) if c.answers]))

    tables = []
    for title, columns in groups:
        prompts = list(dict.fromkeys(p for c in columns for p in c.answers))
        if len(columns) > 1:
            prompts = [p for p in prompts if sum(p in c.answers for c in columns) >= 2]
            if not prompts:
                log.warning("%s: no prompt is answered in more than one column; nothing to compare", title)
        rows = [{"prompt": p, "answers": [_answer(c.answers.get(p)) for c in columns]} for p in prompts]
        tables.append({"title": title, "columns": [c.title for c in columns], "shared_prompts": len(rows),
                       "rows": rows[:MAX_SIDE_BY_SIDE]})
    return tables


def _answer(sample: dict[str, Any] | None) -> dict[str, Any] | None:
    if sample is None:
        return None
    answer = {"response": sample["response"]}
    for key in ("score", "reward", "reward_fn", "finish_reason", "completion_tokens"):
        if sample.get(key) is not None:
            answer[key] = sample[key]
    return answer


def _replace_dir(new: Path, target: Path) -> None:
    """Move the finished report into place; the old one is removed only after the new one is there."""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1320px;
padding:1.5rem 2rem;color:#1d2430;line-height:1.45}
h1{margin-bottom:.2rem}h2{border-bottom:2px solid #e3e7ee;padding-bottom:.3rem;margin-top:2.4rem}
.muted{color:#5c6777;font-size:.9rem}
table{border-collapse:collapse;margin:.6rem 0 1.2rem;font-size:.92rem}
th,td{border:1px solid #d8dde6;padding:.35rem .6rem;text-align:left;vertical-align:top}
th{background:#f2f4f8}td.num{text-align:right;font-variant-numeric:tabular-nums;font-weight:600}
table.sbs{width:100%;table-layout:fixed}table.sbs td{white-space:pre-wrap;word-wrap:break-word}
table.sbs td.prompt{background:#fafbfc;font-style:italic}
.score{display:block;margin-top:.4rem;color:#5c6777;font-size:.8rem;white-space:normal;font-style:normal}
.status{padding:.05rem .45rem;border-radius:.6rem;font-size:.8rem;font-weight:600}
.status.completed{background:#dff3e4;color:#17692c}.status.other{background:#fde8e8;color:#9b1c1c}
figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #e3e7ee}
details{margin:.4rem 0 1rem}pre{background:#f6f8fa;padding:.6rem;overflow:auto}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _html(summary: dict[str, Any], runs: list[Run], evals: list[EvalResult],
          plots: dict[str, list[tuple[str, str]]], tables: list[dict[str, Any]]) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>rlhf report</title><style>{_CSS}</style></head><body>",
           "<h1>rlhf report</h1>",
           f'<p class="muted">Generated {_e(summary["generated_at"])} from {len(runs)} run(s), {len(evals)} '
           f'eval result(s) and {len(summary["inputs"]["samples"])} samples file(s).</p>']

    out.append("<h2>Summary</h2>")
    if summary["summary"]:
        out.append("<table><tr><th>Metric</th><th>Value</th><th>Source</th><th>Key</th></tr>")
        for row in summary["summary"]:
            out.append(f'<tr><td>{_e(row["label"])}</td><td class="num">{_e(_fmt(row["value"]))}</td>'
                       f'<td>{_e(row["source"])}</td><td><code>{_e(row["metric"])}</code></td></tr>')
        out.append("</table>")
    else:
        out.append('<p class="muted">No final metrics found.</p>')

    if summary["independent_checks"]:
        out.append("<h3>Reward model against an independent check</h3>"
                   '<p class="muted">A reward model rewards whatever separated its training pairs; a rule-based '
                   "reward_fn scoring the same answers says whether the gain it reports shows outside it.</p>")
        out.append("<table><tr><th>Eval</th><th>Model vs reference</th><th>Win rate (reward model)</th>"
                   "<th>Reward: model / reference</th><th>Independent check: model / reference</th>"
                   "<th>Reward vs length (Spearman)</th><th>Verdict</th></tr>")
        pair = lambda a, b: f"{_fmt_or_dash(a)} / {_fmt_or_dash(b)}"  # noqa: E731
        for c in summary["independent_checks"]:
            names = f"{Path(c['model'] or 'model').name} vs {Path(c['reference'] or 'reference').name}"
            out.append(f"<tr><td>{_e(c['eval'])}</td><td>{_e(names)}</td>"
                       f'<td class="num">{_e(_fmt(c["win_rate"]))}</td>'
                       f'<td class="num">{_e(pair(c["reward"], c["reference_reward"]))}</td>'
                       f'<td class="num">{_e(pair(c["reward_fn"], c["reference_reward_fn"]))}</td>'
                       f'<td class="num">{_e(_fmt_or_dash(c["reward_length_corr"]))}</td>'
                       f"<td>{_e(c['verdict'])}</td></tr>")
        out.append("</table>")

    if runs:
        out.append("<h2>Runs</h2><table><tr><th>Run</th><th>Stage</th><th>Status</th><th>Base model</th>"
                   "<th>Parent run</th><th>Duration</th><th>Logged records</th></tr>")
        for r in summary["runs"]:
            out.append(f"<tr><td>{_e(r['name'])}</td><td>{_e(r['stage'])}</td><td>{_status(r['status'])}</td>"
                       f"<td>{_e(r['base_model'] or '')}</td><td>{_e(r['parent_run'] or '')}</td>"
                       f"<td>{_e(_fmt_duration(r['duration_s']))}</td><td>{r['logged_records']}</td></tr>")
        out.append("</table>")

    for table in tables:
        out.append(f"<h2>{_e(table['title'])}</h2>")
        shared = "shared " if len(table["columns"]) > 1 else ""
        out.append(f'<p class="muted">{len(table["rows"])} of {table["shared_prompts"]} {shared}prompt(s) shown.</p>')
        if not table["rows"]:
            continue
        width = 100 // (len(table["columns"]) + 1)
        out.append('<table class="sbs"><tr>' + f'<th style="width:{width}%">Prompt</th>'
                   + "".join(f"<th>{_e(c)}</th>" for c in table["columns"]) + "</tr>")
        for row in table["rows"]:
            cells = "".join(_answer_cell(a) for a in row["answers"])
            out.append(f'<tr><td class="prompt">{_e(row["prompt"])}</td>{cells}</tr>')
        out.append("</table>")

    for e in evals:
        meta = ", ".join(f"{k}: {_e(e.model_path(k))}" for k in ("model", "reference") if e.model_path(k))
        out.append(f"<h2>Eval: {_e(e.name)}</h2><p class='muted'>{meta}</p>")
        out.append(_metrics_table(e.metrics))

    for run in runs:
        out.append(f"<h2>{_e(run.name)} <span class='muted'>({_e(run.stage)})</span> "
                   f"{_status(run.manifest.get('status'))}</h2>")
        out.append(f"<p class='muted'>{_e(run.path)}</p>")
        if not plots.get(run.name):
            out.append("<p class='muted'>No curves: metrics.jsonl holds fewer than 2 points of any metric.</p>")
        for name, caption in plots.get(run.name, []):
            out.append(f'<figure><img src="{_e(name)}" alt="{_e(caption)}"></figure>')
        if run.final:
            out.append("<details open><summary>Final metrics (run.json)</summary>" + _metrics_table(run.final)
                       + "</details>")
        if run.manifest.get("recipe"):
            recipe = json.dumps(run.manifest["recipe"], indent=2, default=str)
            out.append(f"<details><summary>Recipe</summary><pre>{_e(recipe)}</pre></details>")
    out.append("</body></html>\n")
    return "\n".join(out)


def _status(status: Any) -> str:
    cls = "completed" if status == "completed" else "other"
    return f'<span class="status {cls}">{_e(status or "unknown")}</span>'


def _answer_cell(answer: dict[str, Any] | None) -> str:
    if answer is None:
        return '<td class="muted">(no answer)</td>'
    text = answer["response"]
    if len(text) > MAX_RESPONSE_CHARS:
        text = text[:MAX_RESPONSE_CHARS] + f" … [{len(answer['response']) - MAX_RESPONSE_CHARS} more characters]"
    extras = " · ".join(f"{k} {_fmt(v)}" for k, v in answer.items() if k != "response")
    return f"<td>{_e(text)}" + (f'<span class="score">{_e(extras)}</span>' if extras else "") + "</td>"


def _metrics_table(metrics: dict[str, Any]) -> str:
    rows = "".join(f'<tr><td><code>{_e(k)}</code></td><td class="num">{_e(_fmt(v))}</td></tr>'
                   for k, v in _flatten(metrics).items())
    return f"<table><tr><th>Metric</th><th>Value</th></tr>{rows}</table>"


def _fmt_or_dash(value: Any) -> str:
    return "–" if value is None else _fmt(value)


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, s = divmod(int(round(seconds)), 60)
    h, m = divmod(minutes, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"
