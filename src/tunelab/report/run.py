"""The facts of a run the report tells besides its results, read from what the run used and wrote: the spec's
settings, the data counts, the validation points of metrics.jsonl, the artefacts and how to load them, and each
sample's score under the scenario's metric."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.methods import get_method
from tunelab.models import base_reference
from tunelab.report.page import RunDetails, Sample
from tunelab.train.progress import EVAL_KEY, VALIDATION

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tunelab.config import JobSpec
    from tunelab.evaluate import Generation
    from tunelab.tasks import Evaluation, Task, TaskData

# The Auto classes that open each kind of model: (PEFT's for an adapter, transformers' for a whole model).
LOADERS = {
    "CAUSAL_LM": ("AutoPeftModelForCausalLM", "AutoModelForCausalLM"),
    "SEQ_CLS": ("AutoPeftModelForSequenceClassification", "AutoModelForSequenceClassification"),
    "TOKEN_CLS": ("AutoPeftModelForTokenClassification", "AutoModelForTokenClassification"),
}


def read_metrics(path: Path) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """(training steps, validation points) of a run's metrics.jsonl; the before/after rows are left out."""
    if not path.is_file():
        return [], []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    steps = [row for row in rows if EVAL_KEY not in row]
    points = [{k: v for k, v in row.items() if k != EVAL_KEY} for row in rows if row.get(EVAL_KEY) == VALIDATION]
    return steps, points


def hyperparameters(spec: JobSpec, steps: int, processes: int = 1) -> dict[str, str]:
    """The settings that decide what was trained, as the spec (with its defaults) gave them."""
    train = spec.train
    method = spec.method.model_dump(mode="json")
    settings = ", ".join(f"{k} {v}" for k, v in method.items() if k != "name" and v is not None)
    batch = train.batch_size * train.grad_accum * processes
    objective = {"objective": f"DPO, beta {spec.task.beta:g}"} if spec.task.scenario == "preference" else {}
    return objective | {
        "method": spec.method.name + (f" ({settings})" if settings else ""),
        "learning rate": f"{train.lr:g} ({train.schedule}, warmup {train.warmup_ratio:g})",
        "batch": f"{train.batch_size} x {train.grad_accum} accumulation x {processes} process(es) = {batch} rows",
        "sequence length": f"{train.max_seq_len} tokens ({'packed' if spec.packing else 'padded'})",
        "steps": f"{steps}" + (f" (max_steps {train.max_steps})" if train.max_steps else f" ({train.epochs:g} epochs)"),
        "precision": train.precision,
        "weight decay / grad clip": f"{train.weight_decay:g} / {train.max_grad_norm:g}",
        "seed": str(train.seed),
    }


def data_counts(spec: JobSpec, data: TaskData, tokens_seen: int) -> dict[str, str]:
    """Examples and rows of each split, and the tokens they hold."""
    train_tokens = sum(len(r.input_ids) for r in data.train_rows)
    val_tokens = sum(len(r.input_ids) for r in data.val_rows)
    sources = ", ".join(str(s.path.resolve()) for s in spec.data.sources)
    validation = spec.data.validation.resolve() if spec.data.validation else None
    counts = {
        "training data": sources + (f" ({data.sources})" if data.sources else ""),
        "validation data": str(validation or f"{spec.data.validation_split:g} of the training data"),
        "training examples": f"{data.n_train_examples:,} in {len(data.train_rows):,} rows ({train_tokens:,} tokens)",
        "validation examples": f"{data.n_val_examples:,} in {len(data.val_rows):,} rows ({val_tokens:,} tokens)",
        "tokens trained on": f"{tokens_seen:,}",
    }
    if data.warnings:
        counts["data warnings"] = f"{len(data.warnings)} (printed at the start of training)"
    return counts


def artefacts(spec: JobSpec, adapter: Path | None, merged: Path | None) -> tuple[dict[str, str], str]:
    """The run's artefact paths, and three lines of Python that load them."""
    out = spec.output_dir.resolve()
    found = {"run folder": str(out), "metrics": str(out / "metrics.jsonl"), "spec": str(out / "spec.yaml")}
    if adapter is not None:
        found["adapter" if get_method(spec.method.name).peft else "model"] = str(adapter.resolve())
    if merged is not None:
        found["merged model"] = str(merged.resolve())
    return found, loading_snippet(spec, adapter, merged)


def loading_snippet(spec: JobSpec, adapter: Path | None, merged: Path | None) -> str:
    """Three lines: the imports, the adapter on its base with PEFT (or the whole model), the merged model (or the
    tokenizer when there is none)."""
    if adapter is None:
        return ""
    peft_loader, loader = LOADERS[_task_type(spec)]
    is_peft = get_method(spec.method.name).peft
    imports = ([f"from peft import {peft_loader}"] if is_peft else []) + [f"from transformers import {loader}"]
    tuned = f'tuned = {peft_loader if is_peft else loader}.from_pretrained("{adapter.resolve()}")'
    if is_peft:  # the adapter records its base by a name that resolves elsewhere (a hub id for the embedded model)
        tuned += f"  # base {base_reference(spec.model.name).name} + this adapter"
    if merged is not None:
        last = f'merged = {loader}.from_pretrained("{merged.resolve()}")  # one model, adapter merged in'
    else:
        imports[-1] += ", AutoTokenizer"
        last = f'tokenizer = AutoTokenizer.from_pretrained("{adapter.resolve()}")'
    return "\n".join(["; ".join(imports), tuned, last])


def scored_samples(
    task: Task,
    tokenizer: PreTrainedTokenizerBase,
    data: TaskData,
    spec: JobSpec,
    before: Evaluation,
    after: Evaluation | None,
) -> list[Sample]:
    """Each sample's base and tuned answers, with the scenario's metric on that sample alone where the scenario
    scores generated text (the validation item is found by its rendered prompt)."""
    outputs: list[Generation | None] = list(after.samples) if after else []
    outputs += [None] * (len(before.samples) - len(outputs))
    items = _items_by_prompt(task, tokenizer, data, {g.prompt for g in before.samples})
    samples = []
    for base, tuned in zip(before.samples, outputs, strict=False):
        item = items.get(base.prompt)
        samples.append(
            Sample(
                base.prompt,
                base.reference,
                base.output,
                tuned.output if tuned else None,
                _score(task, base.output, item, spec),
                _score(task, tuned.output, item, spec) if tuned else {},
            )
        )
    return samples


def _items_by_prompt(
    task: Task, tokenizer: PreTrainedTokenizerBase, data: TaskData, prompts: set[str]
) -> dict[str, Any]:
    from tunelab.data.render import generation_prompt
    from tunelab.tasks.generative import GenerativeTask, Item

    if not isinstance(task, GenerativeTask) or not prompts:
        return {}  # a head's samples are its own predictions; no text metric to apply
    found: dict[str, Any] = {}
    for item in data.val_items:
        if isinstance(item, Item):
            prompt = generation_prompt(item.example, tokenizer)[0]
            if prompt in prompts:
                found.setdefault(prompt, item)
                if len(found) == len(prompts):
                    break
    return found


def _score(task: Task, output: str, item: Any, spec: JobSpec) -> dict[str, float]:
    if item is None:
        return {}
    scored, _ = task.score([output], [item], spec)  # type: ignore[attr-defined]
    return {name: float(value) for name, value in scored.items()}


def _task_type(spec: JobSpec) -> str:
    if spec.task.approach != "head":
        return "CAUSAL_LM"
    return "TOKEN_CLS" if spec.task.scenario == "ner" else "SEQ_CLS"


def details(
    spec: JobSpec,
    data: TaskData,
    steps: int,
    tokens_seen: int,
    artefact: tuple[Path | None, Path | None],
    processes: int,
) -> RunDetails:
    """Everything above for one run; `artefact`: its (adapter, merged) folders."""
    paths, snippet = artefacts(spec, *artefact)
    return RunDetails(hyperparameters(spec, steps, processes), data_counts(spec, data, tokens_seen), paths, snippet)
