"""Distilling a student from a teacher's answers, and the attackers' strategies.

The thief has a query budget: a fixed set of degraded training patches, answered once by the teacher
(through ``Oracle``). A student is then trained on (input, answer) pairs. Adaptive thieves change the
loss (L2, Charbonnier), filter the answers (Gaussian low-pass, Haar wavelet detail removal), train longer,
use a larger student, match exposed features (``tap`` placement) through a 1x1 adapter, or strip the
defence from the file before querying.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from hardener.metrics import Conventions, psnr, ssim


@dataclass(frozen=True)
class Attacker:
    name: str
    loss: str = "l1"  # l1 | l2 | charbonnier
    target_filter: str | None = None  # None | lowpass | wavelet
    steps_factor: float = 1.0
    student: str | None = None  # overrides the suite's student (e.g. a larger one)
    strip: bool = False  # remove the inserted subgraphs from the file before querying
    # how the stripper finds them: "manifest" (or node names), or "structure" on a copy with no manifest and
    # opaque names (what `harden --no-manifest` ships), i.e. without any help from the file's labels
    strip_by: str = "manifest"
    feature_weight: float = 0.0  # > 0: also match tap features through a 1x1 adapter
    ground_truth: bool = False  # control: train on ground truth, no teacher at all
    # self-ensemble queries: each input under the 8 flips/rotations, answers mapped back and averaged (8x the
    # queries): averaging cancels whatever of a perturbation is not equivariant
    ensemble: bool = False
    # the one-image thief (arXiv 2406.00828): all query patches cut from a single training photo
    one_image: bool = False
    # after distilling, fine-tune on the thief's own ground-truth pairs for this fraction of the steps (lr/10)
    finetune_factor: float = 0.0
    # a smaller query budget: only this fraction of the suite's queries (the first ones of the same set)
    queries_factor: float = 1.0
    # the thief who knows the mark's method (y' = y + eps * g_K(y), g_K a small local conv net) but not the
    # key: before distilling it removes from the answers whatever of their error against its own ground truth
    # a second-order polynomial of each pixel's 3x3 neighbourhood predicts, and learns from the result
    demark: bool = False


ATTACKERS = {
    "naive": Attacker("naive"),
    "l2": Attacker("l2", loss="l2"),
    "charbonnier": Attacker("charbonnier", loss="charbonnier"),
    "lowpass": Attacker("lowpass", target_filter="lowpass"),
    "wavelet": Attacker("wavelet", target_filter="wavelet"),
    "long": Attacker("long", steps_factor=3.0),
    "large": Attacker("large", student="edsr_large"),
    "strip": Attacker("strip", strip=True),
    "strip_blind": Attacker("strip_blind", strip=True, strip_by="structure"),
    # hints from the teacher's tapped features; the weight is tuned by the thief (tune_feature_weight) among
    # 0, feature_weight / 10 and feature_weight on a held-out tenth of its own queries
    "features": Attacker("features", feature_weight=0.1),
    "ground_truth": Attacker("ground_truth", ground_truth=True),
    "ensemble": Attacker("ensemble", ensemble=True),
    "one_image": Attacker("one_image", one_image=True),
    "finetune": Attacker("finetune", finetune_factor=0.3),
    "jpeg": Attacker("jpeg", target_filter="jpeg"),
    "uint8": Attacker("uint8", target_filter="uint8"),
    "few_queries": Attacker("few_queries", queries_factor=0.125),
    "demark": Attacker("demark", demark=True),
}
JPEG_QUALITY = 75  # the thief re-encodes every answer (PIL, 4:2:0), the common web default


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(round(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    return (k[:, None] * k[None, :])[None, None].repeat(3, 1, 1, 1)


def filter_targets(y: torch.Tensor, how: str | None) -> torch.Tensor:
    """The adaptive thief's cleaning of the teacher's answers."""
    if how is None:
        return y
    if how == "lowpass":  # Gaussian blur, sigma 1 px: removes high-frequency perturbation (and detail)
        k = _gaussian_kernel(1.0).to(y)
        return F.conv2d(F.pad(y, [k.shape[-1] // 2] * 4, mode="reflect"), k, groups=3)
    if how == "wavelet":  # one-level Haar, detail bands soft-thresholded (VisuShrink-style, MAD of HH)
        a, b = y[..., 0::2, 0::2], y[..., 0::2, 1::2]
        c, d = y[..., 1::2, 0::2], y[..., 1::2, 1::2]
        ll, lh, hl, hh = (a + b + c + d) / 2, (a - b + c - d) / 2, (a + b - c - d) / 2, (a - b - c + d) / 2
        sigma = hh.abs().flatten(-2).median(-1).values[..., None, None] / 0.6745
        t = 3 * sigma
        lh, hl, hh = (torch.sign(v) * torch.clamp(v.abs() - t, min=0) for v in (lh, hl, hh))
        out = torch.empty_like(y)
        out[..., 0::2, 0::2] = (ll + lh + hl + hh) / 2
        out[..., 0::2, 1::2] = (ll - lh + hl - hh) / 2
        out[..., 1::2, 0::2] = (ll + lh - hl - hh) / 2
        out[..., 1::2, 1::2] = (ll - lh - hl + hh) / 2
        return out
    if how == "uint8":  # answers as an 8-bit PNG-serving API would return them
        return torch.round(torch.clamp(y, 0, 1) * 255) / 255
    if how == "jpeg":  # re-encoded as JPEG (lossy, removes fine detail and high-frequency signals)
        return torch.from_numpy(_jpeg(y.detach().cpu().numpy())).to(y)
    raise ValueError(f"unknown target filter {how!r}")


def _jpeg(y: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    import io

    from PIL import Image

    out = np.empty_like(y, dtype=np.float32)
    for i, img in enumerate(np.round(np.clip(y, 0, 1) * 255).astype(np.uint8)):
        buf = io.BytesIO()
        Image.fromarray(np.moveaxis(img, 0, -1).squeeze()).save(buf, format="JPEG", quality=quality)
        back = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32) / 255
        out[i] = back[None] if back.ndim == 2 else np.moveaxis(back, -1, 0)
    return out


DEMARK_SUPPORT = 3  # the mark's first layer: a 3x3 convolution


def _features(y: torch.Tensor, k: int = DEMARK_SUPPORT) -> torch.Tensor:
    """(N*H*W, F) second-order (Volterra) features of every pixel's k x k neighbourhood over all channels
    (edge padded, like the mark): a constant, the neighbourhood, and every product of two of its values."""
    n, c, h, w = y.shape
    cols = F.unfold(F.pad(y, [k // 2] * 4, mode="replicate"), k)  # (N, C*k*k, H*W)
    cols = cols.transpose(1, 2).reshape(n * h * w, c * k * k)
    i, j = torch.triu_indices(cols.shape[1], cols.shape[1])
    return torch.cat([torch.ones(len(cols), 1, dtype=cols.dtype), cols, cols[:, i] * cols[:, j]], 1)


def demark_targets(answers: np.ndarray, truth: np.ndarray, ridge: float = 1e-6, chunk: int = 8) -> np.ndarray:
    """The method-aware thief's cleaning.  It knows the mark is a key-dependent even function of each
    output pixel's 3x3 neighbourhood (a squared tanh of a convolution: to second order a quadratic form of
    the neighbourhood), not the key.  It fits, on its own ground-truth pairs, the second-order polynomial of
    the 3x3 x C neighbourhood that best predicts the answers' error (least squares, normal equations in
    float64 accumulated in chunks, a small ridge), and subtracts that prediction: whatever of the mark such a
    polynomial captures is removed, key or no key.  Deterministic, no training loop."""
    y = torch.from_numpy(np.ascontiguousarray(answers, np.float64))
    t = torch.from_numpy(np.ascontiguousarray(truth, np.float64))
    c = y.shape[1]
    d = _features(y[:1, :, :1, :1]).shape[1]
    xtx, xtr = torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, c, dtype=torch.float64)
    for i in range(0, len(y), chunk):
        x = _features(y[i:i + chunk])
        r = (t[i:i + chunk] - y[i:i + chunk]).permute(0, 2, 3, 1).reshape(-1, c)
        xtx += x.T @ x
        xtr += x.T @ r
    coef = torch.linalg.solve(xtx + ridge * torch.trace(xtx) / d * torch.eye(d, dtype=torch.float64), xtr)
    out = []
    for i in range(0, len(y), chunk):
        part = y[i:i + chunk]
        n, _, h, w = part.shape
        fix = (_features(part) @ coef).reshape(n, h, w, c).permute(0, 3, 1, 2)
        out.append((part + fix).numpy())
    return np.concatenate(out).astype(np.float32)


def _loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "l1":
        return F.l1_loss(pred, target)
    if kind == "l2":
        return F.mse_loss(pred, target)
    if kind == "charbonnier":
        return torch.sqrt((pred - target) ** 2 + 1e-6).mean()
    raise ValueError(f"unknown loss {kind!r}")


class FeatureHints:
    """FitNets-style hints for the feature thief (``tap`` placement exposes the teacher's features).

    Teacher taps and student layers are matched one to one in depth order: the teacher's j-th of T tapped
    ``body.N.conv2`` outputs is regressed from the student's ``body[i].conv2`` output, i = round((j + 1) B / T)
    - 1 for a student of B blocks (with B = T, block j to block j; a one-block student serves every tap from
    its one block).  Each teacher feature is standardised per channel over the query set, so the loss (the
    mean over taps of the MSE between a 1x1 adapter of the student feature and the standardised teacher
    feature) starts near 1 whatever the features' scale, and one weight means the same on every teacher."""

    def __init__(self, student: nn.Module, features: dict[str, np.ndarray]):
        blocks = getattr(getattr(student, "body", None), "__len__", None)
        if blocks is None or not all(hasattr(b, "conv2") for b in student.body):
            raise ValueError("the feature thief needs a residual student (body[i].conv2 layers)")
        names = sorted(features, key=_depth)
        b, t = len(student.body), len(names)
        self.pairs = [(name, max(0, round((j + 1) * b / t) - 1)) for j, name in enumerate(names)]
        self.targets, self.adapters, self.captured = {}, nn.ModuleDict(), {}
        for j, (name, i) in enumerate(self.pairs):
            f = torch.from_numpy(np.ascontiguousarray(features[name], np.float32))
            mean, std = f.mean(dim=(0, 2, 3), keepdim=True), f.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
            self.targets[str(j)] = (f - mean) / std
            self.adapters[str(j)] = nn.Conv2d(student.body[i].conv2.out_channels, f.shape[1], 1)
        self.hooks = [student.body[i].conv2.register_forward_hook(
            lambda m, inp, out, i=i: self.captured.__setitem__(i, out)) for i in sorted({i for _, i in self.pairs})]

    def loss(self, idx: torch.Tensor) -> torch.Tensor:
        terms = [F.mse_loss(self.adapters[str(j)](self.captured[i]), self.targets[str(j)][idx])
                 for j, (_, i) in enumerate(self.pairs)]
        return torch.stack(terms).mean()

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.captured.clear()


def _depth(name: str) -> tuple:
    """Sort key: tap names in the order of the blocks they come from (body.2 before body.10)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def train_student(
    student: nn.Module,
    inputs: np.ndarray,
    targets: np.ndarray,
    *,
    steps: int,
    loss: str = "l1",
    target_filter: str | None = None,
    features: dict[str, np.ndarray] | None = None,
    feature_weight: float = 0.0,
    batch: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    progress=None,
) -> list[float]:
    """Adam with cosine decay on (input, target) pairs; returns the loss curve (every 10th step)."""
    g = torch.Generator().manual_seed(seed)
    x_all = torch.from_numpy(np.ascontiguousarray(inputs, np.float32))
    with torch.no_grad():
        y_all = filter_targets(torch.from_numpy(np.ascontiguousarray(targets, np.float32)), target_filter)
    hints = FeatureHints(student, features) if features and feature_weight > 0 else None
    params = list(student.parameters()) + (list(hints.adapters.parameters()) if hints else [])
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=lr * 0.01)
    curve = []
    student.train()
    for step in range(steps):
        idx = torch.randint(0, len(x_all), (min(batch, len(x_all)),), generator=g)
        pred = student(x_all[idx])
        value = _loss(pred, y_all[idx], loss)
        if hints is not None:  # the hint weight decays linearly to 0: the last steps fit the outputs alone
            value = value + feature_weight * (1 - step / steps) * hints.loss(idx)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        sched.step()
        if step % 10 == 0:
            curve.append(value.item())
        if progress is not None:
            progress.update(1)
    if hints is not None:
        hints.remove()
    student.eval()
    return curve


HOLDOUT = 0.1  # share of the thief's queries it keeps back to choose the hint weight


def tune_feature_weight(student: nn.Module, inputs: np.ndarray, targets: np.ndarray,
                        features: dict[str, np.ndarray], candidates: tuple[float, ...], *, steps: int,
                        seed: int = 0, progress=None, **kw) -> tuple[float, dict[float, float]]:
    """The feature thief's choice of hint weight, made as a thief can: a copy of ``student`` (same
    initial weights) is trained with each candidate weight on the first 90 % of the queries, and the weight
    whose student best matches the teacher's answers on the held-out 10 % (L1) wins.  0 is always a
    candidate, so a thief whose hints do not help falls back to plain distillation.  Returns (weight,
    {weight: held-out L1})."""
    import copy

    n = len(inputs)
    cut = max(1, min(n - 1, int(round(n * (1 - HOLDOUT)))))
    scores = {}
    for w in sorted(set((0.0, *candidates))):
        trial = copy.deepcopy(student)
        train_student(trial, inputs[:cut], targets[:cut], steps=steps, seed=seed, progress=progress,
                      features={k: v[:cut] for k, v in features.items()}, feature_weight=w, **kw)
        with torch.no_grad():
            pred = trial(torch.from_numpy(np.ascontiguousarray(inputs[cut:], np.float32)))
        scores[w] = float(F.l1_loss(pred, torch.from_numpy(np.ascontiguousarray(targets[cut:], np.float32))))
    return min(scores, key=lambda w: (scores[w], w)), scores


@torch.no_grad()
def evaluate(predict, eval_set, conventions: Conventions) -> dict:
    """Mean PSNR/SSIM over the images, per image under ``conventions`` (hardener.metrics: RGB or Y, crop
    border, optional 8-bit rounding, clipped to [0, 1])."""
    psnrs, ssims = [], []
    for _, x, truth in eval_set:
        y = predict(x)
        psnrs.append(psnr(y[0], truth[0], conventions=conventions))
        ssims.append(ssim(y[0], truth[0], conventions=conventions))
    return {"psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims)), "per_image_psnr": psnrs}


def torch_predictor(model: nn.Module):
    def predict(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()
    return predict
