"""`tunelab eval`: score any model — a base, base + adapter, or a merged/fully fine-tuned folder — on a spec's
scenario and validation data (or any file: the CLI makes it the spec's validation file), and write the same report
as training does (base = "before", tuned = "after")."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console
from transformers import set_seed

from tunelab.abc_render import render_samples, rendering_line
from tunelab.benchmarks import benchmark_metrics, check_benchmarks, run_benchmarks, with_benchmarks
from tunelab.config import JobSpec
from tunelab.inference import load_for_inference
from tunelab.layout import RunLayout
from tunelab.models import load_tokenizer, resolve
from tunelab.report import Sample, write_report
from tunelab.tasks import Evaluation, Task, TaskData, get_task
from tunelab.train.progress import reporting, timed, timing_line


@dataclass(frozen=True)
class EvalResult:
    base: Evaluation
    tuned: Evaluation | None
    report: Path


def run_eval(spec: JobSpec, tuned: Path | None, out_dir: Path, console: Console) -> EvalResult:
    """Evaluate spec.model, and `tuned` (an adapter or a model folder) when given, on the spec's validation data.
    Only the validation rows are tokenized; the data warnings are those `train` prints for the same file."""
    set_seed(spec.train.seed)
    task = get_task(spec.task.scenario, spec.task.approach)
    data = task.prepare_eval(spec, load_tokenizer(resolve(spec.model.name, spec.model.gguf_file)))
    check_benchmarks(spec)  # a wrong benchmark name fails before any model loads
    for warning in data.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    scored = spec.data.validation or spec.data.sources[0].path
    console.print(f"data: {data.n_val_examples} examples to score ({scored})")
    base = _evaluate(task, data, spec, None, console)
    result = _evaluate(task, data, spec, tuned, console) if tuned is not None else None
    outputs: list[str | None] = [s.output for s in result.samples] if result else [None] * len(base.samples)
    benchmarks, benchmarks_lower = benchmark_metrics(base)
    samples_dir = RunLayout(out_dir).samples
    music = render_samples((result or base).details, samples_dir)  # creative: sheet music and MIDI
    if line := rendering_line(music, samples_dir):
        console.print(line)
    paths = write_report(
        out_dir,
        title=f"tunelab eval: {spec.task.scenario}" + (f" — {tuned}" if tuned else ""),
        before=base.metrics,
        after=result.metrics if result else None,
        history=[],
        samples=[Sample(b.prompt, b.reference, b.output, o) for b, o in zip(base.samples, outputs, strict=False)],
        info={"model": spec.model.name, "tuned": str(tuned or "-"), "scenario": spec.task.scenario},
        lower_is_better=task.lower_is_better | benchmarks_lower,
        benchmarks=benchmarks,
        music=music,
    )
    return EvalResult(base, result, paths.html)


def _evaluate(task: Task, data: TaskData, spec: JobSpec, tuned: Path | None, console: Console) -> Evaluation:
    """The scenario's metrics (each phase shows its progress), then the spec's benchmarks (they show their own)."""
    label = "eval tuned" if tuned else "eval base"
    with reporting(console, label):
        model, tokenizer = load_for_inference(spec.model.name, tuned, load=task.load_model)
        with timed() as seconds:  # the evaluation alone, without loading the model
            evaluation = task.evaluate(model, tokenizer, data, spec)
    console.print(timing_line(f"{label} time", seconds))
    evaluation = replace(evaluation, metrics=evaluation.metrics | seconds)
    if not spec.eval.benchmarks:
        return evaluation
    return with_benchmarks(evaluation, run_benchmarks(model, tokenizer, spec.eval, console))
