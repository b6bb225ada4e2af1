"""Does int4 keep the fine-tune? Greedy agreement of ONNX exports with the fine-tuned PyTorch model, and their speed.

Variants of one fine-tuned adapter on one base:
- merged int4: the adapter merged into the base, then the whole model quantised (`tunelab export onnx -a`);
- runtime int4: the base quantised, the adapter kept fp32 beside it (`--runtime-adapter`), active at run time;
- the same two in int8.
The reference is the fine-tuned PyTorch model (base + adapter, merged, fp32). Agreement is teacher-forced along
its greedy answers (tunelab.export.onnx.greedy_agreement); speed is greedy tokens/s at batch 1 with EOS suppressed,
the runtimes taking turns prompt by prompt (bench/onnx.py's method). Goal (issue 20): >= 90 % agreement at >= 3x
PyTorch eager.

    .venv/bin/python bench/onnx_adapter.py --adapter runs/chat-lora/adapter [--work /tmp/onnx-adapter] [--threads 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as `python bench/onnx_adapter.py`, this folder comes first on sys.path and bench/onnx.py would shadow `onnx`.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import argparse  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from tunelab.export.onnx import OnnxModel, export_onnx, greedy_agreement, prompt_ids, torch_greedy  # noqa: E402
from tunelab.inference import load_for_inference  # noqa: E402

VARIANTS = {  # name -> (precision, adapter kept apart)
    "merged int4": ("int4", False),
    "runtime int4": ("int4", True),
    "merged int8": ("int8", False),
    "runtime int8": ("int8", True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, required=True, help="a fine-tuned LoRA adapter folder")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per prompt for the speed run")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", type=Path, help="folder for the exports (reused when present)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run(args, args.work or Path(tmp))


def run(args: argparse.Namespace, work: Path) -> None:
    tuned, tokenizer = load_for_inference(args.model, args.adapter)
    tuned = tuned.merge_and_unload().eval()  # the fine-tuned model as PyTorch runs it fastest: merged, fp32
    prompts = prompt_ids(tokenizer)
    folders = {
        name: export(args.model, args.adapter, work / name.replace(" ", "-"), *variant)
        for name, variant in VARIANTS.items()
    }
    load = os.getloadavg()[0]
    print(f"\nmachine: {os.cpu_count()} cores, threads {args.threads}, load average before the run {load:.1f}")
    print(f"{len(prompts)} prompts; agreement along the fine-tuned model's greedy answers (32 tokens or EOS)\n")
    speeds = measure(tuned, folders, prompts, args.tokens, args.threads)
    print(f"{'variant':<14} {'agreement':>10} {'identical':>10} {'tokens/s':>9} {'vs PyTorch':>11} {'MiB':>6}")
    print(f"{'PyTorch fp32':<14} {'-':>10} {'-':>10} {speeds['PyTorch']:>9.1f} {1:>10.2f}x {'':>6}")
    for name, folder in folders.items():
        adapter = "ft" if VARIANTS[name][1] else None
        agreement = greedy_agreement(tuned, folder, prompts, max_new_tokens=32, adapter=adapter)
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20
        ratio = speeds[name] / speeds["PyTorch"]
        print(
            f"{name:<14} {agreement.rate:>9.1%} {agreement.exact:>6}/{agreement.prompts:<3} "
            f"{speeds[name]:>9.1f} {ratio:>10.2f}x {size:>6.0f}"
        )


def export(model: str, adapter: Path, folder: Path, precision: str, apart: bool) -> Path:
    if (folder / "genai_config.json").is_file():
        return folder
    start = time.perf_counter()
    if apart:
        export_onnx(model, folder, precision, runtime_adapters={"ft": adapter})
    else:
        export_onnx(model, folder, precision, adapter=adapter)
    print(f"exported {folder.name} in {time.perf_counter() - start:.0f} s")
    return folder


def measure(
    tuned: torch.nn.Module, folders: dict[str, Path], prompts: list[list[int]], tokens: int, threads: int
) -> dict[str, float]:
    runners = {"PyTorch": lambda ids: torch_greedy(tuned, ids, tokens, ignore_eos=True)}
    for name, folder in folders.items():
        model, adapter = OnnxModel(folder, threads), "ft" if VARIANTS[name][1] else None
        runners[name] = lambda ids, m=model, a=adapter: m.greedy(ids, tokens, ignore_eos=True, adapter=a)
    for generate in runners.values():
        generate(prompts[0])  # warm-up
    seconds, produced = dict.fromkeys(runners, 0.0), dict.fromkeys(runners, 0)
    for ids in prompts:
        for name, generate in runners.items():
            start = time.perf_counter()
            produced[name] += len(generate(ids))
            seconds[name] += time.perf_counter() - start
    return {name: produced[name] / seconds[name] for name in runners}


if __name__ == "__main__":
    main()
