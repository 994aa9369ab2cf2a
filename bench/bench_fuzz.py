"""The longer fuzz: schemathesis against a live panel's OpenAPI schema (/api/v1 with a personal
API token, the gateway with a gateway key), many examples per operation, then the structural
families (nesting, escapes, encodings, enormous rows and key counts, YAML features), many attacks
each. Prints operations, test cases, failures and errors, and the attacks per family with any that
were not refused with their row or line; exits 1 on any failure. What is fuzzed and skipped:
tests/fuzzing.py.

    .venv/bin/python bench/bench_fuzz.py [--examples 50] [--seconds 600] [--per-family 25] [--seed 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fuzzing import fuzz, fuzz_structure  # noqa: E402
from tests.live import standalone_panel  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=50, help="max examples per operation")
    parser.add_argument("--seconds", type=int, default=600, help="time budget of the fuzzing")
    parser.add_argument("--per-family", type=int, default=25, help="structural attacks per family")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-fuzz-"))
    started = time.monotonic()
    with standalone_panel(root, worker=False) as panel:
        result = fuzz(panel, root / "report", max_examples=args.examples, max_time_s=args.seconds, seed=args.seed)
        structural = fuzz_structure(panel, per_family=args.per_family, seed=args.seed)
        tracebacks = panel.log("web", 10**8).count("Traceback")
    for output in result.outputs:
        print(output[-6000:])
    print(f"operations {result.operations}  test cases {result.test_cases}  failures {result.failures}  "
          f"errors {result.errors}  web tracebacks {tracebacks}  in {time.monotonic() - started:.0f} s  "
          f"(reports: {root / 'report'})")
    print("structural attacks: " + ", ".join(f"{family} {count}" for family, count in structural.by_family.items())
          + f"  failures {len(structural.failures)}")
    for failure in structural.failures:
        print("  " + failure)
    return 0 if result.clean and structural.clean and tracebacks == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
