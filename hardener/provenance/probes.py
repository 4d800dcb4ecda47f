"""Probe photographs for `harden verify`: a fixed default set of real photos, or a folder of images.

Default set (16 probes, in this order; the first N are used with --num-probes N):

1-4.  the bundled low-resolution samples hardener/assets/samples/lr: astronaut, chelsea, coffee, rocket
      (64 x 64 crops of scikit-image photos; held out from the bundled teacher's training);
5-16. scikit-image photos that ship in its wheel (no download): motorcycle_left (two crops),
      hubble_deep_field, immunohistochemistry, retina (colour); camera, grass, gravel, brick, coins,
      clock, moon (grey, replicated to RGB).  Each is resized (torch bicubic, antialias=True) so its shorter side is 128
      pixels, a 64 x 64 window is cut at the stated position and rounded to 8 bit, so a PNG of it (what
      --write-probes writes) reads back exactly.

Probes are model INPUTS (RGB, float32 in [0, 1], (1, 3, H, W)); any image model taking RGB images can be
probed with them.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..inputs import IMAGE_SUFFIXES, _to_unit, read_image, to_channels

SIZE = 64
# (probe name, skimage.data function, window position as fractions of the free range (top, left))
_SKIMAGE = (
    ("motorcycle_left", "stereo_motorcycle", (0.5, 0.25)),
    ("hubble_deep_field", "hubble_deep_field", (0.5, 0.5)),
    ("immunohistochemistry", "immunohistochemistry", (0.5, 0.5)),
    ("retina", "retina", (0.5, 0.5)),
    ("camera", "camera", (0.3, 0.4)),
    ("grass", "grass", (0.5, 0.5)),
    ("gravel", "gravel", (0.5, 0.5)),
    ("brick", "brick", (0.5, 0.5)),
    ("coins", "coins", (0.5, 0.5)),
    ("clock", "clock", (0.5, 0.5)),
    ("moon", "moon", (0.5, 0.5)),
    ("motorcycle_left_2", "stereo_motorcycle", (0.5, 0.8)),
)
DEFAULT_COUNT = 4 + len(_SKIMAGE)


def _skimage_probe(func: str, where: tuple[float, float]) -> np.ndarray:
    import skimage.data as skd
    import torch
    from torch.nn import functional as F

    raw = np.asarray(skd.stereo_motorcycle()[0] if func == "stereo_motorcycle" else getattr(skd, func)())
    img = to_channels(_to_unit(raw, func), 3, func)  # (3, H, W) float32 in [0, 1], grey replicated
    h, w = img.shape[1:]
    s = 2 * SIZE / min(h, w)
    shape = (max(SIZE, round(h * s)), max(SIZE, round(w * s)))
    with torch.no_grad():
        t = torch.from_numpy(img)[None]
        small = F.interpolate(t, size=shape, mode="bicubic", antialias=True, align_corners=False)[0]
    small = small.numpy().transpose(1, 2, 0).astype(np.float64)
    top = int(round(where[0] * (shape[0] - SIZE)))
    left = int(round(where[1] * (shape[1] - SIZE)))
    crop = small[top:top + SIZE, left:left + SIZE]
    q = np.clip(np.round(crop * 255.0), 0, 255).astype(np.uint8)
    return (q.astype(np.float32) / np.float32(255.0)).transpose(2, 0, 1)


@functools.lru_cache(maxsize=None)
def _skimage_probe_cached(func: str, where: tuple[float, float]) -> np.ndarray:
    probe = _skimage_probe(func, where)
    probe.setflags(write=False)
    return probe


def default_probes(count: int | None = None) -> list[tuple[str, np.ndarray]]:
    """The first ``count`` (default all 16) default probes as (name, (3, H, W) float32 in [0, 1])."""
    from .mark import bundled_samples

    count = DEFAULT_COUNT if count is None else count
    if not 1 <= count <= DEFAULT_COUNT:
        raise UsageError(f"--num-probes must be 1..{DEFAULT_COUNT} with the default probes, got {count}")
    lr, _ = bundled_samples()
    probes = [(p.stem, read_image(p, 3)) for p in sorted(lr.glob("*.png"))]
    for name, func, where in _SKIMAGE:
        if len(probes) >= count:
            break
        probes.append((name, _skimage_probe_cached(func, where).copy()))
    return probes[:count]


def describe_default(count: int) -> str:
    names = ["astronaut", "chelsea", "coffee", "rocket"] + [n for n, _, _ in _SKIMAGE]
    return (f"default probes ({count}): " + ", ".join(names[:count]) +
            " (bundled samples, then scikit-image photos; 64x64 inputs)")


def probe_folder(folder: Path, count: int | None = None) -> list[tuple[str, np.ndarray]]:
    """Images in ``folder`` (sorted by name) as probes; names are the file stems and must be unique."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"probe folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"no probe images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    stems = [p.stem for p in files]
    if len(set(stems)) != len(stems):
        raise UsageError(f"probe folder {folder} has two images with the same name stem")
    if count is not None:
        if count < 1:
            raise UsageError(f"--num-probes must be >= 1, got {count}")
        files = files[:count]
    return [(p.stem, read_image(p, 3)) for p in files]


def write_probes(folder: Path, probes: list[tuple[str, np.ndarray]], force: bool = False) -> list[Path]:
    """Write probes as 8-bit PNGs (exact for the default probes); refuse to replace files without force."""
    import io

    from PIL import Image

    from ..model_io import atomic_write

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} exists and is not a folder")
    targets = [folder / f"{name}.png" for name, _ in probes]
    clash = [p for p in targets if p.exists()]
    if clash and not force:
        raise UsageError(f"{clash[0]} exists ({len(clash)} probe file(s) would be replaced); pass --force")
    folder.mkdir(parents=True, exist_ok=True)
    for (name, img), path in zip(probes, targets):
        q = np.clip(np.round(img.transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(q, mode="RGB").save(buf, format="PNG")
        atomic_write(buf.getvalue(), None, path)
    return targets
