"""Float64 PyTorch reference of ASVP, from a full ``torch.linalg.svd``.

Used by the tests (to check the ONNX subgraph), by validation (per-layer accuracy and spectral gap in the
report) and by the attack suite.  Slow by design: exact, not fast.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .asvp import AsvpParams


@dataclass
class ReferenceResult:
    output: np.ndarray  # perturbed map, float64, shape of the input
    singular_values: np.ndarray  # (..., min(m, n)) descending, per matrix
    ranks: np.ndarray  # k used per matrix (differs from params.rank only with adaptive energy)


def _as_matrices(x, mode: str):
    n, c, h, w = x.shape
    return x.reshape(n, c, h * w) if mode == "channel" else x


def asvp_reference(x, params: AsvpParams) -> ReferenceResult:
    """Apply M' = U diag(s') V^T with the top-k singular values of each matrix scaled by h."""
    import torch

    t = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    if t.ndim != 4:
        raise ValueError(f"expected an (N, C, H, W) feature map, got shape {tuple(t.shape)}")
    m = _as_matrices(t, params.mode)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    ks = torch.full(s.shape[:-1], min(params.rank, s.shape[-1]), dtype=torch.int64)
    if params.adaptive_energy is not None:
        energy = s**2
        total = energy.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        before = (torch.cumsum(energy, -1) - energy) / total  # energy strictly before column j
        needed = (before < params.adaptive_energy).sum(-1)
        ks = torch.minimum(ks, needed)
    cols = torch.arange(s.shape[-1])
    gain = torch.where(cols < ks[..., None], params.gain, 1.0).to(torch.float64)
    out = (u * (s * gain)[..., None, :]) @ vh
    return ReferenceResult(
        output=out.reshape(t.shape).numpy(),
        singular_values=s.numpy(),
        ranks=ks.numpy(),
    )


def spectral_gap(singular_values: np.ndarray, rank: int) -> np.ndarray:
    """sigma_(k+1) / sigma_k per matrix; 0 where sigma_k is 0 or k covers the whole spectrum."""
    s = np.asarray(singular_values, dtype=np.float64)
    if rank >= s.shape[-1]:
        return np.zeros(s.shape[:-1])
    sk, sk1 = s[..., rank - 1], s[..., rank]
    return np.divide(sk1, sk, out=np.zeros_like(sk), where=sk > 0)


def relative_error(approx: np.ndarray, exact: np.ndarray, original: np.ndarray) -> float:
    """||approx - exact|| / ||exact - original||: error relative to the size of the perturbation."""
    num = np.linalg.norm(np.asarray(approx, np.float64) - exact)
    den = np.linalg.norm(exact - np.asarray(original, np.float64))
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return float(num / den)
