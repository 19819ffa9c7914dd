"""What `rlhf report` reads and derives from it: inputs, summary rows, the independent check, side by side.

Inputs, in any order: run directories (run.json + metrics.jsonl, any stage), eval directories
(eval.json written by `rlhf eval --output-dir`), and generation samples (`rlhf generate` JSONL files).
Metric names still vary between stages, so the summary looks up the keys listed in SUMMARY_KEYS, falling
back to a run's final metrics. Everything here is plain data; the figures live in report/plots.py, the
page in report/page.py and report.html.j2.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rlhf_cli.core.data import decode_utf8
from rlhf_cli.errors import DataError
from rlhf_cli.runs import changed_inputs, read_manifest

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
MAX_SIDE_BY_SIDE = 8  # prompts shown per side-by-side table


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
        value = number(self.final.get(key))
        if value is not None:
            return value
        for record in reversed(self.records):
            value = number(record.get(key))
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
        return flatten(self.data.get("metrics") if isinstance(self.data.get("metrics"), dict) else {})

    def model_path(self, role: str) -> str | None:
        """recipe.model.path / recipe.reference.path of the eval (see stages/eval.py)."""
        spec = (self.data.get("recipe") or {}).get(role)
        return spec.get("path") if isinstance(spec, dict) else None


@dataclass
class Column:
    """Answers of one model (one samples file, or one side of an eval): prompt -> answer."""

    title: str
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)


# --------------------------------------------------------------------------- inputs


def collect(paths: list[Path], output: Path) -> tuple[list[Run], list[EvalResult], list[Path]]:
    """Sort the command's inputs into runs, evals and samples files; the report's own output is skipped."""
    runs: list[Run] = []
    evals: list[EvalResult] = []
    samples: list[Path] = []
    # A path given twice (`rlhf report runs/sft runs/*`) is read once: a second copy would prefix every
    # one of its metric keys with its name, as if two runs gave them.
    first: dict[Path, Path] = {}
    for p in map(Path, paths):
        first.setdefault(p.resolve(), p)
    paths = list(first.values())
    # An eval.json given as a file is named as its directory would be, so two such files cannot share a name.
    names = _unique_names([p.parent if p.name == "eval.json" and p.is_file() else p for p in map(Path, paths)])
    for path, name in zip(map(Path, paths), names):
        if not path.exists():
            raise DataError(f"{path}: not found (expected a run directory, an eval directory or a samples .jsonl file)")
        if path.resolve() == output.resolve():
            log.info("skipping %s: it is the report output directory", path)
            continue
        if path.is_dir() and is_report(path):  # an earlier report caught by `rlhf report runs/*`
            log.warning("skipping %s: it is a report, not a run", path)
            continue
        if path.is_file():
            if path.name == "eval.json":
                evals.append(EvalResult(name, path.parent, _read_eval(path)))
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


def stale_inputs(runs: list[Run], evals: list[EvalResult]) -> list[str]:
    """One line for each run or eval of the report made from a run that has been trained again (or removed)
    since: its figures belong to weights that are no longer there."""
    lines = [f"{r.path}: {phrase} after this run read it: train {r.path} again for a chain that fits together"
             for r in runs for phrase in changed_inputs(r.manifest)]
    lines += [f"{e.path}: {phrase} after this eval: its figures are of the run before; evaluate again"
              for e in evals for phrase in changed_inputs(e.data)]
    return lines


def is_report(path: Path) -> bool:
    return (path / "report.html").is_file() and (path / "summary.json").is_file() and not (path / "run.json").exists()


def _unique_names(paths: list[Path]) -> list[str]:
    """Directory or file names, with as many parent folders added as tell apart two that would clash
    (x/a/sft and y/a/sft): runs, their figures and their metrics are keyed by these names."""
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    depth = [1] * len(parts)
    while True:
        names = ["/".join(pp[-d:]).lstrip("/") or "/" for pp, d in zip(parts, depth)]
        clash = [i for i, n in enumerate(names)
                 if depth[i] < len(parts[i]) and any(m == n and parts[j] != parts[i] for j, m in enumerate(names))]
        if not clash:
            return names
        for i in clash:
            depth[i] += 1


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl records; a torn line (a run killed mid-write) is skipped with a warning."""
    if not path.is_file():
        return []
    records = []
    for lineno, line in enumerate(_lines(path.read_text(encoding="utf-8", errors="replace")), 1):
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


def _lines(text: str) -> list[str]:
    """JSONL lines. Not str.splitlines: it also splits at U+2028, U+0085 and the like, which JSON written
    with ensure_ascii=False (as `rlhf generate` writes it) keeps raw inside strings."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _read_eval(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(decode_utf8(path.read_bytes(), str(path)))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: eval.json is not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with a metrics section")
    return data


def _read_samples(path: Path) -> list[dict[str, Any]]:
    rows = []
    for lineno, line in enumerate(_lines(decode_utf8(path.read_bytes(), str(path))), 1):
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


def number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# --------------------------------------------------------------------------- summary


def summary_rows(runs: list[Run], evals: list[EvalResult]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    used: set[tuple[str, str]] = set()  # (source name, metric) already shown
    for row_key, (label, candidates) in SUMMARY_KEYS.items():
        for source, metric in candidates:
            found = [(e.name, number(e.metrics.get(metric))) for e in evals] if source == "eval" else [
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
            if (e.name, metric) not in used and number(value) is not None:
                rows.append({"key": metric, "label": metric, "value": number(value), "source": e.name, "metric": metric})
    # A run that gave no row (a stage the table does not know) shows its final metrics instead.
    for run in runs:
        if not any(row["source"] == run.name for row in rows):
            for metric, value in run.final.items():
                if number(value) is not None:
                    rows.append({"key": metric, "label": f"{metric} ({run.stage})", "value": number(value),
                                 "source": run.name, "metric": metric})
    return rows


def independent_check(e: EvalResult) -> dict[str, Any] | None:
    """The reward model's verdict on a model against its reference, beside the rule-based check's (reward_fn)
    on the same answers: whether an outside judge sees the gain the reward model claims."""
    m = {k: number(v) for k, v in e.metrics.items()}
    if m.get("win_rate") is None:
        return None
    row: dict[str, Any] = {
        "eval": e.name, "model": e.model_path("model"), "reference": e.model_path("reference"),
        **{k: m.get(k) for k in ("win_rate", "reward", "reference_reward", "reward_fn", "reference_reward_fn", "reward_fn_gain_se",
                                 "reward_length_corr", "length")},
    }
    rm_gain = row["reward"] is not None and row["reference_reward"] is not None and row["reward"] > row["reference_reward"]
    if row["reward_fn"] is None or row["reference_reward_fn"] is None:
        row["verdict"] = "no independent check (eval ran without --reward-fn)"
    elif not rm_gain and not row["win_rate"] > 0.5:
        row["verdict"] = "the reward model sees no gain"
    elif "reward_fn_gain_se" in e.metrics and m["reward_fn_gain_se"] is None:
        # Recorded but undefined (null: NaN under 2 prompts): one prompt's difference says nothing either way.
        row["verdict"] = (f"inconclusive: the independent check differs by {row['reward_fn'] - row['reference_reward_fn']:+.3g} "
                          "on fewer than 2 prompts, too few for a standard error")
    elif (se := m.get("reward_fn_gain_se")) is not None and abs(row["reward_fn"] - row["reference_reward_fn"]) <= 2 * se:
        # Older eval.json files lack the error: they keep the plain comparison below.
        row["verdict"] = (f"inconclusive: the independent check differs by {row['reward_fn'] - row['reference_reward_fn']:+.3g}, "
                          f"within two standard errors ({2 * se:.3g}) of its difference on these prompts")
    elif row["reward_fn"] > row["reference_reward_fn"]:
        row["verdict"] = "confirmed: the independent check also scores the model higher"
    else:
        row["verdict"] = "not confirmed: the independent check scores the model no higher than the reference"
    return row


def flat_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Summary rows as one flat dict; a key that several sources give is prefixed by the source."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["key"]] = counts.get(row["key"], 0) + 1
    return {row["key"] if counts[row["key"]] == 1 else f"{row['source']}/{row['key']}": row["value"] for row in rows}


def run_overview(run: Run) -> dict[str, Any]:
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


# --------------------------------------------------------------------------- side by side


def _prompt_text(prompt: Any) -> str:
    """A prompt as its side-by-side row shows it, and the key its answers are matched on: a lone user turn
    as its text, a longer conversation turn by turn (two prompts that differ only in their system turn
    are two rows, not one whose second answer is dropped)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt):
        if len(prompt) == 1 and prompt[0].get("role") == "user":
            return prompt[0]["content"]
        return "\n".join(f"{m.get('role')}: {m['content']}" for m in prompt)
    return json.dumps(prompt, ensure_ascii=False)


def side_by_side_tables(sample_files: list[Path], evals: list[EvalResult]) -> list[dict[str, Any]]:
    """One table for the samples files (a column each), one per eval directory with samples."""
    groups: list[tuple[str, list[Column]]] = []
    if sample_files:
        titles = _unique_names(sample_files)
        columns = []
        for path, title in zip(sample_files, titles):
            column = Column(title)
            for row in _read_samples(path):
                # With several samples per prompt the first stands for the model, or the one best-of chose
                # (`generate --best-of --all` writes every candidate, the chosen one marked "best").
                prompt = _prompt_text(row["prompt"])
                if prompt not in column.answers or row.get("best") is True:
                    column.answers[prompt] = row
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
                                                      "score": s.get("reference_score"),
                                                      "reward_fn": s.get("reference_reward_fn")})
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

