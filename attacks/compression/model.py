"""A small scale-hyperprior image codec (Balle et al. 2018, "Variational image compression with a scale
hyperprior"), written in plain PyTorch.

Layout (CompressAI's ``ScaleHyperprior`` with ``N`` and ``M`` channels)::

    y = g_a(x)              4 x [Conv 5x5 stride 2], GDN between them          (3 -> N -> N -> N -> M)
    z = h_a(|y|)            Conv 3x3 s1, ReLU, Conv 5x5 s2, ReLU, Conv 5x5 s2    (M -> N -> N -> N)
    z_hat = Q(z)            likelihoods from a factorised prior (EntropyBottleneck)
    sigma = h_s(z_hat)      Deconv 5x5 s2, ReLU, Deconv 5x5 s2, ReLU, Conv 3x3 s1, ReLU  (N -> N -> N -> M)
    y_hat = Q(y)            likelihoods from a zero-mean Gaussian with scale sigma (GaussianConditional)
    x_hat = g_s(y_hat)      4 x [Deconv 5x5 stride 2], inverse GDN between them (M -> N -> N -> N -> 3)

The total downsampling is 64 (16 in ``g_a``, 4 more in ``h_a``): H and W must be multiples of 64.

Quantisation ``Q``: additive uniform noise U(-1/2, 1/2) in ``train()`` mode (the usual differentiable
proxy), rounding in ``eval()`` mode with a straight-through gradient ``v + (round(v) - v).detach()``, so
an attacker can differentiate the eval-mode model end to end.  ``y`` and ``z`` are rounded around 0 (no
learned medians).  ``y + (round(y) - y)`` equals ``round(y)`` exactly in float32 (the subtraction is exact by
Sterbenz's lemma for |y| >= 1/2 and gives -y below), so eval mode decodes exactly the rounded latents, as
the exported graphs (plain ``Round``) do.

Why not CompressAI: CompressAI 1.2.8 installs from a wheel, but ``import compressai`` fails beside this
project's CPU torch 2.13: it imports torchvision, and PyPI's torchvision is a CUDA build whose operators do
not register (``operator torchvision::nms does not exist``); pinning torchvision 0.28.0 does not help (it
works only beside torch 2.14.1 + torchvision 0.29.1, the ``spandrel`` extra's pins).  No pretrained codec
weights ship in any PyPI or Debian package either.  The pieces needed (GDN, the factorised prior, the
Gaussian conditional) are ~200 lines here, and owning them lets us (a) build the Gaussian's ``erfc`` from
ONNX operators (there is no ``Erfc`` op; ``1 - erf`` exports but loses the tails to float32 cancellation,
see :func:`erfc`) and write the prior's sigmoid as ``1 / (1 + exp(-v))`` (ONNX Runtime's ``Sigmoid``
clamps its input), so the TorchScript exporter's opset-17 graph matches PyTorch to ~1e-6 in bpp, and
(b) floor GDN's beta at 1e-3, which this small model needs to train stably (with no floor and no gradient
clipping its loss explodes near step 1,700).

Differences from CompressAI worth knowing: GDN's ``beta``/``gamma`` are stored directly and floored
(``beta >= 1e-3``, ``gamma >= 0``) instead of CompressAI's squared reparametrisation; the factorised prior
has no learned quantiles/medians and no auxiliary loss (the entropy coder evaluates the prior's CDF on
the integers it needs, :mod:`attacks.compression.entropy`); the Gaussian CDF uses Numerical Recipes'
``erfcc`` (:func:`erfc`: relative error < 1.2e-7 in float64; in float32 within 2x of ``torch.erfc``'s) instead
of ``torch.erfc``, evaluated at ``t = (1/2 - |y|) / sigma`` and ``(-1/2 - |y|) / sigma`` as CompressAI does.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

SCALE_BOUND = 0.11
"""Lower bound on the Gaussian scales (CompressAI's default)."""
LIKELIHOOD_BOUND = 1e-9
"""Lower bound on every likelihood (CompressAI's default): at most ~29.9 bits per symbol."""
GDN_BETA_MIN = 1e-3
"""Floor of GDN's beta: the small model's loss explodes without it (NOTES.md)."""


class _LowerBound(torch.autograd.Function):
    """``max(x, bound)`` whose gradient still flows where it would push ``x`` up (CompressAI's LowerBound):
    a parameter that fell onto the floor can leave it."""

    @staticmethod
    def forward(ctx, x, bound: float):
        ctx.save_for_backward(x)
        ctx.bound = bound
        return x.clamp_min(bound)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        pass_through = (x >= ctx.bound) | (grad < 0)
        return grad * pass_through.to(grad.dtype), None


def lower_bound(x: torch.Tensor, bound: float) -> torch.Tensor:
    """``max(x, bound)``: CompressAI's gradient rule when autograd records, a plain ``clamp_min`` otherwise
    (and always while exporting, so the graph holds a ``Max``/``Clip``, not a Python op)."""
    if torch.is_grad_enabled() and x.requires_grad and not torch.jit.is_tracing():
        return _LowerBound.apply(x, bound)
    return x.clamp_min(bound)


def quantize(v: torch.Tensor, training: bool) -> torch.Tensor:
    """Uniform noise in training, rounding with a straight-through gradient otherwise."""
    if training:
        return v + torch.empty_like(v).uniform_(-0.5, 0.5)
    return v + (torch.round(v) - v).detach()


# --------------------------------------------------------------------------
# GDN
# --------------------------------------------------------------------------
class GDN(nn.Module):
    """Generalised divisive normalisation ``y_i = x_i / sqrt(beta_i + sum_j gamma_ij x_j^2)`` (Balle 2016);
    ``inverse=True`` multiplies instead (IGDN, used in ``g_s``)."""

    def __init__(self, channels: int, inverse: bool = False, gamma_init: float = 0.1) -> None:
        super().__init__()
        self.inverse = bool(inverse)
        self.channels = int(channels)
        self.beta = nn.Parameter(torch.ones(channels))
        self.gamma = nn.Parameter(gamma_init * torch.eye(channels))
        self._frozen: tuple[torch.Tensor, torch.Tensor] | None = None

    def freeze(self) -> None:
        """Fix the floored ``gamma``/``beta`` as plain tensors (constants in an exported graph: ``Conv`` on
        ``x * x`` with those weights, no ``Clip``/``Reshape`` ops).  Export copies only; see
        :func:`frozen_copy`."""
        with torch.no_grad():
            c = self.channels
            self._frozen = (self.gamma.clamp_min(0.0).reshape(c, c, 1, 1).clone(),
                            self.beta.clamp_min(GDN_BETA_MIN).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._frozen is not None:
            weight, bias = self._frozen
        else:
            c = self.channels
            weight = lower_bound(self.gamma, 0.0).reshape(c, c, 1, 1)
            bias = lower_bound(self.beta, GDN_BETA_MIN)
        norm = F.conv2d(x * x, weight, bias)
        return x * torch.sqrt(norm) if self.inverse else x / torch.sqrt(norm)


def _conv(cin: int, cout: int, k: int = 5, stride: int = 2) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)


def _deconv(cin: int, cout: int, k: int = 5, stride: int = 2) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(cin, cout, k, stride=stride, padding=k // 2, output_padding=stride - 1)


# --------------------------------------------------------------------------
# Entropy models
# --------------------------------------------------------------------------
def _sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``1 / (1 + exp(-v))``, written out: ONNX Runtime's CPU ``Sigmoid`` clamps its input to about +-18
    (so ``sigmoid(-30)`` comes out as ``sigmoid(-18)``, 1.5e-8), which loses the factorised prior's tail
    likelihoods (their bits differed from PyTorch's by ~7 bits per image); ``Exp`` keeps them."""
    return 1.0 / (1.0 + torch.exp(-v))


class EntropyBottleneck(nn.Module):
    """Factorised (per-channel, non-parametric) prior of Balle et al. 2018, appendix 6.1; CompressAI's
    ``EntropyBottleneck`` without quantiles/medians.

    The density of channel ``c`` is the derivative of a monotone CDF ``sigmoid(f_c(v))``, ``f_c`` a small
    per-channel network (filters ``(1, 3, 3, 3, 1)``).  The likelihood of a quantised value ``v`` is
    ``cdf(v + 1/2) - cdf(v - 1/2)``, computed on the side of the median where it is accurate.
    """

    def __init__(self, channels: int, filters: tuple[int, ...] = (3, 3, 3, 3), init_scale: float = 10.0) -> None:
        super().__init__()
        self.channels = int(channels)
        self.filters = tuple(int(f) for f in filters)
        dims = (1,) + self.filters + (1,)
        scale = init_scale ** (1.0 / (len(self.filters) + 1))
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for i in range(len(self.filters) + 1):
            init = math.log(math.expm1(1.0 / scale / dims[i + 1]))
            self.matrices.append(nn.Parameter(torch.full((channels, dims[i + 1], dims[i]), init)))
            self.biases.append(nn.Parameter(torch.empty(channels, dims[i + 1], 1).uniform_(-0.5, 0.5)))
            if i < len(self.filters):
                self.factors.append(nn.Parameter(torch.zeros(channels, dims[i + 1], 1)))
        self._frozen: tuple[list, list] | None = None

    def freeze(self) -> None:
        """Fix ``softplus(matrices)`` and ``tanh(factors)`` as plain tensors (export copies only)."""
        with torch.no_grad():
            self._frozen = ([F.softplus(m).clone() for m in self.matrices],
                            [torch.tanh(f).clone() for f in self.factors])

    def logits_cumulative(self, v: torch.Tensor) -> torch.Tensor:
        """``f_c(v)`` for ``v`` of shape (C, 1, K) -> (C, 1, K)."""
        if self._frozen is not None:
            matrices, factors = self._frozen
        else:
            matrices = [F.softplus(m) for m in self.matrices]
            factors = [torch.tanh(f) for f in self.factors]
        logits = v
        for i, matrix in enumerate(matrices):
            logits = torch.matmul(matrix, logits) + self.biases[i]
            if i < len(factors):
                logits = logits + factors[i] * torch.tanh(logits)
        return logits

    def likelihood_flat(self, v: torch.Tensor) -> torch.Tensor:
        """Likelihood of quantised values ``v`` of shape (C, 1, K) (unbounded below)."""
        lower = self.logits_cumulative(v - 0.5)
        upper = self.logits_cumulative(v + 0.5)
        sign = -torch.sign(lower + upper).detach()
        return torch.abs(_sigmoid(sign * upper) - _sigmoid(sign * lower))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_hat, likelihoods)`` for ``z`` of shape (B, C, h, w)."""
        z_hat = quantize(z, self.training)
        b, c, h, w = z_hat.shape
        flat = z_hat.transpose(0, 1).reshape(c, 1, -1)
        lik = self.likelihood_flat(flat).reshape(c, b, h, w).transpose(0, 1)
        return z_hat, lower_bound(lik, LIKELIHOOD_BOUND)


# Numerical Recipes' ``erfcc`` (Press et al., 2nd ed., section 6.2): a Chebyshev fit of erfc with fractional
# (relative) error below 1.2e-7 everywhere, built from exp and arithmetic only.
_ERFC_COEFFS = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807, -1.13520398,
                1.48851587, -0.82215223, 0.17087277)


def erfc(x: torch.Tensor) -> torch.Tensor:
    """``erfc(x)`` with relative error < 1.2e-7 (Numerical Recipes' ``erfcc``), from ``exp`` and arithmetic.

    Why not ``torch.erfc``: ONNX has ``Erf`` but no ``Erfc``, and ``1 - erf(x)`` cancels catastrophically in
    float32 for x > ~3 (it reaches 0 at x ~ 3.9, where erfc is still 3e-8): the Gaussian likelihoods of
    tail symbols then fall to the 1e-9 floor, and PyTorch and ONNX Runtime disagree on which ones (their
    ``erf`` differ in the last bit).  This form keeps full relative precision down to the floor and
    exports as plain ``Abs``/``Div``/``Mul``/``Add``/``Exp``/``Where`` nodes.
    """
    z = torch.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = t * _ERFC_COEFFS[-1] + _ERFC_COEFFS[-2]
    for c in reversed(_ERFC_COEFFS[:-2]):
        poly = poly * t + c
    ans = t * torch.exp(poly - z * z)
    return torch.where(x >= 0, ans, 2.0 - ans)


def standard_normal_cdf(t: torch.Tensor) -> torch.Tensor:
    """``Phi(t) = 0.5 * erfc(-t / sqrt 2)`` (:func:`erfc`: accurate in the lower tail, exportable)."""
    return 0.5 * erfc(t * (-1.0 / math.sqrt(2.0)))


class GaussianConditional(nn.Module):
    """Zero-mean Gaussian conditional on ``y`` with per-element scales from the hyper-decoder;
    likelihood of a quantised value ``v``: ``Phi((1/2 - |v|) / s) - Phi((-1/2 - |v|) / s)``."""

    def __init__(self, scale_bound: float = SCALE_BOUND) -> None:
        super().__init__()
        self.scale_bound = float(scale_bound)

    def likelihood(self, y_hat: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        s = lower_bound(scales, self.scale_bound)
        v = torch.abs(y_hat)
        upper = standard_normal_cdf((0.5 - v) / s)
        lower = standard_normal_cdf((-0.5 - v) / s)
        return lower_bound(upper - lower, LIKELIHOOD_BOUND)

    def forward(self, y: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y_hat = quantize(y, self.training)
        return y_hat, self.likelihood(y_hat, scales)


# --------------------------------------------------------------------------
# The codec
# --------------------------------------------------------------------------
class ScaleHyperprior(nn.Module):
    """Balle 2018 scale hyperprior with ``N`` hidden and ``M`` latent channels (defaults: 32 and 48, about
    321k parameters).  Module paths: ``g_a.{0..6}``, ``g_s.{0..6}``, ``h_a.{0..4}``, ``h_s.{0..5}``,
    ``entropy_bottleneck``, ``gaussian_conditional``.

    ``forward(x)``, ``x`` (B, 3, H, W) in [0, 1] with H, W multiples of 64, returns
    ``{"x_hat", "likelihoods": {"y", "z"}, "y"}`` (``y = g_a(x)`` before quantisation); ``x_hat`` is not
    clamped.
    """

    downsampling = 64

    def __init__(self, N: int = 32, M: int = 48) -> None:
        super().__init__()
        self.N, self.M = int(N), int(M)
        self.g_a = nn.Sequential(
            _conv(3, N), GDN(N), _conv(N, N), GDN(N), _conv(N, N), GDN(N), _conv(N, M))
        self.g_s = nn.Sequential(
            _deconv(M, N), GDN(N, inverse=True), _deconv(N, N), GDN(N, inverse=True),
            _deconv(N, N), GDN(N, inverse=True), _deconv(N, 3))
        self.h_a = nn.Sequential(
            _conv(M, N, 3, 1), nn.ReLU(inplace=True), _conv(N, N), nn.ReLU(inplace=True), _conv(N, N))
        self.h_s = nn.Sequential(
            _deconv(N, N), nn.ReLU(inplace=True), _deconv(N, N), nn.ReLU(inplace=True),
            _conv(N, M, 3, 1), nn.ReLU(inplace=True))
        self.entropy_bottleneck = EntropyBottleneck(N)
        self.gaussian_conditional = GaussianConditional()

    def check_size(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W), got {tuple(x.shape)}")
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if h % self.downsampling or w % self.downsampling:
            raise ValueError(f"H and W must be multiples of {self.downsampling}, got {h}x{w} "
                             f"(crop with attacks.compression.crop64)")

    def forward(self, x: torch.Tensor) -> dict:
        if not torch.jit.is_tracing():
            self.check_size(x)
        y = self.g_a(x)
        z = self.h_a(torch.abs(y))
        z_hat, z_lik = self.entropy_bottleneck(z)
        scales = self.h_s(z_hat)
        y_hat, y_lik = self.gaussian_conditional(y, scales)
        x_hat = self.g_s(y_hat)
        return {"x_hat": x_hat, "likelihoods": {"y": y_lik, "z": z_lik}, "y": y}


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode whose GDN and factorised-prior parameters are frozen into constants
    (:meth:`GDN.freeze`, :meth:`EntropyBottleneck.freeze`): same outputs, a simpler exported graph."""
    import copy

    model = copy.deepcopy(model).eval()
    for module in model.modules():
        if isinstance(module, (GDN, EntropyBottleneck)):
            module.freeze()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def crop64(x, multiple: int = 64):
    """Top-left crop of the last two axes (an (..., H, W) tensor or array) to multiples of ``multiple``."""
    h, w = x.shape[-2], x.shape[-1]
    h2, w2 = h - h % multiple, w - w % multiple
    if h2 == 0 or w2 == 0:
        raise ValueError(f"image {h}x{w} is smaller than {multiple}x{multiple}")
    return x[..., :h2, :w2]
