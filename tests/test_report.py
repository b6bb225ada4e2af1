"""The before/after report: PNG and self-contained HTML, verdicts, escaping, and the no-after case."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import matplotlib.image
import pytest

from tunelab.report import Sample, compare, write_report

LOWER = frozenset({"loss", "perplexity"})
HISTORY = [
    {
        "step": s,
        "loss": 3.0 - 0.2 * s,
        "lr": 1e-3,
        "grad_norm": 1.0,
        "tokens": 64 * s,
        "tokens_per_s": 500.0,
        "elapsed_s": 0.1 * s,
    }
    for s in range(1, 9)
]


def _row(html: str, metric: str) -> str:
    found = re.search(rf'<tr data-metric="{metric}">.*?</tr>', html, re.DOTALL)
    assert found, f"no row for {metric}"
    return found.group(0)


def _write(tmp_path: Path, **overrides: object) -> tuple[str, Path]:
    kwargs: dict[str, object] = {
        "title": "tunelab: lora on chat",
        "before": {"loss": 2.5, "accuracy": 0.5},
        "after": {"loss": 1.25, "accuracy": 0.4},
        "history": HISTORY,
        "samples": [Sample("What is 2+2?", "4", "five", "4")],
        "info": {"model": "tiny-llama", "steps": "8"},
        "lower_is_better": LOWER,
    }
    kwargs.update(overrides)
    paths = write_report(tmp_path, **kwargs)  # type: ignore[arg-type]
    assert paths.html == tmp_path / "report.html" and paths.png == tmp_path / "report.png"
    assert paths.html.is_file() and paths.png.is_file()
    return paths.html.read_text(encoding="utf-8"), paths.png


def test_writes_png_and_html_with_metrics_and_verdicts(tmp_path: Path) -> None:
    html, png = _write(tmp_path)

    image = matplotlib.image.imread(png)
    height, width = image.shape[:2]
    assert 200 < height < 1000 and width > 2 * height  # three panels side by side

    b64 = base64.b64encode(png.read_bytes()).decode("ascii")
    assert f'src="data:image/png;base64,{b64}"' in html

    loss = _row(html, "loss")
    assert ">2.5<" in loss and ">1.25<" in loss and "↓ -50.0%" in loss
    assert 'class="change better"' in loss and "(better)" in loss
    accuracy = _row(html, "accuracy")
    assert ">0.5<" in accuracy and ">0.4<" in accuracy and "↓ -20.0%" in accuracy
    assert 'class="change worse"' in accuracy and "(worse)" in accuracy

    assert "<h1>tunelab: lora on chat</h1>" in html
    assert "<th>model</th><td>tiny-llama</td>" in html
    assert "What is 2+2?" in html and "five" in html
    assert "white-space: pre-wrap" in html
    assert "http://" not in html and "https://" not in html  # nothing external to fetch


def test_user_text_is_escaped(tmp_path: Path) -> None:
    attack = "<script>alert(1)</script>"
    html, _ = _write(
        tmp_path,
        title=f"run {attack}",
        samples=[Sample(f"say {attack}", "ok & done", attack, "line one\n  line two")],
        info={"model": attack},
    )
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "ok &amp; done" in html
    assert "line one\n  line two" in html  # whitespace kept for pre-wrap


def test_after_none_and_empty_history(tmp_path: Path) -> None:
    html, png = _write(
        tmp_path, after=None, history=[], samples=[Sample("p", "r", "b", None)], lower_is_better=frozenset()
    )
    assert matplotlib.image.imread(png).ndim == 3
    loss = _row(html, "loss")
    assert ">2.5<" in loss and loss.count("—") == 2  # no after value, no change
    assert "(better)" not in html and "(worse)" not in html
    assert "no values after training" in html
    assert '<td class="missing">—</td>' in html  # the sample's missing after-generation


def test_no_metrics_at_all(tmp_path: Path) -> None:
    html, png = _write(tmp_path, before={}, after=None, history=[], samples=[])
    assert matplotlib.image.imread(png).shape[1] > 0
    assert "no metrics" in html and "no samples" in html


@pytest.mark.parametrize(
    ("old", "new", "lower_better", "expected"),
    [
        (2.0, 1.0, True, ("↓ -50.0%", "better")),
        (2.0, 1.0, False, ("↓ -50.0%", "worse")),
        (0.5, 0.75, False, ("↑ +50.0%", "better")),
        (0.5, 0.75, True, ("↑ +50.0%", "worse")),
        (1.0, 1.0, True, ("→ 0%", "unchanged")),
        (0.0, 0.25, False, ("↑ +0.25", "better")),
        (1.0, None, True, ("—", "")),
        (float("nan"), 1.0, True, ("—", "")),
    ],
)
def test_compare(old: float, new: float | None, lower_better: bool, expected: tuple[str, str]) -> None:
    assert compare(old, new, lower_better) == expected


def test_evaluation_times_are_in_the_table_not_the_picture(tmp_path: Path) -> None:
    """Times are not results: a panel for eval_seconds would widen the picture by one panel."""
    _, plain = _write(tmp_path / "plain")
    timed = {"before": {"loss": 2.5, "accuracy": 0.5, "eval_seconds": 3.0}, "after": {"loss": 1.25, "accuracy": 0.4}}
    html, png = _write(tmp_path / "timed", **timed)
    assert matplotlib.image.imread(png).shape == matplotlib.image.imread(plain).shape
    assert ">3<" in _row(html, "eval_seconds")


def test_benchmark_chart_alone(tmp_path: Path) -> None:
    from tunelab.report import benchmark_png

    names = ["truthfulqa_mc1/acc", "truthfulqa_mc2/acc"]
    png = tmp_path / "chart.png"
    png.write_bytes(benchmark_png({n: 0.25 for n in names}, {n: 0.3 for n in names}, names))
    height, width = matplotlib.image.imread(png).shape[:2]
    assert 200 < height < 1000 and width >= height
