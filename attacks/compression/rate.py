"""Rate and rate-distortion loss from a codec's likelihoods (CompressAI's conventions)."""
from __future__ import annotations

import math

import torch


def bits(likelihoods: dict) -> torch.Tensor:
    """Total information content ``-sum log2 p`` of every likelihood tensor in ``likelihoods`` (a scalar)."""
    return sum(torch.log(lik).sum() for lik in likelihoods.values()) / -math.log(2.0)


def bpp(likelihoods: dict, num_pixels: int) -> torch.Tensor:
    """Mean bits per pixel over the batch: ``-sum log2 p / num_pixels``.

    ``num_pixels`` is the number of pixels in the WHOLE batch, ``N * H * W`` (CompressAI's
    ``RateDistortionLoss`` convention), so the result is the batch mean of the per-image bpp; for one
    image it is ``H * W``.  Per-image values: :func:`bpp_per_image`.
    """
    return bits(likelihoods) / float(num_pixels)


def bpp_per_image(likelihoods: dict, pixels_per_image: int) -> torch.Tensor:
    """Bits per pixel of each image, shape (N,): ``pixels_per_image`` is ``H * W``."""
    total = None
    for lik in likelihoods.values():
        b = torch.log(lik).reshape(lik.shape[0], -1).sum(dim=1)
        total = b if total is None else total + b
    return total / (-math.log(2.0) * float(pixels_per_image))


def rd_loss(out: dict, x: torch.Tensor, lmbda: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, bpp, mse)`` with ``loss = lmbda * 255^2 * mse + bpp`` (CompressAI's convention: ``mse``
    on [0, 1] images, ``bpp`` the batch mean); ``out`` is the codec's ``forward`` dict."""
    n, _, h, w = x.shape
    rate = bpp(out["likelihoods"], n * h * w)
    mse = torch.mean((out["x_hat"] - x) ** 2)
    return lmbda * 255.0 ** 2 * mse + rate, rate, mse
