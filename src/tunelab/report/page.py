"""The report page: one self-contained HTML file (pictures inline as data: URIs, no external fetch), every text
from a run or a model escaped by the template."""

from __future__ import annotations

import base64
import datetime
import importlib.metadata
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tunelab import __version__
from tunelab.abc_render import RenderedTune, Rendering
from tunelab.layout import RunLayout
from tunelab.metrics import LOWER_IS_BETTER
from tunelab.report.charts import fmt, metric_names, render_png, smoothed
from tunelab.report.chat import Turn, prompt_turns
from tunelab.report.template import TEMPLATE

MISSING = "—"
VERSIONED = ("tunelab", "torch", "transformers", "peft", "accelerate")


@dataclass(frozen=True)
class Sample:
    prompt: str  # as the model saw it (a chat template's text is shown by roles)
    reference: str
    before: str
    after: str | None
    before_score: dict[str, float] = field(default_factory=dict)  # the scenario's metric on this sample alone
    after_score: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RunDetails:
    """What the page tells besides the results: the settings, the data, where the artefacts are and how to load
    them (a few lines of Python), the library versions and the date."""

    hyperparameters: dict[str, str] = field(default_factory=dict)
    data: dict[str, str] = field(default_factory=dict)
    artefacts: dict[str, str] = field(default_factory=dict)  # name -> path
    snippet: str = ""
    versions: dict[str, str] = field(default_factory=lambda: versions())
    date: str = field(default_factory=lambda: today())


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


@dataclass(frozen=True)
class ValidationRow:
    step: int
    loss: str
    training: str  # the smoothed training loss at that step, to compare with
    rows: str


@dataclass(frozen=True)
class SampleView:
    turns: list[Turn]
    reference: str
    before: str
    after: str | None
    before_score: str
    after_score: str


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
    validation: Sequence[dict[str, float]] = (),
    details: RunDetails | None = None,
    music: Rendering | None = None,
) -> ReportPaths:
    """`lower_is_better`: the metrics that improve by going down (default: as declared in tunelab.metrics).
    `figures`: further PNG pictures (title -> bytes), e.g. confusion matrices, embedded after the main one.
    `benchmarks`: metrics drawn together in one grouped before/after bar chart (lm-eval benchmarks).
    `validation`: the validation-loss points measured during training (metrics.jsonl's "validation" rows).
    `details`: hyperparameters, data counts, artefacts; versions and date are filled in when not given.
    `music`: generated ABC tunes rendered as sheet music and MIDI (creative runs), embedded in the page."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = render_png(before, after, history, benchmarks, validation)
    layout = RunLayout(out_dir)
    paths = ReportPaths(html=layout.report_html, png=layout.report_png)
    paths.png.write_bytes(png)
    page = TEMPLATE.render(
        title=title,
        info=info,
        details=details or RunDetails(),
        metrics=metric_rows(before, after, lower_is_better),
        has_after=after is not None,
        png_b64=_b64(png),
        png_alt=_png_alt(benchmarks, bool(validation)),
        validation=validation_rows(history, validation),
        trained=bool(history),  # `tunelab eval` writes the same page without a training run
        figures={k: _b64(v) for k, v in (figures or {}).items()},
        samples=[_view(s) for s in samples],
        missing=MISSING,
        music=[_tune_view(t) for t in (music.tunes if music else [])],
        music_note=music.note if music else "",
    )
    paths.html.write_text(page, encoding="utf-8")
    return paths


def _tune_view(tune: RenderedTune) -> dict[str, str]:
    """A rendered tune for the page: its SVG and MIDI inline (the page stays one self-contained file)."""
    return {"abc": tune.abc, "svg": _b64(tune.svg.read_bytes()), "midi": _b64(tune.midi.read_bytes())}


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


def validation_rows(history: Sequence[dict[str, float]], validation: Sequence[dict[str, float]]) -> list[ValidationRow]:
    """Each validation point beside the smoothed training loss of the same step."""
    steps = [row for row in history if "step" in row and "loss" in row]
    trend = dict(zip((int(r["step"]) for r in steps), smoothed([r["loss"] for r in steps]), strict=True))
    return [
        ValidationRow(int(v["step"]), fmt(v["loss"]), fmt(trend.get(int(v["step"]))), str(int(v.get("rows", 0))))
        for v in validation
    ]


def versions() -> dict[str, str]:
    """The installed versions of tunelab and the libraries that shape its results."""
    found = {"tunelab": __version__}  # the code running, which may not be the installed distribution
    for name in VERSIONED[1:]:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def today() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def scores_text(scores: dict[str, float]) -> str:
    return ", ".join(f"{name} {fmt(value)}" for name, value in scores.items())


def _view(sample: Sample) -> SampleView:
    return SampleView(
        prompt_turns(sample.prompt),
        sample.reference,
        sample.before,
        sample.after,
        scores_text(sample.before_score),
        scores_text(sample.after_score),
    )


def _b64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def _png_alt(benchmarks: Sequence[str], validation: bool) -> str:
    grouped = f"; benchmarks before and after: {', '.join(benchmarks)}" if benchmarks else ""
    points = " with the validation loss during training" if validation else ""
    return f"the training loss (smoothed, raw behind it){points}, and the metrics before and after{grouped}"
