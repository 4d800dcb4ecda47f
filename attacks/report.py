"""An attack suite's report, from its finished runs (:meth:`attacks.runner.Runner.collect`, or for `attack
report` every run file of a folder as recorded, :func:`recorded_runs`): per task, defence, attacker and
student, the teacher's PSNR with and without the defence (the cost) and each student's PSNR next to the same
student distilled from the baseline teacher (the protection), with a paired bootstrap interval over seeds x
images and a competence check of the attacker; ``OUT/report.json``, ``OUT/report.md``, an image
grid per task and the trade-off curve.  Redrawing a report never reruns anything (this module is not part of
a run's identity).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import detection
from .plots import image_grid, tradeoff_curve


def summarize(results: list[dict]) -> dict:
    """Per (task, defence, attacker, student): mean/std over seeds, and drops against the baseline run.

    A drop is paired by seed (the same student, attacker, query set and initialisation distilled from the
    defence's baseline teacher, by default the undefended one, minus this one); its std over seeds is the
    spread.  Strip is compared with naive.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["task"], r["defence"]["name"], r["attacker"]["name"], r["student"]), []).append(r)
    rows = []
    order = lambda item: (item[0][0], item[0][1] != "none", item[0][1], item[0][2], item[0][3])  # noqa: E731
    for (task, defence, attacker, student), runs in sorted(groups.items(), key=order):
        runs = sorted(runs, key=lambda r: r["seed"])
        p = [r["student_metrics"]["psnr"] for r in runs]
        s = [r["student_metrics"]["ssim"] for r in runs]
        ref_attacker = "naive" if attacker in ("strip", "strip_blind") else attacker
        baseline = runs[0]["defence"].get("baseline", "none")
        ref = {r["seed"]: r for r in groups.get((task, baseline, ref_attacker, student), [])} \
            if defence != baseline else {}
        paired = [(ref[r["seed"]]["student_metrics"], r["student_metrics"]) for r in runs if r["seed"] in ref]
        drops = [a["psnr"] - b["psnr"] for a, b in paired]
        ci = paired_bootstrap([np.subtract(a["per_image_psnr"], b["per_image_psnr"]) for a, b in paired
                               if "per_image_psnr" in a and "per_image_psnr" in b]) if len(paired) > 1 else None
        ssim_drops = [100 * (a["ssim"] - b["ssim"]) / a["ssim"] for a, b in paired]
        t, d = runs[0], runs[0]["defence"]
        rows.append({
            "task": task, "defence": defence, "attacker": attacker, "student": student,
            "student_params": t.get("student_params"), "seeds": len(runs), "paired_seeds": len(paired),
            "baseline": baseline,
            "placement": d.get("placement"), "mode": d.get("mode"), "rank": d.get("rank") if d["layers"] else None,
            "gain": d.get("gain") if d["layers"] else None, "layers": d["layers"],
            "student_psnr": float(np.mean(p)), "student_psnr_std": float(np.std(p)),
            "student_ssim": float(np.mean(s)),
            "student_psnr_drop": float(np.mean(drops)) if drops else None,
            "student_psnr_drop_std": float(np.std(drops)) if drops else None,
            # 95 % paired bootstrap interval over seeds x images (None with fewer than 2 paired seeds)
            "student_psnr_drop_ci95": ci,
            "within_noise": None if ci is None else bool(ci[0] <= 0.0 <= ci[1]),
            "student_ssim_drop_pct": float(np.mean(ssim_drops)) if ssim_drops else None,
            "teacher_psnr": t["teacher_served"]["psnr"],
            "teacher_psnr_original": t["teacher_original"]["psnr"],
            "teacher_psnr_drop": t["teacher_original"]["psnr"] - t["teacher_served"]["psnr"],
            "teacher_ssim_drop_pct": 100 * (t["teacher_original"]["ssim"] - t["teacher_served"]["ssim"])
            / t["teacher_original"]["ssim"],
            "conventions": t.get("conventions"),
        })
        rows[-1].update(competence(groups, task, baseline, attacker, student))
    return {"schema": "attacks.report/3", "rows": rows, "provenance": detection.table(results)}


BOOTSTRAP_SAMPLES = 2000


def recorded_runs(out: Path) -> list[dict]:
    """Every run file in ``OUT/runs`` as recorded (``attack report``); ValueError, in one line, if there is
    none, a file is not a run, or two files are runs of the same cell (task, defence, attacker, student,
    seed)."""
    from .runner import RUN_SCHEMA

    files = sorted((Path(out) / "runs").glob("*.json"))
    if not files:
        raise ValueError(f"no run files in {Path(out) / 'runs'}")
    results, cells = [], {}
    for file in files:
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{file} is not readable JSON ({type(exc).__name__})") from None
        if not isinstance(data, dict) or data.get("schema") != RUN_SCHEMA:
            raise ValueError(f"{file} is not a run file of schema {RUN_SCHEMA}")
        try:
            cell = (data["task"], data["defence"]["name"], data["attacker"]["name"], data["student"], data["seed"])
        except (KeyError, TypeError):
            raise ValueError(f"{file} is not a complete run file (no task, defence, attacker, student or seed)") \
                from None
        if cell in cells:
            raise ValueError(f"two runs of the cell {'/'.join(map(str, cell))}: {cells[cell].name} and {file.name} "
                             "(remove the one not to report)")
        cells[cell] = file
        results.append(data)
    return results


def paired_bootstrap(drops: list, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> list[float] | None:
    """95 % percentile interval of the mean drop, resampling seeds and, within them, images (two-stage,
    with replacement); ``drops`` holds one array of per-image drops per paired seed.  Deterministic."""
    rows = [np.asarray(d, np.float64) for d in drops if len(d)]
    if len(rows) < 2:
        return None
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    for b in range(samples):
        picked = rng.integers(0, len(rows), len(rows))
        means[b] = np.mean([rows[s][rng.integers(0, len(rows[s]), len(rows[s]))].mean() for s in picked])
    lo, hi = np.percentile(means, [2.5, 97.5])
    return [float(lo), float(hi)]


COMPETENCE_MARGIN = 0.05  # dB: the least shortfall against the naive thief that counts as incompetent


def competence(groups: dict, task: str, baseline: str, attacker: str, student: str) -> dict:
    """Is ``attacker`` at least as good as the naive thief against the clean (baseline) teacher?

    Paired by seed: d = PSNR(attacker's student) - PSNR(naive's student), both from the baseline teacher.
    Competent when mean(d) >= -max(COMPETENCE_MARGIN, 2 standard errors); an incompetent attacker's drops do
    not count as protection (``drop_counts`` False).  Strip thieves, the ground-truth control and the naive
    thief itself are not judged (n/a)."""
    if attacker in ("naive", "ground_truth", "strip", "strip_blind"):
        return {"competent": None, "competence_gap": None, "drop_counts": True}
    mine = {r["seed"]: r for r in groups.get((task, baseline, attacker, student), [])}
    naive = {r["seed"]: r for r in groups.get((task, baseline, "naive", student), [])}
    d = [mine[s]["student_metrics"]["psnr"] - naive[s]["student_metrics"]["psnr"] for s in mine if s in naive]
    if not d:
        return {"competent": None, "competence_gap": None, "drop_counts": False}
    gap = float(np.mean(d))
    se = float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
    ok = gap >= -max(COMPETENCE_MARGIN, 2 * se)
    return {"competent": bool(ok), "competence_gap": gap, "drop_counts": bool(ok)}


def _ci_text(row: dict) -> str:
    ci = row.get("student_psnr_drop_ci95")
    if ci is None:
        return "n/a" if row.get("student_psnr_drop") is not None else "-"
    return f"[{ci[0]:+.2f}, {ci[1]:+.2f}]" + (" within noise" if row.get("within_noise") else "")


def _fmt(v, f: str) -> str:
    return "-" if v is None else format(v, f)


def write_report(summary: dict, out: Path, results: list[dict] | None = None) -> None:
    """``report.json``, ``report.md`` and, given the runs, ``grid_<task>.png`` and ``tradeoff.png``."""
    rows = summary["rows"]
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out / "report.json")
    tasks_by_conv: dict[str, list[str]] = {}
    for r in rows:
        if r.get("conventions") and r["task"] not in tasks_by_conv.setdefault(r["conventions"], []):
            tasks_by_conv[r["conventions"]].append(r["task"])
    lines = ["# Attack report", "",
             "Students are distilled from the teacher's answers to the thief's queries (black box, ONNX "
             "Runtime) and evaluated on held-out photos, with these conventions:", ""]
    lines += [f"- {', '.join(tasks)}: {conv}." for conv, tasks in sorted(tasks_by_conv.items())] or ["- -"]
    lines += ["",
             "`student drop` = the same student, attacker and seed distilled from the baseline teacher (the "
             "undefended one unless the row says otherwise) minus this one, mean +- std over seeds (positive = "
             "protection; strip is compared with naive). "
             "`teacher drop` = what the defence costs the teacher against ground truth. "
             "`95 % CI` = paired bootstrap interval of the mean drop over seeds x held-out images "
             f"({BOOTSTRAP_SAMPLES} resamples; n/a with one seed); 'within noise' when it contains 0. "
             "`competent` = the attacker's student from the baseline (clean) teacher is at least as good as the "
             f"naive thief's (paired by seed, within max({COMPETENCE_MARGIN} dB, 2 standard errors)); an "
             "incompetent attacker's drop is struck through: it does not count as protection.", "",
             "## Defences", "",
             "| task | defence | placement | mode | k | h | layers | teacher PSNR | teacher drop (dB) | "
             "teacher SSIM drop (%) |", "|---|---|---|---|---:|---:|---|---:|---:|---:|"]
    seen = set()
    for r in rows:
        if (r["task"], r["defence"]) in seen:
            continue
        seen.add((r["task"], r["defence"]))
        lines.append(f"| {r['task']} | {r['defence']} | {r['placement'] if r['layers'] else '-'} | "
                     f"{r['mode'] if r['layers'] else '-'} | {_fmt(r['rank'], 'd')} | {_fmt(r['gain'], 'g')} | "
                     f"{', '.join(r['layers']) or '-'} | {r['teacher_psnr']:.2f} | {r['teacher_psnr_drop']:.3f} | "
                     f"{r['teacher_ssim_drop_pct']:.2f} |")
    lines += ["", "## Students", "",
              "| task | defence | attacker | student | seeds | competent | student PSNR | +- | student drop (dB) | "
              "+- | 95 % CI | SSIM drop (%) | teacher drop (dB) |",
              "|---|---|---|---|---:|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        vs = "" if r["baseline"] == "none" else f" (vs {r['baseline']})"
        ok = r.get("competent")
        competent = "n/a" if ok is None else "yes" if ok else f"no ({r['competence_gap']:+.2f} dB)"
        drop = _fmt(r["student_psnr_drop"], ".2f")
        drop = drop if r.get("drop_counts", True) or drop == "-" else f"~~{drop}~~"
        lines.append(f"| {r['task']} | {r['defence']}{vs} | {r['attacker']} | {r['student']} | {r['seeds']} | "
                     f"{competent} | {r['student_psnr']:.2f} | {r['student_psnr_std']:.2f} | {drop} | "
                     f"{_fmt(r['student_psnr_drop_std'], '.2f')} | {_ci_text(r)} | "
                     f"{_fmt(r['student_ssim_drop_pct'], '.1f')} | "
                     f"{r['teacher_psnr_drop']:.3f} |")
    lines += detection.markdown(summary["provenance"]) if summary.get("provenance") else []
    if results:
        pictures = draw(summary, results, out)
        lines += ["", "## Pictures", ""] + [f"- `{p}`" for p in pictures]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def draw(summary: dict, results: list[dict], out: Path) -> list[str]:
    """An image grid per task (rows: defences; columns: input, ground truth, teacher, each student under the
    naive attacker, lowest seed) and the trade-off curve.  Returns the files written, relative to ``out``."""
    written = []
    by_task: dict[str, list[dict]] = {}
    for r in results:
        by_task.setdefault(r["task"], []).append(r)
    for task, runs in sorted(by_task.items()):
        defences = list(dict.fromkeys(r["defence"]["name"] for r in sorted(
            runs, key=lambda r: (bool(r["defence"]["layers"]), r["defence"]["gain"], r["defence"]["rank"]))))
        students = sorted({r["student"] for r in runs})
        grid = []
        for defence in defences:
            mine = [r for r in runs if r["defence"]["name"] == defence]
            first = mine[0]
            ts = first["teacher_served"]["per_image_psnr"][0]
            row = [("input", out / first.get("input_image", f"images/{task}__input.png")),
                   ("ground truth", out / first.get("truth_image", f"images/{task}__truth.png")),
                   (f"teacher [{defence}] {ts:.2f} dB", out / first["teacher_image"] if first.get("teacher_image") else None)]
            for student in students:
                naive = sorted((r for r in mine if r["student"] == student and r["attacker"]["name"] == "naive"),
                               key=lambda r: r["seed"])
                if naive:
                    sp = naive[0]["student_metrics"]["per_image_psnr"][0]
                    row.append((f"{student} (naive) {sp:.2f} dB", out / naive[0]["image"]))
                else:
                    row.append((f"{student} (naive): not run", None))
            grid.append(row)
        name = f"grid_{task}.png"
        image_grid(out / name, f"{task}: first held-out photo, PSNR of that photo", grid)
        written.append(name)
    if tradeoff_curve(out / "tradeoff.png", summary["rows"]):
        written.append("tradeoff.png")
    return written
