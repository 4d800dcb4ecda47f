"""Synthetic degradations for six image-restoration tasks, and (input, target) pairs from real photos.

Every degradation is ``fn(hr, rng) -> input`` with ``hr`` an ``(N, 3, H, W)`` float32 array in
[0, 1] and ``rng`` a ``numpy.random.Generator`` (the only source of randomness: no global RNG state
is read or changed).  Per-image random parameters are drawn from ``rng`` image by image, in batch
order, so a result depends only on the batch and the generator's state.  Outputs are float32,
clamped to [0, 1].  The exact parameters are in each task's ``description`` (:data:`TASKS`).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from attacks.data import Photos, load_photos, patches

Degrade = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _check(hr: np.ndarray) -> np.ndarray:
    hr = np.asarray(hr)
    if hr.ndim != 4 or hr.shape[1] != 3:
        raise ValueError(f"expected (N, 3, H, W), got {hr.shape}")
    return hr.astype(np.float32, copy=False)


def _finish(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 1.0).astype(np.float32, copy=False)


# --------------------------------------------------------------------------- super-resolution
def bicubic_down(hr: np.ndarray, scale: int) -> np.ndarray:
    """The SR degradation: ``round(255 * clamp(F.interpolate(hr, scale_factor=1/scale, mode="bicubic",
    antialias=True, align_corners=False), 0, 1)) / 255`` (what an LR PNG stores)."""
    hr = _check(hr)
    if hr.shape[-2] % scale or hr.shape[-1] % scale:
        raise ValueError(f"H and W must be multiples of {scale}, got {hr.shape}")
    with torch.no_grad():
        lr = F.interpolate(torch.from_numpy(np.ascontiguousarray(hr)), scale_factor=1.0 / scale,
                           mode="bicubic", antialias=True, align_corners=False)
        lr = lr.clamp(0, 1).mul(255.0).round().div(255.0)
    return lr.numpy().astype(np.float32, copy=False)


def input_baseline(x: np.ndarray, scale: int) -> np.ndarray:
    """What the degraded input alone gives at the target size: bicubic x``scale`` upsampling
    (``align_corners=False``, not clamped) for SR, the input itself for same-size tasks (scale 1)."""
    if scale == 1:
        return x
    with torch.no_grad():
        return F.interpolate(torch.from_numpy(np.ascontiguousarray(x)), scale_factor=scale, mode="bicubic",
                             align_corners=False).numpy()


def sr2(hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """x2 bicubic antialiased downscale, clamp, 8-bit quantize (TEACHER.md's degradation). ``rng`` unused."""
    return bicubic_down(hr, 2)


def sr4(hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """x4 bicubic antialiased downscale, clamp, 8-bit quantize. ``rng`` unused."""
    return bicubic_down(hr, 4)


# --------------------------------------------------------------------------- denoising
DENOISE_SIGMA = 25.0 / 255.0


def denoise(hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Additive white Gaussian noise, sigma 25/255, i.i.d. per pixel and channel; clamp."""
    hr = _check(hr)
    return _finish(hr + rng.normal(0.0, DENOISE_SIGMA, size=hr.shape).astype(np.float32))


# --------------------------------------------------------------------------- low-light
LOWLIGHT = dict(gamma=(2.0, 3.5), brightness=(0.5, 0.9), peak=(200.0, 800.0), read_sigma=(0.01, 0.03))


def lowlight(hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gamma darkening, brightness scaling and Poisson-Gaussian sensor noise, per image.

    ``y = b * x**g``; ``y = Poisson(K * y) / K + N(0, s^2)``; clamp.
    """
    hr = _check(hr)
    out = np.empty_like(hr)
    for i, x in enumerate(hr):
        g = rng.uniform(*LOWLIGHT["gamma"])
        b = rng.uniform(*LOWLIGHT["brightness"])
        k = rng.uniform(*LOWLIGHT["peak"])
        s = rng.uniform(*LOWLIGHT["read_sigma"])
        y = b * np.power(np.clip(x, 0.0, 1.0), g, dtype=np.float64)
        y = rng.poisson(k * y) / k + rng.normal(0.0, s, size=y.shape)
        out[i] = y
    return _finish(out)


# --------------------------------------------------------------------------- underwater
UNDERWATER = dict(beta_r=(0.6, 1.0), beta_g=(0.15, 0.3), beta_b=(0.1, 0.25),
                  d_near=(0.3, 0.8), d_far=(2.0, 3.0), slope_x=(-0.5, 0.5),
                  veil_r=(0.05, 0.15), veil_g=(0.4, 0.6), veil_b=(0.5, 0.7))


def underwater(hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Wavelength-dependent attenuation and back-scatter: ``I_c = J_c t_c + B_c (1 - t_c)``,
    ``t_c = exp(-beta_c d)``; ``d`` a linear ramp, far (``d_far``) at the top row and near
    (``d_near``) at the bottom row, plus a horizontal slope; clamp."""
    hr = _check(hr)
    n, _, h, w = hr.shape
    p = UNDERWATER
    yy = np.linspace(1.0, 0.0, h)[:, None]  # 1 at the top (far), 0 at the bottom (near)
    xx = np.linspace(-0.5, 0.5, w)[None, :]
    out = np.empty_like(hr)
    for i, x in enumerate(hr):
        beta = np.array([rng.uniform(*p["beta_r"]), rng.uniform(*p["beta_g"]), rng.uniform(*p["beta_b"])])
        veil = np.array([rng.uniform(*p["veil_r"]), rng.uniform(*p["veil_g"]), rng.uniform(*p["veil_b"])])
        d_near = rng.uniform(*p["d_near"])
        d_far = rng.uniform(*p["d_far"])
        slope = rng.uniform(*p["slope_x"])
        d = np.maximum(d_near + (d_far - d_near) * yy + slope * xx, 0.1)
        t = np.exp(-beta[:, None, None] * d[None])
        out[i] = x * t + veil[:, None, None] * (1.0 - t)
    return _finish(out)


# --------------------------------------------------------------------------- dehazing
DEHAZE = dict(beta=(0.6, 1.6), airlight=(0.7, 1.0), d_min=(0.1, 0.4), d_max=(1.0, 1.5), grid=4, noise_weight=0.35)


def _smooth_depth(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Synthetic depth in [0, 1]: vertical ramp (1 = far at the top) + bicubic-upsampled 4x4 Gaussian noise."""
    g = DEHAZE["grid"]
    coarse = torch.from_numpy(rng.standard_normal((1, 1, g, g)))
    noise = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)[0, 0].numpy()
    noise = (noise - noise.mean()) / (noise.std() + 1e-12)
    ramp = np.linspace(1.0, 0.0, h)[:, None] * np.ones((1, w))
    d = (1.0 - DEHAZE["noise_weight"]) * ramp + DEHAZE["noise_weight"] * 0.25 * noise
    return (d - d.min()) / (d.max() - d.min() + 1e-12)


def dehaze(hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Atmospheric scattering ``I = J t + A (1 - t)``, ``t = exp(-beta d)``, grey airlight ``A``;
    ``d`` from a synthetic smooth depth map (not the motorcycle disparity, which fits one photo only)."""
    hr = _check(hr)
    n, _, h, w = hr.shape
    p = DEHAZE
    out = np.empty_like(hr)
    for i, x in enumerate(hr):
        beta = rng.uniform(*p["beta"])
        a = rng.uniform(*p["airlight"])
        d_min = rng.uniform(*p["d_min"])
        d_max = rng.uniform(*p["d_max"])
        d = d_min + (d_max - d_min) * _smooth_depth(h, w, rng)
        t = np.exp(-beta * d)[None]
        out[i] = x * t + a * (1.0 - t)
    return _finish(out)


# --------------------------------------------------------------------------- deraining
DERAIN = dict(density=(0.001, 0.004), angle_deg=(-20.0, 20.0), length=(10, 30), intensity=(0.3, 0.8),
              seed_brightness=(0.5, 1.0), width_sigma=0.6)


def line_kernel(length: int, angle_deg: float) -> np.ndarray:
    """Anti-aliased line of ``length`` px through the centre, ``angle_deg`` from vertical (bilinear
    splatting, 4 samples per pixel); about 1 along the line (max 1), odd square size."""
    k = int(length) + 3
    k += 1 - k % 2
    c = k // 2
    ker = np.zeros((k, k))
    a = math.radians(angle_deg)
    for t in np.linspace(-length / 2.0, length / 2.0, 4 * int(length) + 1):
        y, x = c + t * math.cos(a), c + t * math.sin(a)
        y0, x0 = int(math.floor(y)), int(math.floor(x))
        fy, fx = y - y0, x - x0
        ker[y0, x0] += (1 - fy) * (1 - fx)
        ker[y0, x0 + 1] += (1 - fy) * fx
        ker[y0 + 1, x0] += fy * (1 - fx)
        ker[y0 + 1, x0 + 1] += fy * fx
    return np.minimum(ker / 4.0, 1.0)


def rain_layer(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """One image's streak layer S in [0, 1], (h, w)."""
    from scipy.ndimage import gaussian_filter
    from scipy.signal import fftconvolve

    p = DERAIN
    density = rng.uniform(*p["density"])
    angle = rng.uniform(*p["angle_deg"])
    length = int(rng.integers(p["length"][0], p["length"][1] + 1))
    intensity = rng.uniform(*p["intensity"])
    ker = line_kernel(length, angle)
    pad = ker.shape[0]  # seeds outside the frame also draw streaks into it
    hp, wp = h + 2 * pad, w + 2 * pad
    seeds = (rng.random((hp, wp)) < density) * rng.uniform(*p["seed_brightness"], size=(hp, wp))
    s = fftconvolve(seeds, ker, mode="same")[pad : pad + h, pad : pad + w]
    s = gaussian_filter(np.clip(s, 0.0, None), p["width_sigma"])
    return intensity * np.clip(s, 0.0, 1.0)


def derain(hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rain streaks (sparse seeds convolved with a motion-blur line), screen-blended: ``I = J + (1 - J) S``."""
    hr = _check(hr)
    n, _, h, w = hr.shape
    out = np.empty_like(hr)
    for i, x in enumerate(hr):
        s = rain_layer(h, w, rng)[None]
        out[i] = x + (1.0 - x) * s
    return _finish(out)


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Task:
    name: str
    scale: int  # output side / input side (1 for same-size restoration)
    description: str
    degrade: Degrade

    def __call__(self, hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.degrade(hr, rng)


TASKS: dict[str, Task] = {
    "sr2": Task("sr2", 2, "x2 super-resolution: LR = round(255 * clamp(F.interpolate(HR, scale_factor=0.5, "
                "mode='bicubic', antialias=True, align_corners=False), 0, 1)) / 255 (identical to "
                "hardener/assets/TEACHER.md).", sr2),
    "sr4": Task("sr4", 4, "x4 super-resolution: LR = round(255 * clamp(F.interpolate(HR, scale_factor=0.25, "
                "mode='bicubic', antialias=True, align_corners=False), 0, 1)) / 255.", sr4),
    "denoise": Task("denoise", 1, "denoising: I = clamp(J + n, 0, 1), n ~ N(0, (25/255)^2) i.i.d. per pixel "
                    "and channel.", denoise),
    "lowlight": Task("lowlight", 1, "low-light enhancement, per image: g ~ U[2, 3.5], b ~ U[0.5, 0.9], "
                     "K ~ U[200, 800] photons at full scale, s ~ U[0.01, 0.03]; y = b * J^g; "
                     "I = clamp(Poisson(K y) / K + N(0, s^2), 0, 1).", lowlight),
    "underwater": Task("underwater", 1, "underwater enhancement, per image: I_c = clamp(J_c t_c + B_c (1 - t_c), "
                       "0, 1), t_c = exp(-beta_c d); beta = (U[0.6, 1.0], U[0.15, 0.3], U[0.1, 0.25]) (R, G, B) "
                       "per unit depth; veil B = (U[0.05, 0.15], U[0.4, 0.6], U[0.5, 0.7]); depth "
                       "d = max(d_near + (d_far - d_near) * r + k * (x - 0.5), 0.1) with r = 1 at the top row, "
                       "0 at the bottom, x in [0, 1] left to right, d_near ~ U[0.3, 0.8], d_far ~ U[2, 3], "
                       "k ~ U[-0.5, 0.5].", underwater),
    "dehaze": Task("dehaze", 1, "dehazing, per image: I = clamp(J t + A (1 - t), 0, 1), t = exp(-beta d), "
                   "beta ~ U[0.6, 1.6], grey airlight A ~ U[0.7, 1.0]; depth d = d_min + (d_max - d_min) * D, "
                   "d_min ~ U[0.1, 0.4], d_max ~ U[1.0, 1.5], D = min-max normalized (0.65 * vertical ramp "
                   "[1 at top .. 0 at bottom] + 0.35 * 0.25 * standardized bicubic upsampling (align_corners) "
                   "of 4x4 N(0, 1) noise); synthetic depth for every photo (skimage's stereo_motorcycle "
                   "disparity is not used).", dehaze),
    "derain": Task("derain", 1, "deraining, per image: seeds ~ Bernoulli(p) * U[0.5, 1] per pixel on a "
                   "canvas padded by the kernel size, p ~ U[0.001, 0.004]; convolved (FFT) with an "
                   "anti-aliased line kernel of length L ~ U{10..30} px at angle ~ U[-20, 20] deg from "
                   "vertical; Gaussian blur sigma 0.6; clipped to [0, 1]; times intensity "
                   "~ U[0.3, 0.8] -> S (same for R, G, B); screen blend I = clamp(J + (1 - J) S, 0, 1).",
                   derain),
}


def _task(task: str) -> Task:
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}") from None


def make_pairs(task: str, photos: Photos, hr_size: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, targets)``, float32 NCHW: targets are ``count`` random HR patches of ``hr_size``
    (:func:`attacks.data.patches` with ``seed``), inputs their degradation (``hr_size / scale`` for
    SR; degraded per patch).  ``photos``: a split name or a photo list.  Deterministic under ``seed``."""
    t = _task(task)
    if hr_size % t.scale:
        raise ValueError(f"hr_size {hr_size} is not a multiple of the scale {t.scale} of {task!r}")
    targets = patches(photos, hr_size, count, seed)
    rng = np.random.default_rng([int(seed), 0x646567])  # independent of the patch stream
    return t.degrade(targets, rng), targets


def centre_crop(img: np.ndarray, size: int, multiple: int) -> np.ndarray:
    """The centre ``min(size, side)`` crop of an HxW(xC) image, sides rounded down to multiples of ``multiple``."""
    h, w = img.shape[:2]
    ch = min(size, h) // multiple * multiple
    cw = min(size, w) // multiple * multiple
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    return img[y0 : y0 + ch, x0 : x0 + cw]


def eval_set(task: str, split: str = "test", hr_size: int = 128, seed: int = 0
             ) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Per photo of ``split``: ``(name, input (1, 3, h, w), target (1, 3, H, W))`` from its centre crop
    of at most ``hr_size`` (sides rounded down to multiples of the scale).  The degradation of each
    photo uses a generator seeded by ``(seed, crc32(name))``: deterministic and independent of
    which other photos are present."""
    t = _task(task)
    out = []
    for name, img in load_photos(split):
        hr = np.ascontiguousarray(centre_crop(img, hr_size, t.scale).transpose(2, 0, 1)[None], dtype=np.float32)
        rng = np.random.default_rng([int(seed), zlib.crc32(name.encode())])
        out.append((name, t.degrade(hr, rng), hr))
    return out
