"""The fine-tuning recipe, read top to bottom: setup -> evaluate before -> train -> evaluate after -> export -> report.

The CLI (and later the service's workers) call `run_job` with a validated JobSpec.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from peft import PeftModel
from rich.console import Console
from transformers import PreTrainedTokenizerBase, set_seed

from tunelab.abc_render import Rendering, render_samples, rendering_line
from tunelab.allocator import release_freed_memory
from tunelab.benchmarks import benchmark_metrics, check_benchmarks, run_benchmarks, with_benchmarks
from tunelab.config import JobSpec
from tunelab.data.packing import Row
from tunelab.export.card import finish_run_artefacts
from tunelab.export.merge import save_adapter, save_merged
from tunelab.layout import RunLayout, checkpoint_step
from tunelab.methods import apply_method, count_parameters, get_method
from tunelab.models import ModelSource, cache_dir, load_model, load_tokenizer, resolve
from tunelab.plan import available_memory, checkpointing_needed, estimate, measure_flops, model_shape
from tunelab.report import confusion_png, write_report
from tunelab.report.run import details, read_metrics, scored_samples
from tunelab.storage import RunMirror
from tunelab.tasks import Evaluation, Task, TaskData, get_task
from tunelab.train.budget import CALIBRATION_STEPS, format_duration, steps_that_fit
from tunelab.train.checkpoint import latest_checkpoint
from tunelab.train.distributed import World, all_cores, barrier, current_world, init_process_group
from tunelab.train.loop import TrainResult, make_plan, train
from tunelab.train.objectives import CausalLM
from tunelab.train.precision import CACHE_FILE as PRECISION_CACHE
from tunelab.train.precision import choose_precision
from tunelab.train.progress import log_benchmarks, reporting, timed, timing_line
from tunelab.train.trackers import Trackers, open_trackers


@dataclass(frozen=True)
class RunSummary:
    output_dir: Path
    report: Path | None
    adapter: Path | None
    merged: Path | None
    before: dict[str, float]
    after: dict[str, float]
    trainable_params: int
    total_params: int
    steps: int
    tokens_per_s: float
    seconds: float
    interrupted: bool


def run_job(
    spec: JobSpec, resume: bool = False, console: Console | None = None, stop_after: int | None = None
) -> RunSummary:
    world = current_world()
    if get_method(spec.method.name).quantized:  # before any model: blocks allocated earlier stay where they are
        release_freed_memory()
    init_process_group(spec.distributed, world)
    # Under a launcher every process runs this function; only rank 0 talks, evaluates and exports.
    console = (console or Console(stderr=True)) if world.is_main else Console(quiet=True)
    started = time.perf_counter()
    out = spec.output_dir
    layout = RunLayout(out)
    out.mkdir(parents=True, exist_ok=True)
    if world.is_main:
        spec_text = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
        layout.spec.write_text(spec_text, encoding="utf-8")
    mirror = RunMirror(spec.storage, out, spec.checkpoints.keep_last) if spec.storage and world.is_main else None
    if mirror is not None and resume and _remote_is_newer(mirror, layout):
        console.print(f"fetching the latest checkpoint from {mirror.url}")
        mirror.pull_latest_checkpoint()
    barrier(world)  # the other processes look for the checkpoint rank 0 may have fetched
    resume_from = _resume_point(layout, resume)
    if world.is_main and spec.eval.enabled:
        check_benchmarks(spec)  # a wrong benchmark name fails now, not after training
    resume_step = checkpoint_step(resume_from) if resume_from is not None else None
    if resume_from is not None:
        console.print(f"resuming from {resume_from} (step {resume_step})")
    with open_trackers(spec, resume_step, world.is_main) as trackers:
        summary = _run(spec, console, resume_from, stop_after, trackers, started, mirror)
    if mirror is not None:  # after the trackers closed: their files are complete
        mirror.push_run()
        console.print(f"run folder mirrored to {mirror.url}")
    return summary


def _run(
    spec: JobSpec,
    console: Console,
    resume_from: Path | None,
    stop_after: int | None,
    trackers: Trackers | None,
    started: float,
    mirror: RunMirror | None,
) -> RunSummary:
    """run_job's work, with the run folder made and the trackers (if any) open."""
    world = current_world()
    out = spec.output_dir
    layout = RunLayout(out)

    # Setup: model, tokenizer, data.
    set_seed(spec.train.seed)
    source = resolve(spec.model.name, spec.model.gguf_file)
    console.print(f"model: {source.label or source.path}")
    tokenizer = load_tokenizer(source)
    task = get_task(spec.task.scenario, spec.task.approach)
    data = task.prepare(spec, tokenizer)
    model = task.load_model(source, _quantization(spec))  # after the data: a head's size is the label count
    for warning in data.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    console.print(
        f"data: {data.n_train_examples} train examples in {len(data.train_rows)} rows "
        f"({'packed' if spec.packing else 'padded'}), {data.n_val_examples} validation examples"
        + (f" ({data.sources})" if data.sources else "")
    )

    before = Evaluation({}, [])
    # Rank 0's evaluation threads want every core: wait until the other processes are done loading (measured: the
    # evaluation ran 2.5x slower while they still competed for the cores).
    barrier(world)
    if world.is_main:
        with all_cores(world):
            before = _evaluate_once(task, model, tokenizer, data, spec, layout.eval_before, console, "before")
        if trackers is not None and resume_from is None:  # a resumed run logged it when it started
            trackers.log_evaluation(before.metrics, 0)
    barrier(world)  # the other processes wait for rank 0's evaluation

    # An objective that needs the untouched model (DPO's reference) sees it now, on every process.
    objective = data.objective or CausalLM(spec.train.chunked_loss)
    if data.objective is not None:
        console.print(f"scoring the {data.n_train_examples} training pairs with the reference (the model as loaded)")
    # Minutes on a CPU for a few thousand pairs: rank 0 shows the progress, as evaluation does.
    with reporting(console, "reference") if world.is_main else contextlib.nullcontext():
        objective.setup(model, data.train_rows, tokenizer.pad_token_id, spec.train.batch_size)

    # Method: wrap the model; report what trains.
    model = apply_method(model, spec.method)
    trainable, total = count_parameters(model)
    console.print(
        f"method: {spec.method.name} — trainable parameters {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"
    )
    pissa_init = _save_pissa_init(model, spec, out) if world.is_main else None  # rank 0 alone writes adapters

    precision = choose_precision(spec.train.precision, model, world, cache_dir() / PRECISION_CACHE)
    console.print(f"precision: {precision.precision} ({precision.reason})")
    checkpointing, why = _checkpointing(model, spec, precision.precision == "bf16")
    console.print(f"activation checkpointing: {'on' if checkpointing else 'off'} ({why})")
    if checkpointing:
        # Recompute each layer's activations in backward instead of keeping them: about a third more compute for
        # a fraction of the activation memory. Non-reentrant: works with frozen inputs (adapters) as is.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]
    # From here on the spec says what the run does (spec.yaml keeps what was asked, so a resume asks again).
    answers = {"precision": precision.precision, "gradient_checkpointing": checkpointing}
    spec = spec.model_copy(update={"train": spec.train.model_copy(update=answers)})
    step_s = _time_estimate(model, spec, data.train_rows, console)
    result = train(
        model,
        data.train_rows,
        pad_id=tokenizer.pad_token_id,
        packed=spec.packing,
        train_spec=spec.train,
        ckpt_spec=spec.checkpoints,
        out_dir=out,
        resume_from=resume_from,
        stop_after=stop_after,
        dist_spec=spec.distributed,
        objective=objective,
        val_rows=_validation_rows(spec, data),
        trackers=trackers,
        on_checkpoint=mirror.push_checkpoint if mirror is not None else None,
        estimated_step_s=step_s,
    )
    if result.interrupted:
        return _summary(spec, None, None, None, before, Evaluation({}, []), trainable, total, result, started)

    if spec.distributed.strategy != "none":
        adapter = _save_gathered(result, tokenizer, layout.adapter, pissa_init, world)
        if not world.is_main:
            return _summary(spec, None, adapter, None, before, Evaluation({}, []), trainable, total, result, started)
        torch.set_num_threads(os.cpu_count() or 1)  # the other processes are done: rank 0 may use every core
        # Evaluate and merge what was saved: this also proves the saved adapter is complete (ZeRO-3 shards).
        model = _reload(task, source, adapter, spec)
        after = _evaluate(task, model, tokenizer, data, spec, console, "after") if spec.eval.enabled else None
    else:
        after = _evaluate(task, model, tokenizer, data, spec, console, "after") if spec.eval.enabled else None
        adapter = save_adapter(model, tokenizer, layout.adapter, pissa_init)
    merged = _merge(model, source, tokenizer, adapter, spec) if _mergeable(spec, console) else None
    log_benchmarks(layout.metrics, before, after, result.state.step)
    if trackers is not None and after is not None:
        trackers.log_evaluation(after.metrics, result.state.step)
    music = render_samples(after.details if after else {}, layout.samples)  # creative: sheet music and MIDI
    if line := rendering_line(music, layout.samples):
        console.print(line)
    outcome = _Outcome(before, after, result, adapter, merged, music)
    report = _report(spec, source.label, outcome, trainable, total, task, data, tokenizer)
    summary = _summary(
        spec, report, adapter, merged, before, after or Evaluation({}, []), trainable, total, result, started
    )
    layout.summary.write_text(json.dumps(asdict(summary), indent=1, default=str), encoding="utf-8")
    finish_run_artefacts(out)  # portable base name in the adapter; model cards in adapter/ and merged/
    return summary


def _checkpointing(model: torch.nn.Module, spec: JobSpec, bf16: bool) -> tuple[bool, str]:
    """train.gradient_checkpointing, with auto answered by `tunelab plan`'s estimate of this run without it
    against the memory this process has (its share of the machine's under a launch)."""
    asked = spec.train.gradient_checkpointing
    if asked != "auto":
        return bool(asked), "as the spec says"
    if get_method(spec.method.name).quantized:
        # Whoever quantises the base trades speed for memory; activations are then the largest thing left (on a
        # 1.1B model, 1.5 of QLoRA's 3.2 GB peak). peft's prepare_model_for_kbit_training turns this on by default.
        return True, "auto: on for a quantised base (QLoRA), whose point is memory; train.gradient_checkpointing: false"
    try:
        shape = model_shape(model.config)  # type: ignore[arg-type]
    except (ValueError, KeyError, AttributeError) as exc:  # an architecture transformers cannot build as a causal LM
        return False, f"auto: no memory estimate for this architecture ({type(exc).__name__})"
    dist = spec.distributed
    without = estimate(
        shape,
        spec.method.name,
        seq_len=spec.train.max_seq_len,
        batch=spec.train.batch_size,
        devices=current_world().size,
        strategy="single" if dist.strategy == "none" else dist.strategy,
        offload=dist.offload,
        rank=spec.method.r,
        bf16=bf16,
        lora_dropout=spec.method.dropout,
        chunked_loss=spec.train.chunked_loss,
    )
    return checkpointing_needed(without, available_memory(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def _time_estimate(model: torch.nn.Module, spec: JobSpec, rows: list[Row], console: Console) -> float | None:
    """`tunelab plan`'s seconds per step for this run (its FLOPs at this process's measured matmul speed), said
    before training starts; the loop replaces it with the measured rate after the first steps."""
    try:
        shape = model_shape(model.config)  # type: ignore[arg-type]
    except (ValueError, KeyError, AttributeError):  # no causal-LM shape: the timed steps alone will tell
        return None
    world = current_world()
    tokens = sum(len(r.input_ids) for r in rows) / max(len(rows), 1)
    method = "full" if spec.method.name == "full" else "lora"
    step_s = estimate(
        shape, method, seq_len=max(1, round(tokens)), batch=spec.train.batch_size * spec.train.grad_accum,
        checkpointing=spec.train.gradient_checkpointing is True,  # resolved by now: the recompute is counted
        flops=measure_flops(),
    ).seconds_per_step
    if spec.train.time_budget is not None:
        console.print(
            f"time: tunelab plan estimates {step_s:.2f} s/step, so about "
            f"{steps_that_fit(spec.train.time_budget, step_s, 0, 0.0, None)} steps fit in "
            f"{format_duration(spec.train.time_budget)}; the first {CALIBRATION_STEPS} steps are timed to set the count"
        )
    else:
        total = make_plan(len(rows), spec.train, world.size).total_steps
        console.print(
            f"time: tunelab plan estimates {step_s:.2f} s/step, {total} steps: about "
            f"{format_duration(step_s * total)} of training (measured after step {CALIBRATION_STEPS})"
        )
    return step_s


def _save_gathered(
    result: TrainResult, tokenizer: PreTrainedTokenizerBase, folder: Path, pissa_init: Path | None, world: World
) -> Path:
    """Every process joins the gathering of sharded weights; rank 0 writes them."""
    with result.backend.gathered():
        if world.is_main:
            save_adapter(result.backend.unwrapped(), tokenizer, folder, pissa_init)
    barrier(world)
    return folder


def _reload(task: Task, source: ModelSource, adapter: Path, spec: JobSpec) -> torch.nn.Module:
    """The trained model as users will load it: the base with the saved adapter, or the saved full model."""
    if not get_method(spec.method.name).peft:
        return task.load_model(resolve(str(adapter)))
    return PeftModel.from_pretrained(task.load_model(source, _quantization(spec)), str(adapter)).eval()


def _quantization(spec: JobSpec) -> Any:
    if not get_method(spec.method.name).quantized:
        return None
    from tunelab.methods.qlora import quantization_config

    return quantization_config(spec.method)


def _mergeable(spec: JobSpec, console: Console) -> bool:
    info = get_method(spec.method.name)
    if info.quantized and spec.method.dora:
        # PEFT's DoRA on bitsandbytes layers does not match DoRA on the dequantised weights (max logit difference
        # 3.0 on the tiny test model), so a merged model would not generate what the adapter does.
        console.print("[yellow]note:[/] a DoRA trained on a quantised base is kept as an adapter, not merged")
        return False
    return info.mergeable


def _merge(
    model: torch.nn.Module, source: ModelSource, tokenizer: PreTrainedTokenizerBase, adapter: Path, spec: JobSpec
) -> Path:
    out = RunLayout(spec.output_dir).merged
    if not get_method(spec.method.name).quantized:
        return save_merged(model, tokenizer, out)
    # QLoRA: merge into the dequantised weights the adapter was trained against, in fp32.
    from tunelab.methods.qlora import dequantized_base

    base = dequantized_base(model, load_model(source))
    return save_merged(PeftModel.from_pretrained(base, str(adapter)), tokenizer, out)


def _remote_is_newer(mirror: RunMirror, layout: RunLayout) -> bool:
    """Whether the bucket has a later checkpoint than this machine (which may have run the job before)."""
    local = latest_checkpoint(layout.checkpoints)
    remote = mirror.latest_remote_step()
    return remote is not None and (local is None or remote > (checkpoint_step(local) or 0))


def _resume_point(layout: RunLayout, resume: bool) -> Path | None:
    if not resume:
        return None
    found = latest_checkpoint(layout.checkpoints)
    if found is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {layout.checkpoints}")
    return found


def _evaluate_once(
    task: Task,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: TaskData,
    spec: JobSpec,
    cache: Path,
    console: Console,
    label: str,
) -> Evaluation:
    """The base model's scores, cached so a resumed run does not recompute them."""
    if not spec.eval.enabled:
        return Evaluation({}, [])
    if cache.is_file():
        saved = json.loads(cache.read_text(encoding="utf-8"))
        from tunelab.evaluate import Generation

        return Evaluation(saved["metrics"], [Generation(**g) for g in saved["samples"]], saved.get("details", {}))
    evaluation = _evaluate(task, model, tokenizer, data, spec, console, label)
    cache.write_text(json.dumps(asdict(evaluation), indent=1), encoding="utf-8")
    return evaluation


def _evaluate(
    task: Task,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: TaskData,
    spec: JobSpec,
    console: Console,
    label: str,
) -> Evaluation:
    with reporting(console, f"eval {label}"), timed() as seconds:  # each phase shows its progress and is timed
        evaluation = task.evaluate(model, tokenizer, data, spec)
    console.print(timing_line(f"eval {label} time", seconds))
    evaluation = replace(evaluation, metrics=evaluation.metrics | seconds)
    if spec.eval.benchmarks:  # after the status spinner: the benchmarks show their own progress
        evaluation = with_benchmarks(evaluation, run_benchmarks(model, tokenizer, spec.eval, console))
    shown = ", ".join(f"{k} {v:.4f}" for k, v in evaluation.metrics.items())
    console.print(f"eval {label}: {shown}")
    return evaluation


def _save_pissa_init(model: torch.nn.Module, spec: JobSpec, out: Path) -> Path | None:
    """PiSSA changes the base weights at initialisation; keep its starting adapter so the final one can be
    converted to a LoRA for the original base (PEFT's documented procedure)."""
    if spec.method.name != "pissa" or not isinstance(model, PeftModel):
        return None
    path = RunLayout(out).pissa_init
    config: Any = model.peft_config["default"]
    saved_init = config.init_lora_weights
    config.init_lora_weights = True  # stored so that loading the initial adapter does not re-run the SVD
    model.save_pretrained(str(path))
    config.init_lora_weights = saved_init
    return path


def _validation_rows(spec: JobSpec, data: TaskData) -> list[Row]:
    """The rows of the validation loss during training: with evaluation on (or `train.eval_every` set), for the
    model's own loss (a DPO objective scores its training pairs' reference only), in every process of a launch."""
    every = spec.train.eval_every
    wanted = every != 0 and (every is not None or spec.eval.enabled)
    if not wanted or data.objective is not None:
        return []
    return data.val_rows


@dataclass(frozen=True)
class _Outcome:
    before: Evaluation
    after: Evaluation | None
    result: TrainResult
    adapter: Path | None
    merged: Path | None
    music: Rendering


def _report(
    spec: JobSpec,
    model_label: str,
    outcome: _Outcome,
    trainable: int,
    total: int,
    task: Task,
    data: TaskData,
    tokenizer: PreTrainedTokenizerBase,
) -> Path:
    before, after, result = outcome.before, outcome.after, outcome.result
    state = result.state
    history, validation = read_metrics(RunLayout(spec.output_dir).metrics)  # what the whole run logged
    info = {
        "model": model_label,
        "method": spec.method.name,
        "scenario": spec.task.scenario + (" (classification head)" if spec.task.approach == "head" else ""),
        "trainable parameters": f"{trainable:,} of {total:,}",
        "steps": str(state.step),
        "training tokens/s": f"{state.tokens / max(state.elapsed_s, 1e-9):.0f}",
        "training time": f"{state.elapsed_s:.0f} s",
    }
    benchmarks, benchmarks_lower = benchmark_metrics(before)
    paths = write_report(
        spec.output_dir,
        title=f"tunelab: {spec.method.name} on {spec.task.scenario}",
        before=before.metrics,
        after=after.metrics if after else None,
        history=history,
        samples=scored_samples(task, tokenizer, data, spec, before, after),
        info=info,
        lower_is_better=task.lower_is_better | benchmarks_lower,
        figures=_figures(before, after),
        benchmarks=benchmarks,
        validation=validation,
        details=details(spec, data, state.step, state.tokens, (outcome.adapter, outcome.merged), current_world().size),
        music=outcome.music,
    )
    return paths.html


def _figures(before: Evaluation, after: Evaluation | None) -> dict[str, bytes]:
    """Task-specific pictures: the confusion matrices of a classification run."""
    if "confusion" not in before.details:
        return {}
    matrices = {"before": before.details["confusion"]}
    if after is not None and "confusion" in after.details:
        matrices["after"] = after.details["confusion"]
    return {"Confusion matrix": confusion_png(before.details["labels"], matrices)}


def _summary(
    spec: JobSpec,
    report: Path | None,
    adapter: Path | None,
    merged: Path | None,
    before: Evaluation,
    after: Evaluation,
    trainable: int,
    total: int,
    result: TrainResult,
    started: float,
) -> RunSummary:
    state = result.state
    return RunSummary(
        spec.output_dir,
        report,
        adapter,
        merged,
        before.metrics,
        after.metrics,
        trainable,
        total,
        state.step,
        state.tokens / max(state.elapsed_s, 1e-9),
        time.perf_counter() - started,
        result.interrupted,
    )
