#!/usr/bin/env python3
"""Cost of the provenance mark: marked/original latency on ONNX Runtime, measured in one run.

The model is marked with a key derived from a fixed public seed (``generate_key(0)``; latency does not depend
on the key) at ``harden mark``'s default target, then the original and the marked sessions run in
interleaved pairs after a warm-up, on one fixed input per size, exactly as ``bench_overhead.py`` times ASVP
(median of per-pair ratios, its 90th percentile, and on CPU the steadier ratio of process CPU time).  The
FLOP floor beside it is ``1 + mark MACs / model MACs``: the mark is a 3x3 convolution C -> 16, a squared
tanh, a 1x1 convolution 16 -> C and a per-image mean, per image output.

    python scripts/bench_mark.py                    # bundled x2 teacher and the edsr20 net, 256^2 and 512^2
    python scripts/bench_mark.py --quick --json out.json
    python scripts/bench_mark.py --providers cuda
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

from bench_overhead import Runner, build_edsr20, mac_tensors, model_macs, pair_ratios, tensor_shapes

from hardener.provenance.key import generate_key
from hardener.provenance.mark import mark_model
from hardener.runtime import make_session, resolve_providers

TEACHER = Path(__file__).resolve().parents[1] / "hardener" / "assets" / "sr_x2.onnx"
MARK_HIDDEN = 16  # hidden channels of the mark (hardener.provenance.signal)


def mark_macs(output_shape: tuple[int, ...]) -> int:
    n, c, h, w = output_shape
    return n * h * w * (9 * c * MARK_HIDDEN + MARK_HIDDEN * c)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256,512", help="input sizes (LR side), comma separated")
    ap.add_argument("--models", default="teacher,edsr20", help="teacher (bundled x2) and/or edsr20")
    ap.add_argument("--providers", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (CPU)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="64^2, teacher only, few repeats: checks that it runs")
    ap.add_argument("--json", type=Path, help="write the rows as JSON (schema hardener.bench-mark/1)")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.models, args.repeats, args.warmup = "64", "teacher", 5, 1
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        ap.error(f"--sizes must be integers separated by commas, got {args.sizes!r}")
    models = args.models.split(",")
    if not set(models) <= {"teacher", "edsr20"}:
        ap.error(f"--models: choose from teacher, edsr20, got {args.models!r}")
    providers = resolve_providers(args.providers.split(","))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"{'provider':>8} {'model':>8} {'size':>5}  marked/original (median, p90, cpu)  floor   orig ms")
        for name in models:
            source = TEACHER if name == "teacher" else build_edsr20(tmp)
            marked = tmp / f"{name}.marked.onnx"
            report = mark_model(source, generate_key(0), marked, force=True, report_path=tmp / f"{name}.json")
            proto = onnx.load(str(source))
            out_name = proto.graph.output[0].name
            for size in sizes:
                shapes = tensor_shapes(source, mac_tensors(proto) + [out_name], size, providers, args.threads)
                macs = model_macs(proto, shapes)
                x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
                sessions = [make_session(p, providers, False, args.threads) for p in (source, marked)]
                feed = {sessions[0].get_inputs()[0].name: x}
                stats = pair_ratios(Runner(sessions[0], feed), Runner(sessions[1], feed), args.repeats, args.warmup)
                floor = 1 + mark_macs(shapes[out_name]) / macs
                row = {"provider": providers[0], "model": name, "size": size, "eps": report["outputs"][0]["eps"],
                       "original_ms": stats["original_ms"], "marked_ms": stats["hardened_ms"],
                       "ratio_median": stats["ratio_median"], "ratio_p90": stats["ratio_p90"],
                       "cpu_ratio_median": stats["cpu_ratio_median"], "model_macs": macs,
                       "mark_macs": mark_macs(shapes[out_name]), "flop_floor": floor}
                rows.append(row)
                cpu = "-" if row["cpu_ratio_median"] is None else f"{row['cpu_ratio_median']:.3f}"
                print(f"{providers[0][:-17]:>8} {name:>8} {size:>4}²  {row['ratio_median']:.3f} "
                      f"{row['ratio_p90']:.3f} {cpu:>6}                  {floor:.3f}  {row['original_ms']:8.2f}")
    if args.json:
        args.json.write_text(json.dumps({"schema": "hardener.bench-mark/1", "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
