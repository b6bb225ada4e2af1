"""Two processes on CPU (gloo), launched as users launch them: `tunelab train SPEC --nproc 2`.

The reference is a one-process run with the same global batch (batch_size 4 = 2 per process x 2 processes).
Dropout is off so that both runs compute the same function; what remains is float summation order.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny import ROOT
from tunelab.config import DistributedSpec, TrainSpec, load_spec
from tunelab.errors import ConfigError
from tunelab.train.distributed import check_batch, clear_stale_build_locks, deepspeed_config, free_port

# Per-step losses agree to float summation order; measured differences are ~1e-6.
LOSS_TOL = 1e-4
WEIGHT_TOL = 1e-4


def _spec(tmp_path: Path, model_dir: Path) -> Path:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"model: {{name: {model_dir}}}\n"
        "method: {name: lora, r: 4, alpha: 8, dropout: 0.0}\n"
        f"data: {{train: {ROOT / 'data/chat/train.jsonl'}, validation: {ROOT / 'data/chat/validation.jsonl'}}}\n"
        "train: {max_steps: 6, batch_size: 2, grad_accum: 2, lr: 2.0e-2, warmup_ratio: 0.0, max_seq_len: 64}\n"
        "checkpoints: {every_steps: 3, keep_last: 2}\n"
        "eval: {max_examples: 8, samples: 0, generations: 0}\n",
        encoding="utf-8",
    )
    return spec


def _train(spec: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "tunelab.cli", "train", str(spec), "--set", f"output_dir={out}", *args]
    if "--nproc" in args:
        command += ["--master-port", str(free_port())]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "eval" not in row]  # the steps, not the evaluation rows


def _validation(run: Path) -> dict[int, float]:
    """The validation-loss points measured during training, by step."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if row.get("eval") == "validation"}


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def one_process(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("one")
    run = tmp / "run"
    _train(_spec(tmp, tiny_llama_dir), run, "--set", "train.batch_size=4")
    return run


@pytest.mark.parametrize(
    "strategy",
    [
        ["distributed.strategy=ddp", "--report-to", "tensorboard"],
        ["distributed.strategy=zero1"],
        ["distributed.strategy=zero2"],
        ["distributed.strategy=zero3", "--set", "distributed.offload=parameters"],
    ],
    ids=["ddp", "zero1", "zero2", "zero3-offload"],
)
def test_two_processes_match_one(strategy: list[str], one_process: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _train(_spec(tmp_path, tiny_llama_dir), run, "--nproc", "2", "--set", *strategy)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["after"]["loss"] < summary["before"]["loss"]  # it learned
    assert _losses(run) == pytest.approx(_losses(one_process), abs=LOSS_TOL)
    # The validation curve too, measured by every process on the same rows (ZeRO-3's forward needs them all).
    assert len(_validation(one_process)) == 3
    assert _validation(run) == pytest.approx(_validation(one_process), abs=LOSS_TOL)
    ours, reference = _adapter(run), _adapter(one_process)
    # Complete: every LoRA matrix present with its full shape (ZeRO-3 would otherwise save empty shards).
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.items()}
    assert all(v.numel() > 0 for v in ours.values())
    assert max(float((ours[k] - reference[k]).abs().max()) for k in ours) < WEIGHT_TOL
    assert (run / "merged" / "model.safetensors").is_file()
    if "--report-to" in strategy:
        _check_curves(run)


def _check_curves(run: Path) -> None:
    """Rank 0 alone writes the TensorBoard curves, the steps metrics.jsonl holds (a launch with trackers once hung:
    accelerate's state built for them must not change the backend's DDP wrapping)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len(list((run / "tensorboard" / "run").glob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(run / "tensorboard" / "run"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(_losses(run), rel=1e-6)


@pytest.mark.parametrize(
    "strategy",
    [["distributed.strategy=ddp"], ["distributed.strategy=zero3", "--set", "distributed.offload=optimizer"]],
    ids=["ddp", "zero3-offload"],
)
def test_resume_is_exact(strategy: list[str], tiny_llama_dir: Path, tmp_path: Path) -> None:
    spec, run = _spec(tmp_path, tiny_llama_dir), tmp_path / "run"
    args = ["--nproc", "2", "--set", *strategy]
    _train(spec, run, *args)
    straight, losses = _adapter(run), _losses(run)
    # Lose the last checkpoint and the results, as a crash after step 3 would: resume must redo steps 4-6 exactly.
    shutil.rmtree(run / "checkpoints" / "step-000006")
    shutil.rmtree(run / "adapter")
    _train(spec, run, *args, "--resume")
    assert _losses(run) == losses
    resumed = _adapter(run)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_ctrl_c_under_a_launch_saves_a_checkpoint_and_resumes(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Ctrl-C as a terminal sends it (to the foreground process group: tunelab, not torchrun's own session) stops
    both processes after the current step with a checkpoint, as in one process; --resume finishes the run."""
    spec, run = _spec(tmp_path, tiny_llama_dir), tmp_path / "run"
    args = ["--nproc", "2", "--set", "distributed.strategy=ddp", "--set", "train.max_steps=60"]
    command = [sys.executable, "-m", "tunelab.cli", "train", str(spec), "--set", f"output_dir={run}", *args]
    launch = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(launch.pid, signal.SIGINT)  # the terminal's Ctrl-C
    _, stderr = launch.communicate(timeout=300)
    assert launch.returncode == 130, stderr[-3000:]
    assert "run the same command with --resume" in stderr
    assert "ChildFailedError" not in stderr  # torchrun saw two processes that stopped as asked
    stopped = len(_losses(run))
    assert 3 <= stopped < 60
    assert (run / "checkpoints" / f"step-{stopped:06d}").is_dir()
    _train(spec, run, *args, "--resume")
    assert len(_losses(run)) == 60


def test_resume_with_another_process_count_is_refused(one_process: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(one_process / "checkpoints", run / "checkpoints")
    command = [sys.executable, "-m", "tunelab.cli", "train", str(_spec(tmp_path, tiny_llama_dir))]
    command += ["--set", f"output_dir={run}", "--set", "distributed.strategy=ddp", "--resume"]
    command += ["--nproc", "2", "--master-port", str(free_port())]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "resume with --nproc 1" in result.stderr


def test_batch_mismatch_names_the_fields() -> None:
    train = TrainSpec(batch_size=2, grad_accum=2, global_batch_size=16)
    with pytest.raises(ConfigError) as info:
        check_batch(train, world_size=2)
    assert "train.global_batch_size" in str(info.value) and "grad_accum: 4" in str(info.value)
    config = deepspeed_config(train.model_copy(update={"global_batch_size": 8}), DistributedSpec(strategy="zero2"), 2)
    assert config["train_batch_size"] == 8 and config["zero_optimization"] == {"stage": 2}


def test_offload_needs_the_right_stage(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"data: {{train: {ROOT / 'data/chat/train.jsonl'}}}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="needs strategy: zero3"):
        load_spec(spec, ["distributed.strategy=zero2", "distributed.offload=parameters"])
    with pytest.raises(ConfigError, match="cannot be sharded"):
        load_spec(spec, ["method.name=qlora", "distributed.strategy=zero3"])


def test_nproc_without_a_strategy_says_how_to_fix(tiny_llama_dir: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "tunelab.cli", "train", str(_spec(tmp_path, tiny_llama_dir)), "--nproc", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "distributed.strategy=ddp" in result.stderr


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A build killed mid-way leaves its lock; torch then waits on it forever, silently (it hung a whole test run).
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    old, fresh = tmp_path / "py311_cpu/deepspeed_shm_comm/lock", tmp_path / "py311_cpu/other_op/lock"
    for lock in (old, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
    os.utime(old, (0, 0))
    assert clear_stale_build_locks("deepspeed_shm_comm") == [old]
    assert not old.exists() and fresh.exists()
    (fresh.parent.parent / "deepspeed_shm_comm/lock").touch()  # a build running now: its lock is kept
    assert clear_stale_build_locks("deepspeed_shm_comm") == []
