"""`tunelab export gguf`: the command function, mounted by `tunelab.cli` (wrapped in its `friendly_errors`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from tunelab.errors import TunelabError
from tunelab.layout import RunLayout

# soft_wrap: result lines stay one line whatever the terminal width, so scripts can grep them.
out = Console(soft_wrap=True)


def export_gguf_cmd(
    run: Annotated[Path | None, typer.Option(help="A run's output_dir: its merged/ model is converted.")] = None,
    model: Annotated[Path | None, typer.Option("--model", "-m", help="Or a merged Hugging Face model folder.")] = None,
    quant: Annotated[
        str, typer.Option(help="f16, bf16, f32, q8_0, q5_1, q5_0, q4_1 or q4_0 (weights; norms stay f32).")
    ] = "q8_0",
    out_file: Annotated[
        Path | None, typer.Option("--out", help="The .gguf file (default: RUN/gguf/<run>-<quant>.gguf).")
    ] = None,
) -> None:
    """Write a GGUF file for llama.cpp and Ollama (Llama architecture), and an Ollama Modelfile beside it."""
    from tunelab.export.gguf import export_gguf
    from tunelab.train.progress import reporting

    folder, target, system = _source(run, model, quant, out_file)
    name = (run.resolve() if run else folder.resolve()).name
    with reporting(Console(stderr=True, soft_wrap=True), f"gguf {quant}"):  # progress on stderr, results on stdout
        result = export_gguf(folder, target, quant, system=system, name=name)
    size = result.path.stat().st_size / 2**20
    out.print(f"GGUF ({quant}): {result.path}  ({size:.1f} MiB, {result.tensors} tensors)")
    out.print(f"Modelfile: {result.modelfile}")
    out.print(f"try it: cd {result.path.parent} && ollama create NAME -f Modelfile && ollama run NAME")


def _source(run: Path | None, model: Path | None, quant: str, out_file: Path | None) -> tuple[Path, Path, str | None]:
    """(merged model folder, .gguf file to write, system message for the Modelfile)."""
    if (run is None) == (model is None):
        raise TunelabError("give --run RUN_DIR or --model MERGED_FOLDER (one of them)")
    if model is not None:
        if not (model / "config.json").is_file():
            raise TunelabError(f"--model {model}: not a Hugging Face model folder (no config.json)")
        return model, out_file or Path(f"{model.name}-{quant}.gguf"), None
    assert run is not None
    merged = RunLayout(run).merged
    if not (merged / "config.json").is_file():
        raise TunelabError(
            f"--run {run}: no merged model in {merged} (the run did not finish, or its method is not mergeable); "
            f"merge it first with: tunelab export --run {run}"
        )
    from tunelab.export.card import run_record

    spec, _ = run_record(run)
    return merged, out_file or run / "gguf" / f"{run.resolve().name}-{quant}.gguf", trained_system(spec)


def trained_system(spec: dict[str, Any] | None) -> str | None:
    """The system message the run's examples were trained with, when they all share one: a scenario's own
    instruction (classification's names its labels) even when `task.instruction` was not set, so Ollama prompts
    as training did. None (the chat template's default) when the examples differ, have none, or cannot be read."""
    from tunelab.config import load_spec
    from tunelab.tasks import get_task

    if not spec:
        return None
    instruction = spec.get("task", {}).get("instruction")
    try:
        job = load_spec(None, base=spec)
        split = getattr(get_task(job.task.scenario, job.task.approach), "split", None)
        items = split(job)[0] if split is not None else []
    except (TunelabError, OSError):
        return instruction  # the data files moved: the spec's own instruction, if any
    systems = {m[0].content if m and m[0].role == "system" else None for m in (i.example.messages for i in items)}
    return systems.pop() if len(systems) == 1 else instruction
