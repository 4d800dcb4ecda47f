"""The `harden` command as a user meets it: --demo, --list-layers, --help."""
from __future__ import annotations

import json

import onnx

from hardener.rewrite import read_manifest

from conftest import TEACHER, run_cli


def test_demo_hardens_the_bundled_teacher_on_real_photos(tmp_path):
    proc = run_cli("--demo", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("PASSED | 4 layer(s) hardened")
    report = json.loads((tmp_path / "sr_x2.hardened.onnx.report.json").read_text())
    sr = report["validation"]["outputs"]["sr"]
    assert report["validation"]["samples"] == 4  # the four bundled held-out photos
    assert sr["psnr_original_vs_truth"] > 30  # a real SR teacher on real photos, not noise
    assert 0 < sr["psnr_drop_vs_truth"] <= 0.5  # the hardening costs something, within budget
    gapped = [layer["reference_rel_error_gap_le_0.8"] for layer in report["validation"]["layers"]]
    assert any(e is not None for e in gapped)  # agreement with the float64 SVD where it is well posed
    assert all(e <= 1e-4 for e in gapped if e is not None), gapped
    manifest = read_manifest(onnx.load(str(tmp_path / "sr_x2.hardened.onnx")))
    assert [l["module"] for l in manifest["layers"]] == [f"body.{i}.conv2" for i in range(4)]


def test_list_layers_on_both_exporters(dynamo_model, torchscript_model):
    for path in (dynamo_model, torchscript_model, TEACHER):
        proc = run_cli(path, "--list-layers")
        assert proc.returncode == 0, proc.stderr
        rows = [line.split() for line in proc.stdout.splitlines()]
        assert rows[0][:4] == ["module", "node", "op", "tensor"]
        modules = {row[0] for row in rows[1:-1]}
        assert {"head", "body.1.conv2", "body.1", "tail"} <= modules
        conv = next(row for row in rows if row[0] == "body.1.conv2")
        assert conv[2] == "Conv" and len(conv[4].split("x")) == 4 and conv[5] == "float32"


def test_help_teaches_every_option_with_examples():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for option in ("--layers", "--list-layers", "--mode", "--placement", "--rank", "--gain", "--iterations",
                   "--adaptive-energy", "--seed", "--inputs", "--truth", "--providers", "--min-psnr",
                   "--max-psnr-drop", "--atol", "--rtol", "--report", "--force", "--demo", "--precision", "--squarings"):
        assert option in proc.stdout, option
    assert "Examples:" in proc.stdout and "Exit codes:" in proc.stdout and "re:" in proc.stdout
