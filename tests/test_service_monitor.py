"""The worker's view of the training loop's metrics log: every step reported once, across resumes."""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.job_service.monitor import MetricsTail, validation_event


def _rows(steps: range, elapsed: float) -> str:
    return "".join(json.dumps({"step": s, "elapsed_s": elapsed * s}) + "\n" for s in steps)


def test_tail_reports_each_step_once_across_a_rewrite_that_outgrows_the_old_file(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    log.write_text(_rows(range(1, 8), 0.1))
    tail = MetricsTail(log, last_step=0)
    assert [r["step"] for r in tail.read()] == [1, 2, 3, 4, 5, 6, 7]
    # A resume from step 4: the loop rewrites the history, then appends steps 5.. with other timings (so other
    # byte lengths), and the file is already longer than before when it is next read.
    log.write_text(_rows(range(1, 5), 0.1) + _rows(range(5, 12), 0.123456789))
    assert [r["step"] for r in tail.read()] == [8, 9, 10, 11]


def test_tail_waits_for_a_line_being_written_and_starts_after_the_reported_step(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    log.write_text(_rows(range(1, 4), 0.1) + '{"step": 4')
    tail = MetricsTail(log, last_step=2)  # steps 1-2 were reported by an earlier worker
    assert [r["step"] for r in tail.read()] == [3]
    with log.open("a") as f:
        f.write(', "elapsed_s": 0.4}\n')
    assert [r["step"] for r in tail.read()] == [4]
    assert MetricsTail(tmp_path / "missing.jsonl", 0).read() == []


def test_validation_points_are_reported_once_each_as_valid_loss_events(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    point = {"eval": "validation", "step": 2, "loss": 2.5, "token_accuracy": 0.4}
    log.write_text(_rows(range(1, 3), 0.1))
    tail = MetricsTail(log, last_step=0)
    assert [r["step"] for r in tail.read()] == [1, 2]
    with log.open("a") as f:  # the point comes after its step's row, in a later read
        f.write(json.dumps(point) + "\n" + _rows(range(3, 4), 0.1))
    rows = tail.read()
    assert [(r["step"], r.get("eval")) for r in rows] == [(2, "validation"), (3, None)]
    assert tail.read() == []
    event = validation_event(rows[0], total=3)
    assert event.type == "metrics"
    assert event.data == {"step": 2, "total_steps": 3, "valid_loss": 2.5, "valid_token_accuracy": 0.4}
    assert event.message == "Step 2/3: validation loss=2.5000"
