"""Draw a before/after benchmark chart (the report's grouped bars) from measured numbers, for a README or a card.

    python scripts/benchmark_chart.py --out docs/images/truthfulqa.png \
        "truthfulqa_mc1/acc=0.255:0.270" "truthfulqa_mc2/acc=0.464:0.520" --title "TruthfulQA, 408 test questions"

Each argument is METRIC=BEFORE:AFTER, as printed by `tunelab eval` / `tunelab train`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tunelab.report import benchmark_png


def parse(item: str) -> tuple[str, float, float]:
    name, _, values = item.partition("=")
    before, _, after = values.partition(":")
    try:
        return name, float(before), float(after)
    except ValueError:
        raise SystemExit(f"{item!r}: give METRIC=BEFORE:AFTER, e.g. truthfulqa_mc1/acc=0.255:0.270") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("values", nargs="+", help="METRIC=BEFORE:AFTER")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--title", default="benchmarks")
    args = parser.parse_args()
    rows = [parse(item) for item in args.values]
    before = {name: b for name, b, _ in rows}
    after = {name: a for name, _, a in rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(benchmark_png(before, after, [name for name, _, _ in rows], args.title))
    print(args.out)


if __name__ == "__main__":
    main()
