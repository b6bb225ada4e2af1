"""`tunelab export onnx`: the command function, mounted by `tunelab.cli` (wrapped in its `friendly_errors`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

# soft_wrap: result lines stay one line whatever the terminal width, so scripts can grep them.
out = Console(soft_wrap=True)


def export_onnx_cmd(
    out_dir: Annotated[Path, typer.Option("--out", help="Where the ONNX folder goes.")],
    model: Annotated[
        str, typer.Option("--model", "-m", help="'embedded', a model folder, a .gguf file or a hub id.")
    ] = "embedded",
    adapter: Annotated[
        Path | None, typer.Option("--adapter", "-a", help="A PEFT adapter folder to merge in first.")
    ] = None,
    precision: Annotated[
        str,
        typer.Option(
            help="int8 (the default: keeps 98% of a fine-tune's greedy tokens at ~6x PyTorch), int4 (faster and "
            "smaller, ~80%) or fp32 (exact). int8/int4 quantise the weights only."
        ),
    ] = "int8",
    force: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    runtime_adapter: Annotated[
        list[str] | None,
        typer.Option(
            "--runtime-adapter",
            help="NAME=PATH of a LoRA adapter kept apart from the base (repeatable): `tunelab serve --onnx` "
            "switches them per request (model=NAME).",
        ),
    ] = None,
) -> None:
    """Export the (merged) model to ONNX for onnxruntime-genai: model, genai_config.json and tokenizer."""
    from tunelab.export.onnx import export_onnx
    from tunelab.inference_server.cli import parse_adapters
    from tunelab.train.progress import reporting

    adapters = parse_adapters(runtime_adapter or [], option="--runtime-adapter")
    with reporting(Console(stderr=True, soft_wrap=True), f"onnx {precision}"):  # progress on stderr
        folder = export_onnx(model, out_dir, precision, adapter, force, adapters)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    out.print(f"ONNX ({precision}): {folder}  ({size / 2**20:.1f} MiB)")
    for name in adapters:
        out.print(f"adapter {name}: {folder}/adapters/{name}.onnx_adapter")
    out.print(f"try it: tunelab generate 'hello' --onnx {folder}   or   tunelab serve --onnx {folder}")
