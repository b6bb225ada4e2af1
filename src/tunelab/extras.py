"""Optional features and the pip extra that installs each (pyproject.toml's [project.optional-dependencies]).

The base install trains (LoRA family, full), evaluates, exports and serves. A feature outside it imports its package
through `optional_import`, or checks for it up front with `require`, so that a missing package is one clear message
naming the extra to install, instead of a ModuleNotFoundError from deep inside a run.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

from tunelab.errors import Problem, TunelabError


@dataclass(frozen=True)
class Extra:
    name: str
    modules: dict[str, str]  # top-level module -> the distribution that provides it (named in messages)


EXTRAS = {
    extra.name: extra
    for extra in (
        Extra("deepspeed", {"deepspeed": "deepspeed"}),
        Extra("qlora", {"bitsandbytes": "bitsandbytes"}),
        Extra(
            "service",
            {"sqlalchemy": "sqlalchemy", "alembic": "alembic", "python_multipart": "python-multipart"},
        ),
        Extra("postgres", {"psycopg": "psycopg"}),
        Extra("benchmarks", {"lm_eval": "lm-eval"}),
        Extra("ray", {"ray": "ray"}),
        Extra("storage", {"s3fs": "s3fs"}),
        Extra(
            "trackers",
            {
                "mlflow": "mlflow-skinny",
                "sqlalchemy": "sqlalchemy",
                "alembic": "alembic",
                "wandb": "wandb",
            },
        ),
    )
}


class MissingExtraError(TunelabError):
    """A feature's optional packages are not installed; the message names the extra that installs them."""

    def __init__(self, extra: str, feature: str, packages: list[str], detail: str = "") -> None:
        self.extra = extra
        self.packages = packages
        why = f" ({detail})" if detail else ""
        super().__init__(f"{_needs(feature, packages)}{why}; install the {extra} extra: {install_hint(extra)}")


def install_hint(extra: str) -> str:
    """The command that installs `extra`; a source checkout (an editable install) names the folder instead."""
    return f"pip install 'tunelab[{extra}]', or pip install -e '.[{extra}]' in a source checkout"


def missing(extra: str, modules: Sequence[str] | None = None) -> list[str]:
    """The distributions of `extra` that cannot be imported here, found without importing them (DeepSpeed and
    lm-eval take seconds to import). `modules`: only those of the extra, for a feature that needs part of it (one
    tracker of the trackers extra)."""
    wanted = _extra(extra).modules.items()
    return [dist for module, dist in wanted if (modules is None or module in modules) and not _findable(module)]


def require(extra: str, feature: str, modules: Sequence[str] | None = None) -> None:
    """Raise MissingExtraError unless every package of `extra` (or its `modules`) is installed; call it before a
    command starts work."""
    packages = missing(extra, modules)
    if packages:
        raise MissingExtraError(extra, feature, packages)


def optional_import(module: str, extra: str, feature: str) -> ModuleType:
    """`import module`, or MissingExtraError naming `extra` when it (or a package it imports) is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        packages = missing(extra) or [_extra(extra).modules.get(module.partition(".")[0], module)]
        raise MissingExtraError(extra, feature, packages, detail=str(exc)) from exc


def missing_problem(where: str, extra: str, feature: str, modules: Sequence[str] | None = None) -> Problem | None:
    """The job spec's problem when field `where` asks for a feature whose extra (or the `modules` of it that the
    feature needs) is not installed, else None."""
    packages = missing(extra, modules)
    if not packages:
        return None
    return Problem(where, _needs(feature, packages), install_hint(extra))


def _needs(feature: str, packages: list[str]) -> str:
    names = " and ".join(", ".join(packages).rsplit(", ", 1))
    return f"{feature} needs {names}, which {'is' if len(packages) == 1 else 'are'} not installed"


def _extra(name: str) -> Extra:
    if name not in EXTRAS:
        raise ValueError(f"unknown extra {name!r}; known: {', '.join(EXTRAS)}")  # a programming error, not input
    return EXTRAS[name]


def _findable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken parent package, or a module in sys.modules without a spec
        return False
