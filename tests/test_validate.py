"""Validation that tells the truth: budgets over all images, per-layer checks that fail a no-op, calibration."""
from __future__ import annotations

from dataclasses import replace
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
import pytest

import hardener.api as api
from hardener import AsvpParams, Budgets, HardenConfig, harden
from hardener.calibrate import Calibration, CalibrationError, calibrate_gain
from hardener.errors import UsageError
from hardener.inputs import image_folder_reader, model_inputs
from hardener.validate import ImageStats, compare_outputs

ASSETS = Path(str(resources.files("hardener") / "assets"))
TEACHER = ASSETS / "sr_x2.onnx"


def photos_reader():
    """The bundled real LR photos with their HR ground truth."""
    model = onnx.load(str(TEACHER))
    reader = image_folder_reader(ASSETS / "samples" / "lr", model_inputs(model), model.graph.output[0].name,
                                 ASSETS / "samples" / "hr")
    reader.description = "bundled photos"
    return reader


def config(**kw) -> HardenConfig:
    base = dict(layers=["body.*.conv2"], budgets=Budgets(crop_border=2), force=True)
    base.update(kw)
    return HardenConfig(**base)


# --- budgets over all images -------------------------------------------------------------------------------

def test_an_unchanged_image_cannot_mask_the_others():
    rng = np.random.default_rng(0)
    o = rng.random((3, 3, 16, 16)).astype(np.float32)
    h = o.copy()
    h[1] += 0.1  # PSNR 20 dB
    h[2] += np.float32(10 ** (-21 / 20))  # PSNR 21 dB; image 0 unchanged (PSNR inf)
    h = np.clip(h, 0, 1)
    image: dict = {}
    compare_outputs(["y"], [o], [h], {}, Budgets(), None, image, with_ssim=False)
    stats = image["y"].summary(1.0)
    mses = [float(np.mean((np.clip(h[i], 0, 1) - o[i]) ** 2)) for i in range(3)]
    assert np.isfinite(stats["psnr_vs_original"])  # mean([inf, 20, 21]) would have been inf
    assert stats["psnr_vs_original"] == pytest.approx(10 * np.log10(1 / np.mean(mses)))
    assert stats["psnr_vs_original_worst_image"] == pytest.approx(10 * np.log10(1 / max(mses)))
    assert stats["psnr_vs_original"] < 40  # the default min-psnr budget fails, as it should


def test_psnr_drop_uses_mean_mse_of_both_models():
    stats = ImageStats()
    stats.original_vs_truth = [1e-3, 1e-3]
    stats.hardened_vs_truth = [1e-3, 3e-3]
    stats.vs_original = [0.0, 1e-3]
    out = stats.summary(1.0)
    assert out["psnr_drop_vs_truth"] == pytest.approx(10 * np.log10(2e-3 / 1e-3))
    assert out["psnr_drop_vs_truth_worst_image"] == pytest.approx(10 * np.log10(3))


# --- per-layer checks: a subgraph that does (almost) nothing must FAIL ----------------------------------------

def _insert_with(monkeypatch, **actual):
    """Make the rewrite build subgraphs with other parameters than the ones the run reports."""
    real = api.insert_asvp

    def wrong(model, opset, selections, params, *a, **k):
        return real(model, opset, selections, replace(params, **actual), *a, **k)

    monkeypatch.setattr(api, "insert_asvp", wrong)


def test_a_no_op_subgraph_fails(tmp_path, monkeypatch):
    _insert_with(monkeypatch, gain=1.0)  # the graph amplifies nothing, the run claims h = 1.3
    result = harden(TEACHER, tmp_path / "out.onnx", config(params=AsvpParams(gain=1.3)), data_reader=photos_reader())
    assert result.report["status"] == "FAILED" and result.report["exit_code"] == 1
    failures = "\n".join(result.report["failures"])
    assert "outputs equal the original's" in failures
    assert failures.count("left every probe map unchanged") == 4
    assert result.summary.splitlines()[-1].startswith("FAILED")


def test_a_subgraph_that_amplifies_too_little_fails(tmp_path, monkeypatch):
    _insert_with(monkeypatch, gain=1.15)  # half the claimed perturbation
    result = harden(TEACHER, tmp_path / "out.onnx", config(params=AsvpParams(gain=1.3)), data_reader=photos_reader())
    layers = result.report["validation"]["layers"]
    assert all(l["check"].startswith("failed") for l in layers)
    assert all(l["energy_ratio"] == pytest.approx(0.5, abs=0.02) for l in layers)
    assert result.report["status"] == "FAILED"


def test_a_correct_subgraph_passes_its_layer_checks(tmp_path):
    result = harden(TEACHER, tmp_path / "out.onnx", config(params=AsvpParams(gain=1.3)), data_reader=photos_reader())
    layers = result.report["validation"]["layers"]
    assert [l["check"] for l in layers] == ["ok"] * 4
    assert all(abs(l["energy_ratio"] - 1) < 1e-3 for l in layers)
    assert result.report["status"] == "PASSED"
    assert result.report["validation"]["data"] == "bundled photos"


# --- calibration ------------------------------------------------------------------------------------------------

def test_calibration_search_hits_a_target_on_a_known_curve():
    calls = []

    def drop(h):  # a quadratic law, like a small perturbation's cost
        calls.append(h)
        return 2.0 * (h - 1) ** 2

    record = calibrate_gain(drop, "psnr_drop", 0.5)
    assert abs(record["measured"]["psnr_drop"] - 0.5) <= 0.05
    assert record["chosen_gain"] == pytest.approx(1.5, rel=0.02)
    psnr = calibrate_gain(lambda h: 60 - 20 * np.log10(h - 1 + 1e-9) - 40, "psnr", 30.0)
    assert abs(psnr["measured"]["psnr"] - 30.0) <= 0.1


def test_calibration_that_cannot_reach_its_target_is_a_clear_failure():
    with pytest.raises(CalibrationError, match="no gain reaches a PSNR drop of 1 dB"):
        calibrate_gain(lambda h: 0.2 * (1 - 1 / h), "psnr_drop", 1.0)  # saturates below 0.2 dB


@pytest.mark.parametrize("target", [0.05, 0.1])
def test_calibrated_gain_meets_its_target_on_the_bundled_teacher(tmp_path, target):
    out = tmp_path / "cal.onnx"
    result = harden(TEACHER, out, config(calibration=Calibration(target_psnr_drop=target)),
                    data_reader=photos_reader())
    cal = result.report["calibration"]
    drop = result.report["validation"]["outputs"]["sr"]["psnr_drop_vs_truth"]
    assert abs(drop - target) <= 0.1 * target  # the validated model, not just the search, is on target
    assert cal["measured"]["psnr_drop"] == pytest.approx(drop, abs=1e-9)
    assert result.report["config"]["params"]["gain"] == cal["chosen_gain"] > 1
    # the reported gain rebuilds the same file
    again = harden(TEACHER, tmp_path / "fixed.onnx", config(params=AsvpParams(gain=cal["chosen_gain"])),
                   data_reader=photos_reader())
    assert out.read_bytes() == Path(again.output).read_bytes()


def test_unreachable_calibration_writes_nothing(tmp_path):
    out = tmp_path / "cal.onnx"
    with pytest.raises(CalibrationError):
        harden(TEACHER, out, config(calibration=Calibration(target_psnr_drop=40.0)), data_reader=photos_reader())
    assert list(tmp_path.iterdir()) == []


def test_calibration_needs_truth_for_a_drop_target_and_an_inline_placement(tmp_path):
    model = onnx.load(str(TEACHER))
    no_truth = image_folder_reader(ASSETS / "samples" / "lr", model_inputs(model), "sr")
    with pytest.raises(UsageError, match="needs ground truth"):
        harden(TEACHER, tmp_path / "a.onnx", config(calibration=Calibration(target_psnr_drop=0.1)),
               data_reader=no_truth)
    with pytest.raises(UsageError, match="give --gain"):
        harden(TEACHER, tmp_path / "b.onnx", config(placement="tap", calibration=Calibration()),
               data_reader=photos_reader())
    assert list(tmp_path.iterdir()) == []


def test_psnr_target_without_truth(tmp_path):
    model = onnx.load(str(TEACHER))
    no_truth = image_folder_reader(ASSETS / "samples" / "lr", model_inputs(model), "sr")
    result = harden(TEACHER, tmp_path / "p.onnx", config(calibration=Calibration(target_psnr=45.0)),
                    data_reader=no_truth)
    assert abs(result.report["validation"]["outputs"]["sr"]["psnr_vs_original"] - 45.0) <= 0.1
    assert result.report["calibration"]["target"]["psnr"] == 45.0


# --- a reader the runtime rejects is a usage error, and nothing is left behind ---------------------------------

class WrongShapes:
    def __init__(self):
        self.done = False

    def get_next(self):
        if self.done:
            return None
        self.done = True
        return {"lr": np.zeros((1, 5, 16, 16), np.float32)}


def test_a_reader_with_wrong_shapes_is_a_usage_error_and_writes_nothing(tmp_path):
    with pytest.raises(UsageError):
        harden(TEACHER, tmp_path / "w.onnx", config(params=AsvpParams(gain=1.3)), data_reader=WrongShapes())
    assert list(tmp_path.iterdir()) == []


def test_tap_placement_serves_the_original_bit_for_bit(tmp_path):
    result = harden(TEACHER, tmp_path / "tap.onnx",
                    config(layers=["body.*.conv1", "body.*.conv2"], placement="tap", params=AsvpParams(gain=2.0)),
                    data_reader=photos_reader())
    assert result.report["validation"]["outputs"]["sr"]["difference"]["max_abs"] == 0.0
    assert result.report["status"] == "PASSED"
    assert [l["check"] for l in result.report["validation"]["layers"]] == ["ok"] * 8
