"""storage: s3://...: a run's folder mirrored to a real S3 API on loopback (moto's server). A run stopped mid-way and
resumed on a "new machine" (its local folder gone) fetches the checkpoint from the bucket and ends with the same
adapter as an uninterrupted run; the bucket then holds the adapter, the report and the pruned checkpoint list."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from s3_support import moto_bucket
from tunelab.cli import app
from tunelab.config import load_spec
from tunelab.errors import ConfigError
from tunelab.layout import RunLayout, checkpoint_name
from tunelab.recipe import run_job
from tunelab.storage import RunMirror

ROOT = Path(__file__).parents[1]
BUCKET = "tunelab-test"


@pytest.fixture(scope="module")
def fs() -> Iterator[Any]:
    with moto_bucket(BUCKET) as bucket:
        yield bucket


def _spec(tmp_path: Path, model_dir: Path, run: str) -> Path:
    spec = tmp_path / f"{run}.yaml"
    spec.write_text(
        f"model: {{name: {model_dir}}}\n"
        "method: {name: lora, r: 4, alpha: 8}\n"
        f"data: {{train: {ROOT / 'data/chat/train.jsonl'}, validation: {ROOT / 'data/chat/validation.jsonl'}}}\n"
        "train: {max_steps: 6, batch_size: 4, lr: 5.0e-3, max_seq_len: 64, report_to: []}\n"
        "checkpoints: {every_steps: 2, keep_last: 1}\n"
        "eval: {max_examples: 4, samples: 1, max_new_tokens: 4, generations: 2}\n"
        f"output_dir: {tmp_path / run}\n",
        encoding="utf-8",
    )
    return spec


def test_a_stopped_run_resumes_from_the_bucket_on_a_new_machine(fs: Any, tiny_llama_dir: Path, tmp_path: Path) -> None:
    storage = f"s3://{BUCKET}/runs"
    reference = run_job(load_spec(_spec(tmp_path, tiny_llama_dir, "whole"), []))  # no storage: the reference
    spec = load_spec(_spec(tmp_path, tiny_llama_dir, "moved"), [f"storage={storage}"])
    stopped = run_job(spec, stop_after=3)
    assert stopped.interrupted
    remote = f"{BUCKET}/runs/moved"
    assert fs.ls(f"{remote}/checkpoints") == [f"{remote}/checkpoints/step-000003"]  # keep_last: 1, pruned remotely
    shutil.rmtree(tmp_path / "moved")  # the new machine has nothing local
    result = CliRunner().invoke(app, ["train", str(tmp_path / "moved.yaml"), "--storage", storage, "--resume"])
    assert result.exit_code == 0, result.output
    assert f"fetching the latest checkpoint from {storage}/moved" in result.output
    assert "step 3" in result.output and f"run folder mirrored to {storage}/moved" in result.output
    name = "adapter_model.safetensors"
    with fs.open(f"{remote}/adapter/{name}", "rb") as remote_file:
        (tmp_path / name).write_bytes(remote_file.read())
    expected = load_file(reference.adapter / name)
    for key, value in load_file(tmp_path / name).items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6)
    assert fs.exists(f"{remote}/report.html") and fs.exists(f"{remote}/metrics.jsonl")


def test_a_bad_storage_url_names_the_field(tmp_path: Path, tiny_llama_dir: Path) -> None:
    with pytest.raises(ConfigError, match="storage"):
        load_spec(_spec(tmp_path, tiny_llama_dir, "x"), ["storage=bucket/prefix"])


def test_a_checkpoint_half_uploaded_is_never_resumed_from(tmp_path: Path) -> None:
    """A machine killed while uploading leaves a remote checkpoint without its marker: the previous one counts."""
    run = tmp_path / "run"
    done, partial = (RunLayout(run).checkpoints / checkpoint_name(s) for s in (2, 4))
    for folder in (done, partial):
        folder.mkdir(parents=True)
        (folder / "trainable.safetensors").write_bytes(b"weights")
    mirror = RunMirror(f"file://{tmp_path / 'bucket'}", run, keep_last=2)
    mirror.push_checkpoint(done)
    mirror._put(partial / "trainable.safetensors")  # its first file only: the upload stopped there
    assert mirror.latest_remote_step() == 2
    shutil.rmtree(run)
    assert mirror.pull_latest_checkpoint() == done and (done / "trainable.safetensors").read_bytes() == b"weights"
    assert not partial.exists()
