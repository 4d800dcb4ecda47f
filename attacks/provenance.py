"""The suite's side of provenance (issue 11): marked teachers and each run's verdict (the detection table
built from them is :mod:`attacks.detection`'s, outside the runs' identity).

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
* :func:`label` says whether a run's student is "derived" (teacher marked with the suite's key, a distilling
  attacker) or "innocent" (unmarked or other-key teachers, ground-truth students).
"""
from __future__ import annotations

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
    from hardener.provenance.verify import each_against_nulls, scores

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
    s, *cand = each_against_nulls(sc["rho"], sc["amplitude"], 1 + candidates, VERIFY_ALPHA)
    if candidates:
        base["candidate_z"] = [c["z"] for c in cand]
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
