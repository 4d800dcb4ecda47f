"""Budget sweep: how the student drop (and the clean student's quality) depends on the thief's budget.

A suite is run once per (queries, steps) point, each point in its own folder ``OUT/q<queries>_s<steps>``
with the suite's other settings unchanged, so every run keeps its content-hashed identity and finished runs
are reused.  The sweep's table has one row per point and (task, defence, attacker, student): the clean
student's PSNR (is it still improving?) and the student drop with its interval, from the same
:func:`attacks.report.summarize` the suite report uses.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from hardener.model_io import atomic_write

from .config import Suite
from .report import summarize
from .runner import Runner


def points(queries: list[int], steps: list[int]) -> list[tuple[int, int]]:
    return [(q, s) for q in queries for s in steps]


def sweep(suite: Suite, queries: list[int], steps: list[int], out: Path, executor=None, progress: bool = True,
          threads: int | None = None) -> dict:
    """Run ``suite`` at every (queries, steps) point; returns {"points": [...], "rows": [...]} and writes it to
    ``OUT/budget.json`` (atomically)."""
    rows = []
    for q, s in points(queries, steps):
        point = dataclasses.replace(suite, queries=q, steps=s)
        point.check(source=f"budget point q={q} s={s}", resolve_layers=False)
        runner = Runner(point, out / f"q{q}_s{s}", progress=progress, threads=threads)
        results = runner.run_all(executor=executor)
        for row in summarize(results)["rows"]:
            rows.append({"queries": q, "steps": s, **{k: row[k] for k in (
                "task", "defence", "attacker", "student", "seeds", "student_psnr", "student_psnr_std",
                "student_psnr_drop", "student_psnr_drop_ci95", "within_noise", "teacher_psnr")}})
    report = {"schema": "attacks.budget/1", "points": points(queries, steps), "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(json.dumps(report, indent=2).encode(), None, out / "budget.json")
    return report


def table(report: dict) -> list[str]:
    """Markdown: per (task, defence, attacker, student), the student's PSNR and drop at each budget point."""
    f = lambda v, spec=".2f": "-" if v is None else format(v, spec)  # noqa: E731
    lines = ["| task | defence | attacker | student | queries | steps | seeds | student PSNR | drop (dB) | 95 % CI |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    key = lambda r: (r["task"], r["defence"] != "none", r["defence"], r["attacker"], r["student"],  # noqa: E731
                     r["queries"], r["steps"])
    for r in sorted(report["rows"], key=key):
        ci = r["student_psnr_drop_ci95"]
        ci_text = "n/a" if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]" + (" within noise" if r["within_noise"] else "")
        lines.append(f"| {r['task']} | {r['defence']} | {r['attacker']} | {r['student']} | {r['queries']} | "
                     f"{r['steps']} | {r['seeds']} | {f(r['student_psnr'])} +- {f(r['student_psnr_std'])} | "
                     f"{f(r['student_psnr_drop'])} | {ci_text} |")
    return lines
