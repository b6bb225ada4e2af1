"""The report's pictures: training and validation loss, the metrics before and after, benchmarks, confusion.

Sized to be read on a 1280 px screen without zooming: one figure FIGURE_WIDTH_IN wide at DPI (shown at its own
size in the page), text at least 12 pt; the loss chart spans the width, the metric panels follow in rows of
COLUMNS.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import matplotlib
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tunelab.metrics import is_timing

FIGURE_WIDTH_IN = 11.0
DPI = 100  # 1100 px wide: the page's width, so the picture is never scaled down
COLUMNS = 4  # metric panels per row
LOSS_HEIGHT_IN = 4.2
ROW_HEIGHT_IN = 3.4
SMOOTHING = 0.6  # exponential moving average weight of the smoothed training loss (TensorBoard's default)
BEFORE_COLOR = "#9aa5b1"
AFTER_COLOR = "#2b7bba"
VALIDATION_COLOR = "#d9730d"
FONTS: dict[str, Any] = {
    "font.size": 12,
    "axes.titlesize": 14,
    "axes.labelsize": 12,
    "xtick.labelsize": 11,
    "ytick.labelsize": 11,
    "legend.fontsize": 11,
}


def fmt(value: float | None, missing: str = "—") -> str:
    """Four significant digits; the placeholder when there is no value."""
    return missing if value is None else f"{value:.4g}"


def metric_names(before: dict[str, float], after: dict[str, float] | None) -> list[str]:
    return list(dict.fromkeys([*before, *(after or {})]))


def panels(before: dict[str, float], after: dict[str, float] | None, benchmarks: Sequence[str] = ()) -> list[str]:
    """The metric panels drawn, in order: one per scenario metric (times stay in the HTML table), then one
    "benchmarks" panel grouping every benchmark metric."""
    shown = [n for n in metric_names(before, after) if not is_timing(n)]
    names = [n for n in shown if n not in benchmarks]
    return names + (["benchmarks"] if any(n in benchmarks for n in shown) else [])


def render_png(
    before: dict[str, float],
    after: dict[str, float] | None,
    history: list[dict[str, float]],
    benchmarks: Sequence[str] = (),
    validation: Sequence[dict[str, float]] = (),
) -> bytes:
    """The loss chart across the top, the metric panels in rows below it."""
    drawn = panels(before, after, benchmarks)
    rows = math.ceil(len(drawn) / COLUMNS)
    with _fonts():
        fig = _figure(LOSS_HEIGHT_IN + rows * ROW_HEIGHT_IN)
        grid = fig.add_gridspec(1 + rows, COLUMNS, height_ratios=[LOSS_HEIGHT_IN] + [ROW_HEIGHT_IN] * rows)
        loss_panel(fig.add_subplot(grid[0, :]), history, validation, before.get("loss"), (after or {}).get("loss"))
        for index, name in enumerate(drawn):
            ax = fig.add_subplot(grid[1 + index // COLUMNS, index % COLUMNS])
            if name == "benchmarks":
                grouped = [n for n in metric_names(before, after) if n in benchmarks and not is_timing(n)]
                _grouped_panel(ax, grouped, before, after)
            else:
                _bar_panel(ax, name, before.get(name), (after or {}).get(name), after is not None)
        return _png(fig)


def benchmark_png(
    before: dict[str, float], after: dict[str, float], names: Sequence[str], title: str = "benchmarks"
) -> bytes:
    """The benchmark chart alone (one before/after bar pair per metric), e.g. for a README or a model card."""
    with _fonts():
        fig = _figure(ROW_HEIGHT_IN + 0.6, width=min(FIGURE_WIDTH_IN, 2.0 + 1.6 * len(names)))
        ax = fig.subplots()
        _grouped_panel(ax, list(names), before, after)
        ax.set_title(title)
        return _png(fig)


def confusion_png(labels: list[str], matrices: dict[str, list[list[int]]]) -> bytes:
    """Confusion matrices side by side (e.g. before / after): rows are gold labels, columns predictions, the last
    column answers that were no label."""
    columns = [*labels, "(other)"]
    with _fonts():
        fig = _figure(4.8, width=min(FIGURE_WIDTH_IN, 5.2 * len(matrices)))
        for index, (name, matrix) in enumerate(matrices.items()):
            ax = fig.add_subplot(1, len(matrices), index + 1)
            ax.imshow(matrix, cmap="Blues")
            ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
            ax.set_yticks(range(len(labels)), labels)
            ax.set_xlabel("predicted")
            ax.set_ylabel("gold")
            ax.set_title(name)
            for row, values in enumerate(matrix):
                for col, value in enumerate(values):
                    ax.text(col, row, str(value), ha="center", va="center")
        return _png(fig)


def smoothed(values: Sequence[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average, debiased so the first points are not pulled towards zero (as TensorBoard)."""
    out, average = [], 0.0
    for count, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**count))
    return out


def loss_panel(
    ax: Axes,
    history: Sequence[dict[str, float]],
    validation: Sequence[dict[str, float]] = (),
    before: float | None = None,
    after: float | None = None,
) -> None:
    """Training loss raw (faint) and smoothed, the validation points measured during training, and the full
    evaluation's loss before and after."""
    points = [(row["step"], row["loss"]) for row in history if "step" in row and "loss" in row]
    ax.set_title("loss")
    if not points:
        _empty(ax, "no training steps")
        return
    steps, losses = zip(*points, strict=True)
    ax.plot(steps, losses, color=AFTER_COLOR, alpha=0.3, linewidth=1, label="training (raw)")
    ax.plot(steps, smoothed(losses), color=AFTER_COLOR, linewidth=2.2, label=f"training (smoothed, EMA {SMOOTHING})")
    if validation:
        xs, ys = [v["step"] for v in validation], [v["loss"] for v in validation]
        rows = int(validation[-1].get("rows", 0))
        label = f"validation ({rows} rows)" if rows else "validation"
        ax.plot(xs, ys, color=VALIDATION_COLOR, marker="o", markersize=6, linewidth=1.8, label=label)
    _evaluation_marks(ax, before, after, steps[-1])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.grid(alpha=0.3)
    ax.legend(loc="best")


def _evaluation_marks(ax: Axes, before: float | None, after: float | None, last: float) -> None:
    marks = [(x, v) for x, v in ((0.0, before), (last, after)) if v is not None and math.isfinite(v)]
    if marks:
        xs, ys = zip(*marks, strict=True)
        label = "full evaluation before / after"
        ax.plot(xs, ys, linestyle="none", marker="D", markersize=8, markerfacecolor="none", label=label)[0].set(
            markeredgecolor=VALIDATION_COLOR, markeredgewidth=2
        )


def _bar_panel(ax: Axes, name: str, old: float | None, new: float | None, has_after: bool) -> None:
    candidates = [("before", old, BEFORE_COLOR)] + ([("after", new, AFTER_COLOR)] if has_after else [])
    # Non-finite values (e.g. an overflowing perplexity) would wreck the axis; they stay in the HTML table.
    bars = [(label, value, color) for label, value, color in candidates if value is not None and math.isfinite(value)]
    ax.set_title(name)
    if not bars:
        _empty(ax, "no finite value")
        return
    labels, values, colors = zip(*bars, strict=True)
    drawn = ax.bar(labels, values, color=colors, width=0.6)
    ax.bar_label(drawn, labels=[fmt(v) for v in values], padding=2)
    ax.set_xlim(-0.75, len(bars) - 0.25)
    ax.margins(y=0.18)


def _grouped_panel(ax: Axes, names: list[str], before: dict[str, float], after: dict[str, float] | None) -> None:
    """Benchmark metrics side by side, a before and an after bar each (like the TruthfulQA MC1/MC2 chart of a
    model card); non-finite or missing values are left out of the picture (the HTML table has them)."""
    series = [("before", before, BEFORE_COLOR)] + ([("after", after, AFTER_COLOR)] if after is not None else [])
    width = 0.8 / len(series)
    for index, (label, values, color) in enumerate(series):
        points = [(i, values[n]) for i, n in enumerate(names) if n in values and math.isfinite(values[n])]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        drawn = ax.bar([x + (index - (len(series) - 1) / 2) * width for x in xs], ys, width, label=label, color=color)
        ax.bar_label(drawn, labels=[fmt(v) for v in ys], padding=2, fontsize=10)
    ax.set_xticks(range(len(names)), [n.replace("/", "\n", 1) for n in names], fontsize=10)
    ax.set_title("benchmarks")
    ax.legend(loc="best")
    ax.margins(y=0.18)


def _empty(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#52606d")
    ax.set_xticks([])
    ax.set_yticks([])


@contextmanager
def _fonts() -> Iterator[None]:
    """Text sizes read at the figure's own size (artists take them from rcParams when created)."""
    with matplotlib.rc_context(FONTS):  # type: ignore[arg-type]  # the keys are rcParams names
        yield


def _figure(height_in: float, width: float = FIGURE_WIDTH_IN) -> Figure:
    fig = Figure(figsize=(width, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()
