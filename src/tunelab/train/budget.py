"""How long a run will take, and `train.time_budget`: as many steps as fit in a given training time.

Before training, `tunelab plan`'s model (FLOPs per token over this machine's measured matmul speed) gives a first
estimate. The real rate is only known once steps run, so after CALIBRATION_STEPS steps the loop times them (the
first WARMUP_STEPS are left out: they pay for first-call allocations and, under a launch, for the processes settling
— measured on the embedded model in 2 processes: 20 and 21 s for steps 1-2, 12 s from step 4 on) and says how long
the run will take; with a time budget it then sets the number of steps that fit and rebuilds the learning-rate
schedule for them (until then the schedule is the plan's estimate's, so the change is small). The chosen count is
saved in every checkpoint, so a resumed run keeps it (and its schedule) rather than measuring again.

The budget covers the optimizer steps; the validation-loss points and checkpoints during training add a little,
the evaluations before and after training are not counted.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

WARMUP_STEPS = 3  # not timed: slower than the rest
CALIBRATION_STEPS = 8  # steps 4..8 are timed: enough to average out a slow step, early enough to matter little
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")
_UNITS = (3600.0, 60.0, 1.0)


def parse_duration(text: str | float | int) -> float:
    """Seconds in '90s', '20m', '1.5h', '1h30m' (a bare number is seconds)."""
    if isinstance(text, bool):
        raise ValueError("a duration is a number of seconds or a text such as 90s, 20m, 1h30m")
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        cleaned = text.strip().lower().replace(" ", "")
        match = _DURATION.fullmatch(cleaned)
        if cleaned and match is None and cleaned.replace(".", "", 1).isdigit():
            seconds = float(cleaned)
        elif not cleaned or match is None or not any(match.groups()):
            raise ValueError(f"{text!r} is not a duration: write e.g. 90s, 20m, 1.5h or 1h30m")
        else:
            seconds = sum(float(v) * unit for v, unit in zip(match.groups(), _UNITS, strict=True) if v)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{text!r}: a time budget must be a positive duration, e.g. 20m")
    return seconds


def format_duration(seconds: float) -> str:
    """'45 s', '12.5 min', '2.1 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def steps_that_fit(budget_s: float, seconds_per_step: float, done: int, elapsed_s: float, cap: int | None) -> int:
    """The total step count for a budget: the steps done plus as many as the time left allows at the measured
    rate, at least one more than done (the run must end with a trained step), at most `cap`."""
    left = max(budget_s - elapsed_s, 0.0)
    total = done + max(1, math.floor(left / max(seconds_per_step, 1e-9)))
    return min(total, cap) if cap is not None else total


def measured_rate(history: Sequence[dict[str, float]]) -> float:
    """Seconds per step over the calibration steps after the warm-up ones (each row's `elapsed_s` is cumulative)."""
    rows = list(history)[:CALIBRATION_STEPS]
    start = min(WARMUP_STEPS, len(rows)) - 1
    if start < 0 or len(rows) - 1 == start:
        return float(rows[-1]["elapsed_s"]) / len(rows) if rows else 0.0
    return (float(rows[-1]["elapsed_s"]) - float(rows[start]["elapsed_s"])) / (len(rows) - 1 - start)


@dataclass(frozen=True)
class Forecast:
    """What the loop says once the first steps are timed."""

    total_steps: int
    seconds_per_step: float

    def line(self, done: int, budget_s: float | None) -> str:
        left = (self.total_steps - done) * self.seconds_per_step
        finish = time.strftime("%H:%M", time.localtime(time.time() + left))
        rate = f"{self.seconds_per_step:.2f} s/step measured on steps {WARMUP_STEPS + 1}-{CALIBRATION_STEPS}"
        if budget_s is None:
            return f"time: {self.total_steps} steps at {rate}: about {format_duration(left)} left (ends ~{finish})"
        return (
            f"time budget {format_duration(budget_s)}: {self.total_steps} steps fit at {rate} "
            f"(about {format_duration(left)} left, ends ~{finish}); the learning-rate schedule is set for them"
        )
