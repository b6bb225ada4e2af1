"""`tunelab eval`: score any model — a base, base + adapter, or a merged/fully fine-tuned folder — on a spec's
scenario and validation data (or any file: the CLI makes it the spec's validation file), and write the same report
as training does (base = "before", tuned = "after")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from transformers import set_seed

from tunelab.config import JobSpec
from tunelab.inference import load_for_inference
from tunelab.models import load_tokenizer, resolve
from tunelab.report import Sample, write_report
from tunelab.tasks import Evaluation, get_task
from tunelab.train.progress import reporting


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
    for warning in data.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    console.print(f"data: {data.n_val_examples} examples to score ({spec.data.validation or spec.data.train})")
    with reporting(console, "eval base"):
        model, tokenizer = load_for_inference(spec.model.name, load=task.load_model)
        base = task.evaluate(model, tokenizer, data, spec)
    result = None
    if tuned is not None:
        with reporting(console, "eval tuned"):
            model, tokenizer = load_for_inference(spec.model.name, tuned, load=task.load_model)
            result = task.evaluate(model, tokenizer, data, spec)
    outputs: list[str | None] = [s.output for s in result.samples] if result else [None] * len(base.samples)
    paths = write_report(
        out_dir,
        title=f"tunelab eval: {spec.task.scenario}" + (f" — {tuned}" if tuned else ""),
        before=base.metrics,
        after=result.metrics if result else None,
        history=[],
        samples=[Sample(b.prompt, b.reference, b.output, o) for b, o in zip(base.samples, outputs, strict=False)],
        info={"model": spec.model.name, "tuned": str(tuned or "-"), "scenario": spec.task.scenario},
        lower_is_better=task.lower_is_better,
    )
    return EvalResult(base, result, paths.html)
