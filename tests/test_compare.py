"""`harden compare A B`: differences, PSNR/SSIM, budgets and exit codes between two models."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from hardener import AsvpParams, HardenConfig, harden
from hardener.metrics import psnr_of_mse, squared_error

from conftest import TEACHER, invoke, real_photos, run_model




@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    inline, tap = folder / "inline.onnx", folder / "tap.onnx"
    harden(TEACHER, inline, HardenConfig(layers=["body.*.conv2"], params=AsvpParams(gain=1.3), validate=False))
    harden(TEACHER, tap, HardenConfig(layers=["body.1.conv2"], params=AsvpParams(gain=2.0), placement="tap",
                                      validate=False))
    feeds = folder / "feeds.npz"
    np.savez(feeds, lr=real_photos(size=32, count=3))  # 3 samples, each fed as (1, 3, 32, 32)
    return {"inline": inline, "tap": tap, "feeds": feeds, "folder": folder}


def test_identical_models_pass_with_infinite_psnr(capsys, monkeypatch, models):
    code, out, err = invoke(capsys, monkeypatch, "compare", TEACHER, TEACHER, "--inputs", models["feeds"])
    assert code == 0, err
    assert "PSNR inf dB (identical)" in out and "SSIM 1.00000" in out
    assert out.splitlines()[-1] == "PASSED | All 1 output(s) matched | Outputs: ['sr']"
    code, out, _ = invoke(capsys, monkeypatch, "compare", TEACHER, TEACHER, "--inputs", models["feeds"], "--json")
    doc = json.loads(out)  # standard JSON: inf written as a string
    sr = doc["outputs"]["sr"]
    assert code == 0 and doc["status"] == "PASSED" and doc["samples"] == 3
    assert sr["psnr"] == "inf" and sr["difference"]["max_abs"] == 0 and sr["shape"] == [1, 3, 64, 64]


def test_budget_failure_exits_1_with_true_numbers(capsys, monkeypatch, models, tmp_path):
    report = tmp_path / "cmp.json"
    code, out, err = invoke(capsys, monkeypatch, "compare", TEACHER, models["inline"], "--inputs", models["feeds"],
                            "--report", report)
    assert code == 1, err
    assert "[E]     FAILED | Output: 'sr'" in out and out.splitlines()[-1].startswith("FAILED | 1 of 1 output(s)")
    doc = json.loads(report.read_text())
    sr = doc["outputs"]["sr"]
    # recompute independently: run both models on the same feeds
    photos = np.load(models["feeds"])["lr"]
    a = [run_model(TEACHER, {"lr": x[None]})[0] for x in photos]
    b = [run_model(models["inline"], {"lr": x[None]})[0] for x in photos]
    diffs = [np.abs(y.astype(np.float64) - x) for x, y in zip(a, b)]
    assert sr["difference"]["max_abs"] == pytest.approx(max(d.max() for d in diffs), rel=1e-6)
    where = sr["max_abs_at"]
    assert diffs[where["input"]][tuple(where["index"])] == pytest.approx(sr["difference"]["max_abs"], rel=1e-6)
    expected = psnr_of_mse(np.mean([squared_error(y[0], x[0]) for x, y in zip(a, b)]))
    assert sr["psnr"] == pytest.approx(expected, rel=1e-9) and 35 < sr["psnr"] < 80
    assert sr["difference"]["tolerance_violations"] > 0 and doc["budgets"] == {"atol": 1e-5, "rtol": 1e-5,
                                                                               "min_psnr": None}
    # a PSNR budget alone: pass below the measured PSNR, fail above it
    code, _, _ = invoke(capsys, monkeypatch, "compare", TEACHER, models["inline"], "--inputs", models["feeds"],
                        "--min-psnr", f"{sr['psnr'] - 1:.2f}")
    assert code == 0
    code, out, _ = invoke(capsys, monkeypatch, "compare", TEACHER, models["inline"], "--inputs", models["feeds"],
                          "--min-psnr", f"{sr['psnr'] + 1:.2f}", "-q")
    assert code == 1 and out.strip().startswith("FAILED |") and len(out.strip().splitlines()) == 1
    # a loose elementwise budget passes
    code, _, _ = invoke(capsys, monkeypatch, "compare", TEACHER, models["inline"], "--inputs", models["feeds"],
                        "--atol", "1")
    assert code == 0


def test_mismatched_models_exit_2(capsys, monkeypatch, models, tmp_path):
    renamed = onnx.load(str(TEACHER))
    old = renamed.graph.input[0].name
    renamed.graph.input[0].name = "image"
    for node in renamed.graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = "image"
    onnx.save(renamed, str(tmp_path / "renamed.onnx"))
    code, out, err = invoke(capsys, monkeypatch, "compare", TEACHER, tmp_path / "renamed.onnx")
    assert code == 2 and "different inputs" in err and not out

    static = onnx.load(str(TEACHER))
    dims = static.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_value, dims[2].dim_value, dims[3].dim_value = 1, 16, 16
    onnx.save(static, str(tmp_path / "a16.onnx"))
    dims[2].dim_value = dims[3].dim_value = 24
    onnx.save(static, str(tmp_path / "b24.onnx"))
    code, _, err = invoke(capsys, monkeypatch, "compare", tmp_path / "a16.onnx", tmp_path / "b24.onnx")
    assert code == 2 and "input 'lr' differs" in err

    code, _, err = invoke(capsys, monkeypatch, "compare", TEACHER, models["tap"], "--inputs", models["feeds"])
    assert code == 2 and "only in B: ['asvp/body.1.conv2']" in err and "--outputs" in err
    code, _, err = invoke(capsys, monkeypatch, "compare", TEACHER, models["tap"], "--outputs", "nope")
    assert code == 2 and "no output 'nope'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a16.onnx", "b24.onnx", "renamed.onnx"]  # nothing written


def test_tap_placement_leaves_the_served_output_bit_identical(capsys, monkeypatch, models):
    code, out, err = invoke(capsys, monkeypatch, "compare", TEACHER, models["tap"], "--inputs", models["feeds"],
                            "--outputs", "sr", "--atol", "0", "--rtol", "0")
    assert code == 0, out + err
    assert "PSNR inf dB (identical)" in out


def test_compare_usage_and_model_errors(capsys, monkeypatch, models, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not a model")
    cases = [(["compare", TEACHER, tmp_path / "missing.onnx"], 2, "not found"),
             (["compare", TEACHER, garbage], 4, ""),
             (["compare", TEACHER, TEACHER, "--synthetic", "--inputs", models["feeds"]], 2, "--synthetic"),
             (["compare", TEACHER, TEACHER, "--inputs", tmp_path / "none.npz"], 2, "not found"),
             (["compare", TEACHER, TEACHER, "--atol", "-1"], 2, "atol"),
             (["compare", TEACHER, TEACHER, "--providers", "tpu"], 2, "unknown provider")]
    for args, expected, message in cases:
        code, out, err = invoke(capsys, monkeypatch, *args)
        assert code == expected, (args, out, err)
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
