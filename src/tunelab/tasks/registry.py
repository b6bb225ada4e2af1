"""The scenario registry: each scenario's task, by name and approach, registered by the scenario's own module.

It imports no scenario, so a scenario module registers itself here without importing the package that imports
it (as the method families do in `tunelab.methods.registry`). `tunelab.tasks` imports every scenario module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from tunelab.tasks.base import Task

Approach = Literal["generative", "head"]


@dataclass(frozen=True)
class ScenarioInfo:
    name: str  # what `task.scenario` names
    task: Callable[[], Task]  # builds the task (a task class)
    approach: Approach = "generative"  # `head`: a classification head instead of the language-model head


_REGISTRY: dict[tuple[str, Approach], ScenarioInfo] = {}


def register_scenario(info: ScenarioInfo) -> None:
    key = (info.name, info.approach)
    if key in _REGISTRY:
        raise ValueError(f"scenario {info.name!r} ({info.approach}) is registered twice")
    _REGISTRY[key] = info


def scenario_names() -> list[str]:
    return sorted(name for name, approach in _REGISTRY if approach == "generative")


def head_scenarios() -> list[str]:
    """The scenarios that also train with a classification head (`task.approach: head`)."""
    return sorted(name for name, approach in _REGISTRY if approach == "head")


def get_task(name: str, approach: str = "generative") -> Task:
    """The scenario's task (names and approaches are checked by the JobSpec first)."""
    return _REGISTRY[(name, "head" if approach == "head" else "generative")].task()
