"""Learned image compression: a small scale-hyperprior codec (Balle et al. 2018) to attack and harden.

* :mod:`.model`   -- :class:`ScaleHyperprior` (plain PyTorch; why not CompressAI: see its docstring).
* :mod:`.rate`    -- :func:`bpp` and :func:`rd_loss` from the likelihoods (CompressAI conventions).
* :mod:`.train`   -- :func:`train_codec` on random crops of the real training photos.
* :mod:`.entropy` -- real bitstreams (ANS coding with ``constriction``, optional extra ``codec``); a stream
  decodes reliably only with the runtime (PyTorch or onnxruntime) that encoded it.
* :mod:`.export`  -- ONNX graphs: the four transforms ``g_a``/``g_s``/``h_a``/``h_s`` on demand, and the
  end-to-end ``x -> (x_hat, bpp)`` graph bundled as ``attacks/teachers/codec_q*.onnx``.

Bundled codecs (trained by ``scripts/train_codec.py``, cards ``attacks/teachers/codec_q*.md``):
:data:`BUNDLED`, :data:`LAMBDAS`, :func:`load_bundled`, :func:`bundled_onnx`.
"""
from __future__ import annotations

from pathlib import Path

from .model import ScaleHyperprior, crop64
from .rate import bpp, bpp_per_image, rd_loss

TEACHERS_DIR = Path(__file__).resolve().parents[1] / "teachers"

BUNDLED = ("codec_q1", "codec_q2")
"""Names of the bundled codecs, lowest rate first."""

LAMBDAS = {"codec_q1": 0.0035, "codec_q2": 0.013}
"""Rate-distortion trade-off each bundled codec was trained with (``loss = lmbda * 255^2 * mse + bpp``):
``codec_q1`` from scratch (4000 steps), ``codec_q2`` fine-tuned from ``codec_q1`` (4000 more steps)."""


def _check_name(name: str) -> None:
    if name not in BUNDLED:
        raise ValueError(f"unknown bundled codec {name!r}; expected one of {BUNDLED}")


def bundled_pt(name: str) -> Path:
    """Path of a bundled codec's float32 ``state_dict`` (``attacks/teachers/<name>.pt``)."""
    _check_name(name)
    return TEACHERS_DIR / f"{name}.pt"


def bundled_onnx(name: str) -> Path:
    """Path of a bundled codec's end-to-end ONNX graph ``x -> (x_hat, bpp)``."""
    _check_name(name)
    return TEACHERS_DIR / f"{name}.onnx"


def load_bundled(name: str) -> ScaleHyperprior:
    """A bundled codec (N=32, M=48) in eval mode, weights from ``attacks/teachers/<name>.pt``."""
    import torch

    path = bundled_pt(name)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (train it: python scripts/train_codec.py --help)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = ScaleHyperprior(N=32, M=48)
    model.load_state_dict(state)
    return model.eval()


__all__ = ["BUNDLED", "LAMBDAS", "ScaleHyperprior", "bpp", "bpp_per_image", "bundled_onnx", "bundled_pt",
           "crop64", "load_bundled", "rd_loss", "TEACHERS_DIR"]
