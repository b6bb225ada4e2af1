"""`tunelab serve`: the command function, mounted by `tunelab.cli` (wrapped in its `friendly_errors`).

`serve_app` runs it on its own too: `python -m tunelab.inference_server.cli --model embedded`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tunelab.errors import TunelabError

console = Console(stderr=True)


def parse_adapters(specs: list[str], option: str = "--adapter") -> dict[str, Path]:
    """`NAME=PATH` pairs; a bare PATH is named after its folder."""
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        if not name or not path:
            raise TunelabError(f"{option} {spec!r}: expected NAME=PATH")
        if name in adapters:
            raise TunelabError(f"{option}: the name {name!r} is given twice")
        adapters[name] = Path(path).expanduser()
    return adapters


def serve_cmd(
    model: Annotated[
        str, typer.Option("--model", "-m", help="Base model: 'embedded', a model folder, a .gguf file or a hub id.")
    ] = "embedded",
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            "--adapter",
            "-a",
            help="NAME=PATH of a PEFT adapter; requests choose it with model=NAME. With --onnx: a LoRA adapter "
            "(or .onnx_adapter file) on a base exported with --runtime-adapter.",
        ),
    ] = None,
    onnx: Annotated[Path | None, typer.Option(help="Serve an ONNX export (tunelab export onnx) instead.")] = None,
    name: Annotated[str | None, typer.Option(help="The model id of the base (default: --model or --onnx).")] = None,
    max_adapters: Annotated[int, typer.Option(min=1, help="Adapters kept loaded at once (LRU).")] = 4,
    max_batch: Annotated[
        int, typer.Option(min=1, help="Requests decoded in one forward pass (PyTorch; 1: no batching).")
    ] = 16,
    threads: Annotated[
        int | None, typer.Option(min=1, help="ONNX Runtime threads (default: the machine's physical cores).")
    ] = None,
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            "--api-key",
            envvar="TUNELAB_SERVE_API_KEY",
            help="Require this key (Authorization: Bearer KEY) on every route but /health; repeatable.",
        ),
    ] = None,
    api_keys_file: Annotated[
        Path | None, typer.Option(help="A file of accepted keys, one per line ('#' starts a comment).")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
) -> None:
    """Serve the OpenAI API (/v1/models, /v1/chat/completions, /v1/completions) for a base model and adapters."""
    import uvicorn

    from tunelab.inference_server.app import create_app
    from tunelab.serving.engines import build_engine

    keys = read_keys(api_key or [], api_keys_file)
    engine = build_engine(model, parse_adapters(adapter or []), onnx, max_adapters, name, threads, max_batch)
    console.print(f"models: {', '.join(engine.model_ids)}")
    console.print(f"OpenAI base URL: http://{host}:{port}/v1 ({'API key required' if keys else 'no API key: open'})")
    uvicorn.run(create_app(engine, keys), host=host, port=port, log_level="info")


def read_keys(given: list[str], path: Path | None) -> frozenset[str]:
    """Keys from the command line (or TUNELAB_SERVE_API_KEY) and a keys file; an empty key is a mistake."""
    keys = [k.strip() for k in given]
    if path is not None:
        if not path.is_file():
            raise TunelabError(f"--api-keys-file {path}: no such file")
        lines = path.read_text(encoding="utf-8").splitlines()
        keys += [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]
        if not keys:
            raise TunelabError(f"--api-keys-file {path}: no key in the file")
    if any(not k for k in keys):
        raise TunelabError("--api-key: a key must not be empty")
    return frozenset(keys)


serve_app = typer.Typer(pretty_exceptions_enable=False)
serve_app.command("serve")(serve_cmd)

if __name__ == "__main__":
    serve_app()
