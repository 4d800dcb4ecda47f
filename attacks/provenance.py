"""The suite's side of provenance (issue 11): marked teachers, each run's verdict, and the detection table.

* A defence with ``mark = true`` serves its teacher (after ASVP hardening, if it has layers) marked with
  :func:`hardener.provenance.mark.mark_model` at a 0.05 dB PSNR cost, calibrated against ground truth on a
  fixed set of the task's own training pairs (:data:`CALIBRATION`).  ``mark_key = "suite"`` uses the
  suite's key, ``"other"`` a second key: that teacher's students are innocents ("marked, but with a key
  that is not the one tested").
* The keys are derived from fixed seeds (:data:`KEY_SEEDS`, ``generate_key(seed)``): reproducible, and so
  not secret.  They measure the mark; they protect nothing.
* Every run's student, whatever its teacher, gets the verify statistic against the suite's key
  (:func:`verdict`): the student runs in torch on the default probe photos, the reference is the unmarked
  source teacher, and z, p and the amplitude come from ``hardener.provenance.verify`` (the same functions
  ``harden verify`` uses), with the suite's numbers of probes and null keys.
* :func:`table` turns the runs into the report's rows: per task and student architecture, "derived" runs
  (teacher marked with the suite's key, a distilling attacker) against "innocent" ones (unmarked or
  other-key teachers, ground-truth students, the served teachers themselves), with the detection rate at a
  false-positive rate of 1e-3 estimated on the task's innocents.
"""
from __future__ import annotations

import math
import os
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from hardener.provenance.key import ProvenanceKey, generate_key, null_key
from hardener.provenance.mark import DEFAULT_DROP, read_mark_manifest

KEY_SEEDS = {"suite": 1101, "other": 1102}  # generate_key(seed): public, reproducible measurement keys
MARK_KEYS = tuple(KEY_SEEDS)
TARGET_DROP = DEFAULT_DROP  # dB against ground truth, the `harden mark` default
# the pairs eps is calibrated on: the task's training photos, degraded like the thief's queries
CALIBRATION = {"split": "train", "hr_size": 128, "count": 8, "seed": 9011}
FPR = 1e-3
GAUSS_Z = 3.090232306167813  # P(Z >= z) = 1e-3 for a standard normal
EMPIRICAL_MIN = 1000  # innocents needed before the threshold is read off their own distribution
VERIFY_ALPHA = 1e-6  # `harden verify`'s default


@lru_cache(maxsize=None)
def key(which: str = "suite") -> ProvenanceKey:
    if which not in KEY_SEEDS:
        raise ValueError(f"unknown mark key {which!r}; expected one of {', '.join(MARK_KEYS)}")
    return generate_key(KEY_SEEDS[which])


def key_record(which: str = "suite") -> dict:
    return {"name": which, "seed": KEY_SEEDS[which], "key_id": key(which).key_id}


def mark_config(defence) -> dict | None:
    """What the mark adds to a teacher's configuration (None for an unmarked defence)."""
    if not getattr(defence, "mark", False):
        return None
    return {"key": key_record(defence.mark_key), "target_psnr_drop": TARGET_DROP, "calibration": dict(CALIBRATION),
            "scheme": "hardener-mark-v1"}


def verify_config(suite) -> dict:
    """What the per-run verdict depends on (part of each run's identity)."""
    config = {"key": key_record("suite"), "probes": suite.provenance_probes,
              "null_keys": suite.provenance_null_keys, "probe_set": "hardener default probes", "alpha": VERIFY_ALPHA}
    if suite.provenance_candidate_keys:  # absent when 0, so runs made before the option keep their identity
        config["candidate_keys"] = suite.provenance_candidate_keys
    return config


# ------------------------------------------------------------------------------------------ marking
def mark_teacher(task: str, unmarked: Path, output: Path, config: dict) -> None:
    """Write ``output``: ``unmarked`` with the configured key's mark, eps calibrated to ``TARGET_DROP`` dB
    against ground truth on the task's calibration pairs (PSNR with the suite's crop border).  Atomic."""
    import onnx

    from hardener.provenance.mark import image_outputs, mark_model

    from .degrade import TASKS, make_pairs

    cal = config["calibration"]
    inputs, truth = make_pairs(task, cal["split"], hr_size=cal["hr_size"], count=cal["count"], seed=cal["seed"])
    model = onnx.load(str(unmarked), load_external_data=False)
    outs = image_outputs(model)
    if not outs:
        raise RuntimeError(f"cannot mark {unmarked}: it has no image output (float32 (N, C, H, W), C = 1 or 3)")
    init = {i.name for i in model.graph.initializer}
    feeds = [i.name for i in model.graph.input if i.name not in init]
    if len(feeds) != 1:
        raise RuntimeError(f"cannot mark {unmarked}: it takes {len(feeds)} inputs, the suite feeds one image")
    fd, npz = tempfile.mkstemp(prefix=f".{output.stem}.", suffix=".calibration.npz", dir=output.parent)
    os.close(fd)
    report = output.with_name(f".{output.name}.mark.json")
    try:
        np.savez(npz, **{feeds[0]: inputs, f"truth:{outs[0].name}": truth})
        mark_model(unmarked, key(config["key"]["name"]), output, target_drop=config["target_psnr_drop"],
                   inputs=npz, crop_border=TASKS[task].scale, force=True, report_path=report)
    finally:
        for p in (Path(npz), report):
            if p.exists():
                p.unlink()


def marked_matches(path: Path, unmarked_sha256: str, config: dict) -> bool:
    """Whether a cached marked teacher is ``config``'s mark on the file with ``unmarked_sha256``."""
    from .identity import stored_manifest

    manifest = stored_manifest(path, read_mark_manifest)
    if manifest is None:
        return False
    cal = (manifest.get("calibration") or {}).get("per_output") or [{}]
    return (manifest.get("key_id") == config["key"]["key_id"] and manifest.get("source_sha256") == unmarked_sha256
            and cal[0].get("kind") == "psnr_drop" and cal[0].get("target") == config["target_psnr_drop"])


def served_eps(path: Path) -> float | None:
    """eps of the suite key's mark in a served teacher (None when it carries no mark of the suite's key)."""
    import onnx

    manifest = read_mark_manifest(onnx.load(str(path), load_external_data=False)) or {}
    if manifest.get("key_id") != key("suite").key_id or not manifest.get("outputs"):
        return None
    return float(manifest["outputs"][0]["eps"])


# ------------------------------------------------------------------------------------------ verdicts
@lru_cache(maxsize=8)
def _reference(source: str, sha256: str, count: int):
    """(probes, output spec, the unmarked source teacher's outputs on them) for a teacher file."""
    from hardener.provenance.mark import image_outputs
    from hardener.provenance.probes import default_probes
    from hardener.provenance.verify import Runner as OnnxRunner

    orig = OnnxRunner(Path(source), "original")
    outs = image_outputs(orig.loaded.model)
    if not outs:
        raise RuntimeError(f"teacher {source} has no image output to verify against")
    probes = default_probes(count)
    ys = [orig(p, outs[0].name).astype(np.float64) for _, p in probes]
    return probes, outs[0], ys


def verdict(predict, source: Path, source_sha256: str, probes: int, null_keys: int,
            eps: float | None = None, candidates: int = 0) -> dict:
    """The verify statistic of ``predict`` ((1, 3, h, w) float32 -> (1, C, H, W)) against the suite's key,
    with the unmarked ``source`` teacher as the original.  ``eps``: the served teacher's mark strength, for
    the amplitude in units of eps.  ``candidates``: also the z of that many candidate keys that marked no
    teacher (``candidate_z``), each against the same null keys: innocent trials, whatever the student."""
    from hardener.provenance.verify import scores, statistic

    from .innocents import candidate_keys

    probe_list, spec, ys = _reference(str(source), source_sha256, probes)
    outs = []
    for (name, p), y in zip(probe_list, ys):
        o = np.asarray(predict(p[None].astype(np.float32)), dtype=np.float64)[0]
        if o.shape != y.shape:
            raise RuntimeError(f"student output for probe '{name}' is {o.shape}, the teacher's {y.shape}")
        outs.append(o)
    base = {"key_id": key("suite").key_id, "probes": len(probe_list), "null_keys": null_keys, "eps": eps}
    if not all(np.all(np.isfinite(o)) for o in outs):
        return {**base, "z": None, "p_gaussian": None, "p_empirical": None, "amplitude": None,
                "amplitude_over_eps": None, "derived": False, "note": "non-finite outputs on a probe: no statistic"}
    rs = [o - y for o, y in zip(outs, ys)]
    cands = candidate_keys(candidates)
    sc = scores(ys, rs, [key("suite")] + cands + [null_key(i) for i in range(null_keys)], spec.index)
    rho, amp, n0 = sc["rho"], sc["amplitude"], 1 + candidates  # rho[n0:]: the null keys
    s = statistic(np.concatenate([rho[:1], rho[n0:]]), np.concatenate([amp[:1], amp[n0:]]), VERIFY_ALPHA)
    if candidates:
        base["candidate_z"] = [statistic(np.concatenate([rho[i:i + 1], rho[n0:]]), amp[i:i + 1], VERIFY_ALPHA)["z"]
                               for i in range(1, n0)]
    return {**base, "z": s["z"], "p_gaussian": s["p_gaussian"], "p_empirical": s["p_empirical"], "rho": s["rho"],
            "amplitude": s["amplitude"], "amplitude_over_eps": s["amplitude"] / eps if eps else None,
            "null_keys_at_or_above": s["null_keys_at_or_above"], "null_z_max": s["null_z_max"],
            "residual_rms": sc["residual_rms"], "derived": s["derived"]}


def label(defence, attacker) -> tuple[str, str]:
    """("derived" | "innocent", why) for a run's student."""
    if attacker.ground_truth:
        return "innocent", "ground-truth student (never saw the teacher)"
    if not getattr(defence, "mark", False):
        return "innocent", "student of an unmarked teacher"
    if defence.mark_key != "suite":
        return "innocent", f"student of a teacher marked with another key ({defence.mark_key})"
    return "derived", "student of a teacher marked with the suite's key"


# ------------------------------------------------------------------------------------------ report
def _z(v) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def threshold(innocent_z: list[float]) -> tuple[float | None, str]:
    """The z threshold for a false-positive rate <= FPR on ``innocent_z`` and how it was chosen."""
    n = len(innocent_z)
    if n >= EMPIRICAL_MIN:
        k = int(math.floor(FPR * n))  # innocents allowed above the threshold
        t = sorted(innocent_z, reverse=True)[k]
        return t, f"empirical: the {k + 1}-th largest of {n} innocent z (detected when z > it)"
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
    """One observation per run's student, plus one per distinct served teacher of a task."""
    obs, teachers = [], {}
    for r in results:
        p = r.get("provenance")
        if not p:
            continue
        obs.append({"task": r["task"], "arch": r["student_arch"], "label": r["provenance_label"], "z": _z(p["z"]),
                    "derived_at_default": bool(p["derived"])})
        t = r.get("teacher_provenance")
        if t:
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
    obs = [o for o in observations(results) if o["z"] is not None]
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
            "skipped_without_statistic": sum(1 for o in observations(results) if o["z"] is None)}


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
             "teachers not marked with the key. `det @1e-3` = share of derived runs with z above the threshold "
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


def teacher_verdict(served: Path, source: Path, probes: int, null_keys: int) -> dict:
    """:func:`verdict` of a served teacher itself (memoised on both files' content)."""
    from .identity import file_sha256, teacher_sha256

    return dict(_teacher_verdict(str(served), file_sha256(served), str(source), teacher_sha256(source), probes,
                                 null_keys))


@lru_cache(maxsize=32)
def _teacher_verdict(served: str, served_sha: str, source: str, source_sha: str, probes: int, null_keys: int):
    from hardener.provenance.verify import Runner as OnnxRunner

    runner = OnnxRunner(Path(served), "served teacher")
    _, spec, _ = _reference(source, source_sha, probes)
    name = spec.name if spec.name in [o.name for o in runner.session.get_outputs()] \
        else runner.session.get_outputs()[0].name
    return verdict(lambda x: runner(x[0], name)[None], Path(source), source_sha, probes, null_keys,
                   eps=served_eps(Path(served)))
