"""White-box PSNR attacks on image-restoration models and codecs, replayed in 8 bits through ONNX Runtime.

Two attacks maximise the distortion of the reconstruction against the *clean* image (the ground truth of a
restoration task; the input itself for a codec), through a differentiable twin (``twin.py``):

* ``pgd``: L_inf projected gradient ascent (Madry et al.) with a uniform random start in the eps ball,
  step ``eps / 4``, ``steps`` sign-gradient steps, projected onto the eps ball and onto [0, 1] after each;
* ``mse``: Chen & Ma's MSE-bounded variant (arXiv 2112.08691): delta optimised with Adam (lr
  ``sqrt(budget) / 4`` by default, the analogue of PGD's eps/4) to maximise the distortion, projected after
  every step onto {mean(delta^2) <= budget} (per image) intersected with the [0, 1] box (clip, then scale
  towards x: feasible, not the exact Euclidean projection onto the intersection).  Random start: uniform
  noise of MSE budget / 4.

Both keep, per image, the iterate with the highest (clipped, cropped) distortion seen in the twin, as is usual
for PGD evaluations.  The result is then rounded to 8 bits (what an image file holds; clean inputs are 8-bit
as well, so integer eps * 255 is respected exactly; the MSE variant shrinks delta until the rounded image is
inside the budget) and replayed through ONNX Runtime on the deployed file: every reported number comes from
ONNX Runtime, not from the twin.

Vulnerability index, per image: ``VI = 10 log10(MSE_out / MSE_in)`` with ``MSE_in = mean((x' - x)^2)`` (the
8-bit perturbation) and ``MSE_out = mean((f(x') - f(x))^2)`` (how much the deployed model's output moves,
border-cropped like PSNR).  VI > 0 dB: the model amplifies the perturbation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from hardener.metrics import psnr_of_mse, squared_error

VARIANTS = ("pgd", "mse")
DEFAULT_EPS = (2, 4, 8)  # in 1/255 units
DEFAULT_BUDGET = 1e-3  # input MSE budget of the mse variant, [0, 1] images


class OnnxModel:
    """ONNX Runtime on CPU: the image output (first graph output unless named), and every output by name."""

    def __init__(self, path: str | Path, output: str | None = None, threads: int | None = 1):
        from hardener.runtime import make_session

        self.path = Path(path)
        self.session = make_session(self.path, ["CPUExecutionProvider"], tf32=False, threads=threads)
        self.input = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]
        if output is not None and output not in self.outputs:
            raise ValueError(f"{self.path}: no output {output!r} (outputs: {', '.join(self.outputs)})")
        self.output = output or self.outputs[0]

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """All outputs, one image at a time (per-image scalars such as a codec's bpp stay per image)."""
        res: dict[str, list] = {name: [] for name in self.outputs}
        for i in range(len(x)):
            outs = self.session.run(None, {self.input: np.ascontiguousarray(x[i:i + 1], np.float32)})
            for name, arr in zip(self.outputs, outs):
                res[name].append(np.asarray(arr).reshape(1, *np.asarray(arr).shape[1:]) if np.ndim(arr) else
                                 np.asarray(arr).reshape(1))
        return {name: np.concatenate(v) for name, v in res.items()}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)[self.output]


def quantize8(x):
    """Round to the 8-bit grid k / 255 (numpy or torch)."""
    if isinstance(x, torch.Tensor):
        return torch.round(x.clamp(0, 1) * 255) / 255
    return (np.round(np.clip(x, 0, 1) * 255) / 255).astype(np.float32)


def is_8bit(x: np.ndarray, atol: float = 1e-4) -> bool:
    v = np.asarray(x, np.float64) * 255
    return bool(np.all(np.abs(v - np.round(v)) <= atol) and v.min() >= -atol and v.max() <= 255 + atol)


def _crop(t: torch.Tensor, border: int) -> torch.Tensor:
    return t[..., border:-border, border:-border] if border else t


def distortion(y: torch.Tensor, target: torch.Tensor, crop: int = 0, clip: bool = False) -> torch.Tensor:
    """Per-image mean squared error (N,), border-cropped; ``clip`` clips y to [0, 1] as the metric does."""
    if clip:
        y = y.clamp(0, 1)
    return (_crop(y, crop) - _crop(target, crop)).pow(2).flatten(1).mean(1)


Forward = Callable[[torch.Tensor], torch.Tensor]


class _Best:
    """Per image, the input with the highest measured distortion so far."""

    def __init__(self, x: torch.Tensor):
        self.x = x.clone()
        self.score = torch.full((len(x),), -1.0, dtype=torch.float64)

    def update(self, x: torch.Tensor, score: torch.Tensor) -> None:
        better = score.detach().to(torch.float64) > self.score
        self.score = torch.where(better, score.detach().to(torch.float64), self.score)
        self.x[better] = x.detach()[better]


def pgd_linf(forward: Forward, x: torch.Tensor, target: torch.Tensor, eps: float, steps: int = 20,
             step_size: float | None = None, seed: int = 0, crop: int = 0, random_start: bool = True,
             keep_best: bool = True) -> torch.Tensor:
    """L_inf PGD maximising the distortion of ``forward(x')`` against ``target``; |x' - x| <= eps, x' in [0, 1].

    ``eps`` and ``step_size`` in [0, 1] units; float result (round with :func:`quantize8`, or use
    :func:`attack` which does it within the bound)."""
    if eps < 0 or steps < 0:
        raise ValueError("eps and steps must be non-negative")
    step_size = eps / 4 if step_size is None else step_size
    gen = torch.Generator().manual_seed(int(seed))
    x, target = x.detach(), target.detach()
    delta = (torch.rand(x.shape, generator=gen, dtype=x.dtype) * 2 - 1) * eps if random_start else torch.zeros_like(x)
    adv = (x + delta).clamp(0, 1)
    best = _Best(adv)
    for _ in range(steps):
        adv.requires_grad_(True)
        y = forward(adv)
        loss = distortion(y, target, crop)
        grad, = torch.autograd.grad(loss.sum(), adv)
        best.update(adv, distortion(y.detach(), target, crop, clip=True))
        with torch.no_grad():
            adv = adv.detach() + step_size * grad.sign()
            adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0, 1)
    with torch.no_grad():
        best.update(adv, distortion(forward(adv), target, crop, clip=True))
    return best.x if keep_best else adv.detach()


def project_mse(delta: torch.Tensor, x: torch.Tensor, budget: float) -> torch.Tensor:
    """Per image: clip x + delta to [0, 1], then scale delta towards 0 until mean(delta^2) <= budget."""
    delta = (x + delta).clamp(0, 1) - x
    mse = delta.pow(2).flatten(1).mean(1).clamp_min(1e-30)
    factor = torch.clamp(torch.sqrt(budget / mse), max=1.0)
    return delta * factor.view(-1, *([1] * (delta.ndim - 1)))


def mse_attack(forward: Forward, x: torch.Tensor, target: torch.Tensor, budget: float = DEFAULT_BUDGET,
               steps: int = 20, lr: float | None = None, seed: int = 0, crop: int = 0,
               keep_best: bool = True) -> torch.Tensor:
    """Chen & Ma's attack: Adam on delta maximising the distortion, projected onto mean(delta^2) <= budget."""
    if budget <= 0 or steps < 0:
        raise ValueError("budget must be positive and steps non-negative")
    lr = math.sqrt(budget) / 4 if lr is None else lr
    gen = torch.Generator().manual_seed(int(seed))
    x, target = x.detach(), target.detach()
    a = math.sqrt(3 * budget / 4)  # uniform on [-a, a] has mean square a^2 / 3 = budget / 4
    delta = project_mse((torch.rand(x.shape, generator=gen, dtype=x.dtype) * 2 - 1) * a, x, budget)
    delta.requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=lr)
    best = _Best(x + delta.detach())
    for _ in range(steps):
        adv = x + delta
        y = forward(adv)
        loss = distortion(y, target, crop)
        best.update(adv, distortion(y.detach(), target, crop, clip=True))
        opt.zero_grad()
        (-loss.sum()).backward()
        opt.step()
        with torch.no_grad():
            delta.copy_(project_mse(delta, x, budget))
    with torch.no_grad():
        adv = x + delta
        best.update(adv, distortion(forward(adv), target, crop, clip=True))
    return best.x if keep_best else adv.detach()


def round_within_linf(adv: np.ndarray, x: np.ndarray, eps: float) -> np.ndarray:
    """8-bit rounding of ``adv`` that stays inside the eps ball around 8-bit ``x`` (exact for integer eps*255)."""
    q = np.round(np.clip(adv, 0, 1) * 255)
    lo, hi = np.ceil((x - eps) * 255 - 1e-6), np.floor((x + eps) * 255 + 1e-6)
    return (np.clip(q, np.maximum(lo, 0), np.minimum(hi, 255)) / 255).astype(np.float32)


def round_within_mse(adv: np.ndarray, x: np.ndarray, budget: float, shrink: float = 0.98) -> np.ndarray:
    """8-bit rounding of ``adv``; per image, delta is shrunk until the rounded image is within the budget."""
    out = quantize8(adv)
    for i in range(len(x)):
        delta = adv[i] - x[i]
        for _ in range(400):
            if np.mean((out[i].astype(np.float64) - x[i]) ** 2) <= budget:
                break
            delta = delta * shrink
            out[i] = quantize8(x[i] + delta)
        else:
            out[i] = x[i]  # cannot happen for budget > 0: delta shrinks to zero
    return out


@dataclass
class AttackSpec:
    variant: str  # "pgd" | "mse"
    bound: float  # eps in [0, 1] units (pgd) or the MSE budget (mse)
    steps: int = 20
    seed: int = 0

    @property
    def label(self) -> str:
        if self.variant == "pgd":
            return f"pgd eps={round(self.bound * 255, 3):g}/255"
        return f"mse budget={self.bound:g}"


def attack(forward: Forward, x8: np.ndarray, target: np.ndarray, spec: AttackSpec, crop: int = 0) -> np.ndarray:
    """Adversarial 8-bit images for 8-bit inputs ``x8`` (N, 3, h, w) against ``target`` (N, 3, H, W)."""
    if not is_8bit(x8):
        raise ValueError("clean inputs must be 8-bit (k / 255): round them with quantize8 first")
    xt = torch.from_numpy(np.ascontiguousarray(x8, np.float32))
    tt = torch.from_numpy(np.ascontiguousarray(target, np.float32))
    if spec.variant == "pgd":
        adv = pgd_linf(forward, xt, tt, spec.bound, spec.steps, seed=spec.seed, crop=crop).numpy()
        return round_within_linf(adv, x8, spec.bound)
    if spec.variant == "mse":
        adv = mse_attack(forward, xt, tt, spec.bound, spec.steps, seed=spec.seed, crop=crop).numpy()
        return round_within_mse(adv, x8, spec.bound)
    raise ValueError(f"unknown variant {spec.variant!r}; expected one of {', '.join(VARIANTS)}")


def vulnerability_index(mse_out: float, mse_in: float) -> float:
    """10 log10(MSE_out / MSE_in) in dB (nan when the input was not perturbed)."""
    if mse_in <= 0:
        return float("nan")
    return float(10 * math.log10(max(mse_out, 1e-30) / mse_in))


def replay_metrics(model: OnnxModel, x8: np.ndarray, adv8: np.ndarray, target: np.ndarray, crop: int,
                   clean: dict | None = None, rate_key: str | None = None) -> dict:
    """Per-image metrics of the 8-bit adversarial images replayed through ONNX Runtime.

    ``clean``: ONNX Runtime outputs on ``x8`` (computed when None).  ``rate_key``: a per-image output (a
    codec's ``bpp``) reported clean and attacked."""
    if not is_8bit(adv8):
        raise AssertionError("adversarial images must be 8-bit before replay")
    clean = clean if clean is not None else model.run(x8)
    adv = model.run(adv8)
    rows = []
    for i in range(len(x8)):
        y0, y1 = clean[model.output][i], adv[model.output][i]
        mse_clean = squared_error(y0, target[i], crop_border=crop)
        mse_adv = squared_error(y1, target[i], crop_border=crop)
        mse_in = float(np.mean((adv8[i].astype(np.float64) - x8[i]) ** 2))
        mse_out = squared_error(y1, y0, crop_border=crop)
        row = {"psnr_clean": psnr_of_mse(mse_clean), "psnr_adv": psnr_of_mse(mse_adv),
               "linf_255": float(np.max(np.abs(adv8[i].astype(np.float64) - x8[i])) * 255),
               "mse_in": mse_in, "mse_out": mse_out, "vi_db": vulnerability_index(mse_out, mse_in)}
        if rate_key:
            row["bpp_clean"] = float(np.ravel(clean[rate_key][i])[0])
            row["bpp_adv"] = float(np.ravel(adv[rate_key][i])[0])
        rows.append(row)
    return {"images": rows, **{f"mean_{k}": float(np.mean([r[k] for r in rows])) for k in rows[0]}}
