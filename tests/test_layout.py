"""The run-folder names defined once, and the atomic writes: a reader sees the old content or the new, never a part."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tunelab.atomic import publish_folder, staged_folder, write_atomic
from tunelab.layout import RunLayout, checkpoint_folders, checkpoint_name, checkpoint_step


def test_run_layout_names_what_a_run_writes(tmp_path: Path) -> None:
    run = RunLayout(tmp_path)
    assert (run.adapter, run.merged, run.checkpoints) == (
        tmp_path / "adapter",
        tmp_path / "merged",
        tmp_path / "checkpoints",
    )
    assert (run.metrics.name, run.report_html.name, run.report_png.name) == (
        "metrics.jsonl",
        "report.html",
        "report.png",
    )
    assert (run.spec.name, run.summary.name, run.eval_before.name) == ("spec.yaml", "summary.json", "eval_before.json")
    checkpoint = run.checkpoint(12)
    assert checkpoint.folder == tmp_path / "checkpoints" / "step-000012"
    assert checkpoint.trainable.name == "trainable.safetensors" and checkpoint.rng(1).name == "rng-1.safetensors"


def test_checkpoint_folders_sort_by_step_and_skip_unfinished_ones(tmp_path: Path) -> None:
    for name in (checkpoint_name(1000000), checkpoint_name(20), checkpoint_name(3), ".tmp-step-000030", "notes"):
        (tmp_path / name).mkdir()
    assert [checkpoint_step(p) for p in checkpoint_folders(tmp_path)] == [3, 20, 1000000]
    assert checkpoint_folders(tmp_path / "missing") == []


def test_write_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.json"
    write_atomic(target, "old")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert os.listdir(target.parent) == ["file.json"]


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "file.txt"
    write_atomic(target, "old")

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        write_atomic(target, "new")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["file.txt"]


def test_staged_folder_publishes_on_success_and_cleans_up_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with staged_folder(target) as staged:
        (staged / "a").write_text("1")
    assert (target / "a").read_text() == "1"
    with pytest.raises(RuntimeError), staged_folder(target) as staged:
        (staged / "b").write_text("2")
        raise RuntimeError("interrupted")
    assert sorted(os.listdir(tmp_path)) == ["model"] and os.listdir(target) == ["a"]  # the old folder, untouched


def test_publish_folder_replaces_the_previous_folder(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("x")
    (tmp_path / "built").mkdir()
    (tmp_path / "built" / "new").write_text("y")
    publish_folder(tmp_path / "built", tmp_path / "out")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["new"]
