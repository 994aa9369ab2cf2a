"""The longer fuzz: schemathesis against a live panel's OpenAPI schema (/api/v1 with a personal
API token, the gateway with a gateway key), many examples per operation. Prints operations, test
cases, failures and errors; exits 1 on any failure. What is fuzzed and skipped: tests/fuzzing.py.

    .venv/bin/python bench/bench_fuzz.py [--examples 50] [--seconds 600] [--seed 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fuzzing import fuzz  # noqa: E402
from tests.live import standalone_panel  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=50, help="max examples per operation")
    parser.add_argument("--seconds", type=int, default=600, help="time budget of the fuzzing")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-fuzz-"))
    started = time.monotonic()
    with standalone_panel(root, worker=False) as panel:
        result = fuzz(panel, root / "report", max_examples=args.examples, max_time_s=args.seconds, seed=args.seed)
        tracebacks = panel.log("web", 10**8).count("Traceback")
    for output in result.outputs:
        print(output[-6000:])
    print(f"operations {result.operations}  test cases {result.test_cases}  failures {result.failures}  "
          f"errors {result.errors}  web tracebacks {tracebacks}  in {time.monotonic() - started:.0f} s  "
          f"(reports: {root / 'report'})")
    return 0 if result.clean and tracebacks == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
