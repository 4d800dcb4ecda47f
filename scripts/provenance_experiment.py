"""Provenance mark: measured z for the marked teacher, students of the marked and clean teachers, innocent
models, and innocent z as the probe count grows.

    python scripts/provenance_experiment.py [--drop 0.05] [--steps 1500] [--out DIR]

Key: keygen --seed 1.  Suspects (all seeded, one CPU thread):
- the marked teacher; the clean teacher; the teacher marked with another key (--seed 2); the teacher
  hardened with ASVP (body.*.conv2, k 4, h 1.3); bicubic x2 upscaling;
- `tiny` students distilled from scratch (attacks.students / attacks.distill.train_student, L1, Adam,
  --steps steps, batch 16, 512 sr2 patches of 64 px from the attack suite's training photos) from the
  marked and from the clean teacher, and one trained on ground truth;
- "fine-tuned" students: the teacher's own architecture started from the clean teacher's weights (a
  stand-in for a thief's pretrained model) and fine-tuned 60 steps (L2, batch 8, lr 5e-4, 256 patches of
  48 px) on answers of the marked teacher / the other-key teacher;
- `edsr` students (the teacher's architecture and capacity) distilled from scratch, --edsr-steps steps
  (L1, batch 16, 1024 patches of 64 px), from the marked and from the clean teacher.
Each is verified with the first 4, 8 and 16 default probes and --null-keys null keys.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from attacks.data import patches
from attacks.degrade import sr2
from attacks.distill import train_student
from attacks.oracle import Oracle
from attacks.students import build_student
from hardener.provenance.key import generate_key
from hardener.provenance.mark import mark_model
from hardener.provenance.verify import verify

TEACHER = Path(__file__).resolve().parents[1] / "hardener" / "assets" / "sr_x2.onnx"


def export(student: torch.nn.Module, path: Path) -> None:
    student.eval()
    torch.onnx.export(student, torch.zeros(1, 3, 32, 32), str(path), input_names=["lr"], output_names=["sr"],
                      dynamic_axes={"lr": {0: "n", 2: "h", 3: "w"}, "sr": {0: "n", 2: "h2", 3: "w2"}},
                      opset_version=17, dynamo=False)


class Bicubic(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)


def distill(teacher: Path | None, arch: str, steps: int, n_patches: int, seed: int, loss: str = "l1",
            size: int = 64, batch: int = 16, lr: float = 2e-3, init_from_teacher: bool = False):
    hr = patches("train", size, n_patches, seed=100 + seed)
    x = sr2(hr, np.random.default_rng(seed))
    targets = hr if teacher is None else Oracle(teacher, threads=1)(x)
    student = build_student(arch, 2, seed=seed)
    if init_from_teacher:
        student.load_state_dict({t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy())
                                 for t in onnx.load(str(TEACHER)).graph.initializer if not t.name.startswith("val")})
    train_student(student, x, targets, steps=steps, seed=seed, batch=batch, lr=lr, loss=loss)
    return student


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--drop", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--edsr-steps", type=int, default=3000,
                    help="from-scratch `edsr` students (the teacher's capacity), marked and clean teacher, seeds "
                         "--edsr-seeds; about 8 min each on one CPU thread; 0 skips them")
    ap.add_argument("--edsr-seeds", default="0")
    ap.add_argument("--null-keys", type=int, default=256)
    ap.add_argument("--probe-counts", default="4,8,16")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    key, other = generate_key(1), generate_key(2)
    work = Path(tempfile.mkdtemp(prefix="provenance_"))
    out = args.out or work
    out.mkdir(parents=True, exist_ok=True)
    marked, marked_other, hardened = work / "marked.onnx", work / "marked_other.onnx", work / "hardened.onnx"
    rep = mark_model(TEACHER, key, marked, target_drop=args.drop)
    mark_model(TEACHER, other, marked_other, target_drop=args.drop)
    from hardener import AsvpParams, HardenConfig, harden

    harden(TEACHER, hardened, HardenConfig(layers=["body.*.conv2"], params=AsvpParams(rank=4, gain=1.3)),
           report_path=work / "hardened.json", progress=False)
    cal = rep["calibration"]["per_output"][0]
    print(f"mark: eps {cal['eps']:.4g}, teacher {cal['psnr_original_vs_truth']:.3f} -> "
          f"{cal['psnr_marked_vs_truth']:.3f} dB vs truth (drop {cal['psnr_drop_vs_truth']:.3f} dB), marked vs "
          f"original {cal['psnr_marked_vs_original']:.2f} dB, mark rms {cal['mark_rms']:.2e}", flush=True)
    export(Bicubic(), work / "bicubic.onnx")
    suspects = {"marked teacher": (marked, True), "clean teacher": (TEACHER, False),
                "teacher marked with another key": (marked_other, False),
                "ASVP-hardened teacher (k4, h1.3)": (hardened, False), "bicubic x2": (work / "bicubic.onnx", False)}
    jobs = [(f"tiny from scratch, marked teacher, {args.steps} steps", marked, True, dict(arch="tiny", steps=args.steps)),
            (f"tiny from scratch, clean teacher, {args.steps} steps", TEACHER, False, dict(arch="tiny", steps=args.steps)),
            (f"tiny from scratch, ground truth, {args.steps} steps", None, False, dict(arch="tiny", steps=args.steps)),
            ("teacher-init fine-tune 60 steps, marked teacher", marked, True,
             dict(arch="edsr", steps=60, n_patches=256, size=48, batch=8, lr=5e-4, loss="l2", init_from_teacher=True)),
            ("teacher-init fine-tune 60 steps, other-key teacher", marked_other, False,
             dict(arch="edsr", steps=60, n_patches=256, size=48, batch=8, lr=5e-4, loss="l2", init_from_teacher=True))]
    if args.edsr_steps > 0:
        for seed in map(int, args.edsr_seeds.split(",")):
            for name, teacher, is_marked in (("MARKED", marked, True), ("clean", TEACHER, False)):
                jobs.append((f"edsr from scratch, {name} teacher, {args.edsr_steps} steps, seed {seed}", teacher,
                             is_marked, dict(arch="edsr", steps=args.edsr_steps, n_patches=1024, seed=seed)))
    for i, (label, teacher, is_marked, kw) in enumerate(jobs):
        t = time.time()
        kw = {"n_patches": 512, "seed": 0, **kw}
        s = distill(teacher, **kw)
        path = work / f"student_{i}.onnx"
        export(s, path)
        suspects[label] = (path, is_marked)
        print(f"  trained '{label}' in {time.time() - t:.0f} s", flush=True)

    rows = []
    counts = [int(c) for c in args.probe_counts.split(",")]
    for label, (path, is_marked) in suspects.items():
        row = {"suspect": label, "derived_from_marked": is_marked}
        for n in counts:
            r = verify(path, key, TEACHER, num_probes=n, null_keys=args.null_keys)
            st = r["statistic"]
            row[n] = {"z": st["z"], "p_gauss": st["p_gaussian"], "p_emp": st["p_empirical"],
                      "amplitude": st["amplitude"], "amplitude_over_eps": st["amplitude"] / cal["eps"],
                      "verdict": r["verdict"]}
        rows.append(row)
        print(f"{label:52s} " + "  ".join(f"n={n}: z {row[n]['z']:+6.2f} p {row[n]['p_gauss']:.1e}" for n in counts)
              + f"  amp/eps {row[counts[-1]]['amplitude_over_eps']:+.3f}  {row[counts[-1]]['verdict']}", flush=True)
    (out / "provenance_experiment.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "mark": cal, "rows": rows}, indent=2, default=str))
    print(f"wrote {out / 'provenance_experiment.json'}")


if __name__ == "__main__":
    main()
