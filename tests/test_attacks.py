"""The attack suite's parts: the strip attack, the oracle, target filters, students, distillation."""
from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
import torch

from attacks.distill import filter_targets, train_student
from attacks.oracle import Oracle, strip_asvp
from attacks.students import STUDENTS, build_student, parameter_count
from hardener.api import HardenConfig, harden
from hardener.asvp import AsvpParams

from conftest import TEACHER, run_model


@pytest.mark.parametrize("placement", ["inline", "tap"])
@pytest.mark.parametrize("use_manifest", [True, False])
def test_strip_finds_and_removes_every_subgraph(tmp_path, placement, use_manifest):
    out = tmp_path / "h.onnx"
    layers = ["body.*.conv2"] + (["tensor:lr"] if placement == "inline" else [])
    harden(TEACHER, out, HardenConfig(layers=layers, placement=placement, validate=False))
    stripped, removed = strip_asvp(onnx.load(str(out)), use_manifest=use_manifest)
    assert removed == len(layers) + 3  # body.0..3.conv2 (+ the graph input)
    onnx.checker.check_model(stripped, full_check=True)
    original = onnx.load(str(TEACHER))
    assert [n.op_type for n in stripped.graph.node] == [n.op_type for n in original.graph.node]
    assert [o.name for o in stripped.graph.output] == [o.name for o in original.graph.output]
    x = np.random.default_rng(0).random((2, 3, 20, 24), dtype=np.float32)
    np.testing.assert_array_equal(run_model(stripped, {"lr": x})[0], run_model(TEACHER, {"lr": x})[0])
    served, clean = run_model(out, {"lr": x})[0], run_model(TEACHER, {"lr": x})[0]
    if placement == "inline":
        assert not np.array_equal(served, clean)
    else:  # a tap leaves the served output bit-identical
        np.testing.assert_array_equal(served, clean)


def test_oracle_counts_queries_and_exposes_taps(tmp_path):
    out = tmp_path / "tap.onnx"
    harden(TEACHER, out, HardenConfig(layers=["body.1.conv2"], placement="tap", validate=False,
                                      params=AsvpParams(rank=2)))
    oracle = Oracle(out)
    x = np.random.default_rng(1).random((5, 3, 16, 16), dtype=np.float32)
    y, feats = oracle(x, batch=2, features=True)
    assert y.shape == (5, 3, 32, 32) and oracle.queries == 5
    assert list(feats) == ["asvp/body.1.conv2"] and feats["asvp/body.1.conv2"].shape == (5, 32, 16, 16)
    np.testing.assert_allclose(y, run_model(TEACHER, {"lr": x})[0], atol=1e-6)


def test_target_filters_remove_high_frequencies_only():
    rng = np.random.default_rng(0)
    smooth = torch.from_numpy(np.tile(np.linspace(0, 1, 32, dtype=np.float32), (1, 3, 32, 1)))
    noisy = smooth + torch.from_numpy(rng.normal(0, 0.05, smooth.shape).astype(np.float32))
    for how in ("lowpass", "wavelet"):
        cleaned = filter_targets(noisy, how)
        inner = (..., slice(4, -4), slice(4, -4))
        assert (cleaned - smooth)[inner].std() < 0.8 * (noisy - smooth)[inner].std(), how
        assert torch.allclose(filter_targets(smooth, how)[inner], smooth[inner], atol=2e-3), how


def test_students_shapes_and_sizes():
    x = torch.rand(2, 3, 12, 12)
    sizes = []
    for name in STUDENTS:
        for scale in (1, 2, 4):
            assert build_student(name, scale)(x).shape == (2, 3, 12 * scale, 12 * scale)
        sizes.append(parameter_count(build_student(name, 2)))
    assert sizes == sorted(sizes) and sizes[-1] > 3 * sizes[1]  # large is several times the EDSR-like one


def test_distillation_learns_the_teacher():
    """A student trained on a teacher's answers moves toward the teacher (loss falls, outputs agree)."""
    rng = np.random.default_rng(0)
    x = rng.random((32, 3, 12, 12), dtype=np.float32)
    teacher = run_model(TEACHER, {"lr": x})[0]
    student = build_student("tiny", 2, seed=0)
    with torch.no_grad():
        before = float(torch.mean(torch.abs(student(torch.from_numpy(x)) - torch.from_numpy(teacher))))
    curve = train_student(student, x, teacher, steps=60, batch=8, seed=0)
    with torch.no_grad():
        after = float(torch.mean(torch.abs(student(torch.from_numpy(x)) - torch.from_numpy(teacher))))
    assert curve[-1] < curve[0] and after < 0.8 * before


def test_suite_end_to_end_identity_defence_and_resume(tmp_path):
    """Quick grid: a gain-1 (identity) defence must protect nothing; reruns reuse finished runs."""
    from attacks.suite import Defence, Runner, Suite, summarize, write_report

    suite = Suite(defences=[Defence("none"), Defence("identity", layers=["body.*.conv2"], gain=1.0)],
                  attackers=["naive", "strip", "ground_truth"], students=["tiny"], queries=32, patch=48,
                  steps=40, eval_size=64)
    runner = Runner(suite, tmp_path, progress=False)
    results = runner.run_all()
    assert len(results) == 4  # none x {naive, ground_truth} + identity x {naive, strip}
    summary = summarize(results)
    write_report(summary, tmp_path, results)
    rows = {(r["defence"], r["attacker"]): r for r in summary["rows"]}
    assert abs(rows[("identity", "naive")]["student_psnr_drop"]) < 0.01
    assert abs(rows[("identity", "naive")]["teacher_psnr_drop"]) < 1e-3
    assert rows[("identity", "strip")]["student_psnr_drop"] is not None
    assert rows[("none", "naive")]["student_psnr_drop"] is None  # no self-comparison
    student = rows[("none", "naive")]["student_psnr"]
    teacher = results[0]["teacher_original"]["psnr"]
    assert 20 < student < teacher + 1  # a real, short distillation: below or near the teacher
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*.json")}
    assert len(Runner(suite, tmp_path, progress=False).run_all()) == 4
    assert stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*.json")}
    md = (tmp_path / "report.md").read_text()
    assert "| sr2 | identity | naive | tiny |" in md
    conv_lines = [line for line in md.splitlines() if line.startswith("- sr2: PSNR/SSIM")]
    assert len(conv_lines) == 1 and "crop border 2" in conv_lines[0]  # one conventions line per task group
    # pictures: each run's prediction on the first held-out photo, the teacher's, and the task grid + curve
    from skimage import io

    for r in results:
        assert io.imread(str(tmp_path / r["image"])).shape == (64, 64, 3)
        assert io.imread(str(tmp_path / r["teacher_image"])).shape == (64, 64, 3)
    assert io.imread(str(tmp_path / results[0]["input_image"])).shape == (32, 32, 3)
    assert io.imread(str(tmp_path / results[0]["truth_image"])).shape == (64, 64, 3)
    grid = io.imread(str(tmp_path / "grid_sr2.png"))
    assert grid.shape[0] > 300 and grid.shape[1] > 500  # 2 rows (none, identity) x 4 panels
    assert (tmp_path / "tradeoff.png").stat().st_size > 10_000
    assert "grid_sr2.png" in (tmp_path / "report.md").read_text()


def _fake_run(defence, attacker, seed, psnr, layers=("body.*.conv2",)):
    return {"task": "sr2", "student": "tiny", "seed": seed, "student_params": 1,
            "defence": {"name": defence, "layers": list(layers) if defence != "none" else [], "rank": 4,
                        "gain": 2.0, "mode": "channel", "placement": "inline"},
            "attacker": {"name": attacker}, "student_metrics": {"psnr": psnr, "ssim": 0.9},
            "teacher_served": {"psnr": 30.0, "ssim": 0.9}, "teacher_original": {"psnr": 31.0, "ssim": 0.9}}


def test_summary_pairs_drops_by_seed():
    """Drops are per seed (same query set and initialisation), then mean and std; strip is paired with naive."""
    from attacks.suite import summarize

    runs = [_fake_run("none", "naive", 0, 30.0), _fake_run("none", "naive", 1, 29.0),
            _fake_run("h2", "naive", 0, 29.5), _fake_run("h2", "naive", 1, 28.0),
            _fake_run("h2", "strip", 0, 30.0), _fake_run("h2", "strip", 2, 27.0)]  # seed 2: no partner
    rows = {(r["defence"], r["attacker"]): r for r in summarize(runs)["rows"]}
    naive = rows[("h2", "naive")]
    assert naive["student_psnr_drop"] == pytest.approx(0.75) and naive["student_psnr_drop_std"] == pytest.approx(0.25)
    assert naive["paired_seeds"] == 2 and naive["teacher_psnr_drop"] == pytest.approx(1.0)
    strip = rows[("h2", "strip")]
    assert strip["student_psnr_drop"] == pytest.approx(0.0) and strip["paired_seeds"] == 1 and strip["seeds"] == 2
    assert rows[("none", "naive")]["student_psnr_drop"] is None
    # a defence measured against another one (a feature thief with clean taps) instead of the undefended teacher
    tap = [dict(_fake_run("tap-h1", "features", s, 30.0 - s)) for s in (0, 1)] + \
          [dict(_fake_run("tap-h2", "features", s, 29.0 - s)) for s in (0, 1)]
    for r in tap:
        r["defence"]["baseline"] = "tap-h1" if r["defence"]["name"] == "tap-h2" else "none"
    rows = {r["defence"]: r for r in summarize(tap)["rows"]}
    assert rows["tap-h2"]["student_psnr_drop"] == pytest.approx(1.0) and rows["tap-h2"]["baseline"] == "tap-h1"
    assert rows["tap-h1"]["student_psnr_drop"] is None  # no undefended features run to compare with


def test_metrics_match_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from hardener.metrics import psnr, ssim

    rng = np.random.default_rng(0)
    a = rng.random((3, 40, 36))
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    assert psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-9)
    ref = structural_similarity(a, b, data_range=1.0, channel_axis=0, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False)
    assert ssim(a, b) == pytest.approx(ref, abs=1e-12)
    assert psnr(a, b, crop_border=4) == pytest.approx(
        peak_signal_noise_ratio(a[:, 4:-4, 4:-4], b[:, 4:-4, 4:-4], data_range=1.0), abs=1e-9)


@pytest.mark.parametrize("text,words", [
    ('tasks = ["sr3"]\n[[defences]]\nname = "none"\n', ("task", "sr3", "sr2")),
    ('attackers = ["thief"]\n[[defences]]\nname = "none"\n', ("attacker", "thief", "naive")),
    ('stepz = 3\n', ("unknown key", "stepz")),
    ('[[defences]]\nname = "h2"\nlayers = ["body.*.conv2"]\n', ("undefended", "none")),
    ('attackers = ["naive"]\n[[defences]]\nname = "none"\nattackers = ["strip"]\n', ("strip",)),
    ('[[defences]]\nname = "none"\ngian = 2\n', ("gian",)),
    ('[[defences]]\nname = "none"\n[[defences]]\nname = "t"\nlayers = ["x"]\nbaseline = "tap"\n', ("baseline", "tap")),
    ('tasks = [\n', ("not valid TOML",)),
])
def test_bad_suite_files_are_refused_clearly(tmp_path, text, words):
    from click.testing import CliRunner

    from attacks.cli import main

    suite = tmp_path / "s.toml"
    suite.write_text(text)
    result = CliRunner().invoke(main, ["run", str(suite), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert all(w in result.output for w in words), result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_defence_attacker_restriction_shapes_the_plan():
    from attacks.suite import Defence, Runner, Suite

    suite = Suite(tasks=["sr2"], attackers=["naive", "features", "strip", "ground_truth"], students=["tiny"],
                  defences=[Defence("none", attackers=["naive", "ground_truth"]),
                            Defence("tap", layers=["body.*.conv2"], placement="tap", attackers=["features"])])
    plan = {(d.name, a) for _, d, a, _, _ in Runner.plan(type("R", (), {"suite": suite})())}
    assert plan == {("none", "naive"), ("none", "ground_truth"), ("tap", "features")}


def test_run_files_have_portable_names(tmp_path):
    from attacks.suite import Defence, Runner, Suite, run_key

    key = run_key("sr2", "asvp-k4-h2", "naive", "spandrel:SwinIR", 1)
    assert key == "sr2__asvp-k4-h2__naive__spandrel-SwinIR__s1" and ":" not in key
    runner = Runner(Suite(students=["tiny"]), tmp_path, progress=False)
    file = runner.run_file("sr2", Defence("asvp-k4-h2", layers=["body.*.conv2"], gain=2.0), "naive", "tiny", 1)
    assert re.fullmatch(r"sr2__asvp-k4-h2__naive__tiny__s1__[0-9a-f]{16}\.json", file.name), file.name


def test_competence_strikes_an_attacker_weaker_than_naive_on_the_clean_teacher():
    from attacks.suite import summarize

    runs = [_fake_run("none", "naive", s, 30.0 + 0.01 * s) for s in (0, 1, 2)] + \
           [_fake_run("none", "lowpass", s, 29.0 + 0.01 * s) for s in (0, 1, 2)] + \
           [_fake_run("none", "l2", s, 30.02 - 0.01 * s) for s in (0, 1, 2)] + \
           [_fake_run("h2", a, s, 28.0) for a in ("naive", "lowpass", "l2") for s in (0, 1, 2)]
    rows = {(r["defence"], r["attacker"]): r for r in summarize(runs)["rows"]}
    weak, fine = rows[("h2", "lowpass")], rows[("h2", "l2")]
    assert weak["competent"] is False and weak["drop_counts"] is False
    assert weak["competence_gap"] == pytest.approx(-1.0)
    assert fine["competent"] is True and fine["drop_counts"] is True
    assert rows[("h2", "naive")]["competent"] is None  # the yardstick itself is not judged


def test_dihedral_transforms_invert():
    from attacks.suite import dihedral

    x = np.random.default_rng(0).random((2, 3, 5, 5)).astype(np.float32)
    outs = [dihedral(x, t) for t in range(8)]
    assert len({o.tobytes() for o in outs}) == 8  # eight distinct transforms
    for t in range(8):
        np.testing.assert_array_equal(dihedral(outs[t], t, inverse=True), x)


def test_new_thieves_query_as_documented(tmp_path):
    """Self-ensemble answers equal the mean over the 8 transforms; the one-image thief uses one photo."""
    from attacks.distill import ATTACKERS
    from attacks.oracle import Oracle
    from attacks.suite import Runner, Suite, dihedral

    runner = Runner(Suite(students=["tiny"], queries=8, patch=32), tmp_path, progress=False)
    x, _, plain, _ = runner.answers("sr2", TEACHER, 0)
    x2, _, ens, _ = runner.answers("sr2", TEACHER, 0, ensemble=True)
    np.testing.assert_array_equal(x, x2)
    oracle = Oracle(TEACHER)
    expect = np.mean([dihedral(oracle(dihedral(x, t)), t, inverse=True) for t in range(8)], axis=0)
    np.testing.assert_allclose(ens, expect, atol=1e-6)
    assert not np.array_equal(ens, plain)  # the teacher is not exactly equivariant
    x1, *_ = runner.answers("sr2", TEACHER, 0, one_image=True)
    assert not np.array_equal(x1, x)
    assert ATTACKERS["finetune"].finetune_factor > 0 and ATTACKERS["one_image"].one_image


def test_finetune_thief_runs_and_records_its_steps(tmp_path):
    from attacks.suite import Defence, Runner, Suite

    suite = Suite(defences=[Defence("none")], attackers=["finetune"], students=["tiny"], queries=16, patch=32,
                  steps=20, eval_size=32)
    result = Runner(suite, tmp_path, progress=False).run_one("sr2", suite.defences[0], "finetune", "tiny", 0)
    assert result["steps"] == 20 + 6 and np.isfinite(result["student_metrics"]["psnr"])


def test_drop_intervals_are_paired_bootstraps_and_flag_noise():
    from attacks.suite import paired_bootstrap, summarize

    def run(defence, seed, per_image):
        r = _fake_run(defence, "naive", seed, float(np.mean(per_image)))
        r["student_metrics"]["per_image_psnr"] = list(per_image)
        return r

    rng = np.random.default_rng(0)
    clean = {s: 30 + rng.normal(0, 0.5, 6) for s in range(3)}
    runs = [run("none", s, clean[s]) for s in range(3)]
    runs += [run("big", s, clean[s] - 1.0 + rng.normal(0, 0.05, 6)) for s in range(3)]  # a clear 1 dB drop
    runs += [run("tiny", s, clean[s] + 0.05 * np.array([1, -1, 1, -1, 1, -1])) for s in range(3)]  # no drop
    runs += [run("one", 0, clean[0] - 1.0)]
    rows = {r["defence"]: r for r in summarize(runs)["rows"]}
    lo, hi = rows["big"]["student_psnr_drop_ci95"]
    assert 0.9 < lo < 1.0 < hi < 1.1 and rows["big"]["within_noise"] is False
    lo, hi = rows["tiny"]["student_psnr_drop_ci95"]
    assert lo < 0 < hi and rows["tiny"]["within_noise"] is True
    assert rows["one"]["student_psnr_drop_ci95"] is None and rows["one"]["within_noise"] is None  # n/a
    assert paired_bootstrap([[1.0, 2.0], [3.0]]) == paired_bootstrap([[1.0, 2.0], [3.0]])  # deterministic


def test_answer_degrading_thieves_do_what_they_say():
    """uint8: exact 8-bit levels; jpeg: lossy but close; both keep the answers' shape and range."""
    rng = np.random.default_rng(1)
    y = torch.from_numpy(rng.uniform(0, 1, (2, 3, 32, 32)).astype(np.float32))
    q = filter_targets(y, "uint8")
    np.testing.assert_allclose(q.numpy() * 255, np.round(q.numpy() * 255), atol=1e-4)
    assert (q - y).abs().max() <= 0.5 / 255 + 1e-6
    smooth = torch.from_numpy(np.tile(np.linspace(0.1, 0.9, 32, dtype=np.float32), (2, 3, 32, 1)))
    j = filter_targets(smooth + 0.03 * torch.from_numpy(rng.normal(size=smooth.shape).astype(np.float32)), "jpeg")
    assert j.shape == smooth.shape and 0 <= j.min() and j.max() <= 1
    assert 1e-5 < float(((j - smooth) ** 2).mean()) < 0.03 ** 2  # changed, and the noise partly removed


def test_demark_thief_removes_a_mark_of_the_method_without_the_key():
    """Answers = truth + eps * g0(truth) with the mark's own function and a random key's weights: the
    method-aware thief's cleaning, fitted on the pairs themselves, removes most of it (a linear filter could
    not: the mark is even in the local detail)."""
    from attacks.distill import demark_targets
    from hardener.provenance.signal import mark_signal

    rng = np.random.default_rng(3)
    w1 = rng.normal(0, 1, (16, 3, 3, 3))
    w1 -= w1.mean(axis=(1, 2, 3), keepdims=True)  # zero-sum filters, like the key's
    w2 = rng.normal(0, 0.25, (3, 16))
    smooth = torch.nn.functional.avg_pool2d(torch.rand(16, 3, 36, 36, generator=torch.Generator().manual_seed(5)),
                                            3, 1).numpy()
    answers = smooth + 0.02 * mark_signal(smooth, w1, w2).astype(np.float32)
    cleaned = demark_targets(answers, smooth)
    before = float(np.mean((answers - smooth) ** 2))
    after = float(np.mean((cleaned - smooth) ** 2))
    assert after < 0.2 * before, (before, after)


def test_small_budget_thief_trains_on_a_subset(tmp_path):
    from attacks.suite import Defence, Runner, Suite

    suite = Suite(defences=[Defence("none")], attackers=["few_queries"], students=["tiny"], queries=16, patch=32,
                  steps=10, eval_size=32)
    result = Runner(suite, tmp_path, progress=False).run_one("sr2", suite.defences[0], "few_queries", "tiny", 0)
    assert result["queries"] == 2 and np.isfinite(result["student_metrics"]["psnr"])


def test_feature_thief_tunes_its_hint_weight_on_held_out_queries():
    """Hints from features that are pure noise, at a weight that swamps the output loss, lose on the held-out
    queries: the thief falls back to a small or zero weight; the student passed in is left untouched."""
    from attacks.distill import tune_feature_weight
    from attacks.students import build_student

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (40, 3, 16, 16)).astype(np.float32)
    y = np.repeat(np.repeat(x, 2, axis=2), 2, axis=3)
    noise = {f"tap/body.{i}.conv2": rng.normal(0, 1, (40, 16, 16, 16)).astype(np.float32) for i in range(2)}
    student = build_student("tiny", 2, 0)
    before = [p.detach().clone() for p in student.parameters()]
    w, scores = tune_feature_weight(student, x, y, noise, (1000.0,), steps=40, seed=0)
    assert set(scores) == {0.0, 1000.0} and w == 0.0 and scores[0.0] < scores[1000.0]
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))
