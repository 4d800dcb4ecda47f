"""The provenance detection table (issue 11) from finished runs: per task and student architecture, the verify
z of "derived" students (teacher marked with the suite's key) against "innocent" ones (unmarked or other-key
teachers, ground-truth students, served teachers that differ from their source), with the detection rate at
a false-positive rate of 1e-3 estimated on the task's innocents and candidate-key trials.

Reads only what the runs recorded (:mod:`attacks.provenance` computed it), so it is not part of a run's
identity: changing the table never invalidates a finished run.
"""
from __future__ import annotations

import math

import numpy as np

from .provenance import key_record

FPR = 1e-3
GAUSS_Z = 3.090232306167813  # P(Z >= z) = 1e-3 for a standard normal
EMPIRICAL_MIN = 1000  # innocents needed before the threshold is read off their own distribution


def _z(v) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def threshold(innocent_z: list[float]) -> tuple[float | None, str]:
    """The z threshold for a false-positive rate <= FPR on ``innocent_z`` and how it was chosen."""
    n = len(innocent_z)
    if n >= EMPIRICAL_MIN:
        k = int(math.floor(FPR * n))  # innocents allowed above the threshold
        t = sorted(innocent_z, reverse=True)[k]
        return t, f"empirical: innocent z number {k + 1} from the top of {n} ({k} allowed above; detected when z > it)"
    if n == 0:
        return GAUSS_Z, f"Gaussian tail z = {GAUSS_Z:.2f} (no innocents to check it against)"
    top = max(innocent_z)
    if top >= GAUSS_Z:
        return top, (f"largest innocent z {top:.2f} (above the Gaussian-tail {GAUSS_Z:.2f}; {n} innocents "
                     f"< {EMPIRICAL_MIN}, too few for an empirical 1e-3 quantile)")
    return GAUSS_Z, (f"Gaussian tail z = {GAUSS_Z:.2f} (P(Z >= z) = 1e-3; {n} innocents < {EMPIRICAL_MIN}, too "
                     f"few for an empirical 1e-3 quantile; largest innocent z {top:.2f})")


def _stats(zs: list[float]) -> dict:
    return {"n": len(zs), "z_mean": float(np.mean(zs)) if zs else None, "z_min": min(zs) if zs else None,
            "z_max": max(zs) if zs else None}


def observations(results: list[dict]) -> list[dict]:
    """One observation per run's student, plus one per distinct served teacher of a task that differs from its
    source (an unmarked, unhardened teacher's residual is 0: it is left out, not counted as an innocent)."""
    obs, teachers = [], {}
    for r in results:
        p = r.get("provenance")
        if not p:
            continue
        obs.append({"task": r["task"], "arch": r["student_arch"], "label": r["provenance_label"], "z": _z(p["z"]),
                    "derived_at_default": bool(p["derived"])})
        t = r.get("teacher_provenance")
        if t and t.get("residual_rms") != 0:  # 0: the served file is its own reference, nothing to test
            teachers[(r["task"], r["teacher_file_sha256"])] = {
                "task": r["task"], "arch": "teacher (served)", "z": _z(t["z"]),
                "derived_at_default": bool(t["derived"]),
                "label": "derived" if t.get("eps") is not None else "innocent"}
    return obs + [teachers[k] for k in sorted(teachers)]


def trials(results: list[dict]) -> dict[tuple[str, str], list[float]]:
    """Candidate-key innocent trials, {(task, student architecture): [z]} (runs made with candidate keys)."""
    out: dict[tuple[str, str], list[float]] = {}
    for r in results:
        zs = (r.get("provenance") or {}).get("candidate_z")
        if zs:
            out.setdefault((r["task"], r["student_arch"]), []).extend(z for z in map(_z, zs) if z is not None)
    return out


def table(results: list[dict]) -> dict:
    """The provenance rows: per task and architecture, derived vs innocent z and detection rates.  The
    task's threshold comes from its innocent models and its candidate-key innocent trials together."""
    every = observations(results)
    obs = [o for o in every if o["z"] is not None]
    by_trial = trials(results)
    rows, thresholds = [], {}
    for task in sorted({o["task"] for o in obs}):
        mine = [o for o in obs if o["task"] == task]
        innocent = [o["z"] for o in mine if o["label"] == "innocent"]
        task_trials = [z for (t_, _), zs in sorted(by_trial.items()) if t_ == task for z in zs]
        t, rule = threshold(innocent + task_trials)
        thresholds[task] = {"z": t, "rule": rule, "innocents": len(innocent), "innocent_trials": len(task_trials),
                            "false_positives_at_default": sum(o["derived_at_default"] for o in mine
                                                              if o["label"] == "innocent"),
                            "trials_over_threshold": sum(z > t for z in task_trials),
                            "trials_at_p_1e-3": sum(z >= GAUSS_Z for z in task_trials)}
        for arch in sorted({o["arch"] for o in mine}, key=lambda a: (a.startswith("teacher"), a)):
            d = [o for o in mine if o["arch"] == arch and o["label"] == "derived"]
            i = [o for o in mine if o["arch"] == arch and o["label"] == "innocent"]
            dz = [o["z"] for o in d]
            rows.append({"task": task, "arch": arch, "derived": _stats(dz), "innocent": _stats([o["z"] for o in i]),
                         "innocent_trials": _stats(by_trial.get((task, arch), [])),
                         "innocent_trials_at_p_1e-3": sum(z >= GAUSS_Z for z in by_trial.get((task, arch), [])),
                         "threshold_z": t,
                         "detection_rate_fpr_1e-3": sum(z > t for z in dz) / len(dz) if dz else None,
                         "detection_rate_verify_default":
                             sum(o["derived_at_default"] for o in d) / len(d) if d else None,
                         "innocent_flagged_at_threshold": sum(o["z"] > t for o in i),
                         "innocent_flagged_at_verify_default": sum(o["derived_at_default"] for o in i)})
    return {"key": key_record("suite"), "fpr": FPR, "thresholds": thresholds, "rows": rows,
            "skipped_without_statistic": len(every) - len(obs)}


def markdown(prov: dict) -> list[str]:
    """The report's "Provenance" section."""
    if not prov["rows"]:
        return []
    k = prov["key"]
    lines = ["", "## Provenance", "",
             f"Every student (and each served teacher) is tested with `harden verify`'s statistic against the "
             f"suite's key (key id {k['key_id'][:16]}, `generate_key(seed={k['seed']})`: reproducible, so not a "
             "secret; it measures the mark and protects nothing), the unmarked source teacher as the original. "
             "`derived` = students distilled from a teacher marked with that key; `innocent` = students of "
             "unmarked teachers or of teachers marked with another key, ground-truth students, and the served "
             "teachers not marked with the key that differ from their source (an unhardened, unmarked teacher "
             "is its own reference and is left out). `det @1e-3` = share of derived runs with z above the threshold "
             "for a false-positive rate of 1e-3 on the task's innocents; `det @verify` = share that `harden "
             "verify` calls derived at its default (p Gaussian < 1e-6 and no null key as high); `FP` = innocents "
             "over the threshold / called derived by verify; `trials` = candidate-key innocent trials (each student "
             "against keys that marked no teacher: innocent whatever the student), their largest z and how many "
             f"reach z >= {GAUSS_Z:.2f} (p < 1e-3).", ""]
    for task, t in prov["thresholds"].items():
        extra = ""
        if t.get("innocent_trials"):
            extra = (f" ({t['innocents']} innocent models + {t['innocent_trials']} candidate-key innocent trials: "
                     f"{t['trials_at_p_1e-3']} trial(s) at z >= {GAUSS_Z:.2f})")
        lines.append(f"- {task}: threshold z = {t['z']:.2f}: {t['rule']}{extra}")
    lines += ["", "| task | architecture | derived n | z mean | z min | z max | det @1e-3 | det @verify | "
              "innocent n | z mean | z min | z max | FP @1e-3 | FP @verify | trials | trial z max | trials p<1e-3 |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    f = lambda v, spec=".2f": "-" if v is None else format(v, spec)  # noqa: E731
    for r in prov["rows"]:
        d, i = r["derived"], r["innocent"]
        lines.append(f"| {r['task']} | {r['arch']} | {d['n']} | {f(d['z_mean'])} | {f(d['z_min'])} | {f(d['z_max'])} | "
                     f"{f(r['detection_rate_fpr_1e-3'], '.0%')} | {f(r['detection_rate_verify_default'], '.0%')} | "
                     f"{i['n']} | {f(i['z_mean'])} | {f(i['z_min'])} | {f(i['z_max'])} | "
                     f"{r['innocent_flagged_at_threshold'] if i['n'] else '-'} | "
                     f"{r['innocent_flagged_at_verify_default'] if i['n'] else '-'} | "
                     f"{r['innocent_trials']['n'] or '-'} | {f(r['innocent_trials']['z_max'])} | "
                     f"{r['innocent_trials_at_p_1e-3'] if r['innocent_trials']['n'] else '-'} |")
    if prov["skipped_without_statistic"]:
        lines.append(f"\n{prov['skipped_without_statistic']} run(s) gave non-finite outputs: no statistic, left out.")
    return lines
