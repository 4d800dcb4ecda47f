"""Provenance marks: keygen, mark, verify (hardener/provenance, hardener/provenance_cli.py).

Fast by construction: one marked teacher per module, 8 probes and 64 null keys unless a test needs more,
students distilled for a few hundred steps on one thread.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from hardener.provenance.key import generate_key, load_key, mark_weights, null_key, write_key
from hardener.provenance.mark import MARK_KEY, read_mark_manifest
from hardener.provenance.signal import mark_signal
from hardener.provenance_cli import COMMANDS, keygen, mark, verify

from conftest import TEACHER, real_photos

FAST = ["--num-probes", "8", "--null-keys", "64"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def invoke(cmd, *args):
    return CliRunner().invoke(cmd, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result, code: int):
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("provenance")


@pytest.fixture(scope="module")
def key_file(work) -> Path:
    path = work / "key.json"
    assert invoke(keygen, "-o", path, "--seed", 7).exit_code == 0
    return path


@pytest.fixture(scope="module")
def marked(work, key_file) -> Path:
    out = work / "marked.onnx"
    res = invoke(mark, TEACHER, "--key", key_file, "-o", out)
    assert res.exit_code == 0, res.output
    return out


def run(path, x):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


# ------------------------------------------------------------------------------------------------ keys
def test_commands_list():
    assert [c.name for c in COMMANDS] == ["keygen", "mark", "verify"]


def test_keygen_deterministic_private_and_refuses_overwrite(tmp_path):
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    assert invoke(keygen, "-o", a, "--seed", 3).exit_code == 0
    assert invoke(keygen, "-o", b, "--seed", 3).exit_code == 0
    assert invoke(keygen, "-o", c, "--seed", 4).exit_code == 0
    assert load_key(a).secret == load_key(b).secret != load_key(c).secret
    assert stat.S_IMODE(os.stat(a).st_mode) == 0o600
    before = a.read_bytes()
    one_line_error(invoke(keygen, "-o", a, "--seed", 4), 2)
    assert a.read_bytes() == before  # nothing written when refused
    assert invoke(keygen, "-o", a, "--seed", 4, "--force").exit_code == 0
    assert load_key(a).secret == load_key(c).secret and stat.S_IMODE(os.stat(a).st_mode) == 0o600
    r1, r2 = tmp_path / "r1.json", tmp_path / "r2.json"  # unseeded keys are fresh
    invoke(keygen, "-o", r1), invoke(keygen, "-o", r2)
    assert load_key(r1).secret != load_key(r2).secret and len(load_key(r1).secret) == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json", "c.json", "r1.json", "r2.json"]


@pytest.mark.parametrize("content", [
    "not json", "{}", '{"format": "hardener-provenance-key", "version": 1, "secret": "zz", "key_id": "x"}',
    '[1, 2]', '{"format": "hardener-provenance-key", "version": 9}',
])
def test_bad_key_files_are_usage_errors(tmp_path, content):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    out = tmp_path / "out.onnx"
    one_line_error(invoke(mark, TEACHER, "--key", bad, "-o", out), 2)
    assert not out.exists()
    one_line_error(invoke(verify, TEACHER, "--key", bad, "--original", TEACHER), 2)


def test_edited_key_is_detected(tmp_path):
    path = tmp_path / "k.json"
    write_key(generate_key(1), path)
    data = json.loads(path.read_text())
    data["secret"] = ("0" if data["secret"][0] != "0" else "1") + data["secret"][1:]
    path.write_text(json.dumps(data))
    one_line_error(invoke(verify, TEACHER, "--key", path, "--original", TEACHER), 2)
    one_line_error(invoke(verify, TEACHER, "--key", tmp_path / "missing.json", "--original", TEACHER), 2)


def test_mark_weights_are_keyed_and_null_keys_public():
    w1, w2 = mark_weights(generate_key(1).secret, 3)
    assert w1.shape == (16, 3, 3, 3) and w2.shape == (3, 16)
    assert np.allclose(w1.reshape(16, -1).sum(1), 0, atol=1e-9) and np.allclose(w2.sum(1), 0, atol=1e-12)
    assert not np.allclose(w1, mark_weights(generate_key(2).secret, 3)[0])
    assert null_key(0).secret == null_key(0).secret != null_key(1).secret


# ------------------------------------------------------------------------------------------------ mark
def test_mark_file_carries_no_key_and_keeps_the_interface(marked, key_file):
    key = load_key(key_file)
    data = marked.read_bytes()
    assert key.secret not in data and key.secret.hex().encode() not in data
    assert key.secret.hex().upper().encode() not in data
    src, out = onnx.load(str(TEACHER)), onnx.load(str(marked))
    assert out.ir_version == src.ir_version and list(out.opset_import) == list(src.opset_import)
    assert [o.name for o in out.graph.output] == [o.name for o in src.graph.output]
    assert [i.name for i in out.graph.input] == [i.name for i in src.graph.input]
    manifest = read_mark_manifest(out)
    assert manifest["key_id"] == key.key_id != key.secret.hex()
    assert "secret" not in manifest and key.secret.hex() not in json.dumps(manifest)
    assert hashlib.sha256(TEACHER.read_bytes()).hexdigest() == manifest["source_sha256"]  # input untouched
    cal = manifest["calibration"]["per_output"][0]
    assert abs(cal["psnr_drop_vs_truth"] - 0.05) < 0.005 and cal["kind"] == "psnr_drop"
    ops = {n.op_type for n in out.graph.node if n.name.startswith("hardener/mark")}
    assert ops <= {"Pad", "Conv", "Tanh", "Mul", "ReduceMean", "Sub", "Add"}
    # the weights in the file are the key's (by necessity) and another key's are not
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    w1, _ = mark_weights(key.secret, 3)
    assert np.allclose(inits["hardener/mark_0/w1"], w1.astype(np.float32))
    assert not np.allclose(inits["hardener/mark_0/w1"], mark_weights(generate_key(8).secret, 3)[0], atol=0.1)
    report = json.loads(Path(str(marked) + ".mark.json").read_text())
    assert key.secret.hex() not in json.dumps(report)


def test_marked_output_is_original_plus_keyed_mark(marked, key_file):
    x = real_photos(size=48, count=2)
    y, ym = run(TEACHER, x), run(marked, x)
    eps = read_mark_manifest(onnx.load(str(marked)))["outputs"][0]["eps"]
    w1, w2 = mark_weights(load_key(key_file).secret, 3)
    want = y + eps * mark_signal(y, w1, w2)
    assert np.max(np.abs(ym - want)) < 1e-5
    assert 1e-4 < np.sqrt(np.mean((ym - y) ** 2)) < 1e-2


def test_mark_refusals_write_nothing(tmp_path, marked, key_file):
    out = tmp_path / "m.onnx"
    one_line_error(invoke(mark, marked, "--key", key_file, "-o", out), 2)  # already marked
    one_line_error(invoke(mark, TEACHER, "--key", key_file, "-o", TEACHER), 2)  # the input itself
    one_line_error(invoke(mark, TEACHER, "--key", key_file, "-o", out, "--target-psnr-drop", "-1"), 2)
    one_line_error(invoke(mark, tmp_path / "nope.onnx", "--key", key_file, "-o", out), 2)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a model")
    one_line_error(invoke(mark, garbage, "--key", key_file, "-o", out), 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.onnx"]
    out.write_bytes(b"x")
    one_line_error(invoke(mark, TEACHER, "--key", key_file, "-o", out), 2)  # exists, no --force
    assert out.read_bytes() == b"x"


def test_mark_is_deterministic_and_calibrates_without_truth(tmp_path, marked, key_file):
    again = tmp_path / "again.onnx"
    assert invoke(mark, TEACHER, "--key", key_file, "-o", again).exit_code == 0
    assert again.read_bytes() == marked.read_bytes()
    lr = Path(str(TEACHER)).parent / "samples" / "lr"
    loose = tmp_path / "loose.onnx"
    res = invoke(mark, TEACHER, "--key", key_file, "-o", loose, "--inputs", lr, "--target-psnr", "45")
    assert res.exit_code == 0, res.output
    cal = read_mark_manifest(onnx.load(str(loose)))["calibration"]["per_output"][0]
    assert cal["kind"] == "psnr_vs_original" and abs(cal["achieved"] - 45) < 0.01
    one_line_error(invoke(mark, TEACHER, "--key", key_file, "-o", tmp_path / "z.onnx", "--inputs", lr,
                          "--target-psnr-drop", "0.1"), 2)  # a drop needs truth


def test_mark_a_hardened_model(tmp_path, key_file):
    from hardener import AsvpParams, HardenConfig, harden
    from hardener.rewrite import MANIFEST_KEY

    hardened, both = tmp_path / "h.onnx", tmp_path / "hm.onnx"
    harden(TEACHER, hardened, HardenConfig(layers=["body.3.conv2"], params=AsvpParams(rank=2, gain=1.3),
                                              validate=False),
           report_path=tmp_path / "h.json", progress=False)
    res = invoke(mark, hardened, "--key", key_file, "-o", both)
    assert res.exit_code == 0, res.output
    keys = {p.key for p in onnx.load(str(both)).metadata_props}
    assert {MANIFEST_KEY, MARK_KEY} <= keys
    res = invoke(verify, both, "--key", key_file, "--original", hardened, *FAST)
    assert res.exit_code == 0 and "DERIVED" in res.output, res.output


# ---------------------------------------------------------------------------------------------- verify
def test_verify_marked_teacher_and_clean_teacher(marked, key_file, tmp_path):
    rep = tmp_path / "v.json"
    res = invoke(verify, marked, "--key", key_file, "--original", TEACHER, *FAST, "--report", rep)
    assert res.exit_code == 0, res.output
    st = json.loads(rep.read_text())["statistic"]
    assert st["z"] > 8 and st["null_keys_at_or_above"] == 0 and st["p_gaussian"] < 1e-12
    assert abs(st["amplitude_over_eps"] - 1) < 0.01
    assert "DERIVED" in res.output and "p (Gaussian tail)" in res.output
    res = invoke(verify, TEACHER, "--key", key_file, "--original", TEACHER, *FAST)
    assert res.exit_code == 1 and "NOT SHOWN" in res.output
    other = tmp_path / "other.json"  # the right model, the wrong key
    write_key(generate_key(99), other)
    res = invoke(verify, marked, "--key", other, "--original", TEACHER, *FAST, "--json")
    assert res.exit_code == 1 and abs(json.loads(res.output)["statistic"]["z"]) < 3.5


def test_verify_folder_of_outputs_equals_model(marked, key_file, tmp_path):
    probes, answers = tmp_path / "probes", tmp_path / "answers"
    assert invoke(verify, "--write-probes", probes, "--num-probes", "8").exit_code == 0
    assert len(list(probes.glob("*.png"))) == 8
    one_line_error(invoke(verify, "--write-probes", probes, "--num-probes", "8"), 2)  # no overwrite
    answers.mkdir()
    from hardener.inputs import read_image

    for p in sorted(probes.glob("*.png")):
        np.save(answers / f"{p.stem}.npy", run(marked, read_image(p, 3)[None])[0])
    on_model = invoke(verify, marked, "--key", key_file, "--original", TEACHER, *FAST, "--json")
    on_folder = invoke(verify, answers, "--key", key_file, "--original", TEACHER, "--probes", probes,
                       "--null-keys", "64", "--json")
    a, b = json.loads(on_model.output)["statistic"], json.loads(on_folder.output)["statistic"]
    assert on_model.exit_code == on_folder.exit_code == 0
    assert a["z"] == b["z"] and a["rho"] == b["rho"] and a["p_gaussian"] == b["p_gaussian"]
    # 8-bit PNG answers: scaled to [0, 1], said so, still derived
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    from skimage import io as skio

    for f in answers.glob("*.npy"):
        img = np.clip(np.round(np.load(f).transpose(1, 2, 0) * 255), 0, 255).astype(np.uint8)
        skio.imsave(pngs / f"{f.stem}.png", img, check_contrast=False)
    res = invoke(verify, pngs, "--key", key_file, "--original", TEACHER, "--probes", probes, "--null-keys", "64")
    assert res.exit_code == 0 and "scaled to [0, 1]" in res.output, res.output
    # 0-255 float answers: detected, divided by 255, said so
    scaled = tmp_path / "scaled"
    scaled.mkdir()
    for f in answers.glob("*.npy"):
        np.save(scaled / f.name, np.load(f) * 255.0)
    res = invoke(verify, scaled, "--key", key_file, "--original", TEACHER, "--probes", probes, "--json",
                 "--null-keys", "64")
    assert res.exit_code == 0 and json.loads(res.output)["statistic"]["z"] == pytest.approx(a["z"], rel=1e-6)
    assert any("0-255" in n for n in json.loads(res.output)["policy_notes"])


def test_verify_mismatches_are_usage_errors(marked, key_file, tmp_path):
    probes, answers = tmp_path / "probes", tmp_path / "answers"
    invoke(verify, "--write-probes", probes, "--num-probes", "4")
    answers.mkdir()
    names = sorted(p.stem for p in probes.glob("*.png"))
    for n in names[:3]:  # one missing
        np.save(answers / f"{n}.npy", np.zeros((3, 128, 128), np.float32))
    args = ["--key", key_file, "--original", TEACHER, "--probes", probes, "--null-keys", "32"]
    one_line_error(invoke(verify, answers, *args), 2)
    np.save(answers / f"{names[3]}.npy", np.zeros((3, 100, 100), np.float32))  # wrong size
    one_line_error(invoke(verify, answers, *args), 2)
    np.save(answers / f"{names[3]}.npy", np.zeros((1, 128, 128), np.float32))  # grey for RGB
    one_line_error(invoke(verify, answers, *args), 2)
    np.save(answers / f"{names[3]}.npy", np.full((3, 100, 100), 0.5, np.float32))
    for n in names[:3]:
        np.save(answers / f"{n}.npy", np.full((3, 128, 128), 0.5, np.float32))
    res = invoke(verify, answers, *args, "--resize")  # resized, stated; a constant image carries no mark
    assert res.exit_code == 1 and "resized" in res.output, res.output
    one_line_error(invoke(verify, TEACHER, "--key", key_file, "--original", marked, *FAST), 2)  # marked original
    one_line_error(invoke(verify, TEACHER, "--key", key_file), 2)  # no original
    one_line_error(invoke(verify, tmp_path / "none.onnx", "--key", key_file, "--original", TEACHER), 2)
    one_line_error(invoke(verify, TEACHER, "--key", key_file, "--original", TEACHER, "--probes", tmp_path / "no"), 2)
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(invoke(verify, TEACHER, "--key", key_file, "--original", TEACHER, "--probes", empty), 2)


# -------------------------------------------------------------------------------------------- students
def _teacher_init_student():
    from attacks.students import build_student

    student = build_student("edsr", 2, seed=0)  # the teacher's own architecture (hardener/assets/TEACHER.md)
    init = {t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy())
            for t in onnx.load(str(TEACHER)).graph.initializer if not t.name.startswith("val")}
    student.load_state_dict(init)
    return student


def _answers(student, folder: Path) -> Path:
    from hardener.provenance.probes import default_probes

    folder.mkdir()
    with torch.no_grad():
        for name, x in default_probes(16):
            np.save(folder / f"{name}.npy", student(torch.from_numpy(x[None]))[0].numpy())
    return folder


def test_students_inherit_the_mark_and_innocents_do_not(work, marked, key_file, tmp_path):
    """Quick runs (seeded, one thread).  A thief fine-tuning a model close to the teacher (stand-in: the
    clean teacher's own weights) on 256 answers of the MARKED teacher for 60 steps is flagged; the same
    procedure on a teacher marked with ANOTHER key, and a tiny student distilled from scratch from the
    clean teacher, are not.  (Students trained from scratch for a few hundred steps inherit too little of
    the mark to be flagged: see README, Provenance.)"""
    from attacks.data import patches
    from attacks.degrade import sr2
    from attacks.distill import train_student
    from attacks.oracle import Oracle
    from attacks.students import build_student
    from hardener.provenance.mark import mark_model

    other_key = tmp_path / "other.json"
    write_key(generate_key(2), other_key)
    other = tmp_path / "other.onnx"
    mark_model(TEACHER, load_key(other_key), other)
    hr = patches("train", 48, 256, seed=100)
    lr = sr2(hr, np.random.default_rng(0))
    verdicts = {}
    for label, teacher in (("marked", marked), ("other key", other)):
        student = _teacher_init_student()
        train_student(student, lr, Oracle(teacher, threads=1)(lr), steps=60, seed=0, batch=8, lr=5e-4, loss="l2")
        res = invoke(verify, _answers(student, tmp_path / label), "--key", key_file, "--original", TEACHER,
                     "--null-keys", "48", "--json")
        verdicts[label] = (res.exit_code, json.loads(res.output)["statistic"])
    scratch = build_student("tiny", 2, seed=0)
    train_student(scratch, lr, Oracle(TEACHER, threads=1)(lr), steps=100, seed=0, batch=8)
    res = invoke(verify, _answers(scratch, tmp_path / "scratch"), "--key", key_file, "--original", TEACHER,
                 "--null-keys", "48", "--json")
    verdicts["scratch"] = (res.exit_code, json.loads(res.output)["statistic"])
    code, st = verdicts["marked"]
    assert code == 0 and st["z"] > 4.75 and st["null_keys_at_or_above"] == 0, st
    for label in ("other key", "scratch"):
        code, st = verdicts[label]
        assert code == 1 and abs(st["z"]) < 3, (label, st)


def test_verify_exit_codes_through_the_harden_entry_point(marked, key_file, tmp_path):
    """`harden verify` as a user runs it: 0 derived, 1 not shown, 2 usage error, one line, no traceback."""
    from conftest import run_cli

    derived = run_cli("verify", marked, "--key", key_file, "--original", TEACHER, *FAST)
    assert derived.returncode == 0 and "DERIVED" in derived.stdout, derived.stderr
    clean = run_cli("verify", TEACHER, "--key", key_file, "--original", TEACHER, *FAST)
    assert clean.returncode == 1 and "NOT SHOWN" in clean.stdout
    missing = run_cli("verify", marked, "--key", tmp_path / "nope.json", "--original", TEACHER)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
