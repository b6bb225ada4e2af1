"""Peak memory of LoRA (fp32) vs QLoRA vs full fine-tuning on the embedded model, each measured in its own process
in this run, next to `tunelab plan`'s estimate for the same configuration.

    .venv/bin/python bench/memory.py [--steps 3] [--seq-len 256] [--batch 4]

Prints, per method: peak RSS (what the OS had to give; the plan, which includes a runtime term, is compared with
it), the runtime (RSS after importing the libraries, before any model) and the training memory above it, peak
private memory (RSS minus file-backed pages, i.e. without a memory-mapped checkpoint), the plan's estimate and its
error, and the ratios to LoRA fp32 of peak RSS and of training memory.
Goals: QLoRA <= 0.35 x LoRA fp32 peak; plan within +-25 % of measured on at least 3 configurations.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

METHODS = ("lora", "qlora", "full")


def child(method: str, steps: int, seq_len: int, batch: int) -> None:
    """Train `steps` steps with `method` and print peak RSS and private memory (MiB) as JSON."""
    import torch

    from tunelab.config import MethodSpec
    from tunelab.methods import apply_method, get_method
    from tunelab.methods.qlora import quantization_config
    from tunelab.models import load_model, resolve

    runtime = _status_mib("VmRSS")  # the interpreter and libraries, before any model: the same for every method
    spec = MethodSpec(name=method)
    quant = quantization_config(spec) if get_method(method).quantized else None
    model = apply_method(load_model(resolve("embedded"), quant), spec)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(100, 40000, (batch, seq_len))
    peak_private = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        peak_private = max(peak_private, _status_mib("RssAnon"))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = (time.perf_counter() - start) / steps
    print(json.dumps({"rss": rss, "private": peak_private, "runtime": runtime, "s_per_step": seconds}))


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status in MiB: VmRSS (resident), or RssAnon (private: RSS without
    file-backed pages such as a memory-mapped checkpoint)."""
    with open("/proc/self/status", encoding="ascii") as status:
        fields = dict(line.split(":", 1) for line in status)
    return int(fields[field].split()[0]) / 1024


def planned_mib(method: str, seq_len: int, batch: int) -> float:
    from tunelab.plan import KNOWN, estimate, model_shape

    return estimate(model_shape(KNOWN["smollm2-135m"]), method, seq_len=seq_len, batch=batch).total / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--child", choices=METHODS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.seq_len, args.batch)
        return
    results = {}
    for method in METHODS:  # one process each: peak RSS is per process and never goes down
        cmd = [sys.executable, __file__, "--child", method, "--steps", str(args.steps)]
        cmd += ["--seq-len", str(args.seq_len), "--batch", str(args.batch)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[method] = json.loads(out.strip().splitlines()[-1])
    base = results["lora"]
    print(f"embedded model, seq {args.seq_len} x batch {args.batch}, {args.steps} steps (MiB)")
    print("'training' = peak RSS minus the runtime (RSS after imports, before the model: the same for every method)")
    header = f"{'method':8} {'peak RSS':>9} {'runtime':>8} {'training':>9} {'private':>8} {'plan':>7} {'plan err':>9}"
    print(header + f" {'RSS/LoRA':>9} {'training/LoRA':>14}")
    for method, r in results.items():
        plan = planned_mib(method, args.seq_len, args.batch)
        training, base_training = r["rss"] - r["runtime"], base["rss"] - base["runtime"]
        print(
            f"{method:8} {r['rss']:9.0f} {r['runtime']:8.0f} {training:9.0f} {r['private']:8.0f} {plan:7.0f} "
            f"{100 * (plan / r['rss'] - 1):+8.0f}% {r['rss'] / base['rss']:9.2f} {training / base_training:14.2f}"
        )


if __name__ == "__main__":
    main()
