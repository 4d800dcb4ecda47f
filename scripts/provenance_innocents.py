#!/usr/bin/env python3
"""Innocent trials for `harden verify` on x2 SR: (innocent model x candidate key) pairs, at 4, 8, 16 probes.

    python scripts/provenance_innocents.py --keys 128 --out results/innocents
    python scripts/provenance_innocents.py --suspect srmd_x2=/path/srmd_x2.onnx --out results/innocents

Reference: the bundled x2 teacher (unmarked).  Innocents (none ever saw a candidate key):
  bicubic            torch bicubic x2 upsampling
  asvp-h1.3          the teacher hardened with ASVP (k=4, h=1.3, body.*.conv2)
  other-key-1, -2    the teacher marked (`harden mark` defaults) with two keys that are not candidates
  tiny-s0..s2        small students distilled from scratch from the clean teacher (384 queries, 600 steps)
  close-s0..s2       students started from the teacher's own weights, fine-tuned on its answers (the
                     innocent closest to the teacher: its residual is smallest)
  --suspect NAME=ONNX   any further x2 model (a real third-party one, say)
Positive controls (the key that marked their teacher is candidate 0): the marked teacher and close-s0..s2
fine-tuned on the MARKED teacher's answers.

Every (model, candidate key) pair gets verify's statistic (256 null keys, p < 1e-6 and no null key above
for "derived"), for the first 4, 8 and 16 default probes.  Writes OUT/innocents.json (with a run id: the
sha256 of the models, keys, probes, code and settings) and OUT/innocents.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from attacks.config import BUNDLED
from attacks.degrade import input_baseline
from attacks.distill import torch_predictor
from attacks.identity import attacks_fingerprint, digest, environment, file_sha256, hardener_fingerprint
from attacks.innocents import CANDIDATE_SEED0, candidate_keys, summarize, trials
from hardener.model_io import atomic_write
from hardener.provenance.key import generate_key
from hardener.provenance.probes import default_probes
from hardener.provenance.verify import Runner

TEACHER = BUNDLED["sr2"]
COUNTS = (4, 8, 16)


def _onnx_predict(path: Path):
    run = Runner(path, "suspect")
    name = run.session.get_outputs()[0].name
    return lambda x: run(x, name).astype(np.float64)


def _torch_predict(model):
    batched = torch_predictor(model.eval())
    return lambda x: batched(x[None])[0].astype(np.float64)


def _bicubic(x):
    return np.clip(input_baseline(x[None], 2)[0], 0, 1).astype(np.float64)


def _students(teacher: Path, seeds: list[int], close: bool, steps: int) -> list:
    from attacks.data import patches
    from attacks.degrade import sr2
    from attacks.distill import train_student
    from attacks.oracle import Oracle
    from attacks.students import build_student

    import onnx

    out = []
    oracle = Oracle(teacher, threads=1)
    init = {t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy())  # the unmarked teacher's weights
            for t in onnx.load(str(TEACHER)).graph.initializer if not t.name.startswith("val")}
    for seed in seeds:
        hr = patches("train", 64, 384, seed=100 + seed)
        lr = sr2(hr, np.random.default_rng(seed))
        answers = oracle(lr)
        if close:
            student = build_student("edsr", 2, seed=seed)
            student.load_state_dict(init)
            train_student(student, lr, answers, steps=steps // 4, seed=seed, batch=8, lr=5e-4, loss="l2")
        else:
            student = build_student("tiny", 2, seed=seed)
            train_student(student, lr, answers, steps=steps, seed=seed)
        out.append(_torch_predict(student))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=128, help="candidate keys per model (default 128)")
    ap.add_argument("--null-keys", type=int, default=256)
    ap.add_argument("--seeds", default="0,1,2", help="student seeds")
    ap.add_argument("--steps", type=int, default=600, help="student training steps (close students: steps/4)")
    ap.add_argument("--suspect", action="append", default=[], metavar="NAME=ONNX", help="a further innocent")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = []
    for item in args.suspect:
        name, _, path = item.partition("=")
        if not path or not Path(path).is_file():
            ap.error(f"--suspect wants NAME=ONNX with an existing file, got {item!r}")
        extra.append((name, Path(path)))
    torch.set_num_threads(1)
    keys = candidate_keys(args.keys)
    identity = {"teacher": file_sha256(TEACHER), "keys": {"count": args.keys, "seed0": CANDIDATE_SEED0},
                "null_keys": args.null_keys, "counts": COUNTS, "seeds": seeds, "steps": args.steps,
                "extra": {n: file_sha256(p) for n, p in extra}, "code": [hardener_fingerprint(), attacks_fingerprint()],
                "environment": environment()}
    run_id = digest(identity)
    probes = default_probes(max(COUNTS))
    ref = _onnx_predict(TEACHER)
    ys = [ref(x) for _, x in probes]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hardened, marked = tmp / "asvp.onnx", tmp / "marked.onnx"
        from hardener import AsvpParams, HardenConfig, harden
        from hardener.provenance.mark import mark_model

        harden(TEACHER, hardened, HardenConfig(layers=["body.*.conv2"], params=AsvpParams(rank=4, gain=1.3)),
               raise_on_failure=True)
        mark_model(TEACHER, keys[0], marked)
        models = [("bicubic", "innocent", _bicubic), ("asvp-h1.3", "innocent", _onnx_predict(hardened))]
        for i in (1, 2):
            other = tmp / f"other{i}.onnx"
            mark_model(TEACHER, generate_key(CANDIDATE_SEED0 - i), other)
            models.append((f"other-key-{i}", "innocent", _onnx_predict(other)))
        models += [(n, "innocent", _onnx_predict(p)) for n, p in extra]
        models += [(f"tiny-s{s}", "innocent", f) for s, f in zip(seeds, _students(TEACHER, seeds, False, args.steps))]
        models += [(f"close-s{s}", "innocent", f) for s, f in zip(seeds, _students(TEACHER, seeds, True, args.steps))]
        models.append(("marked teacher", "derived (key 0)", _onnx_predict(marked)))
        models += [(f"close-s{s} of marked", "derived (key 0)", f)
                   for s, f in zip(seeds, _students(marked, seeds, True, args.steps))]

        results = []
        for name, kind, predict in models:
            rs = [predict(x) - y for (_, x), y in zip(probes, ys)]
            by = trials(ys, rs, keys, args.null_keys, list(COUNTS))
            # a derived model saw key 0 only: keys 1.. are innocent trials for it too
            innocent = by if kind == "innocent" else {n: v[1:] for n, v in by.items()}
            row = {"model": name, "kind": kind, **summarize(innocent),
                   "key0_z": {n: by[n][0]["z"] for n in COUNTS},
                   "residual_rms": float(np.sqrt(np.mean([np.mean(r ** 2) for r in rs])))}
            results.append(row)
            print(f"{name:24s} key0 z {row['key0_z'][16]:+.2f} | 16 probes: mean {row['by_probes'][-1]['z_mean']:+.2f}"
                  f" sd {row['by_probes'][-1]['z_sd']:.2f} max {row['by_probes'][-1]['z_max']:+.2f}", flush=True)

    report = {"schema": "attacks.innocents/1", "run_id": run_id, "identity": identity, "models": results}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write((json.dumps(report, indent=1) + "\n").encode(), None, args.out / "innocents.json")
    lines = [f"Innocent trials, run {run_id[:16]} ({args.keys} candidate keys x model; {args.null_keys} null keys;"
             " default probes; flagged = z >= 3.09, i.e. Gaussian p < 1e-3)", "",
             "| model | kind | key-0 z (4 / 8 / 16 probes) | innocent z mean +- sd over keys (16 probes) | z max | flagged at 1e-3 |"
             " derived | z change 4 -> 16 probes [95 % CI] |", "| --- | --- | --- | --- | ---: | ---: | ---: | --- |"]
    for r in results:
        b, d = r["by_probes"][-1], r["drift"]
        lines.append(f"| {r['model']} | {r['kind']} | " + " / ".join(f"{r['key0_z'][n]:+.2f}" for n in COUNTS) +
                     f" | {b['z_mean']:+.2f} +- {b['z_sd']:.2f} | {b['z_max']:+.2f} | {b['flagged_at_1e-3']}/{b['trials']}"
                     f" | {b['derived']} | {d['mean_change']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}] |")
    atomic_write(("\n".join(lines) + "\n").encode(), None, args.out / "innocents.md")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
