"""`tunelab bench`: the technique table, measured on this machine.

Every method trains on the same data, for the same steps, with the same batch and sequence length, each in its own
`tunelab train` process: peak RSS is a per-process high-water mark that never goes down, so methods sharing a
process would inherit each other's peaks. The numbers are read back from what the run wrote (summary.json,
metrics.jsonl, adapter/) and from the kernel's accounting of the finished process (wait4).
"""

from __future__ import annotations

import difflib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from tunelab.errors import TunelabError
from tunelab.layout import RunLayout
from tunelab.train.progress import is_step_row

DEFAULT_METHODS = ("lora", "dora", "rslora", "qlora", "ia3", "prompt_tuning", "prefix_tuning", "full")
ZERO_ROWS = ("zero1", "zero2", "zero3")  # LoRA under each DeepSpeed ZeRO stage, with --nproc processes
MiB = 2**20
WEIGHT_SUFFIXES = (".safetensors", ".bin")
POLL_S = 0.5
_LOG_LINE = re.compile(r"^[EWIF]\d{4} \d\d:")  # torch's glog-style lines (E1125 14:37:01 ...)
BEFORE_COLOR = "#9aa5b1"  # the report's before/after colours, so the pictures read alike
AFTER_COLOR = "#2b7bba"
FAILED_COLOR = "#c62828"
ZERO_COLOR = "#7b61a8"  # rows launched in several processes


@dataclass(frozen=True)
class BenchSettings:
    out_dir: Path
    data_dir: Path
    rows: tuple[str, ...]
    model: str = "embedded"
    steps: int = 10
    nproc: int = 1
    batch: int = 4
    seq_len: int = 256
    lr: float = 2e-4
    eval_examples: int = 32


@dataclass(frozen=True)
class BenchRow:
    name: str  # the method, or zero1/zero2/zero3 (LoRA under that ZeRO stage)
    method: str
    strategy: str
    processes: int
    status: str  # "ok" or "failed: <last error line>"
    wall_s: float
    trainable_params: int | None = None
    total_params: int | None = None
    adapter_bytes: int | None = None
    peak_rss_bytes: int | None = None
    tokens_per_s: float | None = None
    loss_before: float | None = None
    loss_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class BenchResult:
    rows: list[BenchRow]
    markdown: str
    table: Path
    json: Path
    chart: Path


@dataclass(frozen=True)
class ChildRun:
    """A finished child process: its exit code, its (and its descendants') peak RSS, its wall time."""

    returncode: int
    peak_rss_bytes: int
    wall_s: float


# --- choosing the rows ---------------------------------------------------------------------------------------------


def bench_rows(methods: str | None, nproc: int) -> tuple[str, ...]:
    """The rows to measure: the given methods (default: the technique table's), plus the ZeRO rows under --nproc.

    Naming a zeroN row in --methods picks the ZeRO rows by hand; otherwise all three are added when nproc > 1.
    """
    from tunelab.methods import method_names

    names = [n.strip() for n in methods.split(",") if n.strip()] if methods else list(DEFAULT_METHODS)
    valid = [*method_names(), *ZERO_ROWS]
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise TunelabError(_unknown_message(unknown, valid))
    if nproc < 2 and any(n in ZERO_ROWS for n in names):
        raise TunelabError("--methods: zero1/zero2/zero3 rows need --nproc 2 or more (they launch that many processes)")
    if nproc > 1 and not any(n in ZERO_ROWS for n in names):
        names += ZERO_ROWS
    _require_extras(names)
    return tuple(dict.fromkeys(names))  # a name given twice is measured once


def _require_extras(rows: list[str]) -> None:
    """A row whose optional packages are missing fails now, not after the rows before it have run."""
    from tunelab.extras import require

    for row in rows:
        extra = "deepspeed" if row in ZERO_ROWS else "qlora" if row == "qlora" else None
        if extra is not None:
            require(extra, f"the bench's {row} row (--methods without it leaves it out)")


def _unknown_message(unknown: list[str], valid: list[str]) -> str:
    if not unknown:
        return f"--methods: no method given; valid: {', '.join(valid)}"
    hints = [f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(n, valid, n=1)) else "" for n in unknown]
    listed = ", ".join(f"{name!r}{hint}" for name, hint in zip(unknown, hints, strict=True))
    return f"--methods: unknown method(s) {listed}; valid: {', '.join(valid)} (zero rows need --nproc > 1)"


def bundled_chat_data() -> Path:
    """The repository's chat data (data/chat), next to src/ in a source checkout."""
    return Path(__file__).resolve().parents[2] / "data" / "chat"


# --- running -------------------------------------------------------------------------------------------------------


def run_bench(settings: BenchSettings, console: Console) -> BenchResult:
    """Measure every row, one process (or one launch) each, then write bench.md, bench.json and bench.png."""
    _check_data(settings.data_dir)
    specs = _write_specs(settings)
    if settings.nproc > 1 and any(r in ZERO_ROWS for r in settings.rows):
        _prebuild_deepspeed(console)
    rows: list[BenchRow] = []
    try:
        with _progress(console) as progress:
            for index, (name, spec_path) in enumerate(specs.items(), start=1):
                task = progress.add_task(f"{name} ({index}/{len(specs)})", status="starting")
                rows.append(_measure(name, spec_path, settings, _status_of(progress, task)))
                progress.remove_task(task)
                console.print(_row_line(rows[-1]), markup=False, highlight=False)
    except KeyboardInterrupt:
        # The rows measured so far are worth keeping.
        result = _write_outputs(settings, rows)
        raise TunelabError(f"interrupted after {len(rows)} of {len(specs)} rows; those are in {result.table}") from None
    return _write_outputs(settings, rows)


def _check_data(folder: Path) -> None:
    missing = [name for name in ("train.jsonl", "validation.jsonl") if not (folder / name).is_file()]
    if missing:
        raise TunelabError(f"--data: {', '.join(missing)} not found in {folder} (chat JSONL, OpenAI format)")


def _write_specs(settings: BenchSettings) -> dict[str, Path]:
    """One job spec per row, validated before anything runs so a bad setting fails at once, not after an hour."""
    from tunelab.config import load_spec

    folder = settings.out_dir / "specs"
    folder.mkdir(parents=True, exist_ok=True)
    specs = {}
    for name in settings.rows:
        raw = bench_spec(settings, name)
        load_spec(None, base=raw)
        specs[name] = folder / f"{name}.yaml"
        specs[name].write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return specs


def bench_spec(settings: BenchSettings, name: str) -> dict[str, Any]:
    """The job spec of one row: only the method (or the ZeRO stage) differs between rows."""
    zero = name in ZERO_ROWS
    processes = settings.nproc if zero else 1
    if settings.batch % processes:
        raise TunelabError(f"--batch {settings.batch} must be a multiple of --nproc {processes} (same global batch)")
    model = Path(settings.model)
    return {
        "model": {"name": str(model.resolve()) if model.exists() else settings.model},
        "method": {"name": "lora" if zero else name},
        "task": {"scenario": "chat"},
        "data": {
            "train": str(settings.data_dir / "train.jsonl"),
            "validation": str(settings.data_dir / "validation.jsonl"),
        },
        "train": {
            "max_steps": settings.steps,
            "batch_size": settings.batch // processes,  # per process: every row sees the same global batch
            "lr": settings.lr,
            "max_seq_len": settings.seq_len,
            # Unpacked for all: prompt/prefix tuning cannot pack, and packing only some methods would give them
            # other batches (more tokens per step) than the rest.
            "packing": False,
            "seed": 0,
        },
        "distributed": {"strategy": name if zero else "none"},
        # Generations off: the bench measures training; the loss is the comparable quality number.
        "eval": {"max_examples": settings.eval_examples, "samples": 0, "generations": 0},
        "output_dir": str(settings.out_dir / "runs" / name),
    }


def _prebuild_deepspeed(console: Console) -> None:
    """Build DeepSpeed's CPU op now (first run only), or its minutes of compiling would count as the row's time."""
    from tunelab.train.distributed import prebuild_deepspeed_ops

    with console.status("building DeepSpeed's CPU communication op (first run only)"):
        prebuild_deepspeed_ops()


def _measure(name: str, spec_path: Path, settings: BenchSettings, on_line: Callable[[str], None]) -> BenchRow:
    run_dir = settings.out_dir / "runs" / name
    # A previous bench's run would be reused: its cached eval_before.json, its metrics.
    shutil.rmtree(run_dir, ignore_errors=True)
    zero = name in ZERO_ROWS
    command = [sys.executable, "-m", "tunelab.cli", "train", str(spec_path)]
    if zero:
        from tunelab.train.distributed import free_port

        command += ["--nproc", str(settings.nproc), "--master-port", str(free_port())]
    log = settings.out_dir / "logs" / f"{name}.log"
    child = run_child(command, log, on_line)
    base = (
        BenchRow(name, "lora", name, settings.nproc, "ok", child.wall_s)
        if zero
        else BenchRow(name, name, "none", 1, "ok", child.wall_s)
    )
    if child.returncode != 0:
        return _failed(base, last_error_line(log.read_text(encoding="utf-8", errors="replace"), child.returncode))
    try:
        row = read_results(base, run_dir, child.peak_rss_bytes)
    except (OSError, KeyError, ValueError, IndexError) as exc:
        return _failed(base, f"{type(exc).__name__}: {exc}")
    _drop_byproducts(run_dir)
    return row


def _failed(base: BenchRow, message: str) -> BenchRow:
    return replace(base, status=f"failed: {message}")


def run_child(command: list[str], log: Path, on_line: Callable[[str], None]) -> ChildRun:
    """Run `command` with its output in `log`; its peak RSS is the largest of it and every process it waited for.

    wait4 gives the finished child's own rusage, where Linux counts the high-water mark of its reaped descendants
    too: under --nproc, the largest of the launcher's workers. getrusage(RUSAGE_CHILDREN) could not tell the rows
    apart, as its maximum covers every child this process ever had.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("wb") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        try:
            status, usage = _wait(proc.pid, lambda: on_line(_tail(log)))
        except BaseException:
            proc.wait()  # Ctrl-C reaches the child too: it saves a checkpoint and exits; do not leave it orphaned
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return ChildRun(proc.returncode, usage.ru_maxrss * scale, time.perf_counter() - started)


def _wait(pid: int, tick: Callable[[], None]) -> tuple[int, Any]:
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return status, usage
        tick()
        time.sleep(POLL_S)


def _tail(log: Path, limit: int = 70) -> str:
    """The child's latest output line (progress bars end lines with \\r), for the live status."""
    with log.open("rb") as f:
        f.seek(max(0, log.stat().st_size - 2048))
        text = f.read().decode("utf-8", errors="replace")
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1][:limit] if lines else ""


def last_error_line(text: str, returncode: int) -> str:
    """The line that says what went wrong: a Python exception, or tunelab's `error:` message (with the problems
    listed under it), searched from the end because a launcher prints its own summary after the worker's error."""
    lines = [line.rstrip() for line in text.splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        line = lines[i].strip()
        if line.startswith("error:"):
            return _shorten(" ".join(" ".join([line, *_continuation(lines[i + 1 :])]).split()))
        head, sep, message = line.partition(": ")
        if sep and message.strip() and head.endswith(("Error", "Exception", "Interrupt")) and " " not in head:
            return _shorten(line)
    return next((line.strip() for line in reversed(lines) if line.strip()), f"exit code {returncode}")


def _continuation(lines: list[str]) -> list[str]:
    """The console wraps tunelab's message and may list problems under it; a launcher's own log lines, its
    ====== summary box or a blank line end it."""
    taken = []
    for line in lines:
        if not line.strip() or line.startswith(("=", "[", "Traceback")) or _LOG_LINE.match(line):
            break
        taken.append(line)
    return taken


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def read_results(base: BenchRow, run_dir: Path, peak_rss_bytes: int) -> BenchRow:
    """The row's numbers, from the files the run wrote."""
    layout = RunLayout(run_dir)
    summary = json.loads(layout.summary.read_text(encoding="utf-8"))
    lines = layout.metrics.read_text(encoding="utf-8").splitlines()
    metrics = [row for row in map(json.loads, lines) if is_step_row(row)]  # not the evaluation rows
    return replace(
        base,
        trainable_params=int(summary["trainable_params"]),
        total_params=int(summary["total_params"]),
        adapter_bytes=adapter_bytes(layout.adapter),
        peak_rss_bytes=peak_rss_bytes,
        tokens_per_s=steady_tokens_per_s(metrics),
        loss_before=float(summary["before"]["loss"]),
        loss_after=float(summary["after"]["loss"]),
    )


def steady_tokens_per_s(metrics: list[dict[str, float]]) -> float:
    """Training tokens per second of step time, without the first step: it pays one-off costs (thread pools, memory
    allocation; measured 30 s against 4.5 s for the second on the default model) that would swamp a short bench."""
    first, last = metrics[0], metrics[-1]
    if len(metrics) == 1:
        return float(last["tokens_per_s"])
    return float((last["tokens"] - first["tokens"]) / max(last["elapsed_s"] - first["elapsed_s"], 1e-9))


def adapter_bytes(folder: Path) -> int:
    """Bytes of the saved weights: what a method adds on disk. The tokenizer and configs saved beside them are the
    same for every method, and would dwarf a small adapter."""
    files = [p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)]
    if not files:
        raise ValueError(f"no weights file in {folder}")
    return sum(p.stat().st_size for p in files)


def _drop_byproducts(run_dir: Path) -> None:
    """The merged model and the checkpoints are not measured; with full fine-tuning on the default model they are
    gigabytes per row."""
    layout = RunLayout(run_dir)
    for folder in (layout.merged, layout.checkpoints):
        shutil.rmtree(folder, ignore_errors=True)


def _progress(console: Console) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=True,  # finished rows are printed as lines instead
    )


def _status_of(progress: Progress, task: TaskID) -> Callable[[str], None]:
    def update(line: str) -> None:
        progress.update(task, status=escape(line))  # log lines may hold [brackets]

    return update


def _row_line(row: BenchRow) -> str:
    if not row.ok:
        return f"{row.name}: {row.status} ({row.wall_s:.0f} s)"
    return (
        f"{row.name}: {row.wall_s:.0f} s, {row.tokens_per_s:.0f} tokens/s, peak RSS {_mib(row.peak_rss_bytes)} MiB, "
        f"validation loss {row.loss_before:.4f} -> {row.loss_after:.4f}"
    )


# --- outputs -------------------------------------------------------------------------------------------------------


def _write_outputs(settings: BenchSettings, rows: list[BenchRow]) -> BenchResult:
    out = settings.out_dir
    markdown = markdown_table(settings, rows)
    result = BenchResult(rows, markdown, out / "bench.md", out / "bench.json", out / "bench.png")
    result.table.write_text(markdown, encoding="utf-8")
    payload = {"settings": _settings_json(settings), "rows": [asdict(r) for r in rows]}
    result.json.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    result.chart.write_bytes(render_chart(rows, _caption(settings)))
    return result


def _settings_json(settings: BenchSettings) -> dict[str, Any]:
    values = asdict(settings)
    return {
        **{k: str(v) if isinstance(v, Path) else v for k, v in values.items()},
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }


def _caption(settings: BenchSettings) -> str:
    return (
        f"{settings.model}: {settings.steps} steps, batch {settings.batch} x seq {settings.seq_len} (unpacked), "
        f"lr {settings.lr:g}, chat data, validation loss on {settings.eval_examples} examples"
    )


COLUMNS = (
    "method",
    "trainable params",
    "% of model",
    "adapter (MiB)",
    "peak RSS (MiB)",
    "tokens/s",
    "val loss before",
    "val loss after",
    "wall (s)",
)


def markdown_table(settings: BenchSettings, rows: list[BenchRow]) -> str:
    lines = [
        f"{_caption(settings)}; {os.cpu_count()} CPUs. Peak RSS: the whole training process, evaluation and export "
        "included (zero rows: the largest of the launched processes). tokens/s: training tokens per second of step "
        "time, first step left out. Wall: the whole `tunelab train` run.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cells(row: BenchRow) -> list[str]:
    label = row.name if row.strategy == "none" else f"{row.name} (lora, {row.processes} proc)"
    if not row.ok:
        # Pipes would split the cell.
        return [label, row.status.replace("|", "/"), *["—"] * (len(COLUMNS) - 3), f"{row.wall_s:.0f}"]
    share = 100 * (row.trainable_params or 0) / max(row.total_params or 1, 1)
    return [
        label,
        f"{row.trainable_params:,}",
        f"{share:.3g}%",
        f"{(row.adapter_bytes or 0) / MiB:.3g}",
        _mib(row.peak_rss_bytes),
        f"{row.tokens_per_s:.0f}",
        f"{row.loss_before:.4f}",
        f"{row.loss_after:.4f}",
        f"{row.wall_s:.0f}",
    ]


def _mib(value: int | None) -> str:
    return f"{(value or 0) / MiB:.0f}"


# --- the chart -----------------------------------------------------------------------------------------------------


def render_chart(rows: list[BenchRow], caption: str) -> bytes:
    """Four panels, one bar (or arrow) per row, rows in bench order top to bottom; ZeRO rows in their own colour."""
    height = 1.6 + 0.42 * len(rows)
    fig = Figure(figsize=(13, 2 * height + 0.4), dpi=110)
    FigureCanvasAgg(fig)
    (speed, memory), (loss, params) = fig.subplots(2, 2)
    colors = [AFTER_COLOR if r.strategy == "none" else ZERO_COLOR for r in rows]
    speeds = [r.tokens_per_s for r in rows]
    _bars(speed, rows, speeds, [_num(v) for v in speeds], colors, "training tokens/s (higher is better)")
    rss = [r.peak_rss_bytes / MiB if r.peak_rss_bytes else None for r in rows]
    _bars(memory, rows, rss, [_num(v) for v in rss], colors, "peak RSS, MiB (lower is better)")
    _loss_arrows(loss, rows)
    counts = [float(r.trainable_params) if r.trainable_params else None for r in rows]
    sizes = [f"{_num(r.trainable_params)} · {(r.adapter_bytes or 0) / MiB:.3g} MiB" if r.ok else "" for r in rows]
    _bars(params, rows, counts, sizes, colors, "trainable parameters (log scale) · adapter on disk", log=True)
    fig.suptitle(caption, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _num(value: float | None) -> str:
    return f"{value:,.0f}" if value else ""


def _bars(
    ax: Axes,
    rows: list[BenchRow],
    values: list[float | None],
    texts: list[str],
    colors: list[str],
    title: str,
    log: bool = False,
) -> None:
    drawn = [v if v is not None and math.isfinite(v) else 0.0 for v in values]
    bars = ax.barh(range(len(rows)), drawn, color=colors, height=0.6)
    ax.bar_label(bars, labels=texts, padding=3, fontsize=8)
    _rows_axis(ax, rows, title)
    if log and any(drawn):
        ax.set_xscale("log")
    ax.margins(x=0.45 if log else 0.18)  # room for the value labels
    _mark_failed(ax, rows)


def _loss_arrows(ax: Axes, rows: list[BenchRow]) -> None:
    """Before and after as two dots joined by an arrow: the change per method is what matters, and bars from zero
    would make a 2 % drop invisible."""
    labelled = False
    for y, row in enumerate(rows):
        if row.loss_before is None or row.loss_after is None:
            continue
        ax.annotate("", (row.loss_after, y), (row.loss_before, y), arrowprops={"arrowstyle": "->", "color": "#52606d"})
        ax.scatter([row.loss_before], [y], color=BEFORE_COLOR, zorder=3, label=None if labelled else "before")
        ax.scatter([row.loss_after], [y], color=AFTER_COLOR, zorder=3, label=None if labelled else "after")
        labelled = True
        # The value sits beyond the after dot, away from the arrow.
        side = -1 if row.loss_after < row.loss_before else 1
        ax.annotate(f"{row.loss_after:.4f}", (row.loss_after, y), xytext=(7 * side, 0), textcoords="offset points",
                    ha="right" if side < 0 else "left", va="center", fontsize=8)  # fmt: skip
    _rows_axis(ax, rows, "validation loss: before -> after (lower is better)")
    ax.margins(x=0.2)
    if labelled:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, frameon=False)
    _mark_failed(ax, rows)


def _rows_axis(ax: Axes, rows: list[BenchRow], title: str) -> None:
    ax.set_yticks(range(len(rows)), [r.name for r in rows])
    ax.set_ylim(len(rows) - 0.5, -0.5)  # first row on top
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)


def _mark_failed(ax: Axes, rows: list[BenchRow]) -> None:
    transform = ax.get_yaxis_transform()  # x in axes fraction, y in rows
    for y, row in enumerate(rows):
        if not row.ok:
            ax.text(0.02, y, "failed", color=FAILED_COLOR, va="center", transform=transform, fontsize=8)
