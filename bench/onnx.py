"""Generation speed of ONNX Runtime (int4, int8, fp32) against PyTorch eager fp32, and the exports' parity.

All of them generate greedily, batch 1, from the same chat prompts, the same number of new tokens (EOS suppressed
in all so the lengths are equal), with the same number of threads. The prompts take turns across the
runtimes, so a change in the machine's load during the run hits all of them alike. Goal: int4 >= 3x
PyTorch eager.

    .venv/bin/python bench/onnx.py                  # the embedded model, 64 new tokens per prompt
    .venv/bin/python bench/onnx.py --work /tmp/onnx # keep (and reuse) the exports
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as `python bench/onnx.py`, this folder comes first on sys.path and this file would shadow the `onnx` package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import argparse  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402

import torch  # noqa: E402

from tunelab.export.onnx import (  # noqa: E402
    PARITY_PROMPTS,
    OnnxModel,
    export_onnx,
    greedy_agreement,
    logits_max_abs_diff,
    prompt_ids,
    torch_greedy,
)
from tunelab.models import load_model, load_tokenizer, resolve  # noqa: E402

Generate = Callable[[Sequence[int], int], list[int]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per prompt")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", type=Path, help="folder for the exports (reused when present)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run(args.model, args.tokens, args.threads, args.work or Path(tmp))


def run(model_name: str, tokens: int, threads: int, work: Path) -> None:
    source = resolve(model_name)
    model, tokenizer = load_model(source).eval(), load_tokenizer(source)
    folders = {p: ensure_export(model_name, work / p, p) for p in ("fp32", "int8", "int4")}
    prompts = prompt_ids(tokenizer)
    load = os.getloadavg()[0]  # other processes on the machine slow every runtime, PyTorch's threads the most
    runners: dict[str, Generate] = {"PyTorch eager fp32": lambda ids, n: torch_greedy(model, ids, n, ignore_eos=True)}
    for precision, folder in folders.items():
        runners[f"ONNX Runtime {precision}"] = onnx_runner(OnnxModel(folder, threads=threads))
    speeds = measure(runners, prompts, tokens)
    print(f"\n{len(prompts)} prompts ({min(map(len, prompts))}-{max(map(len, prompts))} tokens), {tokens} new tokens")
    print(f"each, greedy, batch 1, threads: {threads}, load average before the run: {load:.1f}\n")
    baseline = speeds["PyTorch eager fp32"]
    print(f"{'runtime':<22} {'tokens/s':>9} {'vs PyTorch':>11}")
    for name, speed in speeds.items():
        print(f"{name:<22} {speed:>9.1f} {speed / baseline:>10.2f}x")
    print(f"\nint4 vs ONNX fp32: {speeds['ONNX Runtime int4'] / speeds['ONNX Runtime fp32']:.2f}x")
    report_parity(model, folders, prompts)


def onnx_runner(model: OnnxModel) -> Generate:
    return lambda ids, n: model.greedy(ids, n, ignore_eos=True)


def ensure_export(model_name: str, folder: Path, precision: str) -> Path:
    if (folder / "genai_config.json").is_file():
        return folder
    start = time.perf_counter()
    export_onnx(model_name, folder, precision)
    size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
    print(f"exported {precision} in {time.perf_counter() - start:.0f} s: {folder} ({size:.0f} MiB)")
    return folder


def measure(runners: dict[str, Generate], prompts: Sequence[Sequence[int]], tokens: int) -> dict[str, float]:
    for generate in runners.values():
        generate(prompts[0], 4)  # warm-up: first-call allocations and kernel selection
    seconds = dict.fromkeys(runners, 0.0)
    produced = dict.fromkeys(runners, 0)
    for ids in prompts:
        for name, generate in runners.items():
            start = time.perf_counter()
            produced[name] += len(generate(ids, tokens))
            seconds[name] += time.perf_counter() - start
    return {name: produced[name] / seconds[name] for name in runners}


def report_parity(model: torch.nn.Module, folders: dict[str, Path], prompts: Sequence[Sequence[int]]) -> None:
    diff = logits_max_abs_diff(model, folders["fp32"], prompts)
    print(f"\nfp32 logits max |ONNX - PyTorch| over {len(prompts)} prompts: {diff:.2e} (target <= 1e-3)")
    for precision, folder in folders.items():
        agreement = greedy_agreement(model, folder, prompts, max_new_tokens=32)
        print(
            f"{precision} greedy token agreement: {agreement.rate:.1%} of {agreement.tokens} tokens (teacher-forced "
            f"along PyTorch's greedy answers); identical free-running answers: {agreement.exact}/{agreement.prompts}"
        )
    print(f"prompt set: tunelab.export.onnx.PARITY_PROMPTS ({len(PARITY_PROMPTS)} chat questions)")


if __name__ == "__main__":
    main()
