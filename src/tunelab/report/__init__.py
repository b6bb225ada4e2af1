"""The before/after report of a run: `report.png` (the loss during training, the metrics before and after) and
`report.html`, one self-contained page around it (settings, data, samples by role, artefacts, versions).

- `charts`: the pictures; `chat`: prompts back into turns; `page`: the page and what it is built from;
  `run`: those facts read from a run (spec, data, artefacts).
"""

from tunelab.report.charts import (
    DPI,
    FIGURE_WIDTH_IN,
    benchmark_png,
    confusion_png,
    fmt,
    metric_names,
    panels,
    render_png,
    smoothed,
)
from tunelab.report.chat import Turn, prompt_turns
from tunelab.report.page import (
    MISSING,
    MetricRow,
    ReportPaths,
    RunDetails,
    Sample,
    compare,
    metric_rows,
    versions,
    write_report,
)

__all__ = [
    "DPI",
    "FIGURE_WIDTH_IN",
    "MISSING",
    "MetricRow",
    "ReportPaths",
    "RunDetails",
    "Sample",
    "Turn",
    "benchmark_png",
    "compare",
    "confusion_png",
    "fmt",
    "metric_names",
    "metric_rows",
    "panels",
    "prompt_turns",
    "render_png",
    "smoothed",
    "versions",
    "write_report",
]
