"""The before/after report: a PNG of metrics and the training loss, and one self-contained HTML page around it."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jinja2
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tunelab.layout import RunLayout
from tunelab.metrics import LOWER_IS_BETTER, is_timing

PANEL_WIDTH_IN = 4.0
PANEL_HEIGHT_IN = 3.2
DPI = 110
MISSING = "—"
BEFORE_COLOR = "#9aa5b1"
AFTER_COLOR = "#2b7bba"


@dataclass(frozen=True)
class Sample:
    prompt: str
    reference: str
    before: str
    after: str | None


@dataclass(frozen=True)
class ReportPaths:
    html: Path
    png: Path


@dataclass(frozen=True)
class MetricRow:
    name: str
    before: str
    after: str
    change: str
    verdict: str  # "better", "worse", "unchanged", or "" when there is nothing to compare


def write_report(
    out_dir: Path,
    *,
    title: str,
    before: dict[str, float],
    after: dict[str, float] | None,
    history: list[dict[str, float]],
    samples: list[Sample],
    info: dict[str, str],
    lower_is_better: frozenset[str] = LOWER_IS_BETTER,
    figures: dict[str, bytes] | None = None,
    benchmarks: Sequence[str] = (),
) -> ReportPaths:
    """`lower_is_better`: the metrics that improve by going down (default: as declared in tunelab.metrics).
    `figures`: further PNG pictures (title -> bytes), e.g. confusion matrices, embedded after the main one.
    `benchmarks`: metrics drawn together in one grouped before/after bar chart (lm-eval benchmarks)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = render_png(before, after, history, benchmarks)
    layout = RunLayout(out_dir)
    paths = ReportPaths(html=layout.report_html, png=layout.report_png)
    paths.png.write_bytes(png)
    page = _TEMPLATE.render(
        title=title,
        info=info,
        metrics=metric_rows(before, after, lower_is_better),
        has_after=after is not None,
        png_b64=base64.b64encode(png).decode("ascii"),
        png_alt=_png_alt(benchmarks),
        figures={k: base64.b64encode(v).decode("ascii") for k, v in (figures or {}).items()},
        samples=samples,
        missing=MISSING,
    )
    paths.html.write_text(page, encoding="utf-8")
    return paths


def fmt(value: float | None) -> str:
    """Four significant digits; the placeholder when there is no value."""
    return MISSING if value is None else f"{value:.4g}"


def metric_names(before: dict[str, float], after: dict[str, float] | None) -> list[str]:
    return list(dict.fromkeys([*before, *(after or {})]))


def metric_rows(
    before: dict[str, float], after: dict[str, float] | None, lower_is_better: frozenset[str]
) -> list[MetricRow]:
    rows = []
    for name in metric_names(before, after):
        old, new = before.get(name), (after or {}).get(name)
        change, verdict = compare(old, new, name in lower_is_better)
        rows.append(MetricRow(name, fmt(old), fmt(new), change, verdict))
    return rows


def compare(old: float | None, new: float | None, lower_better: bool) -> tuple[str, str]:
    """The change text (arrow and relative change) and its verdict."""
    if old is None or new is None or not (math.isfinite(old) and math.isfinite(new)):
        return MISSING, ""
    diff = new - old
    if diff == 0:
        return "→ 0%", "unchanged"
    arrow = "↑" if diff > 0 else "↓"
    # A relative change from zero is meaningless; show the absolute one instead.
    amount = f"{diff / abs(old):+.1%}" if old != 0 else f"{diff:+.4g}"
    improved = diff < 0 if lower_better else diff > 0
    return f"{arrow} {amount}", "better" if improved else "worse"


def _png_alt(benchmarks: Sequence[str]) -> str:
    grouped = f"; benchmarks before and after: {', '.join(benchmarks)}" if benchmarks else ""
    return f"metrics before and after training, and the training loss{grouped}"


def render_png(
    before: dict[str, float],
    after: dict[str, float] | None,
    history: list[dict[str, float]],
    benchmarks: Sequence[str] = (),
) -> bytes:
    shown = [n for n in metric_names(before, after) if not is_timing(n)]  # times stay in the HTML table
    names = [n for n in shown if n not in benchmarks]
    grouped = [n for n in shown if n in benchmarks]
    # The benchmark panel is as wide as a panel per two metrics, so its bars stay as wide as the others.
    widths = [1.0] * len(names) + ([max(1.0, len(grouped) / 2)] if grouped else []) + [1.0]
    fig = Figure(figsize=(PANEL_WIDTH_IN * sum(widths), PANEL_HEIGHT_IN), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(widths), squeeze=False, gridspec_kw={"width_ratios": widths})[0]
    for ax, name in zip(axes, names, strict=False):
        _bar_panel(ax, name, before.get(name), after.get(name) if after is not None else None, after is not None)
    if grouped:
        _grouped_panel(axes[len(names)], grouped, before, after)
    _loss_panel(axes[-1], history)
    return _png(fig)


def benchmark_png(
    before: dict[str, float], after: dict[str, float], names: Sequence[str], title: str = "benchmarks"
) -> bytes:
    """The benchmark chart alone (one before/after bar pair per metric), e.g. for a README or a model card."""
    fig = Figure(figsize=(PANEL_WIDTH_IN * max(1.5, len(names) / 2), PANEL_HEIGHT_IN), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    _grouped_panel(ax, list(names), before, after)
    ax.set_title(title)
    return _png(fig)


def _png(fig: Figure) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


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
    ax.margins(y=0.15)


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
        ax.bar_label(drawn, labels=[fmt(v) for v in ys], padding=2, fontsize=8)
    ax.set_xticks(range(len(names)), [n.replace("/", "\n", 1) for n in names], fontsize=8)
    ax.set_title("benchmarks")
    ax.legend(loc="best", fontsize=8)
    ax.margins(y=0.15)


def _loss_panel(ax: Axes, history: list[dict[str, float]]) -> None:
    points = [(row["step"], row["loss"]) for row in history if "step" in row and "loss" in row]
    ax.set_title("training loss")
    if not points:
        _empty(ax, "no training steps")
        return
    steps, losses = zip(*points, strict=True)
    ax.plot(steps, losses, color=AFTER_COLOR, marker="o" if len(points) <= 30 else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)


def _empty(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#52606d")
    ax.set_xticks([])
    ax.set_yticks([])


_TEMPLATE = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(
    """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #1f2933; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #d9e2ec; padding: 0.35em 0.7em; text-align: left; vertical-align: top; }
th { background: #f0f4f8; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.better { color: #1b7f3b; font-weight: 600; }
.worse { color: #c62828; font-weight: 600; }
.missing { color: #9aa5b1; }
table.samples { table-layout: fixed; width: 100%; }
table.samples td { white-space: pre-wrap; word-wrap: break-word; font-family: ui-monospace, monospace;
                   font-size: 0.9em; }
img { max-width: 100%; }
</style>
</head>
<body>
<h1>{{ title }}</h1>

<h2>Run</h2>
<table class="info">
{% for key, value in info.items() %}<tr><th>{{ key }}</th><td>{{ value }}</td></tr>
{% endfor %}</table>

<h2>Metrics</h2>
{% if metrics %}<table class="metrics">
<tr><th>metric</th><th>before</th><th>after</th><th>change</th></tr>
{% for row in metrics %}<tr data-metric="{{ row.name }}"><td>{{ row.name }}</td><td class="num">{{ row.before }}</td>\
<td class="num">{{ row.after }}</td>\
<td class="change {{ row.verdict }}">{{ row.change }}{% if row.verdict %} ({{ row.verdict }}){% endif %}</td></tr>
{% endfor %}</table>
{% else %}<p class="missing">no metrics (evaluation was disabled)</p>
{% endif %}{% if not has_after %}<p class="missing">no values after training</p>
{% endif %}
<img alt="{{ png_alt }}" src="data:image/png;base64,{{ png_b64 }}">
{% for name, data in figures.items() %}<h2>{{ name }}</h2>
<img alt="{{ name }}" src="data:image/png;base64,{{ data }}">
{% endfor %}
<h2>Samples</h2>
{% if samples %}<table class="samples">
<tr><th>prompt</th><th>reference</th><th>before</th><th>after</th></tr>
{% for s in samples %}<tr><td>{{ s.prompt }}</td><td>{{ s.reference }}</td><td>{{ s.before }}</td>\
{% if s.after is none %}<td class="missing">{{ missing }}</td>{% else %}<td>{{ s.after }}</td>{% endif %}</tr>
{% endfor %}</table>
{% else %}<p class="missing">no samples</p>
{% endif %}</body>
</html>
"""
)


def confusion_png(labels: list[str], matrices: dict[str, list[list[int]]]) -> bytes:
    """Confusion matrices side by side (e.g. before / after): rows are gold labels, columns predictions, the last
    column answers that were no label."""
    fig = Figure(figsize=(4.2 * len(matrices), 3.6))
    FigureCanvasAgg(fig)
    columns = [*labels, "(other)"]
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
                ax.text(col, row, str(value), ha="center", va="center", fontsize=9)
    return _png(fig)
