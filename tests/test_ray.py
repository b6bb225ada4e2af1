"""`tunelab train SPEC --ray` on a real local Ray cluster: a head and a second node on this machine (loopback), one CPU
each, started by this module through Ray's own test helper (ray.cluster_utils.Cluster) and shut down at its end.

Ray Train's workers run the function `--nproc`'s processes run, so `--ray --num-workers 2` must give `--nproc 2`'s
per-step losses and adapter. Real machines and GPUs are not tested here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from ray_cluster import two_nodes
from test_distributed import LOSS_TOL, WEIGHT_TOL, _adapter, _losses, _spec, _train
from tunelab.cli import app
from tunelab.layout import RunLayout
from tunelab.train.ray_executor import restarted

pytest.importorskip("ray.cluster_utils")


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """Two Ray nodes of one CPU each: the two workers land one per node, as on two machines."""
    with two_nodes() as nodes:
        yield nodes.address


@pytest.fixture(scope="module")
def nproc_two(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `--nproc 2` run (DDP) both Ray runs are held to: one reference, to keep this module's time down. ZeRO-2
    under --nproc 2 matches DDP (and one process) to float summation order: tests/test_distributed.py."""
    tmp = tmp_path_factory.mktemp("nproc")
    run = tmp / "run"
    _train(_spec(tmp, tiny_llama_dir), run, *LONGER, "--nproc", "2", "--set", "distributed.strategy=ddp")
    return run


# Long enough for a worker to be killed mid-run, after the first checkpoint (a step is ~0.1 s here).
LONGER = ["--set", "train.max_steps=40", "--set", "checkpoints.every_steps=10"]


def _train_killing_a_worker(spec: Path, run: Path, *args: str) -> str:
    """Train, and kill one Ray Train worker (SIGKILL, as a lost node would) once the first checkpoint is written:
    Ray restarts the group (--max-failures 1), which resumes from that checkpoint. The workers are this test's
    processes' descendants (the cluster's raylets are), so no other Ray process is touched."""
    command = [sys.executable, "-m", "tunelab.cli", "train", str(spec), "--set", f"output_dir={run}", *args]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        deadline = time.monotonic() + 600
        while not (run / "checkpoints" / "step-000010").is_dir():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
            time.sleep(0.1)
        workers = [p for p in psutil.Process().children(recursive=True) if "RayTrainWorker" in " ".join(p.cmdline())]
        assert workers, "no Ray Train worker found"
        workers[0].kill()
        output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    return output


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_ray_workers_match_nproc(
    strategy: str, ray_address: str, nproc_two: Path, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """ddp also loses a worker mid-run: the restarted group resumes from the last checkpoint, and the results must
    still be those of the uninterrupted --nproc 2 run."""
    spec, reference, run = _spec(tmp_path, tiny_llama_dir), nproc_two, tmp_path / "ray"
    args = [*LONGER, "--ray", "--ray-address", ray_address, "--num-workers", "2", "--set"]
    args.append(f"distributed.strategy={strategy}")
    if strategy == "ddp":
        output = _train_killing_a_worker(spec, run, *args, "--max-failures", "1")
        assert "RETRY" in output and output.count("Attempting to start training worker group") == 2
    else:
        output = _train(spec, run, *args).stdout
    assert f"adapter: {run / 'adapter'}" in output  # the driver prints rank 0's summary
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["after"]["loss"] < summary["before"]["loss"]
    assert len(_losses(run)) == 40
    assert _losses(run) == pytest.approx(_losses(reference), abs=LOSS_TOL)
    ours, theirs = _adapter(run), _adapter(reference)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) < WEIGHT_TOL
    assert (run / "merged" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-workers", "0"], "--num-workers 0: give 1 or more"),
        (["--num-workers", "2"], "--num-workers 2 needs a strategy"),
        (["--cpus-per-worker", "0", "--set", "distributed.strategy=ddp"], "--cpus-per-worker"),
        (["--nproc", "2", "--set", "distributed.strategy=ddp"], "--ray and --nproc are two launchers"),
    ],
    ids=["no-workers", "no-strategy", "no-cpus", "two-launchers"],
)
def test_bad_ray_options_say_how_to_fix(args: list[str], message: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    # Refused before any cluster is started or joined (no address is given: a local one would be started).
    spec = _spec(tmp_path, tiny_llama_dir)
    result = CliRunner().invoke(app, ["train", str(spec), "--ray", *args], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_a_restarted_worker_group_resumes_only_from_its_own_checkpoints(tmp_path: Path) -> None:
    # Ray re-runs the workers' function after a failure: it must resume from what this run wrote, not from an
    # earlier run's checkpoints left in the folder (a fresh run without --resume starts from step 0).
    layout = RunLayout(tmp_path)
    (layout.checkpoints / "step-000003").mkdir(parents=True)
    assert not restarted(layout, known=["step-000003"])
    (layout.checkpoints / "step-000006").mkdir()
    assert restarted(layout, known=["step-000003"])
    assert restarted(layout, known=[])
