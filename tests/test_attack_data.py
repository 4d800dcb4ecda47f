"""attacks.data / attacks.degrade: the photo split, patches, and the six task degradations."""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attacks import data, degrade
from attacks.degrade import TASKS, eval_set, make_pairs

ASSETS = Path(str(resources.files("hardener") / "assets"))
SIGMA = 25.0 / 255.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10.0 * np.log10(1.0 / mse)


def upsample(x: np.ndarray, scale: int) -> np.ndarray:
    if scale == 1:
        return x
    t = F.interpolate(torch.from_numpy(x), scale_factor=scale, mode="bicubic", align_corners=False)
    return t.clamp(0, 1).numpy()


def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.float32)[None].transpose(0, 3, 1, 2) / 255.0


@pytest.fixture(scope="module")
def train_small():
    """A few training photos, capped at 256 px: enough for patches and quick to degrade."""
    return data.load_photos("train", max_side=256)[:4]


# ----------------------------------------------------------------------------------------- split
def test_split_is_disjoint_and_holds_the_teacher_test_photos():
    teacher_md = (ASSETS / "TEACHER.md").read_text()
    m = re.search(r"^\* test \(held out\): (.+)$", teacher_md, flags=re.M)
    assert m, "TEACHER.md no longer states its test photos"
    teacher_test = [n.strip() for n in m.group(1).split(",")]
    assert teacher_test == list(data.TEACHER_TEST)

    train = [n for n, _ in data.load_photos("train")]
    test = [n for n, _ in data.load_photos("test")]
    assert set(teacher_test) <= set(test)
    assert not set(train) & set(test)
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    for excluded in data.EXCLUDED:  # cat == chelsea, motorcycle_right == other view of motorcycle_left
        assert excluded not in train + test
    # the declared split itself is disjoint, whatever is installed
    declared = {s: {n for names in data.SPLIT[s].values() for n in names} for s in data.SPLIT}
    assert not declared["train"] & declared["test"]
    # and no photo's pixels occur in both sets (catches an alias such as cat/chelsea)
    thumbs = {s: [(n, a[:32, :32]) for n, a in data.load_photos(s)] for s in ("train", "test")}
    for n_tr, a in thumbs["train"]:
        for n_te, b in thumbs["test"]:
            assert a.shape != b.shape or not np.allclose(a, b, atol=2 / 255), (n_tr, n_te)


def test_sources_present_are_used():
    present = data.sources()
    assert present["skimage"]
    test = data.split_names("test")
    train = data.split_names("train")
    assert [n for n, _ in data.load_photos("test")] == test
    assert [n for n, _ in data.load_photos("train")] == train
    assert ("grace_hopper" in test) == present["matplotlib"]
    assert ("flower" in test) == present["sklearn"]
    assert ("china" in train) == present["sklearn"]
    assert "motorcycle_left" in train and "retina" in train
    with pytest.raises(ValueError):
        data.load_photos("validation")


def test_missing_optional_sources_are_skipped(monkeypatch):
    monkeypatch.setattr(data, "sources", lambda: {"skimage": True, "matplotlib": False, "sklearn": False})
    assert data.split_names("test") == list(data.TEACHER_TEST)
    loaded = data._load_split.__wrapped__("test", 64)  # bypass the cache
    assert [n for n, _ in loaded] == list(data.TEACHER_TEST)
    assert "china" not in data.split_names("train")


@pytest.mark.parametrize("split", ["train", "test"])
def test_photos_are_float_rgb_unit_range_multiple_of_4(split):
    photos = data.load_photos(split)
    assert len(photos) >= 4
    for name, img in photos:
        assert img.dtype == np.float32, name
        assert img.ndim == 3 and img.shape[2] == 3, (name, img.shape)
        assert img.shape[0] % 4 == 0 and img.shape[1] % 4 == 0, (name, img.shape)
        assert max(img.shape[:2]) <= 512 and min(img.shape[:2]) >= 256, (name, img.shape)
        assert 0.0 <= img.min() and img.max() <= 1.0, name
        assert img.std() > 0.02, name  # a real photo, not a blank
        assert not img.flags.writeable  # shared through the cache
    # colour photos are really colour (test photos are never grey replicas)
    if split == "test":
        for name, img in photos:
            assert np.abs(img[..., 0] - img[..., 1]).mean() > 0.01, name
    # cached: the same arrays again
    again = data.load_photos(split)
    assert all(a is b for (_, a), (_, b) in zip(photos, again))


def test_max_side_downscales_with_antialiasing():
    full = dict(data.load_photos("test"))
    small = dict(data.load_photos("test", max_side=128))
    assert max(small["astronaut"].shape[:2]) == 128
    # antialiased 4x reduction ~= 4x4 box average of the 512 px photo
    box = full["astronaut"].reshape(128, 4, 128, 4, 3).mean(axis=(1, 3))
    assert psnr(small["astronaut"], box) > 30
    # aliasing (plain subsampling) would be much further from the box average
    assert psnr(full["astronaut"][::4, ::4], box) < psnr(small["astronaut"], box) - 3


# --------------------------------------------------------------------------------------- patches
def test_patches_deterministic_and_seed_dependent(train_small):
    a = data.patches(train_small, 32, 24, seed=3)
    b = data.patches(train_small, 32, 24, seed=3)
    c = data.patches(train_small, 32, 24, seed=4)
    assert a.shape == (24, 3, 32, 32) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert 0.0 <= a.min() and a.max() <= 1.0
    assert a.reshape(24, -1).std(axis=1).min() >= 0.01


def test_patches_are_dihedral_crops_and_flat_ones_are_redrawn():
    rng = np.random.default_rng(0)
    img = rng.random((20, 20, 3)).astype(np.float32)
    out = data.patches([img], 20, 16, seed=1)
    views = [v for t in (img, img.transpose(1, 0, 2)) for v in (t, t[::-1], t[:, ::-1], t[::-1, ::-1])]
    seen = set()
    for p in out:
        hwc = p.transpose(1, 2, 0)
        idx = [i for i, v in enumerate(views) if np.array_equal(hwc, v)]
        assert idx, "patch is not a flip/transpose of the photo"
        seen.add(idx[0])
    assert len(seen) > 2  # flips really happen

    half = np.full((64, 64, 3), 0.5, np.float32)
    half[:, 40:] = rng.random((64, 24, 3))
    ps = data.patches([("half", half)], 16, 64, seed=0)
    assert ps.reshape(64, -1).std(axis=1).min() >= 0.01  # ~1/3 of positions are flat: redrawn


# ----------------------------------------------------------------------------------------- tasks
def test_task_registry():
    assert set(TASKS) == {"sr2", "sr4", "denoise", "lowlight", "underwater", "dehaze", "derain"}
    assert {k: t.scale for k, t in TASKS.items() if t.scale != 1} == {"sr2": 2, "sr4": 4}
    for name, t in TASKS.items():
        assert t.name == name and callable(t.degrade) and len(t.description) > 40
    with pytest.raises(ValueError):
        make_pairs("deblur", "train", 64, 1, 0)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_make_pairs_shapes_range_determinism(task, train_small):
    scale = TASKS[task].scale
    np.random.seed(123)
    np_state = np.random.get_state()[1].copy()
    torch_state = torch.get_rng_state().clone()

    x, y = make_pairs(task, train_small, 64, 6, seed=5)
    assert y.shape == (6, 3, 64, 64) and x.shape == (6, 3, 64 // scale, 64 // scale)
    assert x.dtype == np.float32 and y.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and np.isfinite(x).all()
    assert np.array_equal(y, data.patches(train_small, 64, 6, seed=5))
    x2, y2 = make_pairs(task, train_small, 64, 6, seed=5)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    x3, y3 = make_pairs(task, train_small, 64, 6, seed=6)
    assert not np.array_equal(x, x3) and not np.array_equal(y, y3)
    if scale == 1:  # the random degradation itself changes with the generator
        other = TASKS[task].degrade(y, np.random.default_rng(999))
        assert not np.array_equal(x, other)
    # no global RNG state used
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert torch.equal(torch.get_rng_state(), torch_state)
    if scale > 1:
        with pytest.raises(ValueError):
            make_pairs(task, train_small, 65, 1, 0)  # HR not a multiple of the scale


@pytest.mark.parametrize("task", sorted(TASKS))
def test_eval_set_really_degrades(task):
    scale = TASKS[task].scale
    ev = eval_set(task, hr_size=128)
    assert [n for n, _, _ in ev] == data.split_names("test")
    again = eval_set(task, hr_size=128)
    for (name, x, y), (_, x2, y2) in zip(ev, again):
        assert y.shape == (1, 3, 128, 128), name
        assert x.shape == (1, 3, 128 // scale, 128 // scale), name
        assert x.dtype == np.float32 and y.dtype == np.float32
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert np.array_equal(x, x2) and np.array_equal(y, y2)
        p = psnr(upsample(x, scale), y)
        assert 5.0 < p < 40.0, (task, name, p)
    full = dict(data.load_photos("test"))
    name, _, y = ev[0]
    img = full[name]
    y0, x0 = (img.shape[0] - 128) // 2, (img.shape[1] - 128) // 2
    assert np.array_equal(y[0].transpose(1, 2, 0), img[y0 : y0 + 128, x0 : x0 + 128])  # centre crop
    if scale == 1:
        other = eval_set(task, hr_size=128, seed=1)
        assert any(not np.array_equal(a[1], b[1]) for a, b in zip(ev, other))


def test_sr2_matches_bundled_teacher_samples():
    names = sorted(p.stem for p in (ASSETS / "samples" / "hr").glob("*.png"))
    assert "astronaut" in names
    for name in names:
        hr = read_png(ASSETS / "samples" / "hr" / f"{name}.png")
        lr = read_png(ASSETS / "samples" / "lr" / f"{name}.png")
        out = TASKS["sr2"].degrade(hr, np.random.default_rng(0))
        assert out.shape == lr.shape
        assert np.abs(out - lr).max() <= 1 / 255 + 1e-6, name
        assert np.abs(out - lr).mean() < 0.05 / 255, name  # essentially exact, not just close


def test_sr_outputs_are_8bit():
    x, _ = make_pairs("sr4", "test", 64, 3, seed=0)
    assert np.array_equal(x * 255, np.round(x * 255))


def test_denoise_noise_level():
    _, x, y = zip(*eval_set("denoise", hr_size=256))
    x, y = np.concatenate(x), np.concatenate(y)
    mid = (y > 0.3) & (y < 0.7)  # away from the clamp
    assert mid.sum() > 10000
    r = (x - y)[mid]
    assert abs(r.std() - SIGMA) < 0.15 * SIGMA, r.std() * 255
    assert abs(r.mean()) < 0.05 * SIGMA


def test_physical_character_of_degradations():
    def pairs(task):
        _, x, y = zip(*eval_set(task, hr_size=128))
        return np.concatenate(x), np.concatenate(y)

    x, y = pairs("lowlight")  # darker and noisy
    assert (x.mean(axis=(1, 2, 3)) < 0.6 * y.mean(axis=(1, 2, 3))).all()

    x, y = pairs("underwater")  # red lost with depth, blue-green veil
    ratio = x.mean(axis=(0, 2, 3)) / y.mean(axis=(0, 2, 3))
    assert ratio[0] < ratio[1] and ratio[0] < ratio[2], ratio
    top_red = x[:, 0, :16].mean() / y[:, 0, :16].mean()
    bottom_red = x[:, 0, -16:].mean() / y[:, 0, -16:].mean()
    assert top_red < bottom_red  # deeper (top) loses more red

    x, y = pairs("dehaze")  # lower contrast, brighter, haze grey (channels shifted alike)
    assert (x.std(axis=(1, 2, 3)) < y.std(axis=(1, 2, 3))).all()
    assert (x.mean(axis=(1, 2, 3)) > y.mean(axis=(1, 2, 3))).all()

    x, y = pairs("derain")  # screen blend only brightens; sparse streaks
    assert (x >= y - 1e-6).all()
    changed = (x - y).max(axis=1) > 0.05
    assert 0.005 < changed.mean() < 0.5


def test_line_kernel_orientation():
    k = degrade.line_kernel(21, 0.0)
    c = k.shape[0] // 2
    assert k[:, c].sum() > 0.9 * k.sum()  # vertical line
    assert k.max() <= 1.0
    k = degrade.line_kernel(21, 20.0)
    ys, xs = np.nonzero(k > 0.2)
    slope = np.polyfit(ys, xs, 1)[0]
    assert abs(slope - np.tan(np.radians(20.0))) < 0.05


def test_protocol_splits_partition_the_held_out_photos():
    """The suite evaluates on "eval" in both protocols; the "disjoint" thief queries photos that no teacher
    was trained on and that are not evaluated on: eval + disjoint = test, and neither meets train."""
    declared = {s: {n for names in data.SPLIT[s].values() for n in names} for s in data.SPLIT}
    assert declared["eval"] | declared["disjoint"] == declared["test"]
    assert not declared["eval"] & declared["disjoint"]
    assert not (declared["eval"] | declared["disjoint"]) & declared["train"]
    assert data.split_names("eval") == list(data.TEACHER_TEST)
