#!/usr/bin/env python3
"""The README's provenance detection table, from the run files of one or more attack-suite results folders.

    python scripts/provenance_table.py attacks/results/cpu-2026-12-02/provenance_tasks \\
        attacks/results/cpu-2026-12-02/provenance_tasks_edsr

One row per (task, student architecture) with naive-thief runs of both the "mark" defence (teacher marked
with the suite's key: derived students) and the "none" defence (clean teacher: innocent students):
  mark cost            the served teacher's PSNR loss on the evaluation photos (dB)
  student PSNR         of the derived students: mean (min-max over seeds)
  z                    verify's z of each derived student, by seed; p < 1e-3 = z >= 3.09; derived = verify's
                       verdict (p < 1e-6 and no null key as high)
  amplitude / eps      how much of the mark the students carry, range over seeds
  clean z              z of the clean teacher's students, by seed
  innocent trials      candidate-key z of every student in the row (mark and none): count, largest, >= 3.09
Reads only what the runs recorded: nothing is recomputed.  Tasks in the bundled teachers' order.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from attacks.config import BUNDLED
from attacks import detection
from attacks.detection import GAUSS_Z as Z_1E3  # P(Z >= z) = 1e-3


def load(folders: list[Path]) -> list[dict]:
    runs = []
    for folder in folders:
        files = sorted((folder / "runs").glob("*.json"))
        if not files:
            raise SystemExit(f"error: no run files in {folder / 'runs'}")
        runs += [json.loads(f.read_text()) for f in files]
    return [r for r in runs if r.get("provenance") and r["attacker"]["name"] == "naive"]


def _fmt(values: list[float], digits: int = 2) -> str:
    return " / ".join(f"{v:.{digits}f}" for v in values)


def rows(runs: list[dict]) -> list[dict]:
    groups: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for r in runs:
        kind = "mark" if r["defence"]["mark"] and r["defence"]["mark_key"] == "suite" else (
            "none" if r["defence"]["name"] == "none" else None)
        if kind:
            groups.setdefault((r["task"], r["student"]), {"mark": [], "none": []})[kind].append(r)
    order = list(BUNDLED)
    out = []
    for (task, student), g in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        mark = sorted(g["mark"], key=lambda r: r["seed"])
        none = sorted(g["none"], key=lambda r: r["seed"])
        if not mark:
            continue
        z = [r["provenance"]["z"] for r in mark]
        psnr = [r["student_metrics"]["psnr"] for r in mark]
        amp = [r["provenance"]["amplitude_over_eps"] for r in mark]
        cost = {round(r["teacher_original"]["psnr"] - r["teacher_served"]["psnr"], 3) for r in mark}
        trials = [t for zs in detection.trials(mark + none).values() for t in zs]
        out.append({
            "task": task, "student": student, "seeds": [r["seed"] for r in mark],
            "mark_cost": sorted(cost), "psnr": psnr, "z": z,
            "p1e3": sum(v >= Z_1E3 for v in z), "derived": sum(r["provenance"]["derived"] for r in mark),
            "amp": [min(amp), max(amp)], "clean_z": [r["provenance"]["z"] for r in none],
            "trials": len(trials), "trial_z_max": max(trials) if trials else None,
            "trials_1e3": sum(t >= Z_1E3 for t in trials)})
    return out


def markdown(table: list[dict]) -> str:
    lines = ["| task | mark cost (dB) | student | student PSNR, mean (min-max of seeds) | z of students of the marked "
             "teacher (by seed) | p < 1e-3 | derived (p < 1e-6) | amplitude / eps | z of students of the clean "
             "teacher | innocent trials: n, largest z, z >= 3.09 |",
             "| --- | ---: | --- | ---: | --- | ---: | ---: | --- | --- | --- |"]
    for row in table:
        n = len(row["z"])
        p = row["psnr"]
        trials = (f"{row['trials']}, {row['trial_z_max']:.2f}, {row['trials_1e3']}" if row["trials"] else "none")
        lines.append(
            f"| {row['task']} | {' / '.join(f'{c:.3f}' for c in row['mark_cost'])} | {row['student']} | "
            f"{np.mean(p):.2f} ({min(p):.2f}-{max(p):.2f}) | {_fmt(row['z'])} | {row['p1e3']}/{n} | "
            f"{row['derived']}/{n} | {row['amp'][0]:.2f} to {row['amp'][1]:.2f} | {_fmt(row['clean_z']) or '-'} | "
            f"{trials} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path, help="attack-suite results folders (each with runs/)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a markdown table")
    args = ap.parse_args(argv)
    table = rows(load(args.folders))
    if not table:
        print("error: no naive-thief runs of a teacher marked with the suite's key", file=sys.stderr)
        return 1
    print(json.dumps(table, indent=1) if args.json else markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
