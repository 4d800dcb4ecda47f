"""Real photographs for the thief: a fixed, documented train/test split BY PHOTOGRAPH, and random patches.

Every photo ships inside an installed Python package; nothing is ever downloaded.

Sources (each used only when its package is installed; missing ones are skipped silently and
:func:`sources` reports which were present):

* ``skimage``    -- ``skimage.data`` colour photos that load offline (files bundled in the wheel):
  astronaut, coffee, chelsea, rocket, motorcycle_left (= ``stereo_motorcycle()[0]``),
  hubble_deep_field, immunohistochemistry, retina; and grey-scale photos camera, grass, gravel,
  brick, coins, clock, moon, replicated to RGB and used for TRAINING ONLY (exactly the
  grey set of ``hardener/assets/TEACHER.md``).
* ``matplotlib`` -- ``matplotlib.cbook.get_sample_data("grace_hopper.jpg")``.
* ``sklearn``    -- ``sklearn.datasets.load_sample_images()``: china.jpg, flower.jpg.

Split (see :data:`SPLIT`): test = astronaut, coffee, chelsea, rocket (the held-out photos of the
bundled SR teacher, TEACHER.md) + grace_hopper + flower; train = everything else.  Never used:
skimage ``cat`` (the same photo as chelsea), ``motorcycle_right`` (the other stereo view of
motorcycle_left), synthetic images (colorwheel, logo, ...) and every image needing a download.

Preprocessing: uint8 -> float32 in [0, 1]; if the longer side exceeds ``max_side`` the photo is
downscaled with ``torch.nn.functional.interpolate(mode="bicubic", antialias=True,
align_corners=False)`` (the same antialiased bicubic filter as the SR degradation; much faster than
``skimage.transform.resize``) to ``round(side * max_side / longer_side)`` and clamped to [0, 1]; then
height and width are cropped (top-left kept, :func:`crop_to_multiple`) to multiples of 4 so that x2 and
x4 super-resolution pairs are aligned.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Sequence, Union

import numpy as np

# Colour photographs from skimage.data (bundled in the wheel; no pooch download).
SKIMAGE_TRAIN_COLOR = ("motorcycle_left", "hubble_deep_field", "immunohistochemistry", "retina")
# Grey-scale skimage photographs, replicated to RGB; training only (same set as TEACHER.md).
SKIMAGE_TRAIN_GREY = ("camera", "grass", "gravel", "brick", "coins", "clock", "moon")
# Held-out photos of the bundled SR teacher (hardener/assets/TEACHER.md): always test.
TEACHER_TEST = ("astronaut", "coffee", "chelsea", "rocket")

SPLIT: dict[str, dict[str, tuple[str, ...]]] = {
    # name of the source package -> photos it contributes to each split (deterministic order:
    # sources in this order, photos in the listed order).
    "test": {
        "skimage": TEACHER_TEST,
        "matplotlib": ("grace_hopper",),
        "sklearn": ("flower",),
    },
    # the attack suite's evaluation photos (both protocols) and the "disjoint" protocol's query photos: the
    # test photos split in two, so that the thief can query photos no teacher was trained on
    "eval": {"skimage": TEACHER_TEST},
    "disjoint": {"matplotlib": ("grace_hopper",), "sklearn": ("flower",)},
    "train": {
        "skimage": SKIMAGE_TRAIN_COLOR + SKIMAGE_TRAIN_GREY,
        "sklearn": ("china",),
    },
}
"""Fixed split by photograph.  ``test``: astronaut, coffee, chelsea, rocket (TEACHER.md's held-out
set), grace_hopper (matplotlib), flower (scikit-learn).  ``train``: motorcycle_left,
hubble_deep_field, immunohistochemistry, retina, the grey photos camera, grass, gravel, brick, coins,
clock, moon (replicated to RGB), china (scikit-learn).  Excluded: ``cat`` (= chelsea),
``motorcycle_right`` (other view of motorcycle_left).  Photos of a missing source are skipped."""

EXCLUDED = ("cat", "motorcycle_right")

_SOURCE_MODULES = {"skimage": "skimage", "matplotlib": "matplotlib", "sklearn": "sklearn"}

Photo = tuple[str, np.ndarray]
Photos = Union[str, Sequence[Photo], Sequence[np.ndarray]]


def sources() -> dict[str, bool]:
    """Which photo sources (package names) are installed and therefore used."""
    return {src: importlib.util.find_spec(mod) is not None for src, mod in _SOURCE_MODULES.items()}


def split_names(split: str) -> list[str]:
    """Names of the photos of ``split`` whose source is installed, in load order."""
    if split not in SPLIT:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT)}")
    present = sources()
    return [name for src, names in SPLIT[split].items() if present[src] for name in names]


def photo_uint8(name: str) -> np.ndarray:
    """One photo of :data:`SPLIT` by name, HxWx3 uint8 RGB at full resolution (no downscale, no crop); the
    bundled x2 teacher is trained on these (``scripts/train_teacher.py``)."""
    for names in SPLIT.values():
        for src, listed in names.items():
            if name in listed:
                return _load_uint8(src, name)
    raise ValueError(f"unknown photo {name!r}; expected one of {', '.join(n for s in SPLIT for n in split_names(s))}")


def crop_to_multiple(img: np.ndarray, multiple: int) -> np.ndarray:
    """The top-left part of an HxW(xC) image whose sides are multiples of ``multiple``."""
    h, w = img.shape[:2]
    return img[: h - h % multiple, : w - w % multiple]


def _load_uint8(source: str, name: str) -> np.ndarray:
    """One photo as HxWx3 uint8 RGB."""
    if source == "skimage":
        import skimage.data as skd

        img = skd.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(skd, name)()
    elif source == "matplotlib":
        from matplotlib import cbook
        from PIL import Image

        with Image.open(cbook.get_sample_data(f"{name}.jpg", asfileobj=False)) as im:
            img = np.asarray(im.convert("RGB"))
    elif source == "sklearn":
        # The file load_sample_image() reads, opened directly: importing sklearn costs ~1 s.
        from pathlib import Path

        from PIL import Image

        spec = importlib.util.find_spec("sklearn")
        path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "images" / f"{name}.jpg"
        if path.is_file():
            with Image.open(path) as im:
                img = np.asarray(im.convert("RGB"))
        else:  # pragma: no cover - layout change in a future scikit-learn
            from sklearn.datasets import load_sample_image

            img = load_sample_image(f"{name}.jpg")
    else:  # pragma: no cover - SPLIT only names known sources
        raise ValueError(source)
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.shape[-1] == 4:
        img = img[..., :3]
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
        raise TypeError(f"{source}:{name}: unexpected image {img.shape} {img.dtype}")
    return img


def _prepare(img: np.ndarray, max_side: int) -> np.ndarray:
    """uint8 HxWx3 -> float32 [0, 1], antialiased downscale to longer side <= max_side, sides % 4 == 0."""
    x = img.astype(np.float32) / np.float32(255.0)
    h, w = x.shape[:2]
    if max(h, w) > max_side:
        import torch
        import torch.nn.functional as F

        s = max_side / max(h, w)
        shape = (max(1, round(h * s)), max(1, round(w * s)))
        with torch.no_grad():
            t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
            t = F.interpolate(t, size=shape, mode="bicubic", antialias=True, align_corners=False)
        x = np.clip(t[0].numpy().transpose(1, 2, 0), 0.0, 1.0).astype(np.float32)
    x = crop_to_multiple(x, 4)
    if x.shape[0] < 4 or x.shape[1] < 4:
        raise ValueError(f"photo too small after max_side={max_side}: {img.shape}")
    x = np.ascontiguousarray(x)
    x.setflags(write=False)  # shared through the cache: never modified in place
    return x


@functools.lru_cache(maxsize=None)
def _load_split(split: str, max_side: int) -> tuple[Photo, ...]:
    present = sources()
    out = []
    for src, names in SPLIT[split].items():
        if not present[src]:
            continue
        for name in names:
            out.append((name, _prepare(_load_uint8(src, name), max_side)))
    return tuple(out)


def load_photos(split: str, max_side: int = 512) -> list[Photo]:
    """Real colour photographs of ``split`` ("train" or "test") as ``(name, HxWx3 float32 in [0, 1])``.

    Longer side <= ``max_side`` (antialiased downscale), height and width multiples of 4,
    deterministic order (see :data:`SPLIT`).  Cached in-process; the arrays are read-only.
    """
    if split not in SPLIT:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT)}")
    if int(max_side) < 4:
        raise ValueError(f"max_side must be >= 4, got {max_side}")
    return list(_load_split(split, int(max_side)))


def _as_arrays(photos: Photos) -> list[np.ndarray]:
    if isinstance(photos, str):
        photos = load_photos(photos)
    arrays = [p[1] if isinstance(p, tuple) else p for p in photos]
    for a in arrays:
        if a.ndim != 3 or a.shape[-1] != 3:
            raise ValueError(f"expected HxWx3 photos, got {a.shape}")
    return arrays


def patches(photos: Photos, size: int, count: int, seed: int, min_std: float = 0.01,
            max_redraws: int = 100) -> np.ndarray:
    """``count`` random ``size`` x ``size`` crops, ``(count, 3, size, size)`` float32.

    ``photos``: a split name, a list of ``(name, HxWx3)`` or of HxWx3 arrays.  Each patch: a photo
    drawn uniformly among those at least ``size`` on both sides, a uniform position, then random
    horizontal flip, vertical flip and transposition.  Nearly flat patches (std < ``min_std``) are
    redrawn (at most ``max_redraws`` times each).  Deterministic under ``seed``.
    """
    arrays = [a for a in _as_arrays(photos) if a.shape[0] >= size and a.shape[1] >= size]
    if not arrays:
        raise ValueError(f"no photo is at least {size}x{size}")
    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, size, size), dtype=np.float32)
    for i in range(count):
        for _ in range(max_redraws + 1):
            img = arrays[rng.integers(len(arrays))]
            y = rng.integers(img.shape[0] - size + 1)
            x = rng.integers(img.shape[1] - size + 1)
            p = img[y : y + size, x : x + size]
            if p.std() >= min_std:
                break
        flip_h, flip_v, transpose = rng.integers(2, size=3)
        if flip_h:
            p = p[:, ::-1]
        if flip_v:
            p = p[::-1]
        if transpose:
            p = p.transpose(1, 0, 2)
        out[i] = p.transpose(2, 0, 1)
    return out
