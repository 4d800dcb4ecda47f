"""Wall time of a small grid (8 runs) under each executor, and the executor's overhead per run.

    python scripts/bench_executors.py [--out bench_executors.json] [--modes direct,local1,local2,dask1,dask2]

Modes: ``direct`` = ``Runner.run_all()`` with no executor (the runner called directly, in this process);
``serial`` = the serial executor (``execute_run`` in this process); ``localN`` = the local process pool with N
workers; ``daskN`` = a Dask LocalCluster with N single-threaded workers.  Every mode starts from an empty
results folder holding only the hardened teachers (built once, first), so each pays what a fresh
``attack run`` pays: worker start-up, imports, evaluation set, query sets and teacher answers per worker.
Threads per worker: 1 (2 workers x 1 thread on 2 cores; the direct and serial modes also run on 1 thread).
Prints one line per mode and the ratios; writes the numbers as JSON (atomically).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def grid():
    from attacks.suite import Defence, Suite

    return Suite(tasks=["sr2"], defences=[Defence("none"), Defence("asvp", layers=["body.*.conv2"], rank=2)],
                 attackers=["naive"], students=["tiny"], seeds=[0, 1, 2, 3], queries=48, patch=32, steps=30,
                 batch=8, eval_size=48)


def run_mode(mode: str, root: Path, teachers: Path) -> dict:
    import torch

    from attacks.executors import DaskExecutor, LocalExecutor, SerialExecutor
    from attacks.suite import Runner

    out = root / mode
    shutil.copytree(teachers, out / "teachers")
    runner = Runner(grid(), out, progress=False, threads=1)  # 'direct': 1 ONNX Runtime thread, like the workers
    if mode == "direct":
        executor = None
    elif mode == "serial":
        executor = SerialExecutor(threads=1)
    elif mode.startswith("local"):
        executor = LocalExecutor(workers=int(mode[5:]), threads=1)
    elif mode.startswith("dask"):
        executor = DaskExecutor(workers=int(mode[4:]), threads=1)
    else:
        raise SystemExit(f"bench_executors: error: unknown mode {mode!r}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.perf_counter()
    try:
        results = runner.run_all(executor=executor)
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - started
    run_seconds = [r["seconds"] for r in results]
    return {"mode": mode, "runs": len(results), "wall_s": wall, "sum_run_seconds": sum(run_seconds),
            "psnr": {Path(r["image"]).stem: r["student_metrics"]["psnr"] for r in results}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench_executors.json"))
    ap.add_argument("--modes", default="direct,local1,local2,dask1,dask2")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    from attacks.suite import Runner

    with tempfile.TemporaryDirectory(prefix="bench_executors_") as tmp:
        root = Path(tmp)
        prep = Runner(grid(), root / "prep", progress=False)  # hardened teachers once (cached by hash)
        for (task, defence, *_), *_ in prep.identified_plan():
            prep.teacher_path(task, defence)
        rows = []
        for mode in modes:
            try:
                row = run_mode(mode, root, root / "prep" / "teachers")
            except ImportError as exc:
                print(f"{mode:>7}: skipped ({exc})", flush=True)
                continue
            rows.append(row)
            print(f"{mode:>7}: {row['runs']} runs, wall {row['wall_s']:6.1f} s, sum of per-run seconds "
                  f"{row['sum_run_seconds']:6.1f} s", flush=True)
    by = {r["mode"]: r for r in rows}
    ratios = {}
    for kind in ("local", "dask"):
        if f"{kind}1" in by and f"{kind}2" in by:
            ratios[f"{kind}: wall(1 worker) / wall(2 workers)"] = by[f"{kind}1"]["wall_s"] / by[f"{kind}2"]["wall_s"]
    if "direct" in by:
        n = by["direct"]["runs"]
        for mode in by:
            if mode != "direct":
                ratios[f"{mode}: wall / direct"] = by[mode]["wall_s"] / by["direct"]["wall_s"]
                ratios[f"{mode}: overhead per run vs direct (s)"] = (by[mode]["wall_s"] - by["direct"]["wall_s"]) / n
        same = {m: by[m]["psnr"] == by["direct"]["psnr"] for m in by if m != "direct"}
        ratios["same PSNRs as direct"] = same
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    data = {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(), "grid_runs": 8, "threads_per_worker": 1,
            "modes": rows, "ratios": ratios}
    from hardener.model_io import atomic_write

    atomic_write(json.dumps(data, indent=2).encode(), None, args.out)
    return 0


if __name__ == "__main__":  # spawned workers import this file's module: the guard keeps them from rerunning it
    sys.exit(main())
