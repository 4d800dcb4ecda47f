#!/usr/bin/env python3
"""Run an attack suite at several thief budgets (queries x steps) and print how the student drop depends on it.

    python scripts/budget_sweep.py tasks_all --queries 96,384,1536 --steps 300,1200,4800 --out results/budget
    python scripts/budget_sweep.py my_suite.toml --queries 48,96 --steps 30,60 --out /tmp/b --executor local

Each point is a full run of the suite (all its defences, attackers, students and seeds) with only queries
and steps changed, in OUT/q<queries>_s<steps>; runs are content-hashed, so rerunning resumes. Writes
OUT/budget.json and prints a markdown table. Budget points belong where the clean student stops improving:
read the clean ("none") rows' student PSNR across steps.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from attacks.budget import sweep, table
from attacks.cli import resolve_suite
from attacks.config import Suite
from attacks.schema import SuiteError


def _ints(text: str, what: str, ap) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        ap.error(f"{what} must be integers separated by commas, got {text!r}")
    if not values or min(values) < 1:
        ap.error(f"{what} must be positive, got {text!r}")
    return values


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", help="a suite file or the name of a packaged suite")
    ap.add_argument("--queries", required=True, help="query budgets, comma separated")
    ap.add_argument("--steps", required=True, help="training steps, comma separated")
    ap.add_argument("--out", type=Path, required=True, help="output folder (one subfolder per point)")
    ap.add_argument("--executor", choices=("serial", "local"), default=None,
                    help="run each point's runs on a local process pool (default: in this process)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch/ONNX Runtime threads per run")
    args = ap.parse_args(argv)
    queries, steps = _ints(args.queries, "--queries", ap), _ints(args.steps, "--steps", ap)
    try:
        suite = Suite.load(resolve_suite(args.suite))
    except (SuiteError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    executor = None
    if args.executor:
        from attacks.executors import make_executor

        executor = make_executor(args.executor, workers=args.workers, threads=args.threads)
    report = sweep(suite, queries, steps, args.out, executor=executor, threads=args.threads)
    print("\n".join(table(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
