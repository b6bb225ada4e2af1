"""Several training files mixed by weight (`data.train: [{path, weight}, ...]`).

The mixture has as many rows as the files together; each file's share of it is its weight over the sum of the
weights. A file asked for more rows than it has is upsampled by repetition: every row is used once before any row
is used twice (whole shuffled passes, then a shuffled part of one more pass), so no row is left out by chance. A
file asked for fewer rows gives a random subset without repeats. All draws come from `train.seed`: the same seed
gives the same rows in the same order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Share:
    name: str
    available: int  # rows the file has (after any held-out validation rows)
    drawn: int  # rows it gives the mixture

    def __str__(self) -> str:
        return f"{self.name} {self.drawn} of {self.available} (x{self.drawn / self.available:.2f})"


def shares(sizes: list[int], weights: list[float]) -> list[int]:
    """Rows per source, in proportion to the weights, summing to the total size (largest remainders get the rest)."""
    total, weight_sum = sum(sizes), sum(weights)
    exact = [total * w / weight_sum for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def draw(items: list[T], count: int, rng: random.Random) -> list[T]:
    """`count` items: whole shuffled passes over `items`, then a shuffled part of one more."""
    drawn: list[T] = []
    while len(drawn) < count:
        shuffled = items[:]
        rng.shuffle(shuffled)
        drawn += shuffled[: count - len(drawn)]
    return drawn


def mix(sources: list[tuple[str, list[T], float]], seed: int) -> tuple[list[T], list[Share]]:
    """The mixture of (name, items, weight) sources, shuffled, and what each source gave."""
    rng = random.Random(seed)
    counts = shares([len(items) for _, items, _ in sources], [w for _, _, w in sources])
    mixed: list[T] = []
    for (_, items, _), count in zip(sources, counts, strict=True):
        mixed += draw(items, count, rng)
    rng.shuffle(mixed)
    return mixed, [Share(name, len(items), n) for (name, items, _), n in zip(sources, counts, strict=True)]
