"""Peak memory of LoRA (fp32) vs QLoRA vs full fine-tuning, each measured in its own process in this run, next to
`tunelab plan`'s estimate for the same configuration.

    .venv/bin/python bench/memory.py [--steps 3] [--seq-len 256] [--batch 4]
    .venv/bin/python bench/memory.py --model tinyllama-1.1b --methods lora,qlora --steps 2 --batch 1
    TUNELAB_BENCH_MALLOC=fixed .venv/bin/python bench/memory.py ...   # glibc's threshold fixed for every method

`--model embedded` (default) is the 135M model, whose 49k-token embeddings and runtime outweigh its quantisable
weights; `--model tinyllama-1.1b` is a Llama-shaped model of 1.1B parameters (TinyLlama's shape) with random
weights, built and saved once as bf16 safetensors shards in the tunelab cache (memory does not depend on what the
weights are), where the quantised projections are 88 % of the parameters.

Each method runs as `tunelab train` runs it: train mode (LoRA dropout), the allocator fix for QLoRA only, and
activation checkpointing as `train.gradient_checkpointing: auto` answers here (on for QLoRA; `--checkpointing on|off`
forces it for every method). Prints, per method: peak RSS (what the OS had to give; the plan, which includes a
runtime term, is compared with it), the runtime (RSS after importing the libraries, before any model) and the
training memory above it, peak private memory (RSS minus file-backed pages such as a memory-mapped checkpoint,
sampled every 10 ms while loading and training), the plan's estimate and its error, and the ratios to LoRA fp32 of
peak RSS and of training memory.
Goals: QLoRA <= 0.35 x LoRA fp32 peak; plan within +-25 % of measured on at least 3 configurations.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

METHODS = ("lora", "qlora", "full")


def checkpointing_for(method: str, asked: str) -> bool:
    """`auto` as `tunelab train` answers it here: on for a quantised base (QLoRA), off otherwise (the plan finds
    memory ample for these runs on a 24 GiB machine)."""
    from tunelab.methods import get_method

    return get_method(method).quantized if asked == "auto" else asked == "on"


class PeakSampler:
    """The largest private memory (RssAnon) seen, sampled every 10 ms: a step's peak is inside it, not at its end."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_mib("RssAnon"))
            self._stop.wait(0.01)


def child(model_name: str, method: str, steps: int, seq_len: int, batch: int, checkpointing: bool) -> None:
    """Train `steps` steps with `method` and print peak RSS and private memory (MiB) as JSON."""
    import torch

    from tunelab.allocator import release_freed_memory
    from tunelab.config import MethodSpec
    from tunelab.methods import apply_method, get_method
    from tunelab.methods.qlora import quantization_config
    from tunelab.models import load_model, resolve

    # As `tunelab train` does (QLoRA only); TUNELAB_BENCH_MALLOC=default or =fixed measures either way for any method.
    chosen = os.environ.get("TUNELAB_BENCH_MALLOC", "fixed" if get_method(method).quantized else "default")
    if chosen == "fixed":
        release_freed_memory()
    runtime = _status_mib("VmRSS")  # the interpreter and libraries, before any model: the same for every method
    spec = MethodSpec(name=method)
    quant = quantization_config(spec) if get_method(method).quantized else None
    start = time.perf_counter()
    with PeakSampler() as sampler:
        model = apply_method(load_model(resolve(model_folder(model_name)), quant), spec)
    loaded, load_s = _status_mib("VmRSS"), time.perf_counter() - start
    model.train()  # as the training loop does: from_pretrained returns eval mode (no dropout, no checkpointing)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(100, 30000, (batch, seq_len))
    load_private = sampler.peak
    start = time.perf_counter()
    with PeakSampler() as sampler:
        for _ in range(steps):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = (time.perf_counter() - start) / steps
    result = {"rss": rss, "private": max(load_private, sampler.peak), "runtime": runtime, "loaded": loaded}
    result |= {"load_s": load_s, "train_private": sampler.peak}
    print(json.dumps(result | {"s_per_step": seconds}))


def model_folder(name: str) -> str:
    """'embedded', or the folder of the random-weight model of a known shape, built on first use."""
    if name == "embedded":
        return name
    from tunelab.models import cache_dir

    folder = cache_dir() / "bench" / f"{name}-random"
    if not (folder / "config.json").is_file():
        _build_random(name, folder)
    return str(folder)


def _build_random(name: str, folder: Path) -> None:
    """Random weights in the shape of `name` (tunelab plan's known architectures), saved as bf16 safetensors shards
    the way checkpoints of that size are published, so loading reads them shard by shard."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.plan import KNOWN

    print(f"building {name} with random weights in {folder} (once)", file=sys.stderr)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(KNOWN[name], dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="500MB")


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status in MiB: VmRSS (resident), or RssAnon (private: RSS without
    file-backed pages such as a memory-mapped checkpoint)."""
    with open("/proc/self/status", encoding="ascii") as status:
        fields = dict(line.split(":", 1) for line in status)
    return int(fields[field].split()[0]) / 1024


def planned_mib(model_name: str, method: str, seq_len: int, batch: int, checkpointing: bool) -> float:
    from tunelab.plan import KNOWN, estimate, model_shape

    shape = model_shape(KNOWN["smollm2-135m" if model_name == "embedded" else model_name])
    return estimate(shape, method, seq_len=seq_len, batch=batch, checkpointing=checkpointing).total / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--model", choices=("embedded", "tinyllama-1.1b"), default="embedded")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, lora first (the baseline)")
    parser.add_argument(
        "--checkpointing",
        choices=("auto", "on", "off"),
        default="auto",
        help="activation checkpointing (auto: as tunelab)",
    )
    parser.add_argument("--child", choices=METHODS)
    args = parser.parse_args()
    if args.child:
        checkpointing = checkpointing_for(args.child, args.checkpointing)
        child(args.model, args.child, args.steps, args.seq_len, args.batch, checkpointing)
        return
    model_folder(args.model)  # built before any measurement
    results = {}
    for method in args.methods.split(","):  # one process each: peak RSS is per process and never goes down
        cmd = [sys.executable, __file__, "--child", method, "--steps", str(args.steps), "--model", args.model]
        cmd += ["--seq-len", str(args.seq_len), "--batch", str(args.batch), "--checkpointing", args.checkpointing]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[method] = json.loads(out.strip().splitlines()[-1])
    base = results["lora"]
    print(f"{args.model} model, seq {args.seq_len} x batch {args.batch}, {args.steps} steps (MiB)")
    print("'training' = peak RSS minus the runtime (RSS after imports, before the model: the same for every method)")
    print("'loaded' = RSS once the model is loaded and the method applied (load s: the time that took)")
    print("'private' = peak private memory (RssAnon, sampled every 10 ms while loading and training)")
    print("'ckpt' = activation checkpointing (--checkpointing auto: as tunelab train, on for QLoRA)")
    header = f"{'method':8} {'ckpt':>4} {'peak RSS':>9} {'runtime':>8} {'loaded':>7} {'training':>9} {'private':>8}"
    header += f" {'plan':>7}"
    print(header + f" {'plan err':>9} {'RSS/LoRA':>9} {'training/LoRA':>14} {'load s':>7} {'s/step':>7}")
    for method, r in results.items():
        checkpointing = checkpointing_for(method, args.checkpointing)
        plan = planned_mib(args.model, method, args.seq_len, args.batch, checkpointing)
        training, base_training = r["rss"] - r["runtime"], base["rss"] - base["runtime"]
        print(
            f"{method:8} {'on' if checkpointing else 'off':>4} {r['rss']:9.0f} {r['runtime']:8.0f} {r['loaded']:7.0f} "
            f"{training:9.0f} {r['private']:8.0f} "
            f"{plan:7.0f} {100 * (plan / r['rss'] - 1):+8.0f}% {r['rss'] / base['rss']:9.2f} "
            f"{training / base_training:14.2f} {r['load_s']:7.1f} {r['s_per_step']:7.1f}"
        )


if __name__ == "__main__":
    main()
