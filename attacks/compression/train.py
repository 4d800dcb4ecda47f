"""Train (or fine-tune) a codec on random crops of the real training photos (:mod:`attacks.data`)."""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .rate import rd_loss

GRAD_CLIP = 1.0
"""Max global gradient norm; without clipping the small codec's loss explodes (NOTES.md)."""


def lr_at(step: int, steps: int, base: float) -> float:
    """Linear warm-up over the first 2 % of the steps, then cosine decay to 1 % of ``base``."""
    warmup = max(1, steps // 50)
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return base * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * t)))


def train_codec(model: nn.Module, lmbda: float, steps: int, seed: int, batch: int = 8, patch: int = 64,
                lr: float = 1e-3, progress: Optional[Callable[[int, int, dict], None]] = None,
                photos: Optional[Sequence] = None, refresh: int = 50, log_every: int = 100) -> list[float]:
    """Minimise ``lmbda * 255^2 * mse + bpp`` (:func:`attacks.compression.rd_loss`) for ``steps`` steps;
    returns the loss of every step.  The model is trained in place and left in ``eval()`` mode.

    Data: ``attacks.data.patches(photos, patch, batch * refresh, seed=seed * 1_000_003 + chunk)`` for chunk
    0, 1, ... (random crops with flips/transposes, each crop used once); ``photos`` defaults to
    ``attacks.data.load_photos("train")`` (held-out photos are never seen).  Adam (``lr``, betas 0.9/0.999),
    :func:`lr_at` schedule, global gradient norm clipped at :data:`GRAD_CLIP`; quantisation noise drawn from
    torch's global generator, seeded here with ``seed``.  Deterministic under ``seed`` for a given thread
    count (the caller picks it: ``torch.set_num_threads``).  ``patch`` must be a multiple of 64.

    ``progress(step, steps, info)`` is called every ``log_every`` steps and at the end, ``info`` holding
    the running means ``loss``, ``bpp``, ``mse``, ``psnr`` and ``lr`` since the previous call.
    """
    from attacks.data import load_photos, patches

    if patch % 64:
        raise ValueError(f"patch {patch} must be a multiple of 64")
    if steps < 0 or batch < 1:
        raise ValueError("steps must be >= 0 and batch >= 1")
    photos = load_photos("train") if photos is None else photos
    torch.manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    curve: list[float] = []
    acc = {"loss": 0.0, "bpp": 0.0, "mse": 0.0}
    n_acc = 0
    data = None
    try:
        for step in range(steps):
            k = step % refresh
            if k == 0:
                data = torch.from_numpy(patches(photos, patch, batch * refresh,
                                                seed=seed * 1_000_003 + step // refresh))
            x = data[k * batch:(k + 1) * batch]
            rate = lr_at(step, steps, lr)
            for g in opt.param_groups:
                g["lr"] = rate
            loss, b, mse = rd_loss(model(x), x, lmbda)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            opt.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"loss is {value} at step {step}")
            curve.append(value)
            acc["loss"] += value
            acc["bpp"] += float(b.detach())
            acc["mse"] += float(mse.detach())
            n_acc += 1
            if progress is not None and ((step + 1) % log_every == 0 or step + 1 == steps):
                info = {key: v / n_acc for key, v in acc.items()}
                info["psnr"] = float(10 * np.log10(1.0 / max(info["mse"], 1e-12)))
                info["lr"] = rate
                progress(step + 1, steps, info)
                acc = {key: 0.0 for key in acc}
                n_acc = 0
    finally:
        model.eval()
    return curve
