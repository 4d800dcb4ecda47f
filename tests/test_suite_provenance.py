"""The attack suite measures provenance (issue 11): marked teachers, a verify statistic for every run, the
detection table.  Tiny students cannot inherit the mark in a few steps, so these tests check that the
statistic is the one `harden verify` computes, on the same outputs, not that quick students are caught."""
from __future__ import annotations

import json
import math
import types

import numpy as np
import onnx
import pytest

from attacks import detection, provenance
from attacks import runner as runner_mod
from attacks.oracle import Oracle
from attacks.schema import SuiteError
from attacks.suite import Defence, Runner, Suite, summarize, write_report
from hardener.provenance.mark import MARK_KEY, read_mark_manifest
from hardener.rewrite import MANIFEST_KEY
from hardener.provenance.probes import default_probes
from hardener.provenance.verify import verify

PROBES, NULLS = 4, 32
TINY = dict(tasks=["sr2"], attackers=["naive", "ground_truth"], students=["tiny"], seeds=[0], queries=12, patch=32,
            steps=4, batch=4, eval_size=32, provenance_probes=PROBES, provenance_null_keys=NULLS)


def defences():
    return [Defence("none"), Defence("marked", mark=True), Defence("other", mark=True, mark_key="other"),
            Defence("asvp-marked", layers=["body.*.conv2"], rank=2, mark=True)]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One tiny suite, run once; every student's probe outputs captured on the way (for the verify check)."""
    out = tmp_path_factory.mktemp("suite")
    captured = []
    real = provenance.verdict

    def spy(predict, *args, **kwargs):
        result = real(predict, *args, **kwargs)
        outs = [np.asarray(predict(p[None]), np.float64)[0] for _, p in default_probes(args[2])]
        captured.append((result["z"], outs))
        return result

    proxy = types.SimpleNamespace(**{k: getattr(provenance, k) for k in dir(provenance) if not k.startswith("__")})
    proxy.verdict = spy  # only the suite's per-student calls go through the spy
    mp = pytest.MonkeyPatch()
    mp.setattr(runner_mod, "provenance", proxy)
    try:
        runner = Runner(Suite(defences=defences(), **TINY), out, progress=False)
        results = runner.run_all()
    finally:
        mp.undo()
    summary = summarize(results)
    write_report(summary, out)
    return runner, results, summary, captured, out


def test_every_run_has_a_verdict_and_the_report_a_provenance_table(finished):
    runner, results, summary, _, out = finished
    files = sorted((out / "runs").glob("*.json"))
    # ground truth runs only against the unmarked, unhardened teacher
    assert len(files) == len(results) == 5
    labels = {}
    for f in files:
        r = json.loads(f.read_text())
        assert r["schema"] == "attacks.run/4"
        p = r["provenance"]
        assert math.isfinite(p["z"]) and 0 < p["p_gaussian"] < 1 and p["null_keys"] == NULLS
        assert p["probes"] == PROBES and p["key_id"] == provenance.key("suite").key_id
        assert r["config"]["provenance"]["null_keys"] == NULLS
        labels[(r["defence"]["name"], r["attacker"]["name"])] = r["provenance_label"]
        t = r["teacher_provenance"]
        if r["defence"]["name"] in ("marked", "asvp-marked"):
            assert p["eps"] > 0 and t["derived"] and t["z"] > 5  # the served teacher: its own mark, found
        else:
            assert p["eps"] is None and p["amplitude_over_eps"] is None and not t["derived"]
    assert labels == {("none", "naive"): "innocent", ("none", "ground_truth"): "innocent",
                      ("marked", "naive"): "derived", ("other", "naive"): "innocent",
                      ("asvp-marked", "naive"): "derived"}
    prov = json.loads((out / "report.json").read_text())["provenance"]
    rows = {r["arch"]: r for r in prov["rows"]}
    assert set(rows) == {"tiny", "teacher (served)"}
    assert rows["tiny"]["derived"]["n"] == 2 and rows["tiny"]["innocent"]["n"] == 3
    # served teachers: the two suite-key ones are derived, the other-key one innocent; the source itself
    # (residual exactly 0 against itself) is no test and is left out
    assert rows["teacher (served)"]["derived"]["n"] == 2 and rows["teacher (served)"]["innocent"]["n"] == 1
    assert rows["teacher (served)"]["detection_rate_verify_default"] == 1.0
    assert {json.loads(f.read_text())["teacher_provenance"]["residual_rms"] == 0 for f in files} == {True, False}
    assert prov["thresholds"]["sr2"]["innocents"] == 4 and prov["thresholds"]["sr2"]["z"] >= detection.GAUSS_Z
    md = (out / "report.md").read_text()
    assert "## Provenance" in md and "| sr2 | tiny | 2 |" in md and "Gaussian tail" in md
    assert "generate_key(seed=1101)" in md


def test_run_z_equals_harden_verify_on_the_same_outputs(finished, tmp_path):
    """The stored z of each student is `harden verify` on that student's probe outputs (as a folder)."""
    runner, results, _, captured, _ = finished
    source = runner.source_teacher("sr2")
    assert len(captured) == len(results)
    by_z = {z: outs for z, outs in captured}
    names = [n for n, _ in default_probes(PROBES)]
    for r in results[:2]:
        folder = tmp_path / r["run_id"][:8]
        folder.mkdir()
        for name, o in zip(names, by_z[r["provenance"]["z"]]):
            np.save(folder / f"{name}.npy", o)
        rep = verify(folder, provenance.key("suite"), source, num_probes=PROBES, null_keys=NULLS)
        assert rep["statistic"]["z"] == pytest.approx(r["provenance"]["z"], abs=1e-6)
        assert rep["statistic"]["amplitude"] == pytest.approx(r["provenance"]["amplitude"], rel=1e-5, abs=1e-9)


def test_marked_teacher_as_student_stand_in(finished):
    """The marked teacher run through the suite's verdict: verify's z, the full mark (amplitude = eps)."""
    runner, results, _, _, _ = finished
    source = runner.source_teacher("sr2")
    marked = runner.teacher_path("sr2", Defence("marked", mark=True))
    eps = provenance.served_eps(marked)
    oracle = Oracle(marked)
    from attacks.identity import teacher_sha256

    v = provenance.verdict(oracle, source, teacher_sha256(source), PROBES, NULLS, eps=eps)
    rep = verify(marked, provenance.key("suite"), source, num_probes=PROBES, null_keys=NULLS)
    assert v["z"] == pytest.approx(rep["statistic"]["z"], abs=1e-6) and v["z"] > 5
    assert v["derived"] and rep["verdict"] == "derived"
    assert v["amplitude_over_eps"] == pytest.approx(1.0, abs=0.01)
    stored = next(r for r in results if r["defence"]["name"] == "marked")["teacher_provenance"]
    assert stored["z"] == pytest.approx(v["z"], abs=1e-9)
    # the mark was calibrated to the default 0.05 dB against ground truth, with the suite's key
    manifest = read_mark_manifest(onnx.load(str(marked)))
    cal = manifest["calibration"]["per_output"][0]
    assert manifest["key_id"] == provenance.key("suite").key_id
    assert cal["kind"] == "psnr_drop" and cal["achieved"] == pytest.approx(0.05, abs=1e-3)
    other = runner.teacher_path("sr2", Defence("other", mark=True, mark_key="other"))
    assert read_mark_manifest(onnx.load(str(other)))["key_id"] == provenance.key("other").key_id
    # harden first, then mark: both manifests in the served file
    both = onnx.load(str(runner.teacher_path("sr2", Defence("asvp-marked", layers=["body.*.conv2"], rank=2,
                                                                      mark=True))))
    assert {p.key for p in both.metadata_props} >= {MARK_KEY, MANIFEST_KEY}
    # cached: asking again rebuilds nothing
    before = {p.name: p.stat().st_mtime_ns for p in (runner.out / "teachers").iterdir()}
    runner.teacher_path("sr2", Defence("marked", mark=True))
    assert {p.name: p.stat().st_mtime_ns for p in (runner.out / "teachers").iterdir()} == before


def test_mark_is_part_of_the_run_identity(tmp_path):
    runner = Runner(Suite(defences=[Defence("none"), Defence("d")], **TINY), tmp_path, progress=False)
    plain = runner.run_config("sr2", Defence("d"), "naive", "tiny", 0)
    marked = runner.run_config("sr2", Defence("d", mark=True), "naive", "tiny", 0)
    other = runner.run_config("sr2", Defence("d", mark=True, mark_key="other"), "naive", "tiny", 0)
    assert "mark" not in plain["teacher"]
    assert marked["teacher"]["mark"]["key"]["key_id"] == provenance.key("suite").key_id
    ids = {runner.run_file("sr2", Defence("d", mark=m, mark_key=k), "naive", "tiny", 0).name
           for m, k in ((False, "suite"), (True, "suite"), (True, "other"))}
    assert len(ids) == 3 and len({json.dumps(c, sort_keys=True) for c in (plain, marked, other)}) == 3
    fewer = Runner(Suite(defences=[Defence("none")], **{**TINY, "provenance_null_keys": 64}), tmp_path, progress=False)
    assert fewer.run_config("sr2", Defence("d"), "naive", "tiny", 0) != plain  # the statistic's settings too


@pytest.mark.parametrize("text, expected", [
    ('mark = "yes"', "defences[1].mark = 'yes': expected a valid boolean"),
    ("mark = 1", "defences[1].mark = 1: expected a valid boolean"),
    ('mark = true\nmark_key = "mine"', "defences[1].mark_key = 'mine': expected one of 'suite' or 'other'"),
    ('mark_key = "other"', "defences[1].mark_key = 'other': expected mark = true with it"),
])
def test_the_schema_refuses_bad_mark_keys(tmp_path, text, expected):
    f = tmp_path / "s.toml"
    f.write_text(f'tasks = ["sr2"]\n[[defences]]\nname = "none"\n[[defences]]\nname = "m"\n{text}\n')
    with pytest.raises(SuiteError) as err:
        Suite.load(f)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_schema_limits_and_plan(tmp_path):
    with pytest.raises(SuiteError, match="provenance_null_keys = 5: expected greater than or equal to 20"):
        Suite(defences=[Defence("none")], **{**TINY, "provenance_null_keys": 5}).check()
    with pytest.raises(SuiteError, match="needs the undefended teacher"):
        Suite(defences=[Defence("m", mark=True)], **TINY).check()
    runner = Runner(Suite(defences=defences(), **TINY), tmp_path, progress=False)
    gt = [d.name for _, d, a, _, _ in runner.plan() if a == "ground_truth"]
    assert gt == ["none"]


def test_threshold_and_detection_rates():
    z = detection.GAUSS_Z
    assert detection.threshold([0.1, -1.0])[0] == z
    assert detection.threshold([0.1, 4.0])[0] == 4.0  # an innocent above 3.09 raises the threshold
    many = list(np.linspace(-3, 3, 2000))
    t, rule = detection.threshold(many)
    assert t == sorted(many)[-3] and rule.startswith("empirical")  # floor(2000e-3) = 2 allowed above
    assert sum(v > t for v in many) / len(many) <= 1e-3

    def run(label, arch, zv, derived=False, sha="s"):
        return {"task": "sr2", "student_arch": arch, "provenance_label": label, "teacher_file_sha256": sha,
                "provenance": {"z": zv, "derived": derived}, "teacher_provenance": None}
    results = [run("innocent", "tiny", 0.5), run("innocent", "tiny", -0.2), run("innocent", "edsr", 1.0),
               run("derived", "tiny", 2.0), run("derived", "tiny", 3.5), run("derived", "tiny", 6.0, True),
               run("derived", "edsr", float("nan"))]
    table = detection.table(results)
    rows = {r["arch"]: r for r in table["rows"]}
    assert rows["tiny"]["derived"]["n"] == 3 and rows["tiny"]["detection_rate_fpr_1e-3"] == pytest.approx(2 / 3)
    assert rows["tiny"]["detection_rate_verify_default"] == pytest.approx(1 / 3)
    assert rows["tiny"]["innocent"]["z_max"] == 0.5 and rows["edsr"]["derived"]["n"] == 0
    assert table["skipped_without_statistic"] == 1
    assert "| sr2 | tiny | 3 | 3.83 | 2.00 | 6.00 | 67% | 33% | 2 |" in "\n".join(detection.markdown(table))


def test_candidate_key_trials_in_a_run_and_in_the_table(finished):
    """A run's candidate_z is attacks.innocents.trials on the same outputs (the suite key's z unchanged by
    them); runs made without candidates keep their identity; the table pools the trials into the task's
    threshold, which becomes empirical once innocents and trials reach 1000."""
    from attacks.degrade import input_baseline
    from attacks.identity import teacher_sha256
    from attacks.innocents import candidate_keys, trials

    runner, *_ = finished
    source = runner.source_teacher("sr2")
    sha = teacher_sha256(source)
    bicubic = lambda x: input_baseline(x, 2)  # noqa: E731  an innocent suspect
    plain = provenance.verdict(bicubic, source, sha, PROBES, NULLS)
    with_trials = provenance.verdict(bicubic, source, sha, PROBES, NULLS, candidates=5)
    assert "candidate_z" not in plain and len(with_trials["candidate_z"]) == 5
    assert with_trials["z"] == pytest.approx(plain["z"], abs=1e-6)  # float32 key chunks differ
    probes = default_probes(PROBES)
    _, _, ys = provenance._reference(str(source), sha, PROBES)
    rs = [np.asarray(bicubic(p[None]), np.float64)[0] - y for (_, p), y in zip(probes, ys)]
    want = [t["z"] for t in trials(ys, rs, candidate_keys(5), NULLS, [PROBES])[PROBES]]
    assert with_trials["candidate_z"] == pytest.approx(want, abs=1e-6)
    assert "candidate_keys" not in provenance.verify_config(Suite(defences=[Defence("none")], **TINY))
    assert provenance.verify_config(Suite(defences=[Defence("none")], **TINY, provenance_candidate_keys=8))[
        "candidate_keys"] == 8

    def run(label, zv, cz):
        return {"task": "sr2", "student_arch": "tiny", "provenance_label": label, "teacher_file_sha256": "s",
                "provenance": {"z": zv, "derived": False, "candidate_z": cz}, "teacher_provenance": None}
    grid = list(np.linspace(-3, 3.5, 500))
    table = detection.table([run("innocent", 0.2, grid), run("derived", 5.0, grid)])
    t = table["thresholds"]["sr2"]
    assert t["innocent_trials"] == 1000 and t["innocents"] == 1 and t["rule"].startswith("empirical")
    assert t["z"] == sorted(grid + grid + [0.2])[-2]  # floor(1001e-3) = 1 allowed above
    row = table["rows"][0]
    assert row["innocent_trials"]["n"] == 1000 and row["innocent_trials_at_p_1e-3"] == 2 * sum(
        z >= detection.GAUSS_Z for z in grid)
    assert "candidate-key innocent trials" in "\n".join(detection.markdown(table))


# ------------------------------------------------------------------------------------ innocent trials
def test_innocent_trials_find_the_one_key_that_marked_and_no_other():
    """attacks.innocents: candidate keys are disjoint from the null keys and from the suite's keys; on a
    residual that is exactly candidate 0's mark, only candidate 0 is derived; on pure noise, none is."""
    from attacks.innocents import candidate_keys, summarize, trials
    from hardener.provenance.key import mark_weights, null_key
    from hardener.provenance.signal import mark_signal

    keys = candidate_keys(6)
    ids = {k.key_id for k in keys}
    assert len(ids) == 6
    assert not ids & {null_key(i).key_id for i in range(NULLS)}
    assert not ids & {provenance.key(w).key_id for w in provenance.MARK_KEYS}
    ys = [x for _, x in default_probes(3)]
    w1, w2 = mark_weights(keys[0].secret, 3, 0)
    marked = [0.01 * mark_signal(y[None], w1, w2)[0] for y in ys]
    noise = [np.random.default_rng(i).normal(0, 0.01, y.shape) for i, y in enumerate(ys)]
    by_mark = trials(ys, marked, keys, NULLS, [1, 3])
    by_noise = trials(ys, noise, keys, NULLS, [1, 3])
    assert by_mark[3][0]["derived"] and by_mark[3][0]["z"] > 4.75
    assert not any(s["derived"] for s in by_mark[3][1:])
    assert not any(s["derived"] for s in by_noise[3])
    s = summarize(by_noise)
    assert [r["probes"] for r in s["by_probes"]] == [1, 3] and s["by_probes"][1]["trials"] == 6
    z1, z3 = (np.array([t["z"] for t in by_noise[n]]) for n in (1, 3))
    assert s["drift"]["mean_change"] == pytest.approx(float((z3 - z1).mean()))
    assert s["by_probes"][1]["z_max"] == pytest.approx(float(z3.max()))
