"""Image-quality and difference metrics, BasicSR conventions.

PSNR and SSIM are computed per image (on RGB or grey, over all channels, ``crop_border`` pixels removed at
each edge, values clipped to [0, data_range]) and then averaged over images; SSIM is Wang et al.'s with an
11x11 Gaussian window of sigma 1.5 (scikit-image's ``structural_similarity`` with ``gaussian_weights``).
"""
from __future__ import annotations

import numpy as np


def _prepare(img: np.ndarray, crop_border: int, data_range: float) -> np.ndarray:
    img = np.clip(np.asarray(img, dtype=np.float64), 0.0, data_range)
    if crop_border:
        img = img[..., crop_border:-crop_border, crop_border:-crop_border]
    return img


def squared_error(a: np.ndarray, b: np.ndarray, data_range: float = 1.0, crop_border: int = 0) -> float:
    """Mean squared error of one (C, H, W) image pair, after clipping and cropping as for PSNR."""
    a, b = _prepare(a, crop_border, data_range), _prepare(b, crop_border, data_range)
    return float(np.mean((a - b) ** 2))


def psnr_of_mse(mse: float, data_range: float = 1.0) -> float:
    """PSNR in dB of a mean squared error; inf for 0.  Over several images, pass the mean of their MSEs."""
    mse = float(mse)
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0, crop_border: int = 0) -> float:
    """PSNR of one (C, H, W) image pair in dB; inf for identical images."""
    return psnr_of_mse(squared_error(a, b, data_range, crop_border), data_range)


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0, crop_border: int = 0) -> float:
    """SSIM of one (C, H, W) image pair; images smaller than 7 pixels fall back to 1.0 if identical."""
    from skimage.metrics import structural_similarity

    a, b = _prepare(a, crop_border, data_range), _prepare(b, crop_border, data_range)
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
