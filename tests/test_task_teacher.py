"""Per-task teachers in attacks/teachers/ (scripts/train_task_teacher.py): structure, dynamic shapes, quality."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from attacks.degrade import TASKS, eval_set, input_baseline
from hardener.layers import LayerIndex
from hardener.metrics import psnr

ROOT = Path(__file__).resolve().parents[1]
# the task teachers (the bundled codecs beside them are tested in tests/test_compression.py)
TEACHERS = sorted(p for p in (ROOT / "attacks" / "teachers").glob("*.onnx") if not p.stem.startswith("codec_"))


def _script():
    spec = importlib.util.spec_from_file_location("train_task_teacher", ROOT / "scripts" / "train_task_teacher.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_task_teacher", mod)
    spec.loader.exec_module(mod)
    return mod


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.skipif(not TEACHERS, reason="no exported teacher in attacks/teachers/")
@pytest.mark.parametrize("path", TEACHERS, ids=[p.stem for p in TEACHERS])
def test_teacher_structure_shapes_and_quality(path: Path):
    task = path.stem
    assert task in TASKS, f"{path.name}: unknown task"
    assert path.stat().st_size < 1_000_000
    assert path.with_suffix(".md").is_file(), "recipe card missing"
    model = onnx.load(str(path))
    chosen = LayerIndex(model).select(["body.*.conv2"])
    assert len(chosen) == 4

    scale = TASKS[task].scale
    sess = _session(path)
    rng = np.random.default_rng(0)
    for h, w in ((24, 40), (33, 17)):
        x = rng.random((1, 3, h, w), dtype=np.float32)
        (y,) = sess.run(["y"], {"x": x})
        assert y.shape == (1, 3, h * scale, w * scale)
        assert np.isfinite(y).all()

    inp, out = [], []
    for _name, x, truth in eval_set(task, "test", hr_size=64):
        (y,) = sess.run(["y"], {"x": x})
        base = input_baseline(x, scale)
        inp.append(psnr(base[0], truth[0], crop_border=scale))
        out.append(psnr(y[0], truth[0], crop_border=scale))
    assert np.mean(out) > np.mean(inp), (np.mean(out), np.mean(inp))


@pytest.mark.parametrize("task", ["denoise", "sr2"])
def test_training_smoke(task, tmp_path):
    mod = _script()
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    try:
        photos = [("a", np.random.default_rng(1).random((40, 48, 3), dtype=np.float32))]
        model, _ = mod.train(task, steps=3, seed=0, batch=2, patch=16, refresh=2, threads=1, log_every=10,
                             photos=photos, ch=8, n_blocks=4)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
    out = tmp_path / f"{task}.onnx"
    out.write_bytes(mod.export_bytes(model))
    x = np.random.default_rng(0).random((1, 3, 12, 20), dtype=np.float32)
    (y,) = _session(out).run(["y"], {"x": x})
    scale = TASKS[task].scale
    assert y.shape == (1, 3, 12 * scale, 20 * scale)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(y - ref).max() < 1e-4
    assert len(LayerIndex(onnx.load(str(out))).select(["body.*.conv2"])) == 4
