"""The figures of `rlhf report`: one PNG per run and metric group, drawn with matplotlib.

Every numeric series in a run's metrics.jsonl is plotted (stages name their metrics differently), grouped
into figures by FIGURE_GROUPS. matplotlib is an extra (`pip install 'rlhf-cli[report]'`), imported only
when a report is drawn. Reading the runs is report/collect.py; placing the images on the page is
report/page.py.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

from rlhf_cli.errors import RecipeError
from rlhf_cli.report.collect import Run, number

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


def load_matplotlib() -> SimpleNamespace:
    """The few matplotlib pieces the figures need (Agg canvas: no display), or the install hint."""
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
        x = number(record.get(x_key)) if x_key else float(index)
        if x is None:
            continue
        for key, value in record.items():
            y = number(value)
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


def plot_run(run: Run, index: int, folder: Path, mpl: SimpleNamespace) -> list[tuple[str, str]]:
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

