"""The `tunelab` command. Commands translate arguments and print; the work happens in the library."""

from __future__ import annotations

import functools
import itertools
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tunelab.errors import ConfigError, Problem, TunelabError, summarize
from tunelab.export.gguf_cli import export_gguf_cmd
from tunelab.export.onnx_cli import export_onnx_cmd
from tunelab.inference_server.cli import serve_cmd
from tunelab.job_service.cli import app as service_app

if TYPE_CHECKING:
    from tunelab.config import JobSpec
    from tunelab.recipe import RunSummary
    from tunelab.train.ray_executor import RayOptions

app = typer.Typer(
    help="Fine-tune small language models for real tasks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Check and preview training data.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(service_app, name="service")
export_app = typer.Typer(
    help="Export a fine-tuned model: merged Hugging Face model, ONNX (export onnx) or GGUF (export gguf)."
)
app.add_typer(export_app, name="export")
console = Console(stderr=True, soft_wrap=True)  # log lines stay whole when piped (tables still fit the width)
# soft_wrap: result lines stay one line whatever the terminal width, so scripts can grep them.
out = Console(soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="'embedded', a model folder, a .gguf file or a hub id.")]
AdapterOpt = Annotated[Path | None, typer.Option("--adapter", "-a", help="A PEFT adapter folder to apply.")]


@app.callback()
def main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Also show the libraries' progress bars and warnings.")
    ] = False,
) -> None:
    """Fine-tune small language models for real tasks."""
    from tunelab.logs import configure

    configure(verbose)


def friendly_errors(fn: F) -> F:
    """Users' mistakes print as one clear message, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (TunelabError, FileNotFoundError) as exc:
            console.print(f"[bold red]error:[/] {escape(str(exc))}")
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


@app.command("train")
@friendly_errors
def train_cmd(
    spec: Annotated[Path, typer.Argument(help="The job spec (YAML).")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field: --set train.lr=1e-4")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint in output_dir.")] = False,
    nproc: Annotated[
        str,
        typer.Option(
            help="Processes on this machine (torchrun; a number needs distributed.strategy), or auto: one process, "
            "or one per core (DDP) where that is faster (the rule: `tunelab plan`, README)."
        ),
    ] = "auto",
    nnodes: Annotated[int, typer.Option(help="Machines taking part; run the same command on each.")] = 1,
    node_rank: Annotated[int, typer.Option(help="This machine's index, 0 .. nnodes-1.")] = 0,
    master_addr: Annotated[str, typer.Option(help="Address of the node with --node-rank 0.")] = "127.0.0.1",
    master_port: Annotated[
        int, typer.Option(help="A free TCP port on that node (default: any free one on one machine, else 29500).")
    ] = 0,
    report_to: Annotated[
        str | None,
        typer.Option(
            help="Log the curves to these trackers, comma-separated: tensorboard (the default), mlflow, wandb; "
            "none: no tracker (sets train.report_to; offline, in the run folder by default)."
        ),
    ] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Train on a Ray cluster (Ray Train); the ray extra.")] = False,
    ray_address: Annotated[
        str | None, typer.Option(help="The Ray cluster to join (ray://... or HOST:PORT); default: a local one.")
    ] = None,
    num_workers: Annotated[int, typer.Option(help="Ray workers (one process each), with --ray.")] = 2,
    cpus_per_worker: Annotated[float, typer.Option(help="CPUs Ray reserves for each worker.")] = 1.0,
    gpus_per_worker: Annotated[float, typer.Option(help="GPUs Ray reserves for each worker (0: CPU training).")] = 0.0,
    max_failures: Annotated[
        int, typer.Option(help="With --ray: restart a failed worker group this many times, from the last checkpoint.")
    ] = 0,
    storage: Annotated[
        str | None,
        typer.Option(help="Mirror the run folder to object storage, e.g. s3://bucket/prefix (sets storage)."),
    ] = None,
) -> None:
    """Fine-tune: evaluate before, train, evaluate after, export adapter and merged model, write the report."""
    from tunelab.config import load_spec
    from tunelab.recipe import run_job
    from tunelab.train.distributed import LAUNCHED_ENV, current_world

    if report_to is not None:  # an override like any other: checked with the spec, passed on to a launch
        set_ = [*(set_ or []), f"train.report_to={report_to}"]
    if storage is not None:
        set_ = [*(set_ or []), f"storage={storage}"]
    job = load_spec(spec, set_)
    processes = _processes(nproc)
    if ray:
        from tunelab.train.ray_executor import RayOptions

        options = RayOptions(ray_address, num_workers, cpus_per_worker, gpus_per_worker, max_failures)
        _print_summary(_run_on_ray(job, resume, processes or 1, options))
        return
    if processes is None and nnodes == 1 and "RANK" not in os.environ:
        from tunelab.train.processes import layout_for

        layout = layout_for(job, resume)
        console.print(f"processes: {layout}")
        if layout.processes > 1:  # the same run, split: the launch re-reads the spec with these overrides
            set_ = [*(set_ or []), *layout.overrides(job.train.batch_size)]
            job = load_spec(spec, set_)
        processes = layout.processes
    processes = processes or 1
    if (processes > 1 or nnodes > 1) and "RANK" not in os.environ:
        _launch(job, spec, set_, resume, processes, nnodes, node_rank, master_addr, master_port)
        return
    summary = run_job(job, resume=resume, console=console)
    if summary.interrupted:  # in a launch of ours, the launching process says so (see run_launch)
        raise typer.Exit(0 if LAUNCHED_ENV in os.environ else 130)
    if current_world().is_main:
        _print_summary(summary)


def _processes(nproc: str) -> int | None:
    """--nproc: a positive number, or auto (None: decided by `tunelab.train.processes`)."""
    if nproc == "auto":
        return None
    if not nproc.isdigit() or int(nproc) < 1:
        raise typer.BadParameter(f"{nproc!r}: give a number of processes (1, 2, ...) or auto", param_hint="--nproc")
    return int(nproc)


def _run_on_ray(job: JobSpec, resume: bool, nproc: int, options: RayOptions) -> RunSummary:
    from tunelab.train.distributed import prebuild_deepspeed_ops
    from tunelab.train.ray_executor import check_options, run_on_ray

    if nproc > 1:
        raise TunelabError("--ray and --nproc are two launchers: give --num-workers with --ray, or drop --ray")
    check_options(job, options)
    if job.distributed.strategy.startswith("zero"):  # see _launch: the workers on this machine share the build
        with console.status("building DeepSpeed's CPU communication op (first run only)"):
            prebuild_deepspeed_ops()
    where = options.address or "a local Ray cluster"
    console.print(f"launching {options.num_workers} Ray workers ({job.distributed.strategy}) on {where}")
    return run_on_ray(job, resume, options)


def _print_summary(summary: RunSummary) -> None:
    _print_scores("before / after (validation)", ("before", "after"), summary.before, summary.after)
    out.print(
        f"trainable parameters: {summary.trainable_params:,} / {summary.total_params:,}   "
        f"steps: {summary.steps}   training tokens/s: {summary.tokens_per_s:.0f}   "
        f"total time: {summary.seconds:.0f} s"
    )
    out.print(f"report:  {summary.report}\nadapter: {summary.adapter}\nmerged:  {summary.merged or '(not mergeable)'}")


def _print_scores(
    title: str, columns: tuple[str, str], before: dict[str, float], after: dict[str, float] | None
) -> None:
    """Scores side by side, with each change judged by its metric's direction (tunelab.metrics); no empty table."""
    from tunelab.metrics import lower_is_better
    from tunelab.report import compare, metric_names

    if not before and not after:
        out.print("evaluation was off (eval.enabled: false): no scores before or after")
        return
    shown = columns if after is not None else columns[:1]  # no tuned model: no column of dashes
    table = Table("metric", *shown, *(("change",) if after is not None else ()), title=title)
    for key in metric_names(before, after):
        old, new = before.get(key), (after or {}).get(key)
        cells = [f"{v:.4f}" if v is not None else "-" for v in (old, new)][: len(shown)]
        if after is not None:
            change, verdict = compare(old, new, lower_is_better(key))
            cells.append(f"{change} {verdict}".strip())
        table.add_row(key, *cells)
    out.print(table)


def _launch(
    job: JobSpec,
    spec: Path,
    set_: list[str] | None,
    resume: bool,
    nproc: int,
    nnodes: int,
    node_rank: int,
    master_addr: str,
    master_port: int,
) -> None:
    """Re-run this command under torchrun, which starts the processes and tells each its rank."""
    from tunelab.allocator import preload_env
    from tunelab.train.distributed import free_port, launch_command, prebuild_deepspeed_ops, run_launch

    if job.distributed.strategy == "none":
        raise ConfigError(
            [Problem("distributed.strategy", f"--nproc {nproc} needs a strategy", "--set distributed.strategy=ddp")]
        )
    if job.distributed.strategy.startswith("zero"):
        with console.status("building DeepSpeed's CPU communication op (first run only)"):
            prebuild_deepspeed_ops()
    argv = ["train", str(spec), *(f"--set={item}" for item in set_ or []), *(["--resume"] if resume else [])]
    # One machine: any free port, so that two runs at once (now the default launches) do not collide.
    port = master_port or (free_port() if nnodes == 1 else 29500)
    command = launch_command(argv, nproc, nnodes, node_rank, master_addr, port)
    console.print(f"launching {nproc * nnodes} processes ({job.distributed.strategy}): {' '.join(command[2:])}")
    extra_env, allocator = preload_env(os.environ)
    console.print(f"allocator: {allocator}")
    code = run_launch(command, extra_env)
    if code:
        raise typer.Exit(code)


@app.command("eval")
@friendly_errors
def eval_cmd(
    spec: Annotated[
        Path | None, typer.Argument(help="A job spec: its model, scenario and validation data (or give --data).")
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="A file to score (no spec needed; with a spec: instead of its validation file).")
    ] = None,
    scenario: Annotated[
        str | None, typer.Option("--scenario", "-s", help="The rows' scenario (with --data; default chat).")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="The base model (default: the spec's, else embedded).")
    ] = None,
    tuned: Annotated[
        Path | None, typer.Option("--adapter", "-a", help="An adapter, merged or fully fine-tuned model folder.")
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Where report.html/png go.")] = Path("runs/eval"),
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field: --set model.name=...")] = None,
    benchmark: Annotated[
        str | None,
        typer.Option("--benchmark", "-b", help="lm-eval tasks, comma-separated, e.g. truthfulqa_mc1,truthfulqa_mc2."),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Documents scored per benchmark (default: all).")] = None,
    include_path: Annotated[
        Path | None, typer.Option("--include-path", help="A folder of your own lm-eval task YAML files.")
    ] = None,
) -> None:
    """Score a model (and a tuned version of it) on a scenario's data and/or lm-eval benchmarks (-b); write the
    before/after report."""
    if spec is None and data is None:
        if benchmark is None:
            raise TunelabError(
                "give a job spec, --data FILE to score (with --scenario and --model), "
                "or benchmarks: tunelab eval -b truthfulqa_mc1,truthfulqa_mc2"
            )
        _eval_benchmarks(benchmark, model or "embedded", tuned, limit, include_path)
        return
    from tunelab.evaluate_job import run_eval

    job = _with_benchmark_options(_eval_spec(spec, data, scenario, model, set_), benchmark, limit, include_path)
    result = run_eval(job, tuned, out_dir, console)
    tuned_metrics = result.tuned.metrics if result.tuned else None
    _print_scores("base / tuned", ("base", "tuned"), result.base.metrics, tuned_metrics)
    out.print(f"report: {result.report}")


def _with_benchmark_options(
    job: JobSpec, benchmark: str | None, limit: int | None, include_path: Path | None
) -> JobSpec:
    """The command line's --benchmark/--limit/--include-path override the spec's fields."""
    from tunelab.benchmarks import parse_benchmarks

    if benchmark is not None:
        job.eval.benchmarks = parse_benchmarks(benchmark)
    if limit is not None:
        job.eval.benchmark_limit = limit
    if include_path is not None:
        job.eval.benchmark_include_path = include_path
    return job


def _eval_benchmarks(benchmark: str, model: str, adapter: Path | None, limit: int | None, path: Path | None) -> None:
    """Benchmarks alone: no spec, no scenario; one model (base, base + adapter, or a model folder) scored."""
    from tunelab.benchmarks import FEATURE, parse_benchmarks
    from tunelab.extras import require

    require("benchmarks", FEATURE)
    from tunelab.benchmarks.harness import resolve_tasks, score_benchmarks
    from tunelab.inference import load_for_inference

    names, paths = parse_benchmarks(benchmark), [path] if path is not None else []
    resolve_tasks(names, paths)  # a wrong name fails before the model loads
    loaded, tokenizer = load_for_inference(model, adapter)
    scores = score_benchmarks(loaded, tokenizer, names, limit=limit, include_paths=paths, console=console)
    table = Table(title=f"benchmarks: {model}" + (f" + {adapter}" if adapter else ""))
    for col in ("metric", "value"):
        table.add_column(col)
    for key, value in scores.metrics.items():
        table.add_row(key, f"{value:.4f}")
    out.print(table)
    questions = ", ".join(f"{task} {n}" for task, n in scores.questions.items())
    out.print(f"questions: {questions}   time: {scores.seconds:.0f} s")


def _eval_spec(
    spec: Path | None, data: Path | None, scenario: str | None, model: str | None, set_: list[str] | None
) -> JobSpec:
    """The spec to score with: the given one, or the scenario's defaults around `--data` alone (the file is the
    validation split; as training file it only names the labels, for a classification without task.labels)."""
    from tunelab.config import load_spec

    if spec is None and data is None:
        raise TunelabError("give a job spec, or --data FILE to score (with --scenario and --model)")
    overrides = [*(set_ or []), *([f"task.scenario={scenario}"] if scenario else [])]
    overrides += [f"model.name={model}"] if model else []
    overrides += [f"data.validation={data}"] if data else []
    base = {"data": {"train": str(data)}}  # no spec: the file is all there is
    return load_spec(spec, overrides, base=base)


@export_app.callback(invoke_without_command=True)
@friendly_errors
def export_cmd(
    ctx: typer.Context,
    run: Annotated[Path | None, typer.Option(help="A run's output_dir: merges its adapter into its base.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Base model (with --adapter).")] = None,
    adapter: AdapterOpt = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Where the merged model goes.")] = None,
) -> None:
    """Merge an adapter into its base model and save it in Hugging Face format."""
    if ctx.invoked_subcommand is not None:
        return
    from tunelab.export.card import run_record, write_card
    from tunelab.export.merge import save_merged
    from tunelab.inference import load_for_inference, run_base_and_adapter
    from tunelab.layout import RunLayout
    from tunelab.models import base_reference

    base_name, adapter_dir = run_base_and_adapter(run, model, adapter)
    target = out_dir or RunLayout(run or Path()).merged  # without --run or --out: ./merged
    loaded, tokenizer = load_for_inference(base_name, adapter_dir)
    out.print(f"merged model: {save_merged(loaded, tokenizer, target)}")
    out.print(f"model card:   {write_card(target, base_reference(base_name), *run_record(run))}")


export_app.command("onnx")(friendly_errors(export_onnx_cmd))
export_app.command("gguf")(friendly_errors(export_gguf_cmd))
app.command("serve")(friendly_errors(serve_cmd))


@app.command("generate")
@friendly_errors
def generate_cmd(
    prompt: Annotated[str, typer.Argument(help="A user message (rendered with the chat template).")],
    model: ModelOpt = "embedded",
    adapter: AdapterOpt = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    raw: Annotated[bool, typer.Option(help="Continue the text as is, without the chat template.")] = False,
    onnx: Annotated[Path | None, typer.Option(help="Generate with an ONNX export (tunelab export onnx).")] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="--onnx: ONNX Runtime threads (default: the physical cores).")
    ] = None,
) -> None:
    """Generate greedily from the base model or the fine-tuned one."""
    from tunelab.evaluate import generate
    from tunelab.inference import chat_prompt, load_for_inference

    if onnx is not None:
        from tunelab.export.onnx import generate_onnx

        if adapter is not None:
            raise TunelabError("--adapter cannot be used with --onnx: merge it at export (tunelab export onnx -a)")
        _print_text(generate_onnx(onnx, prompt, max_new_tokens, raw=raw, threads=threads))
        return

    loaded, tokenizer = load_for_inference(model, adapter)
    text = prompt if raw else chat_prompt(tokenizer, [{"role": "user", "content": prompt}])
    _print_text(generate(loaded, tokenizer, text, max_new_tokens))


def _print_text(text: str) -> None:
    """Model output is printed byte for byte: rich would read brackets as markup and drop control characters."""
    typer.echo(text)


@app.command("chat")
@friendly_errors
def chat_cmd(
    model: ModelOpt = "embedded",
    adapter: AdapterOpt = None,
    system: Annotated[str | None, typer.Option(help="A system message.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 128,
) -> None:
    """Chat in the terminal with the base or fine-tuned model (empty line or Ctrl-D to quit)."""
    from tunelab.evaluate import generate
    from tunelab.inference import chat_prompt, load_for_inference

    loaded, tokenizer = load_for_inference(model, adapter)
    messages = [{"role": "system", "content": system}] if system else []
    for line in _user_lines():
        if not line.strip():
            break
        messages.append({"role": "user", "content": line.strip()})
        reply = generate(loaded, tokenizer, chat_prompt(tokenizer, messages), max_new_tokens)
        messages.append({"role": "assistant", "content": reply})
        _print_text(f"model> {reply}")


def _user_lines() -> Iterator[str]:
    """Lines typed at the prompt, or piped in; Ctrl-D or Ctrl-C at the prompt ends the chat quietly."""
    if not sys.stdin.isatty():
        yield from sys.stdin
        return
    while True:
        try:
            yield input("you> ")
        except (EOFError, KeyboardInterrupt):
            out.print()
            return


@app.command("plan")
@friendly_errors
def plan_cmd(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="A known architecture (smollm2-135m, tinyllama-1.1b, phi-3-mini, "
            "llama-3-8b), 'embedded', or a model folder (config only).",
        ),
    ] = "embedded",
    method: Annotated[
        str, typer.Option(help="lora, qlora or full (other adapters cost about what lora does).")
    ] = "lora",
    seq_len: Annotated[int, typer.Option(min=1)] = 512,
    batch: Annotated[int, typer.Option(min=1, help="Sequences per device per micro-batch.")] = 8,
    devices: Annotated[int, typer.Option(min=1)] = 1,
    device_memory: Annotated[float, typer.Option(help="GiB per device (default: this machine's RAM).")] = 0.0,
    tflops: Annotated[float, typer.Option(help="Device TFLOP/s (default: measured here, fp32 matmul).")] = 0.0,
    bf16: Annotated[bool, typer.Option(help="bf16 weights and activations (GPUs).")] = False,
    checkpointing: Annotated[
        bool | None,
        typer.Option(help="Activation checkpointing (default: as `tunelab train` does, on for qlora only)."),
    ] = None,
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = 16,
) -> None:
    """Will it fit? Memory per device and time per step for each method and strategy, and a recommendation."""
    import os

    import torch

    from tunelab.plan import GiB, load_config, measure_flops, model_shape, plan_table, recommend
    from tunelab.train.processes import Workload, choose_layout

    shape = model_shape(load_config(model))
    memory = device_memory or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    flops = tflops * 1e12 if tflops else measure_flops()
    common = {"rank": rank, "bf16": bf16, "flops": flops}
    out.print(
        f"{model}: {shape.params:,} parameters, {shape.layers} layers; {memory:.1f} GiB per device, "
        f"{flops / 1e12:.2f} TFLOP/s per device ({'given' if tflops else 'measured fp32 matmul'})"
    )
    table = Table(title=f"memory per device (GiB), seq {seq_len} x batch {batch}")
    for col in ("method", "strategy", "weights", "grads", "optimizer", "activations", "total", "s/step", "fits"):
        table.add_column(col)
    rows = plan_table(
        shape, seq_len=seq_len, batch=batch, devices=devices, device_memory_gib=memory, checkpointing=checkpointing,
        **common,
    )
    for est, fits in rows:
        parts = (est.weights, est.gradients, est.optimizer, est.activations, est.total)
        name = f"[bold]{est.method}[/]" if est.method == method else est.method  # the method asked about
        table.add_row(name, est.strategy, *(f"{p / GiB:.2f}" for p in parts),
                      f"{est.seconds_per_step:.2f}", "yes" if fits else "[red]no[/]")  # fmt: skip
    out.print(table)
    best = recommend(rows)
    out.print(f"recommended: {best.method} with {best.strategy}" if best else "nothing fits: add devices or memory")
    work = Workload(method, batch, seq_len, rank)  # batch: the spec's train.batch_size, split by auto
    cores = len(os.sched_getaffinity(0))
    layout = choose_layout(shape, work, processes=cores, available=memory * GiB, gpu=torch.cuda.is_available())
    out.print(f"tunelab train --nproc auto (the default), {cores} cores here: processes {layout}")


@app.command("methods")
@friendly_errors
def methods_cmd(
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Also count each method's trainable parameters on this model.")
    ] = None,
) -> None:
    """List the fine-tuning methods (with --model: trainable / total parameters of each, with default options)."""
    from tunelab.config import MethodSpec
    from tunelab.methods import apply_method, count_parameters, get_method, method_names
    from tunelab.models import load_model, resolve

    table = Table("method", "mergeable", "what it trains")
    if model:
        table.add_column("trainable / total")
    for name in method_names():
        info = get_method(name)
        row = [name, "yes" if info.mergeable else "no", info.description]
        if model:
            trainable, total = count_parameters(apply_method(load_model(resolve(model)), MethodSpec(name=name)))
            row.append(f"{trainable:,} / {total:,} ({100 * trainable / total:.3f}%)")
        table.add_row(*row)
    out.print(table)


@app.command("bench")
@friendly_errors
def bench_cmd(
    model: ModelOpt = "embedded",
    methods: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated methods (default: lora,dora,rslora,qlora,ia3,prompt_tuning,prefix_tuning,full)."
        ),
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps per method.")] = 10,
    nproc: Annotated[
        int, typer.Option(min=1, help="Above 1: add zero1/zero2/zero3 rows (LoRA, this many processes).")
    ] = 1,
    batch: Annotated[int, typer.Option(min=1, help="Sequences per step (the global batch under --nproc).")] = 4,
    seq_len: Annotated[int, typer.Option(min=9, help="Tokens per sequence.")] = 256,
    lr: Annotated[float, typer.Option(min=0.0, help="Learning rate, the same for every method.")] = 2e-4,
    eval_examples: Annotated[int, typer.Option(min=1, help="Validation examples for the loss before/after.")] = 32,
    data: Annotated[
        Path | None, typer.Option(help="A folder with chat train.jsonl and validation.jsonl (default: data/chat).")
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the results and runs.")] = Path("runs/bench"),
) -> None:
    """Measure each method on the same data and steps: trainable parameters, adapter size, peak memory, tokens/s,
    validation loss before/after, wall time. Prints a markdown table; writes bench.md, bench.json, bench.png."""
    from tunelab.bench import BenchSettings, bench_rows, bundled_chat_data, run_bench

    settings = BenchSettings(
        out_dir=out_dir,
        data_dir=data or bundled_chat_data(),
        rows=bench_rows(methods, nproc),
        model=model,
        steps=steps,
        nproc=nproc,
        batch=batch,
        seq_len=seq_len,
        lr=lr,
        eval_examples=eval_examples,
    )
    result = run_bench(settings, console)
    out.print(result.markdown, markup=False, highlight=False, end="")
    console.print(f"table: {result.table}\njson:  {result.json}\nchart: {result.chart}")
    failed = [row.name for row in result.rows if not row.ok]
    if failed:
        console.print(f"[yellow]{len(failed)} row(s) failed[/] ({', '.join(failed)}): see {out_dir / 'logs'}")


@data_app.command("validate")
@friendly_errors
def data_validate_cmd(
    file: Annotated[Path | None, typer.Argument(help="A data file (or a job spec: its own data files).")] = None,
    scenario: Annotated[
        str | None, typer.Option("--scenario", "-s", help="The rows' scenario (default: the spec's, else chat).")
    ] = None,
    spec: Annotated[Path | None, typer.Option(help="A job spec: its scenario, columns, labels and files.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="e.g. --set data.columns.text=sms")] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Count tokens with this model's tokenizer.")
    ] = None,
    max_seq_len: Annotated[int | None, typer.Option(help="Examples longer than this are reported.")] = None,
    min_examples: Annotated[int, typer.Option(help="Fewest examples accepted (chat).")] = 10,
) -> None:
    """Check a data file (or a spec's files) as training will read it: every problem with its line and code."""
    if file is not None and spec is None and file.suffix in (".yaml", ".yml"):
        file, spec = None, file  # a spec given as the file: check the files it names
    if file is None and spec is None:
        raise TunelabError("give a data FILE (with --scenario), or --spec SPEC to check a spec's data files")
    if spec is None and file is not None and (scenario or "chat") == "chat":
        _validate_chat(file, model, max_seq_len or 512, min_examples)
        return
    job = _validation_spec(file, scenario, spec, set_, max_seq_len)
    _validate_scenario(job, file, model)


def _validation_spec(
    file: Path | None, scenario: str | None, spec: Path | None, set_: list[str] | None, max_seq_len: int | None
) -> JobSpec:
    """The JobSpec training would read the data with: the given spec, or the scenario's defaults, with FILE as
    both splits (a file alone is checked whole)."""
    from tunelab.config import load_spec

    overrides = [*(set_ or []), *([f"task.scenario={scenario}"] if scenario else [])]
    overrides += [f"train.max_seq_len={max_seq_len}"] if max_seq_len else []
    overrides += [f"data.train={file}", f"data.validation={file}"] if file else []
    return load_spec(spec, overrides, base={"data": {}})


def _validate_scenario(job: JobSpec, file: Path | None, model: str | None) -> None:
    from tunelab.models import load_tokenizer, resolve
    from tunelab.tasks import check_data

    checked = check_data(job, load_tokenizer(resolve(model)) if model else None)
    for problem in checked.errors:
        out.print(f"[red]error[/]   {escape(str(problem))}")
    for warning in _file_warnings(checked.warnings, file):
        out.print(f"[yellow]warning[/] {escape(warning)}")
    shown = _files_read(job, count=checked.ok)
    counted = f", {checked.n_examples} training examples" if checked.n_examples is not None else ""
    out.print(f"{', '.join(shown)}: {job.task.scenario} data{counted}: {'OK' if checked.ok else 'NOT OK'}")
    if model is None:
        console.print("lengths not checked: pass --model (e.g. embedded) to tokenize as training does")
    if not checked.ok:
        raise typer.Exit(1)


def _files_read(job: JobSpec, count: bool) -> list[str]:
    """Each data path once, a saved DatasetDict once per split read; with its row count when `count`."""
    from tunelab.data.readers import read_records, saved_split

    paths = [(s.path, "train") for s in job.data.sources]
    paths += [(job.data.validation, "validation")] if job.data.validation else []
    named = {f"{f}[{saved_split(f, split)}]" if f.is_dir() and saved_split(f, split) else str(f): (f, split)
             for f, split in paths}  # fmt: skip
    # Every row was read without error when the check passed: counting them again is cheap and reassuring.
    # Escaped: rich would read a split's `[train]` as markup.
    return [escape(f"{name} ({len(read_records(*where))} rows)" if count else name) for name, where in named.items()]


def _file_warnings(warnings: list[str], file: Path | None) -> list[str]:
    """A file checked alone is both splits: say its name once instead of "train:" and "validation:" twice."""
    if file is None:
        return warnings
    return list(dict.fromkeys(f"{file.name}: {w.partition(': ')[2] or w}" for w in warnings))


def _validate_chat(file: Path, model: str | None, max_seq_len: int, min_examples: int) -> None:
    """A chat file, checked as OpenAI's fine-tuning does."""
    from tunelab.data.validate import validate_chat_file
    from tunelab.inference import token_counter

    counter = token_counter(model) if model else None
    report = validate_chat_file(file, count_tokens=counter, max_seq_len=max_seq_len, min_examples=min_examples)
    for problem in summarize(report.errors, file.name, _not_chat_hints(report.other_columns)):
        out.print(f"[red]error[/]   {escape(str(problem))}")
    for problem in report.warnings:
        out.print(f"[yellow]warning[/] {escape(str(problem))}")
    tokens = f", {sum(report.token_counts):,} tokens" if report.token_counts else ""
    out.print(
        f"{file}: {report.format or 'unknown format'}, {report.n_rows} rows, "
        f"{len(report.examples)} valid examples{tokens}: {'OK' if report.ok else 'NOT OK'}"
    )
    if counter is None:
        console.print("lengths not checked: pass --model (e.g. embedded) to count tokens against --max-seq-len")
    if not report.ok:
        raise typer.Exit(1)


def _not_chat_hints(columns: set[str]) -> dict[str, str]:
    """Rows in no chat format: name the columns they have and, when they fit a scenario's fields, that scenario,
    so a classification file checked without --scenario says so once instead of failing on every row."""
    from tunelab.data.preference import looks_like_pairs
    from tunelab.data.validate import FORMAT_HINT
    from tunelab.tasks import get_task, scenario_names

    if not columns:
        return {}
    required = {name: set(getattr(get_task(name), "required", ())) for name in scenario_names()}
    # The scenario needing the most of the file's columns (text + label: classification rather than domain).
    fits = sorted(
        (name for name, need in required.items() if need and need <= columns), key=lambda n: -len(required[n])
    )
    fits = ["preference"] if looks_like_pairs(dict.fromkeys(columns)) else fits  # pairs have two shapes of keys
    found = f"the file has columns {sorted(columns)}"
    hint = (
        f"{found}, as {fits[0]} rows have: check it with --scenario {fits[0]}"
        if fits
        else f"{found}; a chat file must {FORMAT_HINT}, or give another scenario with --scenario"
    )
    return {"missing_messages": hint}


@data_app.command("preview")
@friendly_errors
def data_preview_cmd(
    file: Annotated[Path, typer.Argument(help="A chat JSONL file, or a job spec (its first training file).")],
    model: ModelOpt = "embedded",
    n: Annotated[int, typer.Option(help="How many examples.")] = 2,
    max_seq_len: Annotated[int, typer.Option()] = 512,
) -> None:
    """Print examples as the model sees them; trained tokens in green (⟦marked⟧ when piped), the rest dim."""
    from tunelab.data.render import IGNORE, tokenize
    from tunelab.data.validate import load_chat_examples
    from tunelab.models import load_tokenizer, resolve

    if file.suffix in (".yaml", ".yml"):  # a spec: preview what it trains on, with its model and length
        file, model, max_seq_len = _spec_preview_source(file)
    tokenizer = load_tokenizer(resolve(model))
    # Colour on a terminal; piped or redirected output marks the trained spans with ⟦ ⟧ instead.
    trained_style, other_style = ("[bold green]{}[/]", "[dim]{}[/]") if out.is_terminal else ("⟦{}⟧", "{}")
    for example in load_chat_examples(file, min_examples=1)[:n]:
        tok = tokenize(example, tokenizer, max_seq_len)
        out.rule(f"line {example.line}: {len(tok.input_ids)} tokens, {tok.n_trained} trained")
        pairs = zip(tok.input_ids, tok.labels, strict=True)
        for trained, group in itertools.groupby(pairs, key=lambda pair: pair[1] != IGNORE):
            # A span is decoded whole, so characters split across tokens come out right.
            piece = escape(str(tokenizer.decode([token_id for token_id, _ in group])))
            out.print((trained_style if trained else other_style).format(piece), end="", highlight=False)
        out.print()


def _spec_preview_source(spec_file: Path) -> tuple[Path, str, int]:
    from tunelab.config import load_spec

    job = load_spec(spec_file)
    source = job.data.sources[0].path
    if source.is_dir():
        raise TunelabError(
            f"{spec_file}: data.train {source} is a saved dataset folder; `data preview` shows JSONL files "
            f"(try `tunelab data validate --spec {spec_file}`)"
        )
    return source, job.model.name, job.train.max_seq_len


if __name__ == "__main__":
    app()
