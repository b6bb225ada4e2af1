"""Fuzz the job service past CI's bounded counts (issue 15):

    .venv/bin/python bench/fuzz_service.py --examples 200

Runs the two fuzz suites with TUNELAB_FUZZ_EXAMPLES examples per property: tests/test_service_fuzz.py (schemathesis
from the service's OpenAPI schema, in-process, 17 operations, plus hostile values in job requests: examples x 21
requests; on PostgreSQL too when TUNELAB_TEST_POSTGRES_URL is set) and tests/test_file_fuzz.py (hypothesis on the
file checks: examples x 7 files). Prints the counts and pytest's verdict; exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITES = ["tests/test_service_fuzz.py", "tests/test_file_fuzz.py"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200, help="Examples per operation and per file property.")
    args = parser.parse_args()
    env = {**os.environ, "TUNELAB_FUZZ_EXAMPLES": str(args.examples), "PYTHONPATH": str(ROOT / "src")}
    started = time.monotonic()
    command = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *SUITES]
    result = subprocess.run(command, cwd=ROOT, env=env, check=False)
    print(f"{args.examples} examples per property: about {args.examples * 21} requests and {args.examples * 7} files "
          f"in {time.monotonic() - started:.0f} s; exit {result.returncode}")  # fmt: skip
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
