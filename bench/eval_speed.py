"""Evaluation speed of a classification run on the embedded model: the parts of `tunelab eval` timed one by one on
the same validation examples, in one process.

    .venv/bin/python bench/eval_speed.py [--examples 100] [--quick]

Prints seconds and examples/s for: the label scoring before its last speed-up (batches in data order, each prompt
run whole: the same-run baseline), the label scoring as it is now (`constrained`, the default), and unless --quick
the loss pass (which constrained scoring makes unnecessary) and free answers (`generate`); then the default
evaluation's time.
Goal (issue 13): 100 classification examples evaluated in <= 15 s on the project's 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from tunelab.config import EvalSpec, load_spec
from tunelab.data.render import generation_prompt, tokenize
from tunelab.evaluate import _shared_prompt_scores, _unscored_prefix, generate_batch
from tunelab.inference import load_for_inference
from tunelab.tasks import get_task
from tunelab.tasks.classification import ClassificationTask, _answered
from tunelab.tasks.generative import Item

ROOT = Path(__file__).parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="only the constrained scoring and its baseline")
    args = parser.parse_args()
    n = args.examples
    torch.set_num_threads(int(os.environ.get("THREADS", os.cpu_count() or 1)))
    spec = load_spec(ROOT / "examples/classification.yaml", [f"eval.max_examples={n}", f"eval.generations={n}"])
    task = get_task("classification", "generative")
    if not isinstance(task, ClassificationTask):
        raise SystemExit("the generative classification task is not ClassificationTask any more: update this bench")
    model, tokenizer = load_for_inference("embedded")
    data = task.prepare_eval(spec, tokenizer)
    items = [i for i in data.val_items if isinstance(i, Item)][:n]
    print(f"{len(items)} validation examples, embedded model, {torch.get_num_threads()} threads, load {_load()}")

    labels = task.labels
    choices = [[tokenize(_answered(i.example, label), tokenizer) for label in labels] for i in items]
    pad = int(tokenizer.pad_token_id)
    timings = {
        "constrained, baseline (data order, no shared prefix)": _timed(lambda: _baseline(model, choices, pad)),
        "constrained (label log-likelihoods)": _timed(lambda: task.constrained(model, tokenizer, items)),
    }
    if not args.quick:
        timings["loss pass"] = _timed(lambda: task.loss_metrics(model, tokenizer, data, spec))
        timings["generate (free answers)"] = _timed(lambda: _generate(model, tokenizer, items, task.max_new_tokens))
    for name, seconds in timings.items():
        print(f"{name:52s} {seconds:7.1f} s  {len(items) / seconds:6.1f} examples/s")
    baseline, constrained = list(timings.values())[:2]
    print(f"constrained vs its baseline, same run: {baseline / constrained:.2f}x faster")
    default = EvalSpec().classification
    spec.eval.classification = default
    total = _timed(lambda: task.evaluate(model, tokenizer, data, spec))
    slowest = max(timings.values())
    print(
        f"default evaluation ({default!r}): {total:.1f} s for {len(items)} examples "
        f"({total / slowest:.2f}x the slowest single part); goal <= 15 s for 100. load {_load()}"
    )


def _baseline(model: torch.nn.Module, choices: list, pad: int, batch_size: int = 16) -> None:
    """The scoring before issue 13's last change: batches in data order, each prompt run whole (no common prefix)."""
    with torch.no_grad():
        for start in range(0, len(choices), batch_size):
            groups = choices[start : start + batch_size]
            _shared_prompt_scores(model, groups, [_unscored_prefix(g) for g in groups], 0, pad)


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
