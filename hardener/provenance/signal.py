"""The mark function itself, in torch: g_K(y) for one key, and for many keys at once.

    g(y)  = W2 . tanh(W1 * pad_edge(y, 1))^2          (3x3 conv C -> 16, squared tanh, 1x1 conv 16 -> C)
    g0(y) = g(y) - mean over H, W of g(y)              (per image and channel)
    mark(y) = y + eps * g0(y)

Why this shape.  W1's filters are zero-sum, so flat regions and brightness give u = 0; the squared tanh is
even, so g is an even function of local detail (g(m + d) = g(m - d) for a locally flat m).  Generic
differences between two restoration models (one blurrier or sharper, a colour or contrast shift, ringing)
are, to first order, linear filters of the output: odd in the detail, hence orthogonal in expectation to
the mark.  W2 is symmetric around 0 over keys, so the average mark over keys is exactly zero.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F


def _t(x: np.ndarray | torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    return x.to(dtype) if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x)).to(dtype)


@torch.no_grad()
def mark_signal(y, w1: np.ndarray, w2: np.ndarray, dtype=torch.float64) -> np.ndarray:
    """g0(y) for y (N, C, H, W); returns numpy in ``dtype``'s precision."""
    y = _t(y, dtype)
    u = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), _t(w1, dtype))
    a = torch.tanh(u)
    g = torch.einsum("ch,nhyx->ncyx", _t(w2, dtype), a * a)
    return (g - g.mean(dim=(2, 3), keepdim=True)).numpy()


@torch.no_grad()
def mark_signals(y: torch.Tensor, w1s: np.ndarray, w2s: np.ndarray) -> torch.Tensor:
    """g0(y) for K keys at once: y (N, C, H, W) float32; w1s (K, 16, C, 3, 3); w2s (K, C, 16).

    Returns (K, N, C, H, W) float32.
    """
    k, hidden, c = w1s.shape[:3]
    w1 = torch.from_numpy(np.ascontiguousarray(w1s.reshape(k * hidden, c, 3, 3), np.float32))
    u = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), w1)  # (N, K*16, H, W)
    a = torch.tanh(u)
    a = (a * a).view(y.shape[0], k, hidden, *y.shape[2:])
    g = torch.einsum("kch,nkhyx->kncyx", torch.from_numpy(np.ascontiguousarray(w2s, np.float32)), a)
    return g - g.mean(dim=(3, 4), keepdim=True)
