"""rlhf report: one HTML page with the curves, a summary table and side-by-side answers of a pipeline.

    rlhf report runs/* samples/sft.jsonl samples/ppo.jsonl --output report

Writes report/report.html (self-contained, plots as PNG files next to it) and report/summary.json.
Not a training stage: it reads what the stages wrote and trains nothing, so it lives beside stages/.
This module holds the command's sequence and the output folder's handling; reading the inputs and the
numbers are report/collect.py, the figures report/plots.py, the page report/page.py + report.html.j2.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path

from rlhf_cli.errors import DataError, RecipeError
from rlhf_cli.report import collect, page, plots
from rlhf_cli.result import RunResult, finite

log = logging.getLogger("rlhf")


def report(runs: list[Path], output: Path) -> RunResult:
    output = Path(output)
    found_runs, evals, sample_files = collect.collect(runs, output)
    if not (found_runs or evals or sample_files):
        raise DataError("nothing to report: pass run directories, eval directories or samples .jsonl files")
    mpl = plots.load_matplotlib()

    rows = collect.summary_rows(found_runs, evals)
    stale = collect.stale_inputs(found_runs, evals)
    for line in stale:
        log.warning("%s", line)
    checks = [c for c in map(collect.independent_check, evals) if c is not None]
    tables = collect.side_by_side_tables(sample_files, evals)
    if output.exists() and not output.is_dir():
        raise RecipeError(f"--output {output}: is a file; choose a directory")
    if output.is_dir() and any(output.iterdir()) and not collect.is_report(output):
        raise RecipeError(f"--output {output}: exists and is not a report directory; choose another --output")

    # Built next to the target and moved into place at the end: a failure leaves no half-written report.
    target = output.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        figures: dict[str, list[tuple[str, str]]] = {}
        for i, run in enumerate(found_runs, 1):
            figures[run.name] = plots.plot_run(run, i, tmp, mpl)
        n_plots = sum(len(p) for p in figures.values())
        summary = {
            "generated_at": datetime.now().astimezone().isoformat(timespec="seconds"),
            "inputs": {"runs": [str(r.path) for r in found_runs], "evals": [str(e.path) for e in evals],
                       "samples": [str(p) for p in sample_files]},
            "stale": stale,
            "summary": rows,
            "independent_checks": checks,
            "runs": [collect.run_overview(r) for r in found_runs],
            "evals": [{"name": e.name, "path": str(e.path), "model": e.model_path("model"),
                       "reference": e.model_path("reference"), "metrics": e.metrics} for e in evals],
            "side_by_side": tables,
            "plots": [name for p in figures.values() for name, _ in p],
        }
        # Inputs may hold NaN (a run's final metrics, an older eval's sample scores): null keeps it strict JSON.
        (tmp / "summary.json").write_text(json.dumps(finite(summary), indent=2, default=str) + "\n", encoding="utf-8")
        html = page.render(summary, found_runs, evals, figures, tables)
        (tmp / "report.html").write_text(html, encoding="utf-8")
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
        metrics=collect.flat_metrics(rows),
        details={"report": str(output / "report.html"), "plots": n_plots, "runs": len(found_runs),
                 "evals": len(evals), "side_by_side_rows": sum(len(t["rows"]) for t in tables), "stale": len(stale)},
    )


def _replace_dir(new: Path, target: Path) -> None:
    """Move the finished report into place; the old one is removed only after the new one is there. What
    else its folder holds (a samples file saved beside the report, notes) moves into the new one: only the
    report's own files are replaced."""
    if not target.exists():
        os.replace(new, target)
        return
    others = [p.name for p in target.iterdir() if p.name not in _own_files(target)]
    clash = [name for name in others if (new / name).exists()]
    if clash:
        raise RecipeError(f"--output {target}: holds {clash[0]}, which the report would write over; move it or choose another --output")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    os.replace(new, target)
    for name in others:
        os.replace(old / name, target / name)
    shutil.rmtree(old, ignore_errors=True)


def _own_files(report_dir: Path) -> set[str]:
    """The files an earlier report wrote: its page, its summary and the figures that summary lists."""
    own = {"report.html", "summary.json"}
    try:
        plotted = json.loads((report_dir / "summary.json").read_text(encoding="utf-8")).get("plots")
    except (OSError, ValueError, AttributeError):
        return own
    return own | {name for name in plotted if isinstance(name, str)} if isinstance(plotted, list) else own

