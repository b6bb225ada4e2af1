"""train.time_budget and the run-time estimate: durations read, steps fitted to the measured rate, the estimate
close to the measured time, the chosen count kept across a resume."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydantic import ValidationError
from rich.console import Console

from test_resume import _model, _rows
from tunelab.config import CheckpointSpec, TrainSpec
from tunelab.train.budget import CALIBRATION_STEPS, measured_rate, parse_duration, steps_that_fit
from tunelab.train.checkpoint import latest_checkpoint, saved_total_steps
from tunelab.train.loop import train
from tunelab.train.progress import ProgressReporter


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("20m", 1200), ("1.5h", 5400), ("1h30m", 5400), ("2m30s", 150), (45, 45)]
)
def test_durations_are_read(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["20 minutes", "", "m", "-5m", "0s", "1d"])
def test_a_bad_budget_names_the_field_and_the_fix(text: str) -> None:
    with pytest.raises(ValidationError) as caught:
        TrainSpec(time_budget=text)
    message = str(caught.value)
    assert "time_budget" in message and "20m" in message


def test_steps_fit_the_time_left_within_the_cap() -> None:
    assert steps_that_fit(60.0, 2.0, 3, 6.0, None) == 3 + 27  # 54 s left at 2 s/step
    assert steps_that_fit(60.0, 2.0, 3, 6.0, 10) == 10  # max_steps bounds it
    assert steps_that_fit(5.0, 2.0, 3, 6.0, None) == 4  # over budget already: one more step ends the run
    # Steps 1-3 (slow warm-up) are left out; steps 4-8 took 2, 2, 2.5, 2, 1.5 s.
    elapsed = [5.0, 9.0, 12.0, 14.0, 16.0, 18.5, 20.5, 22.0, 99.0]
    assert measured_rate([{"elapsed_s": e} for e in elapsed]) == pytest.approx(2.0)


def test_a_budget_sets_the_steps_and_the_estimate_holds(
    tiny_llama_dir: Path, tiny_tokenizer_dir: Path, tmp_path: Path
) -> None:
    rows, pad = _rows(tiny_tokenizer_dir)
    spec = TrainSpec(time_budget="6s", batch_size=2, lr=1e-3, max_seq_len=64, seed=0)
    shown = io.StringIO()
    reporter = ProgressReporter(1, 0, tmp_path / "m.jsonl", console=Console(file=shown, width=200))
    result = train(
        _model(tiny_llama_dir),
        rows,
        pad_id=pad,
        packed=True,
        train_spec=spec,
        ckpt_spec=CheckpointSpec(every_steps=None),
        out_dir=tmp_path,
        reporter=reporter,
        estimated_step_s=0.6,  # a wrong guess (10 steps): the timed steps must correct it
    )
    state = result.state
    assert state.total_steps == state.step > 12  # more than the plan's guess (10 steps)
    # The estimate made after the first steps, against the time the rest of the run took.
    rate = measured_rate(state.history)
    predicted = (state.step - CALIBRATION_STEPS) * rate
    measured = state.elapsed_s - state.history[CALIBRATION_STEPS - 1]["elapsed_s"]
    assert predicted == pytest.approx(measured, rel=0.3)
    assert state.elapsed_s == pytest.approx(6.0, rel=0.3)
    assert f"time budget 6 s: {state.step} steps fit" in shown.getvalue()
    lrs = [row["lr"] for row in state.history]
    assert lrs[-1] < 0.05 * max(lrs)  # the cosine schedule was rebuilt for the fitted count: it ends near 0


def test_a_resumed_budget_run_keeps_its_step_count(
    tiny_llama_dir: Path, tiny_tokenizer_dir: Path, tmp_path: Path
) -> None:
    rows, pad = _rows(tiny_tokenizer_dir)
    spec = TrainSpec(time_budget="5s", max_steps=60, batch_size=2, lr=1e-3, max_seq_len=64, seed=0)
    kwargs = {"pad_id": pad, "packed": True, "train_spec": spec, "out_dir": tmp_path}
    part = train(_model(tiny_llama_dir), rows, ckpt_spec=CheckpointSpec(every_steps=None), stop_after=10, **kwargs)
    chosen = part.state.total_steps
    assert part.interrupted and chosen is not None and CALIBRATION_STEPS < chosen <= 60
    checkpoint = latest_checkpoint(tmp_path / "checkpoints")
    assert checkpoint is not None and saved_total_steps(checkpoint) == chosen
    resumed = train(_model(tiny_llama_dir), rows, ckpt_spec=CheckpointSpec(), resume_from=checkpoint, **kwargs)
    assert resumed.state.step == resumed.state.total_steps == chosen  # not measured again: the schedule stays
