"""Real bitstreams for the codec: entropy coding in Python around the four transforms.

The transforms ``g_a``, ``h_a``, ``h_s``, ``g_s`` run either in PyTorch (:meth:`Codec.from_torch`) or as
the ONNX graphs of :func:`attacks.compression.export.export_transforms` in onnxruntime
(:meth:`Codec.from_onnx`); the entropy coding is an ANS coder from ``constriction`` (optional extra
``codec``: ``pip install 'hardener[codec]'``; :func:`available` says whether it is installed).

Bitstream of one image (``Codec.compress``): a 14-byte header ``b"SH"``, format version (uint8), unused
(uint8), H and W in pixels, ``Kz`` and ``Ky`` (all little-endian uint16: the symbol ranges
``[-Kz, Kz]`` and ``[-Ky, Ky]`` that the coder used, set from the largest ``|symbol|`` of this image, so
no value can fall outside and the code is lossless for any input), ``n`` (uint16, reserved, 0); then
one ANS stream (uint32 words) holding ``y_hat`` encoded first and ``z_hat`` on top of it, so the decoder
pops ``z_hat``, runs ``h_s`` and then pops ``y_hat``.

* ``z_hat``: ``constriction.stream.model.Categorical(perfect=False)`` over ``[-Kz, Kz]``, probabilities
  of channel ``c`` = ``cdf_c(k + 1/2) - cdf_c(k - 1/2)`` of the factorised prior, evaluated in numpy
  (:class:`FactorisedDensity`) from the model's parameters.
* ``y_hat``: ``QuantizedGaussian(-Ky, Ky)`` with mean 0 and standard deviation ``max(h_s(z_hat), 0.11)``
  rounded UP to the next entry of :data:`SCALE_TABLE` (64 scales, log-spaced from 0.11 to 256, as
  CompressAI's ``GaussianConditional``), elementwise.  The table makes a stream decodable by another
  runtime: PyTorch's and ONNX Runtime's ``h_s`` differ by ~1e-7, and an ANS decoder whose probabilities
  differ at all from the encoder's decodes garbage.  (A scale within ~1e-7 of a table entry could still
  round differently; with 64 entries that is rare, not impossible.)

``constriction`` rounds each distribution to fixed-point probabilities (24 bits, every symbol in range
at least the smallest one), and the table widens each scale by up to 13 %, so the real size is a little
above the likelihood estimate: measured in the cards ``attacks/teachers/codec_q*.md``.
"""
from __future__ import annotations

import importlib.util
import struct
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .model import LIKELIHOOD_BOUND, SCALE_BOUND

MAGIC = b"SH"
VERSION = 1
SCALE_TABLE = np.exp(np.linspace(np.log(SCALE_BOUND), np.log(256.0), 64))
"""The 64 Gaussian scales the coder can use (CompressAI's default table: log-spaced from 0.11 to 256); each
predicted scale is rounded up to the next entry."""
_HEADER = struct.Struct("<2sBBHHHHH")  # magic, version, unused, H, W, Kz, Ky, reserved


def available() -> bool:
    """Whether ``constriction`` (the entropy coder) is installed."""
    return importlib.util.find_spec("constriction") is not None


def _constriction():
    try:
        import constriction
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("real bitstreams need constriction: pip install 'hardener[codec]' "
                          "(or pip install constriction)") from exc
    return constriction


# --------------------------------------------------------------------------
# The factorised prior in numpy
# --------------------------------------------------------------------------
def _softplus(a: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, a)


def _sigmoid(a: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * a))


class FactorisedDensity:
    """The factorised prior of :class:`attacks.compression.model.EntropyBottleneck` in float64 numpy:
    ``pmf(k)`` on any integer range, so the coder can cover every symbol of any input."""

    def __init__(self, matrices: list[np.ndarray], biases: list[np.ndarray], factors: list[np.ndarray]) -> None:
        # Stored already transformed: softplus(matrix), bias, tanh(factor).
        self.matrices = [np.asarray(m, np.float64) for m in matrices]
        self.biases = [np.asarray(b, np.float64) for b in biases]
        self.factors = [np.asarray(f, np.float64) for f in factors]
        self.channels = self.matrices[0].shape[0]

    @classmethod
    def from_module(cls, eb) -> "FactorisedDensity":
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            return cls([F.softplus(m).double().numpy() for m in eb.matrices],
                       [b.double().numpy() for b in eb.biases],
                       [torch.tanh(f).double().numpy() for f in eb.factors])

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for i, m in enumerate(self.matrices):
            out[f"matrix{i}"] = m
            out[f"bias{i}"] = self.biases[i]
        for i, f in enumerate(self.factors):
            out[f"factor{i}"] = f
        return out

    @classmethod
    def from_arrays(cls, arrays) -> "FactorisedDensity":
        n = sum(1 for k in arrays if k.startswith("matrix"))
        return cls([arrays[f"matrix{i}"] for i in range(n)], [arrays[f"bias{i}"] for i in range(n)],
                   [arrays[f"factor{i}"] for i in range(n - 1)])

    def _logits(self, v: np.ndarray) -> np.ndarray:
        """v (C, 1, K) -> (C, 1, K)."""
        logits = v
        for i, m in enumerate(self.matrices):
            logits = np.matmul(m, logits) + self.biases[i]
            if i < len(self.factors):
                logits = logits + self.factors[i] * np.tanh(logits)
        return logits

    def pmf(self, k: int) -> np.ndarray:
        """(C, 2k+1) probabilities of the integers ``-k..k`` for every channel (not renormalised)."""
        v = np.broadcast_to(np.arange(-k, k + 1, dtype=np.float64), (self.channels, 1, 2 * k + 1))
        lower, upper = self._logits(v - 0.5), self._logits(v + 0.5)
        sign = -np.sign(lower + upper)
        return np.abs(_sigmoid(sign * upper) - _sigmoid(sign * lower))[:, 0, :]


# --------------------------------------------------------------------------
# The codec
# --------------------------------------------------------------------------
Transform = Callable[[np.ndarray], np.ndarray]


class Codec:
    """Compress one image to bytes and back.  ``g_a``/``h_a``/``h_s``/``g_s``: float32 numpy callables
    (``h_a`` takes ``y`` and applies ``|.|`` itself; ``h_s`` returns raw scales, floored here at
    ``scale_bound``)."""

    def __init__(self, g_a: Transform, h_a: Transform, h_s: Transform, g_s: Transform,
                 density: FactorisedDensity, scale_bound: float = SCALE_BOUND, downsampling: int = 64) -> None:
        self.g_a, self.h_a, self.h_s, self.g_s = g_a, h_a, h_s, g_s
        self.density = density
        self.scale_bound = float(scale_bound)
        self.downsampling = int(downsampling)

    # -- constructors --------------------------------------------------
    @classmethod
    def from_torch(cls, model) -> "Codec":
        """Transforms run by the PyTorch ``ScaleHyperprior`` (eval mode, no grad)."""
        import torch

        model = model.eval()

        def wrap(fn):
            def run(a: np.ndarray) -> np.ndarray:
                with torch.no_grad():
                    return fn(torch.from_numpy(np.ascontiguousarray(a, np.float32))).numpy()
            return run

        return cls(wrap(model.g_a), wrap(lambda y: model.h_a(torch.abs(y))), wrap(model.h_s), wrap(model.g_s),
                   FactorisedDensity.from_module(model.entropy_bottleneck),
                   model.gaussian_conditional.scale_bound, model.downsampling)

    @classmethod
    def from_onnx(cls, folder, providers: Optional[list[str]] = None) -> "Codec":
        """Transforms from ``g_a.onnx``, ``h_a.onnx``, ``h_s.onnx``, ``g_s.onnx`` and the prior from
        ``entropy.npz`` in ``folder`` (written by :func:`attacks.compression.export.export_transforms`)."""
        import onnxruntime as ort

        folder = Path(folder)
        providers = providers or ["CPUExecutionProvider"]

        def wrap(name: str):
            sess = ort.InferenceSession(str(folder / f"{name}.onnx"), providers=providers)
            in_name = sess.get_inputs()[0].name

            def run(a: np.ndarray) -> np.ndarray:
                return sess.run(None, {in_name: np.ascontiguousarray(a, np.float32)})[0]
            return run

        with np.load(folder / "entropy.npz") as f:
            arrays = {k: f[k] for k in f.files}
        return cls(wrap("g_a"), wrap("h_a"), wrap("h_s"), wrap("g_s"), FactorisedDensity.from_arrays(arrays),
                   float(arrays["scale_bound"]), int(arrays["downsampling"]))

    # -- coding --------------------------------------------------------
    def _check(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != 3:
            raise ValueError(f"compress takes one image (1, 3, H, W) or (3, H, W), got {x.shape}")
        h, w = x.shape[-2:]
        if h % self.downsampling or w % self.downsampling or h > 65535 or w > 65535:
            raise ValueError(f"H and W must be multiples of {self.downsampling} (and < 65536), got {h}x{w}")
        return x

    def _z_probs(self, z_sym: np.ndarray, kz: int) -> np.ndarray:
        """(C*h*w, 2kz+1) probabilities, in the C-major order of ``z_sym.ravel()``."""
        table = self.density.pmf(kz)  # (C, 2kz+1)
        return np.repeat(table, z_sym.shape[1] * z_sym.shape[2], axis=0)

    def _raw_scales(self, z_hat: np.ndarray) -> np.ndarray:
        s = self.h_s(z_hat[None].astype(np.float32))[0]
        return np.maximum(s, self.scale_bound).astype(np.float64)

    def _scales(self, z_hat: np.ndarray) -> np.ndarray:
        """The scales the coder uses: ``h_s(z_hat)`` rounded UP to :data:`SCALE_TABLE`, so that encoder and
        decoder agree although their ``h_s`` may differ in the last bits (PyTorch vs ONNX Runtime)."""
        return SCALE_TABLE[np.minimum(np.searchsorted(SCALE_TABLE, self._raw_scales(z_hat), side="left"),
                                      len(SCALE_TABLE) - 1)]

    def compress(self, x: np.ndarray) -> bytes:
        """One image (values in [0, 1]) -> bytes (header + ANS words)."""
        cs = _constriction()
        x = self._check(x)
        y = self.g_a(x)
        z = self.h_a(y)
        y_sym = np.rint(y[0]).astype(np.int32)
        z_sym = np.rint(z[0]).astype(np.int32)
        kz = max(1, int(np.abs(z_sym).max()))
        ky = max(1, int(np.abs(y_sym).max()))
        if kz > 65535 or ky > 65535:
            raise ValueError(f"latent range too large to code (|z| <= {kz}, |y| <= {ky})")
        scales = self._scales(z_sym.astype(np.float32))
        coder = cs.stream.stack.AnsCoder()
        gauss = cs.stream.model.QuantizedGaussian(-ky, ky)
        coder.encode_reverse(y_sym.ravel(), gauss, np.zeros(y_sym.size), scales.ravel())
        cat = cs.stream.model.Categorical(perfect=False)
        coder.encode_reverse((z_sym + kz).ravel(), cat, self._z_probs(z_sym, kz))
        words = coder.get_compressed()
        header = _HEADER.pack(MAGIC, VERSION, 0, x.shape[2], x.shape[3], kz, ky, 0)
        return header + words.astype("<u4").tobytes()

    def decompress(self, data: bytes) -> np.ndarray:
        """bytes -> ``x_hat`` (1, 3, H, W) float32 (not clamped, as the model's ``x_hat``)."""
        cs = _constriction()
        if len(data) < _HEADER.size:
            raise ValueError("truncated bitstream")
        magic, version, _, h, w, kz, ky, _ = _HEADER.unpack_from(data)
        if magic != MAGIC or version != VERSION:
            raise ValueError(f"not a scale-hyperprior bitstream (magic {magic!r}, version {version})")
        words = np.frombuffer(data[_HEADER.size:], dtype="<u4").astype(np.uint32)
        coder = cs.stream.stack.AnsCoder(words)
        c_z = self.density.channels
        zshape = (c_z, h // self.downsampling, w // self.downsampling)
        cat = cs.stream.model.Categorical(perfect=False)
        dummy = np.zeros(zshape, np.int32)
        z_sym = coder.decode(cat, self._z_probs(dummy, kz)).reshape(zshape).astype(np.int32) - kz
        scales = self._scales(z_sym.astype(np.float32))
        gauss = cs.stream.model.QuantizedGaussian(-ky, ky)
        y_sym = coder.decode(gauss, np.zeros(scales.size), scales.ravel()).reshape(scales.shape)
        return self.g_s(y_sym[None].astype(np.float32))

    def latents(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The integer symbols ``(y_hat, z_hat)`` that :meth:`compress` codes (for tests and reports)."""
        x = self._check(x)
        y = self.g_a(x)
        return np.rint(y[0]).astype(np.int32), np.rint(self.h_a(y)[0]).astype(np.int32)

    def estimated_bits(self, x: np.ndarray) -> float:
        """Information content of the symbols under the model (float64, likelihoods floored at 1e-9 as
        in the model): what the likelihood-based bpp counts, computed here in numpy."""
        from math import erf, sqrt

        y_sym, z_sym = self.latents(x)
        kz = max(1, int(np.abs(z_sym).max()))
        pz = self._z_probs(z_sym, kz)[np.arange(z_sym.size), (z_sym + kz).ravel()]
        s = self._raw_scales(z_sym.astype(np.float32)).ravel()
        v = np.abs(y_sym.ravel()).astype(np.float64)
        verf = np.vectorize(erf)
        cdf = lambda t: 0.5 * (1.0 + verf(t / sqrt(2.0)))  # noqa: E731
        py = cdf((0.5 - v) / s) - cdf((-0.5 - v) / s)
        p = np.concatenate([np.maximum(pz, LIKELIHOOD_BOUND), np.maximum(py, LIKELIHOOD_BOUND)])
        return float(-np.log2(p).sum())


def stream_bits(data: bytes, header: bool = True) -> int:
    """Size of a bitstream in bits, with or without its 14-byte header."""
    return 8 * (len(data) if header else len(data) - _HEADER.size)
