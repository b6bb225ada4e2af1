"""Time per step of `tunelab train --ray` with 1 and 2 workers against `--nproc 2` (the baseline, measured in the
same run, first and last; the faster of the two counts), and how long a worker group takes to train again after one
of its workers is killed.

    .venv/bin/python bench/ray_scaling.py [--model embedded] [--steps 12] [--batch 4] [--seq-len 128]

The Ray cluster is started here, as the tests start theirs: a head and a second node on this machine, one CPU each
(Ray's `ray.cluster_utils`), so two workers land one per node as on two machines. Every run trains the same LoRA
job (DDP, evaluation off) on the chat data; s/step is the median of the steps after the first two. The kill run
SIGKILLs one Ray Train worker once the first checkpoint is saved (`--max-failures 1`) and prints, from the kill:
Ray's restart of the group, tunelab's resume from the checkpoint, and the next step trained.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).parents[1]


def write_spec(folder: Path, model: str, steps: int, batch: int, seq_len: int) -> Path:
    spec = folder / "spec.yaml"
    spec.write_text(
        f"model: {{name: {model}}}\n"
        "method: {name: lora, r: 8, alpha: 16, dropout: 0.0}\n"
        f"data: {{train: {ROOT / 'data/chat/train.jsonl'}, validation: {ROOT / 'data/chat/validation.jsonl'}}}\n"
        f"train: {{max_steps: {steps}, batch_size: {batch // 2}, grad_accum: 1, max_seq_len: {seq_len}, "
        "precision: fp32, report_to: []}\n"
        "distributed: {strategy: ddp}\n"
        f"checkpoints: {{every_steps: {max(2, steps // 3)}, keep_last: 2}}\n"
        "eval: {enabled: false}\n",
        encoding="utf-8",
    )
    return spec


def command(spec: Path, run: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "tunelab.cli", "train", str(spec), "--set", f"output_dir={run}", *args]


def step_seconds(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    elapsed = [r["elapsed_s"] for r in rows if "eval" not in r and "elapsed_s" in r]
    gaps = [b - a for a, b in itertools.pairwise(elapsed)][2:]
    return statistics.median(gaps) if gaps else float("nan")


def timed_run(spec: Path, run: Path, *args: str) -> tuple[float, float]:
    start = time.perf_counter()
    done = subprocess.run(command(spec, run, *args), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return step_seconds(run), time.perf_counter() - start


def killed_run(spec: Path, run: Path, first_checkpoint: int, *args: str) -> dict[str, float]:
    """Seconds from the kill to each milestone the command prints (or that its run folder shows)."""
    seen: dict[str, float] = {}
    lines: list[str] = []
    marks = {"restart": "Attempting to start training worker group", "resume": "resuming from"}
    proc = subprocess.Popen(command(spec, run, *args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            for name, text in marks.items():
                if text in line:
                    seen.setdefault(f"{name}#{sum(1 for k in seen if k.startswith(name))}", time.perf_counter())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    checkpoint = run / "checkpoints" / f"step-{first_checkpoint:06d}"
    while not checkpoint.is_dir():
        if proc.poll() is not None:
            raise SystemExit("the run ended before its first checkpoint:\n" + "".join(lines[-40:]))
        time.sleep(0.05)
    workers = [p for p in psutil.Process().children(recursive=True) if "RayTrainWorker" in " ".join(p.cmdline())]
    killed = time.perf_counter()
    workers[0].kill()
    next_step = None
    while proc.poll() is None:
        if next_step is None and any(k.startswith("resume") for k in seen) and _trained_past(run, first_checkpoint):
            next_step = time.perf_counter()
        time.sleep(0.05)
    reader.join()
    if proc.returncode != 0:
        raise SystemExit("the killed run failed:\n" + "".join(lines[-40:]))
    found = {k: v - killed for k, v in seen.items() if v > killed}
    return {**found, "next step": (next_step or float("nan")) - killed, "end": time.perf_counter() - killed}


def _trained_past(run: Path, step: int) -> bool:
    """Whether the step log has a step after `step` (the resumed group truncated it to the checkpoint first)."""
    path = run / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return any(r.get("step", 0) > step and "eval" not in r for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4, help="Global batch (rows per step, over both workers).")
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    from ray import cluster_utils

    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray = ["--ray", "--ray-address", str(cluster.address)]
        with tempfile.TemporaryDirectory(prefix="ray-bench-") as tmp:
            folder = Path(tmp)
            spec = write_spec(folder, args.model, args.steps, args.batch, args.seq_len)
            results = {
                "--nproc 2 (baseline)": timed_run(spec, folder / "nproc2", "--nproc", "2"),
                "--ray, 1 worker": timed_run(
                    spec, folder / "ray1", *ray, "--num-workers", "1", "--set", "train.batch_size=" + str(args.batch)
                ),
                "--ray, 2 workers": timed_run(spec, folder / "ray2", *ray, "--num-workers", "2"),
                # Again at the end: the first run shares the machine with the cluster's own start-up.
                "--nproc 2 (again)": timed_run(spec, folder / "nproc2-again", "--nproc", "2"),
            }
            every = max(2, args.steps // 3)
            kill = killed_run(spec, folder / "killed", every, *ray, "--num-workers", "2", "--max-failures", "1")
    finally:
        cluster.shutdown()
    base = min(results["--nproc 2 (baseline)"][0], results["--nproc 2 (again)"][0])  # the less disturbed one
    print(f"model {args.model}, {args.steps} steps of {args.batch} rows x {args.seq_len} tokens, LoRA, DDP, fp32")
    for name, (step_s, total_s) in results.items():
        print(f"{name:22s} {step_s:7.3f} s/step  ({step_s / base:.2f}x the baseline's time)  command {total_s:.0f} s")
    print("after killing a worker at the first checkpoint (seconds from the kill):")
    for name, seconds in kill.items():
        print(f"  {name:12s} {seconds:6.1f}")


if __name__ == "__main__":
    main()
