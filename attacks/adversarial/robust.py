"""Adversarially robust codecs: Chen & Ma's adversarial fine-tuning, and the KD-guided recipe of 2403.06700.

Every recipe fine-tunes a trained codec (``attacks.compression.ScaleHyperprior``; the bundled ones by
default) with the rate-distortion loss ``lmbda * 255^2 * MSE + bpp`` (``attacks.compression.rd_loss``):

* :func:`adversarial_finetune` (Chen & Ma, arXiv 2112.08691, as the baseline): in every batch the first
  half of the crops is replaced by L_inf PGD adversarial versions (distortion against the clean crop, eps
  drawn per step from ``eps``, ``inner_steps`` PGD steps of size eps/2 with a random start, computed on the
  current model in eval mode); the distortion of every reconstruction is measured against the CLEAN crop.
* :func:`gradient_regularised_teacher` (2403.06700, step 1): clean crops, RD loss plus
  ``beta * lmbda * 255^2 * n * ||d MSE(f(x'), x) / d x'||^2`` at x' = x (the input gradient of the
  distortion against the fixed clean image, ``n`` values per image, per image then averaged; double
  back-propagation).  ``n * ||grad||^2`` has the units of an MSE, so ``beta`` is dimensionless.
* :func:`kd_student` (2403.06700, step 2): the baseline's batches (half adversarial, against the current
  student) plus distillation towards the robust teacher run on the CLEAN crops: ``alpha_y * MSE(y_s(x'),
  y_t(x))`` on the analysis latents (before quantisation) and ``alpha_x * lmbda * 255^2 * MSE(x_hat_s(x'),
  x_hat_t(x))`` on the reconstructions.  The student starts from the same codec as the baseline and sees
  the same batches and adversarial schedule, so the rows differ only by the teacher's guidance.

Shared: Adam, ``attacks.compression.train.lr_at`` schedule (2 % warm-up, cosine to 1 %) from ``lr``, global
gradient norm clipped at ``GRAD_CLIP``; data: random 64x64 crops of the training photos
(``attacks.data.patches``, chunk ``i`` seeded by ``(seed, i)``), quantisation noise from torch's global
generator seeded with ``seed``.  The model is trained in place and returned in eval mode.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from .pgd import pgd_linf


@dataclass
class RobustConfig:
    steps: int = 300
    batch: int = 8
    patch: int = 64
    lr: float = 1e-4  # fine-tuning: a tenth of the bundled codecs' training rate
    eps: tuple[float, ...] = (2.0, 4.0, 8.0)  # /255; one drawn per step
    inner_steps: int = 3  # PGD steps per training batch (20 at evaluation)
    adv_fraction: float = 0.5
    refresh: int = 25  # crops drawn in chunks of batch * refresh
    log_every: int = 50
    extra: dict = field(default_factory=dict)  # recipe-specific weights, recorded in the log

    def as_dict(self) -> dict:
        return asdict(self)


def _grad_clip() -> float:
    from attacks.compression.train import GRAD_CLIP

    return GRAD_CLIP


class _Batches:
    def __init__(self, cfg: RobustConfig, seed: int, photos=None):
        from attacks.data import load_photos

        self.cfg, self.seed = cfg, seed
        self.photos = load_photos("train") if photos is None else photos
        self.data = None

    def __call__(self, step: int) -> torch.Tensor:
        from attacks.data import patches

        cfg = self.cfg
        k = step % cfg.refresh
        if k == 0:
            seed = int(np.random.SeedSequence([self.seed, 0x5AFE, step // cfg.refresh]).generate_state(1)[0])
            self.data = torch.from_numpy(patches(self.photos, cfg.patch, cfg.batch * cfg.refresh, seed=seed))
        return self.data[k * cfg.batch:(k + 1) * cfg.batch]


def adversarial_half(model: nn.Module, x: torch.Tensor, cfg: RobustConfig, rng: np.random.Generator
                     ) -> tuple[torch.Tensor, int, float]:
    """``x`` with its first ``adv_fraction`` replaced by PGD examples against ``model`` (eval mode, no
    parameter gradients); returns (mixed batch, number adversarial, eps used in [0, 1] units)."""
    n_adv = int(round(cfg.adv_fraction * len(x)))
    eps = float(rng.choice(cfg.eps)) / 255.0
    if n_adv == 0:
        return x, 0, eps
    was_training = model.training
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        adv = pgd_linf(lambda v: model(v)["x_hat"], x[:n_adv], x[:n_adv], eps, cfg.inner_steps,
                       step_size=eps / 2, seed=int(rng.integers(2**31)), keep_best=False)
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)
    return torch.cat([adv, x[n_adv:]]), n_adv, eps


def input_gradient_penalty(model: nn.Module, x: torch.Tensor, create_graph: bool = True
                           ) -> tuple[torch.Tensor, dict]:
    """Mean over images of ``n * ||d MSE(f(x'), x) / d x'||^2`` at x' = x, and the forward output."""
    xin = x.detach().clone().requires_grad_(True)
    out = model(xin)
    per_image = (out["x_hat"] - x.detach()).pow(2).flatten(1).mean(1)
    grad, = torch.autograd.grad(per_image.sum(), xin, create_graph=create_graph)
    n = x[0].numel()
    return (n * grad.pow(2).flatten(1).sum(1)).mean(), out


def _train(model: nn.Module, lmbda: float, cfg: RobustConfig, seed: int, loss_fn, photos=None,
           progress=None) -> dict:
    """The shared loop: ``loss_fn(step, x_clean, rng) -> (loss, info dict)``."""
    from attacks.compression.train import lr_at

    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 0xAD7])
    batches = _Batches(cfg, seed, photos)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    log: list[dict] = []
    acc: dict[str, float] = {}
    n_acc = 0
    try:
        for step in range(cfg.steps):
            x = batches(step)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg.steps, cfg.lr)
            model.train()
            loss, info = loss_fn(step, x, rng)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), _grad_clip())
            opt.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"loss is {value} at step {step}")
            info["loss"] = value
            for k, v in info.items():
                acc[k] = acc.get(k, 0.0) + float(v)
            n_acc += 1
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                entry = {"step": step + 1, **{k: v / n_acc for k, v in acc.items()}}
                log.append(entry)
                if progress:
                    progress(entry)
                acc, n_acc = {}, 0
    finally:
        model.eval()
    return {"config": cfg.as_dict(), "lmbda": lmbda, "seed": seed, "log": log}


def adversarial_finetune(model: nn.Module, lmbda: float, cfg: RobustConfig | None = None, seed: int = 0,
                         photos=None, progress=None) -> dict:
    """Chen & Ma's adversarial fine-tuning (see the module docstring); returns the training log."""
    from attacks.compression import rd_loss

    cfg = cfg or RobustConfig()

    def loss_fn(step, x, rng):
        mixed, n_adv, eps = adversarial_half(model, x, cfg, rng)
        loss, bpp, mse = rd_loss(model(mixed), x, lmbda)
        return loss, {"bpp": bpp.detach(), "mse": mse.detach(), "adv": n_adv, "eps_255": eps * 255,
                      "linf_255": float((mixed - x).abs().max()) * 255}

    return _train(model, lmbda, cfg, seed, loss_fn, photos, progress)


def gradient_regularised_teacher(model: nn.Module, lmbda: float, beta: float = 1.0,
                                 cfg: RobustConfig | None = None, seed: int = 0, photos=None,
                                 progress=None) -> dict:
    """2403.06700's robust teacher: RD loss on clean crops + the input-gradient penalty (weight ``beta``)."""
    from attacks.compression import rd_loss

    cfg = cfg or RobustConfig()
    cfg.extra = {**cfg.extra, "beta": beta}

    def loss_fn(step, x, rng):
        penalty, out = input_gradient_penalty(model, x)
        loss, bpp, mse = rd_loss(out, x, lmbda)
        return loss + beta * lmbda * 255.0 ** 2 * penalty, {"bpp": bpp.detach(), "mse": mse.detach(),
                                                           "grad_penalty": penalty.detach()}

    return _train(model, lmbda, cfg, seed, loss_fn, photos, progress)


def kd_student(student: nn.Module, teacher: nn.Module, lmbda: float, alpha_y: float = 0.1,
               alpha_x: float = 1.0, cfg: RobustConfig | None = None, seed: int = 0, photos=None,
               progress=None) -> dict:
    """2403.06700's KD-guided adversarial training of ``student`` towards ``teacher`` (see the module
    docstring); the teacher is frozen and run in eval mode on the clean crops."""
    from attacks.compression import rd_loss

    cfg = cfg or RobustConfig()
    cfg.extra = {**cfg.extra, "alpha_y": alpha_y, "alpha_x": alpha_x}
    teacher = teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss_fn(step, x, rng):
        mixed, n_adv, eps = adversarial_half(student, x, cfg, rng)
        with torch.no_grad():
            t = teacher(x)
        out = student(mixed)
        loss, bpp, mse = rd_loss(out, x, lmbda)
        kd_y = (out["y"] - t["y"]).pow(2).mean()
        kd_x = (out["x_hat"] - t["x_hat"]).pow(2).mean()
        total = loss + alpha_y * kd_y + alpha_x * lmbda * 255.0 ** 2 * kd_x
        return total, {"bpp": bpp.detach(), "mse": mse.detach(), "kd_y": kd_y.detach(), "kd_x": kd_x.detach(),
                       "adv": n_adv, "eps_255": eps * 255}

    return _train(student, lmbda, cfg, seed, loss_fn, photos, progress)
