"""Evaluation speed of a classification run on the embedded model: the parts of `tunelab eval` timed one by one on
the same validation examples, in one process.

    .venv/bin/python bench/eval_speed.py [--examples 100]

Prints seconds and examples/s for: the loss pass (what every scenario reports), scoring each label's
log-likelihood (the `constrained` answer), and generating free answers (`generate`), then the time of the
default evaluation (`eval.classification`'s default) and its ratio to the slowest mode measured here.
Goal (issue 13): 100 classification examples evaluated in <= 15 s on the project's 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from tunelab.config import EvalSpec, load_spec
from tunelab.data.render import generation_prompt
from tunelab.evaluate import generate_batch
from tunelab.inference import load_for_inference
from tunelab.tasks import get_task

ROOT = Path(__file__).parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=100)
    args = parser.parse_args()
    n = args.examples
    torch.set_num_threads(int(os.environ.get("THREADS", os.cpu_count() or 1)))
    spec = load_spec(ROOT / "examples/classification.yaml", [f"eval.max_examples={n}", f"eval.generations={n}"])
    task = get_task("classification", "generative")
    model, tokenizer = load_for_inference("embedded")
    data = task.prepare_eval(spec, tokenizer)
    items = data.val_items[:n]
    print(f"{len(items)} validation examples, embedded model, {torch.get_num_threads()} threads, load {_load()}")

    timings = {
        "loss pass": _timed(lambda: task.loss_metrics(model, tokenizer, data, spec)),
        "constrained (label log-likelihoods)": _timed(lambda: task.constrained(model, tokenizer, items)),  # type: ignore[attr-defined]
        "generate (free answers)": _timed(lambda: _generate(model, tokenizer, items, task.max_new_tokens)),  # type: ignore[attr-defined]
    }
    for name, seconds in timings.items():
        print(f"{name:40s} {seconds:7.1f} s  {len(items) / seconds:6.1f} examples/s")
    default = EvalSpec().classification
    spec.eval.classification = default
    total = _timed(lambda: task.evaluate(model, tokenizer, data, spec))
    slowest = max(timings.values())
    print(
        f"default evaluation ({default!r}): {total:.1f} s for {len(items)} examples "
        f"({total / slowest:.2f}x the slowest single part); goal <= 15 s for 100. load {_load()}"
    )


def _generate(model: torch.nn.Module, tokenizer: object, items: list, max_new: int) -> list[str]:
    prompts = [generation_prompt(i.example, tokenizer)[0] for i in items]  # type: ignore[arg-type]
    return generate_batch(model, tokenizer, prompts, max_new)  # type: ignore[arg-type]


def _timed(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


def _load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


if __name__ == "__main__":
    main()
