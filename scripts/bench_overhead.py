#!/usr/bin/env python3
"""Latency of hardened vs original models on ONNX Runtime, as ratios measured in one run.

For each configuration (insertion points x mode x k) the original and hardened sessions run in
interleaved pairs after a warm-up; the reported ratio is the median of per-pair ratios, so drift in machine
load cancels.  Prints a table and writes JSON.

    python scripts/bench_overhead.py                 # bundled teacher, 1x3x256x256, CPU
    python scripts/bench_overhead.py --quick         # small sizes, few repeats (CI-friendly)
    python scripts/bench_overhead.py --providers cuda --sizes 256 512
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from hardener.api import HardenConfig, harden
from hardener.asvp import AsvpParams
from hardener.validate import make_session, resolve_providers

TEACHER = Path(__file__).resolve().parents[1] / "hardener" / "assets" / "sr_x2.onnx"
LAYER_SETS = {1: ["body.1.conv2"], 3: ["body.0.conv2", "body.1.conv2", "body.2.conv2"]}


def pair_ratios(a, b, feed, repeats: int, warmup: int) -> tuple[float, float, float]:
    for _ in range(warmup):
        a.run(None, feed)
        b.run(None, feed)
    ta, ratios = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.run(None, feed)
        t1 = time.perf_counter()
        b.run(None, feed)
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(ta) * 1e3, statistics.median(ratios), float(np.percentile(ratios, 90))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=TEACHER)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256])
    ap.add_argument("--points", type=int, nargs="+", default=[1, 3], choices=sorted(LAYER_SETS))
    ap.add_argument("--modes", nargs="+", default=["channel", "spatial"])
    ap.add_argument("--ranks", type=int, nargs="+", default=[4])
    ap.add_argument("--iterations", type=int, default=AsvpParams.iterations)
    ap.add_argument("--providers", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="sizes 64, k=1 and 4, 3 repeats: checks it runs")
    ap.add_argument("--json", type=Path, default=Path("bench_overhead.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.ranks, args.repeats, args.warmup = [64], [1, 4], 3, 1
    providers = resolve_providers(args.providers.split(","))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        original = make_session(args.model, providers, tf32=False, threads=args.threads)
        name = original.get_inputs()[0].name
        for points in args.points:
            for mode in args.modes:
                for k in args.ranks:
                    out = Path(tmp) / f"h_{points}_{mode}_{k}.onnx"
                    params = AsvpParams(rank=k, mode=mode, iterations=args.iterations)
                    result = harden(args.model, out, HardenConfig(layers=LAYER_SETS[points], params=params,
                                                                  validate=False))
                    nodes = sum(i["nodes"] for i in result.report["insertions"])
                    hardened = make_session(out, providers, tf32=False, threads=args.threads)
                    for size in args.sizes:
                        x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
                        ms, ratio, p90 = pair_ratios(original, hardened, {name: x}, args.repeats, args.warmup)
                        rows.append({"provider": providers[0], "size": size, "points": points, "mode": mode,
                                     "rank": k, "iterations": args.iterations, "inserted_nodes": nodes,
                                     "original_ms": ms, "ratio_median": ratio, "ratio_p90": p90})
                        print(f"{providers[0]:>22} {size:>4}^2 points={points} {mode:>7} k={k} "
                              f"nodes={nodes:>5} original {ms:8.2f} ms  hardened/original {ratio:.3f} "
                              f"(p90 {p90:.3f})", flush=True)
    args.json.write_text(json.dumps({"model": str(args.model), "threads": args.threads, "rows": rows}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
