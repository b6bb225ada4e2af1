"""Errors users see. Each names what is wrong, where, and how to fix it."""

from __future__ import annotations

from dataclasses import dataclass


class TunelabError(Exception):
    """Base class: the CLI prints these as a clean message, without a traceback."""


@dataclass(frozen=True)
class Problem:
    """One problem in a config or a data file: where it is, what it is, how to fix it."""

    where: str  # a field path ("train.lr") or a location ("train.jsonl:12")
    message: str
    hint: str = ""
    code: str = ""

    def __str__(self) -> str:
        code = f"[{self.code}] " if self.code else ""
        hint = f" (hint: {self.hint})" if self.hint else ""
        return f"{self.where}: {code}{self.message}{hint}"


class ProblemsError(TunelabError):
    """Several problems gathered and reported together, so the user fixes them in one pass."""

    title = "problems"

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} {self.title}:\n{lines}")


class ConfigError(ProblemsError):
    title = "problem(s) in the job spec"


class DataError(ProblemsError):
    title = "problem(s) in the data"


class ModelError(TunelabError):
    """A model could not be found or loaded."""
