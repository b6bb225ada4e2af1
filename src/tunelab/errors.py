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


REPEATS_SHOWN = 3  # a problem on more rows than this is reported once, with its count and its first lines


def summarize(problems: list[Problem], file: str, hints: dict[str, str] | None = None) -> list[Problem]:
    """Problems of one file, each repeated problem once: 200 identical lines hide the one thing to fix.
    `hints` gives a code's hint (e.g. the columns the file has), shown once per problem."""
    groups: dict[tuple[str, str], list[Problem]] = {}
    for problem in problems:
        groups.setdefault((problem.code, problem.message), []).append(problem)
    summary: list[Problem] = []
    for (code, message), group in groups.items():
        hint = (hints or {}).get(code, group[0].hint)
        if len(group) <= REPEATS_SHOWN:
            summary += [Problem(p.where, p.message, hint, p.code) for p in group]
            continue
        lines = ", ".join(p.where.rpartition(":")[2] for p in group[:REPEATS_SHOWN])
        summary.append(Problem(file, f"{message} on {len(group)} rows (lines {lines}, ...)", hint, code))
    return summary
