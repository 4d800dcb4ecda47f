"""ONNX export of the codec, as the learned-compression ecosystem does it: the transforms as graphs, the
entropy coding in Python (:mod:`attacks.compression.entropy`), plus one end-to-end graph for the attack
suite and for ``harden``.

* :func:`export_transforms` writes ``g_a.onnx`` (x -> y), ``h_a.onnx`` (y -> z, takes ``|y|`` itself),
  ``h_s.onnx`` (z_hat -> raw scales), ``g_s.onnx`` (y_hat -> x_hat) and ``entropy.npz`` (the factorised
  prior's parameters, the scale bound) into a folder, on demand (not shipped):
  ``python -m attacks.compression.export attacks/teachers/codec_q1.pt -o /tmp/codec_q1``.
* :func:`export_end_to_end` writes the bundled ``attacks/teachers/codec_q*.onnx``: input ``x``
  (N, 3, H, W) float32, H and W multiples of 64, dynamic N/H/W; outputs ``x_hat`` (N, 3, H, W), the
  decoded image, not clamped) and ``bpp`` (N,), the per-image rate estimate ``-sum log2 p / (H W)``
  from the likelihoods); quantisation by rounding (``Round``).

All graphs: TorchScript exporter (``torch.onnx.export(..., dynamo=False)``), opset 17, one file, the
module paths (``g_s.1``, ``g_a.3``, ...) kept in the node names (``/g_s/g_s.1/Mul``), which ``harden``'s
selectors resolve.
"""
from __future__ import annotations

import argparse
import io
import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .model import ScaleHyperprior, frozen_copy

OPSET = 17


class EndToEnd(nn.Module):
    """``x -> (x_hat, bpp)`` of an eval-mode :class:`ScaleHyperprior` with plain rounding.  Holds the
    codec's sub-modules under the same attribute names, so module paths in the graph are the codec's
    (``g_a.0``, ``g_s.1``, ...)."""

    def __init__(self, model: ScaleHyperprior) -> None:
        super().__init__()
        model = frozen_copy(model)
        self.g_a, self.g_s, self.h_a, self.h_s = model.g_a, model.g_s, model.h_a, model.h_s
        self.entropy_bottleneck = model.entropy_bottleneck
        self.gaussian_conditional = model.gaussian_conditional

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.g_a(x)
        y_hat = torch.round(y)
        z_hat = torch.round(self.h_a(torch.abs(y)))
        b, c, h, w = z_hat.shape
        z_lik = self.entropy_bottleneck.likelihood_flat(z_hat.transpose(0, 1).reshape(c, 1, -1))
        z_lik = z_lik.clamp_min(1e-9).reshape(c, b, h, w).transpose(0, 1)
        scales = self.h_s(z_hat)
        y_lik = self.gaussian_conditional.likelihood(y_hat, scales)
        x_hat = self.g_s(y_hat)
        bits = (torch.log(y_lik).flatten(1).sum(1) + torch.log(z_lik).flatten(1).sum(1)) * (-1.0 / math.log(2.0))
        return x_hat, bits / (x.shape[2] * x.shape[3])


class _Transform(nn.Module):
    def __init__(self, module: nn.Module, name: str, absolute: bool = False) -> None:
        super().__init__()
        setattr(self, name, module)
        self._name, self.absolute = name, absolute

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return getattr(self, self._name)(torch.abs(v) if self.absolute else v)


def _export_bytes(module: nn.Module, example: torch.Tensor, input_name: str, output_names: list[str],
                  dynamic: dict) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), buf, dynamo=False, opset_version=OPSET,
                          input_names=[input_name], output_names=output_names, dynamic_axes=dynamic,
                          do_constant_folding=True)
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same folder, then rename (``hardener.model_io.atomic_write``: usual permissions)."""
    from hardener.model_io import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(data, None, path)


def end_to_end_bytes(model: ScaleHyperprior, size: int = 64) -> bytes:
    """The end-to-end graph's serialised ModelProto (see the module docstring)."""
    import onnx

    spatial = {0: "batch", 2: "height", 3: "width"}
    with torch.no_grad():
        data = _export_bytes(EndToEnd(model.eval()), torch.rand(1, 3, size, size), "x", ["x_hat", "bpp"],
                             {"x": spatial, "x_hat": spatial, "bpp": {0: "batch"}})
    proto = onnx.load_from_string(data)
    proto.doc_string = ("Scale-hyperprior codec (attacks.compression): x (N,3,H,W) in [0,1], H and W multiples of "
                        "64 -> x_hat (decoded image, not clamped), bpp (per-image rate estimate from the "
                        "likelihoods); quantisation by rounding.")
    return proto.SerializeToString()


def export_end_to_end(model: ScaleHyperprior, path, metadata: dict | None = None) -> Path:
    """Write the end-to-end graph to ``path`` atomically (temp file then rename); ``metadata`` -> model-level
    ``metadata_props``."""
    import onnx

    proto = onnx.load_from_string(end_to_end_bytes(model))
    for k, v in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(k), str(v)
    onnx.checker.check_model(proto, full_check=True)
    path = Path(path)
    _write_atomic(path, proto.SerializeToString())
    return path


def export_transforms(model: ScaleHyperprior, folder) -> dict[str, Path]:
    """Write ``g_a.onnx``, ``h_a.onnx``, ``h_s.onnx``, ``g_s.onnx`` and ``entropy.npz`` into ``folder``
    (each atomically); returns their paths.  Dynamic batch/height/width."""
    from .entropy import FactorisedDensity

    model = frozen_copy(model)
    folder = Path(folder)
    n, m = model.N, model.M
    specs = {  # name: (module, |.| first, input name, output name, example channels, example side)
        "g_a": (model.g_a, False, "x", "y", 3, 64),
        "h_a": (model.h_a, True, "y", "z", m, 4),
        "h_s": (model.h_s, False, "z_hat", "scales", n, 1),
        "g_s": (model.g_s, False, "y_hat", "x_hat", m, 4),
    }
    out = {}
    for name, (module, absolute, iname, oname, ch, side) in specs.items():
        dyn = {0: "batch", 2: "height", 3: "width"}
        with torch.no_grad():
            data = _export_bytes(_Transform(module, name, absolute), torch.rand(1, ch, side, side), iname, [oname],
                                 {iname: dyn, oname: dyn})
        out[name] = folder / f"{name}.onnx"
        _write_atomic(out[name], data)
    arrays = FactorisedDensity.from_module(model.entropy_bottleneck).to_arrays()
    arrays["scale_bound"] = np.float64(model.gaussian_conditional.scale_bound)
    arrays["downsampling"] = np.int64(model.downsampling)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    out["entropy"] = folder / "entropy.npz"
    _write_atomic(out["entropy"], buf.getvalue())
    return out


def load_state(path) -> ScaleHyperprior:
    """A :class:`ScaleHyperprior` (N=32, M=48) from a float32 ``state_dict`` file, eval mode."""
    model = ScaleHyperprior()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m attacks.compression.export",
        description="Write a codec's ONNX graphs from its state_dict (.pt): by default the four transforms "
                    "g_a/h_a/h_s/g_s + entropy.npz into the folder -o (for attacks.compression.entropy.Codec."
                    "from_onnx); with --end-to-end the single x -> (x_hat, bpp) graph to the file -o.")
    p.add_argument("weights", help="a state_dict file, e.g. attacks/teachers/codec_q1.pt, or a bundled name (codec_q1)")
    p.add_argument("-o", "--output", required=True, help="output folder (transforms) or .onnx file (--end-to-end)")
    p.add_argument("--end-to-end", action="store_true", help="write the end-to-end graph instead of the transforms")
    args = p.parse_args(argv)
    from . import BUNDLED, bundled_pt

    weights = bundled_pt(args.weights) if args.weights in BUNDLED else Path(args.weights)
    model = load_state(weights)
    if args.end_to_end:
        print(export_end_to_end(model, args.output))
    else:
        for path in export_transforms(model, args.output).values():
            print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
