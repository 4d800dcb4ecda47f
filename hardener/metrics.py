"""Image-quality and difference metrics, BasicSR conventions, through scikit-image.

PSNR and SSIM are computed per image (over all channels of a ``(C, H, W)`` image, values clipped to
[0, data_range], ``crop_border`` pixels removed at each edge) and then averaged over images by the caller;
PSNR is ``skimage.metrics.peak_signal_noise_ratio``, SSIM Wang et al.'s with an 11x11 Gaussian window of
sigma 1.5 (``skimage.metrics.structural_similarity`` with ``gaussian_weights``, ``use_sample_covariance``
off).  :class:`Conventions` selects the rest, each as BasicSR does it:

* ``channel``: ``"rgb"`` (every channel) or ``"y"``, the BT.601 luma of an RGB image,
  ``Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255`` for R, G, B in [0, 1] (``skimage.color.rgb2ycbcr``;
  BasicSR's ``test_y_channel``).  An image without 3 channels is used as it is;
* ``crop_border``: pixels ignored at each edge (BasicSR: the scale for super-resolution);
* ``rounding``: ``None``, or ``"uint8"``: both images rounded to 8-bit levels (k/255 of the range) after
  clipping, as images saved to PNG are.

The defaults (RGB, no crop, no rounding) are what every caller gets unless it asks for more.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHANNELS = ("rgb", "y")
ROUNDINGS = (None, "uint8")


@dataclass(frozen=True)
class Conventions:
    """How images are prepared before PSNR/SSIM (see the module docstring)."""

    channel: str = "rgb"
    crop_border: int = 0
    rounding: str | None = None

    def __post_init__(self):
        if self.channel not in CHANNELS:
            raise ValueError(f"channel must be one of {CHANNELS}, got {self.channel!r}")
        if isinstance(self.crop_border, bool) or not isinstance(self.crop_border, (int, np.integer)) \
                or self.crop_border < 0:
            raise ValueError(f"crop_border must be an integer >= 0, got {self.crop_border!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")

    def describe(self, data_range: float = 1.0) -> str:
        """One line: 'PSNR/SSIM per image then averaged, BT.601 Y, crop border 2, outputs rounded to 8 bits,
        clipped to [0, 1]'."""
        parts = ["PSNR/SSIM per image then averaged", "RGB" if self.channel == "rgb" else "BT.601 Y",
                 f"crop border {self.crop_border}"]
        if self.rounding == "uint8":
            parts.append("outputs rounded to 8 bits")
        parts.append(f"clipped to [0, {data_range:g}]")
        return ", ".join(parts)


def conventions_of(crop_border: int = 0, conventions: Conventions | None = None) -> Conventions:
    """``conventions``, or RGB with ``crop_border`` when none are given (a conflicting border is an error)."""
    if conventions is None:
        return Conventions(crop_border=int(crop_border))
    if crop_border and crop_border != conventions.crop_border:
        raise ValueError(f"crop_border={crop_border} conflicts with {conventions}")
    return conventions


def luma(img: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """BT.601 Y of a ``(..., 3, H, W)`` RGB image in [0, data_range], as ``(..., 1, H, W)`` in the same range."""
    from skimage.color import rgb2ycbcr

    y = rgb2ycbcr(np.asarray(img, np.float64) / data_range, channel_axis=-3)[..., :1, :, :]
    return y * (data_range / 255.0)


def prepare(img: np.ndarray, data_range: float = 1.0, conventions: Conventions | None = None) -> np.ndarray:
    """One image as the metrics see it: float64, clipped to [0, data_range], rounded, Y, cropped."""
    c = conventions or Conventions()
    img = np.clip(np.asarray(img, dtype=np.float64), 0.0, data_range)
    if c.rounding == "uint8":
        img = np.round(img * (255.0 / data_range)) / 255.0 * data_range  # k/255 exactly for range 1
    if c.channel == "y" and img.ndim >= 3 and img.shape[-3] == 3:
        img = luma(img, data_range)
    if c.crop_border:
        b = c.crop_border
        img = img[..., b:-b, b:-b]
    return img


def _pair(a, b, data_range, crop_border, conventions) -> tuple[np.ndarray, np.ndarray]:
    c = conventions_of(crop_border, conventions)
    return prepare(a, data_range, c), prepare(b, data_range, c)


def squared_error(a: np.ndarray, b: np.ndarray, data_range: float = 1.0, crop_border: int = 0,
                  conventions: Conventions | None = None) -> float:
    """Mean squared error of one (C, H, W) image pair, after preparing both as for PSNR."""
    a, b = _pair(a, b, data_range, crop_border, conventions)
    return float(np.mean((a - b) ** 2))


def psnr_of_mse(mse: float, data_range: float = 1.0) -> float:
    """PSNR in dB of a mean squared error; inf for 0.  Over several images, pass the mean of their MSEs."""
    mse = float(mse)
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0, crop_border: int = 0,
         conventions: Conventions | None = None) -> float:
    """PSNR of one (C, H, W) image pair in dB (``skimage.metrics.peak_signal_noise_ratio``); inf for
    identical images."""
    from skimage.metrics import peak_signal_noise_ratio

    a, b = _pair(a, b, data_range, crop_border, conventions)
    if np.array_equal(a, b):
        return float("inf")
    return float(peak_signal_noise_ratio(a, b, data_range=data_range))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0, crop_border: int = 0,
         conventions: Conventions | None = None) -> float:
    """SSIM of one (C, H, W) image pair; images smaller than 7 pixels fall back to 1.0 if identical."""
    from skimage.metrics import structural_similarity

    a, b = _pair(a, b, data_range, crop_border, conventions)
    if min(a.shape[-2:]) < 7:
        return 1.0 if np.array_equal(a, b) else float("nan")
    return float(structural_similarity(a, b, data_range=data_range, channel_axis=0, gaussian_weights=True,
                                       sigma=1.5, use_sample_covariance=False))


def is_image_batch(arr: np.ndarray) -> bool:
    return arr.ndim == 4 and arr.shape[1] in (1, 3)


class DiffStats:
    """Streaming |a - b| statistics of one output across batches (p99 from a bounded sample)."""

    SAMPLE = 1_000_000

    def __init__(self):
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.sum_abs = 0.0
        self.count = 0
        self.samples: list[np.ndarray] = []
        self.tol_violations = 0

    def add(self, hardened: np.ndarray, original: np.ndarray, atol: float,
            rtol: float) -> tuple[np.ndarray, np.ndarray]:
        """Accumulate one batch; returns its elementwise (|h - o|, |h - o| / |o|) for callers that need them."""
        h = np.asarray(hardened, np.float64)
        o = np.asarray(original, np.float64)
        diff = np.abs(h - o)
        rel = diff / np.maximum(np.abs(o), 1e-12)
        self.max_abs = max(self.max_abs, float(diff.max(initial=0.0)))
        self.max_rel = max(self.max_rel, float(rel.max(initial=0.0)))
        self.sum_abs += float(diff.sum())
        self.count += diff.size
        self.tol_violations += int(np.count_nonzero(diff > atol + rtol * np.abs(o)))
        flat = diff.ravel()
        step = max(1, flat.size // self.SAMPLE)
        self.samples.append(flat[::step])
        return diff, rel

    def summary(self) -> dict:
        sample = np.concatenate(self.samples) if self.samples else np.zeros(1)
        return {
            "max_abs": self.max_abs,
            "mean_abs": self.sum_abs / max(self.count, 1),
            "p99_abs": float(np.percentile(sample, 99)),
            "max_rel": self.max_rel,
            "elements": self.count,
            "tolerance_violations": self.tol_violations,
        }
