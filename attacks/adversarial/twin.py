"""Differentiable PyTorch twins of ONNX models, checked against ONNX Runtime before use.

A white-box attack needs gradients; ONNX Runtime gives none.  The twin is a PyTorch module that computes
what the ONNX file computes:

* restoration teachers (the residual-restorer family of ``attacks/teachers/*.md`` and
  ``hardener/assets/TEACHER.md``, PyTorch class :class:`attacks.students.ResidualRestorer`): the file's
  initializers (named by module path, ``head.weight``, ``body.0.conv1.bias``, ...) are loaded into the class;
  channels, blocks and scale are read from their shapes;
* hardened files: ASVP is added as forward hooks after the modules the hardening manifest
  (``hardener.manifest`` in the file's metadata) names, with its rank, gain, mode and adaptive energy.  The
  hook computes the exact top-k subspace with ``torch.linalg.svd`` (float64, differentiable), where the ONNX
  subgraph approximates it by subspace iteration; the parity check measures the difference;
* any PyTorch module the caller already has (the codec: :func:`twin_of_module`), with the same hooks and
  the same check.

Every twin is checked on a real photo against ONNX Runtime on the file itself (max abs difference of the
image output); above ``tol`` :class:`TwinError` is raised with the measured difference, so an attack never
runs on a model that is not the one deployed.  Files hardened without a manifest (``--no-manifest``) are
refused: which layers carry ASVP, and with which rank and gain, is then unknown.

Not done: a general ONNX -> PyTorch converter (``onnx2torch``, PyPI).  It would differentiate through the
subspace iteration itself (the deployed arithmetic) and cover any architecture, but it is one more
dependency and every model this project attacks has its PyTorch class here; the parity check is what makes
the twin trustworthy either way.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from hardener.rewrite import read_manifest

DEFAULT_TOL = 1e-4  # max abs difference (output in [0, 1] units) above which a twin is refused
_BLOCK = re.compile(r"^body\.(\d+)\.conv1\.weight$")


class TwinError(ValueError):
    """The file cannot be twinned (not a supported model, hardened without a manifest, ...)."""


class ParityError(TwinError):
    """The twin does not match ONNX Runtime on the file within the tolerance."""


@dataclass(frozen=True)
class AsvpHookParams:
    """What one hook computes: the manifest's parameters, its static channel count, and how (``how``)."""

    rank: int
    gain: float
    mode: str = "channel"
    adaptive_energy: float | None = None
    iterations: int | None = None
    squarings: int | None = None
    precision: str | None = None
    seed: int = 0
    channels: int | None = None  # static channel count of the map (picks the dense form, as the ONNX does)
    how: str = "iteration"  # "iteration": the deployed subspace iteration; "svd": exact torch.linalg.svd

    def asvp_params(self):
        from hardener.asvp import AsvpParams

        return AsvpParams(rank=self.rank, gain=self.gain, mode=self.mode, iterations=self.iterations,
                          adaptive_energy=self.adaptive_energy, seed=self.seed, squarings=self.squarings,
                          precision=self.precision).resolved()


HOW = ("iteration", "svd")


def asvp_torch(x: torch.Tensor, p: AsvpHookParams) -> torch.Tensor:
    """ASVP of a (N, C, H, W) map, differentiable: ``p.how`` picks :func:`asvp_svd` or :func:`asvp_iteration`."""
    return asvp_svd(x, p) if p.how == "svd" else asvp_iteration(x, p)


def asvp_svd(x: torch.Tensor, p: AsvpHookParams) -> torch.Tensor:
    """Exact ASVP: top-k singular values of each matrix scaled by h, from ``torch.linalg.svd`` in float64.

    Matrices as in ``hardener.asvp``: C x HW per sample (channel mode) or H x W per sample and channel
    (spatial).  ``M' = M + (h - 1) U_k U_k^T M``; cast back to the map's dtype.  Its gradient has
    1 / (s_i^2 - s_j^2) terms: large where singular values nearly coincide.
    """
    n, c, h, w = x.shape
    m = (x.reshape(n, c, h * w) if p.mode == "channel" else x).to(torch.float64)
    u, s, _ = torch.linalg.svd(m, full_matrices=False)
    k = min(p.rank, s.shape[-1])
    q = u[..., :k]
    if p.adaptive_energy is not None:  # as hardener.reference: the smallest k' whose energy reaches p
        energy = s.detach() ** 2
        total = energy.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        before = (torch.cumsum(energy, -1) - energy) / total
        needed = (before < p.adaptive_energy).sum(-1)
        cols = torch.arange(k, device=x.device)
        q = q * (cols < needed[..., None]).to(q.dtype)[..., None, :]
    out = m + (p.gain - 1.0) * (q @ (q.transpose(-1, -2) @ m))
    return out.reshape(x.shape).to(x.dtype)


def asvp_iteration(x: torch.Tensor, p: AsvpHookParams) -> torch.Tensor:
    """The deployed arithmetic of ``hardener.asvp.build_asvp`` in PyTorch (differentiable, op for op).

    float32 Gram matrix G = M M^T, normalised by its largest entry, squared ``squarings`` times in
    ``precision``; the deterministic start block cos(a_j i + b_j); ``iterations`` of Q <- orth(G^(2^s) Q) by
    classical Gram-Schmidt (twice in the last, dependent columns -> 0); optional adaptive-energy mask; then
    (I + (h-1) Q Q^T) M (dense, C <= 32 static channels) or M + Q ((h-1) Q^T M).  Where the spectral gap
    s_(k+1) / s_k is close to 1 the iteration has not converged and differs from the exact SVD: this function
    follows the file, not the mathematics.
    """
    from hardener.asvp import DENSE_MAX_CHANNELS, DEPENDENT_COLUMN_RTOL, FLT_MIN, start_block_coefficients

    q_params = p.asvp_params()
    compute = torch.float64 if q_params.precision == "float64" else torch.float32
    rtol = DEPENDENT_COLUMN_RTOL[np.float64 if compute == torch.float64 else np.float32]
    k = q_params.rank
    n, c, h, w = x.shape
    x32 = x.to(torch.float32)
    m32 = x32.reshape(n, c, h * w) if p.mode == "channel" else x32
    gram = (m32 @ m32.transpose(-1, -2)).to(compute)
    size = gram.sum((-2, -1), keepdim=True)
    gram = torch.where(torch.isfinite(size), gram, torch.zeros((), dtype=compute))

    def normalise(g):
        return g / torch.clamp(g.amax((-2, -1), keepdim=True), min=FLT_MIN)

    gram = normalise(gram)
    power = gram
    for _ in range(q_params.squarings):
        power = normalise(power @ power)
    rows = gram.shape[-1]
    a, ph = start_block_coefficients(k, q_params.seed)
    row_idx = torch.arange(rows, dtype=compute)[:, None]
    q = torch.cos(row_idx * torch.from_numpy(a).to(compute)[None] + torch.from_numpy(ph).to(compute)[None])
    for i in range(q_params.iterations):
        q = _orthonormalize(power @ q, final=i == q_params.iterations - 1, rtol=rtol, tiny=FLT_MIN)
    if p.adaptive_energy is not None:
        energy = (q * (gram @ q)).sum(-2, keepdim=True)
        total = torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1)[..., None, None]
        frac = energy / torch.clamp(total, min=FLT_MIN)
        before = torch.cumsum(frac, -1) - frac
        q = q * (before < p.adaptive_energy).to(compute)
    q32 = q.to(torch.float32)
    q32_t = q32.transpose(-1, -2)
    if p.mode == "channel" and p.channels is not None and p.channels <= DENSE_MAX_CHANNELS:
        eye = torch.eye(rows, dtype=torch.float32)
        y = (eye + (q32 @ q32_t) * np.float32(p.gain - 1.0)) @ m32
    else:
        y = m32 + q32 @ ((q32_t @ m32) * np.float32(p.gain - 1.0))
    return y.reshape(x.shape).to(x.dtype)


def _orthonormalize(z: torch.Tensor, final: bool, rtol: float, tiny: float) -> torch.Tensor:
    cols: list[torch.Tensor] = []
    for col in z.split(1, dim=-1):
        norm0 = col.norm(dim=-2, keepdim=True) if final else None
        if cols:
            basis = torch.cat(cols, -1)
            for _ in range(2 if final else 1):
                col = col - basis @ (basis.transpose(-1, -2) @ col)
        norm = col.norm(dim=-2, keepdim=True)
        unit = col / torch.clamp(norm, min=tiny)
        if final:
            unit = torch.where(norm > norm0 * rtol, unit, torch.zeros((), dtype=unit.dtype))
        cols.append(unit)
    return torch.cat(cols, -1)


@dataclass
class Twin:
    """A PyTorch module standing in for an ONNX file, and how closely it matches ONNX Runtime."""

    module: nn.Module
    path: Path | None
    kind: str  # "restorer" | "module"
    scale: int
    hardened: bool
    asvp_layers: list[str] = field(default_factory=list)
    asvp: AsvpHookParams | None = None  # of the first layer (rank, gain, mode are shared by all)
    placement: str | None = None
    parity_max_abs: float = float("nan")
    parity_input: str = ""
    tol: float = DEFAULT_TOL
    output_key: str | None = None  # module output is a dict: the image is this entry

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.module(x)
        return y[self.output_key] if self.output_key else y

    def describe(self) -> dict:
        how = None
        if self.hardened:
            how = ("replica of the deployed subspace iteration (hardener.asvp), forward hooks"
                   if self.asvp.how == "iteration" else "exact torch.linalg.svd (float64), forward hooks")
        return {"kind": self.kind, "scale": self.scale, "hardened": self.hardened,
                "asvp_layers": self.asvp_layers, "asvp": None if self.asvp is None else vars(self.asvp),
                "placement": self.placement, "parity_max_abs": self.parity_max_abs,
                "parity_input": self.parity_input, "parity_tol": self.tol, "asvp_in_twin": how}


def _static_channels(shape_text: str | None) -> int | None:
    parts = (shape_text or "").split("x")
    return int(parts[1]) if len(parts) == 4 and parts[1].isdigit() else None


def _manifest_hooks(model: onnx.ModelProto, path, how: str) -> tuple[list[str], list[AsvpHookParams], str | None]:
    """(module paths, hook parameters per layer, placement) from the file's manifest; ([], [], None) if none."""
    if how not in HOW:
        raise ValueError(f"how must be one of {', '.join(HOW)}, got {how!r}")
    manifest = read_manifest(model)
    if manifest is None:
        import onnx_ir as ir

        from hardener.strip import find_regions

        regions = find_regions(ir.serde.deserialize_model(model), "structure")
        if regions:
            raise TwinError(f"{path}: holds {len(regions)} ASVP subgraph(s) but no hardening manifest "
                            "(hardened with --no-manifest?): the layers, rank and gain a twin needs are unknown")
        return [], [], None
    p = manifest.get("params", {})
    layers, params = [], []
    for layer in manifest.get("layers", []):
        if not layer.get("module"):
            raise TwinError(f"{path}: the manifest's layer {layer.get('label')!r} names no module path; "
                            "a twin can only hook modules")
        layers.append(layer["module"])
        params.append(AsvpHookParams(
            rank=int(p["rank"]), gain=float(p["gain"]), mode=p.get("mode", "channel"),
            adaptive_energy=p.get("adaptive_energy"), iterations=p.get("iterations"),
            squarings=p.get("squarings"), precision=p.get("precision"), seed=int(p.get("seed", 0)),
            channels=_static_channels(layer.get("shape")), how=how))
    return layers, params, manifest.get("placement", "inline")


def add_asvp_hooks(module: nn.Module, layers: list[str], params: list[AsvpHookParams]) -> list:
    """Forward hooks applying :func:`asvp_torch` to the output of each named submodule; returns the handles."""
    named = dict(module.named_modules())
    missing = [name for name in layers if name not in named]
    if missing:
        raise TwinError(f"the manifest names module(s) {', '.join(missing)} that the PyTorch model lacks")

    def hook(p):
        return lambda _m, _i, out: asvp_torch(out, p)

    return [named[name].register_forward_hook(hook(p)) for name, p in zip(layers, params)]


def _restorer_from_initializers(model: onnx.ModelProto, path) -> nn.Module:
    from attacks.students import ResidualRestorer

    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    need = ("head.weight", "head.bias", "tail.weight", "tail.bias")
    if any(k not in weights for k in need):
        raise TwinError(f"{path}: not a residual-restorer file (no {', '.join(k for k in need if k not in weights)} "
                        "initializer); a twin exists for this project's restoration teachers and, through "
                        "twin_of_module, for models whose PyTorch class you have")
    channels = weights["head.weight"].shape[0]
    blocks = len([k for k in weights if _BLOCK.match(k)])
    out_ch = weights["tail.weight"].shape[0]
    scale = int(round((out_ch / 3) ** 0.5))
    if 3 * scale * scale != out_ch:
        raise TwinError(f"{path}: tail has {out_ch} output channels, not 3 * scale^2")
    net = ResidualRestorer(channels, blocks, scale)
    state = net.state_dict()
    extra = {k for k in weights if k in state} ^ set(state)
    if extra:
        raise TwinError(f"{path}: initializers do not match the residual restorer "
                        f"({channels} channels, {blocks} blocks): {', '.join(sorted(extra)[:4])}")
    net.load_state_dict({k: torch.from_numpy(np.array(weights[k])) for k in state})
    return net.eval()


def parity_input(scale: int, size: int = 48) -> tuple[np.ndarray, str]:
    """A real held-out photo crop (the first of the test split), ``size`` x ``size``, 8-bit, (1, 3, H, W)."""
    from attacks.data import load_photos

    name, img = load_photos("test")[0]
    h, w = img.shape[:2]
    y0, x0 = (h - size) // 2, (w - size) // 2
    x = np.round(img[y0:y0 + size, x0:x0 + size].transpose(2, 0, 1)[None] * 255) / 255
    return np.ascontiguousarray(x, np.float32), f"{name} centre crop {size}x{size} (8-bit)"


def check_parity(twin: Twin, x: np.ndarray | None = None, note: str = "", output: str | None = None) -> float:
    """Max abs difference between the twin and ONNX Runtime on ``x``; :class:`TwinError` above ``twin.tol``."""
    from attacks.adversarial.pgd import OnnxModel

    if x is None:
        x, note = parity_input(twin.scale)
    onnx_model = OnnxModel(twin.path, output=output)
    ref = onnx_model(x)
    with torch.no_grad():
        got = twin(torch.from_numpy(x)).numpy()
    if got.shape != ref.shape:
        raise ParityError(f"{twin.path}: twin output shape {got.shape} != ONNX Runtime's {ref.shape}")
    diff = float(np.max(np.abs(got.astype(np.float64) - ref)))
    twin.parity_max_abs, twin.parity_input = diff, note
    if not np.isfinite(diff) or diff > twin.tol:
        raise ParityError(f"{twin.path}: PyTorch twin differs from ONNX Runtime by {diff:.3g} (max abs, on {note}); "
                        f"tolerance {twin.tol:g}: refusing to attack a model that is not the deployed one")
    return diff


def load_twin(path: str | Path, tol: float = DEFAULT_TOL, check: bool = True, how: str = "iteration") -> Twin:
    """The twin of a (hardened or not) residual-restorer ONNX file, parity-checked against ONNX Runtime.

    ``how``: ASVP in the hooks as the deployed subspace iteration (default) or the exact SVD."""
    path = Path(path)
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one clear error
        raise TwinError(f"{path}: cannot read the ONNX file ({type(exc).__name__}: {exc})") from None
    net = _restorer_from_initializers(model, path)
    layers, params, placement = _manifest_hooks(model, path, how)
    twin = Twin(net, path, "restorer", net.scale, hardened=bool(layers), asvp_layers=layers,
                asvp=params[0] if params else None, placement=placement, tol=tol)
    if layers and placement == "inline":  # a tap leaves the image output unperturbed
        add_asvp_hooks(net, layers, params)
    if check:
        check_parity(twin)
    return twin


def twin_of_module(module: nn.Module, path: str | Path, scale: int = 1, output_key: str | None = None,
                   x: np.ndarray | None = None, output: str | None = None, tol: float = DEFAULT_TOL,
                   check: bool = True, how: str = "iteration") -> Twin:
    """``module`` (the PyTorch original of ``path``) as a twin: ASVP hooks from ``path``'s manifest, if any,
    then the parity check on ``x`` (default: a real photo crop) against ONNX Runtime's ``output``."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    layers, params, placement = _manifest_hooks(model, path, how)
    module = copy.deepcopy(module).eval()  # hooks go on a copy: the caller's module stays as it was
    twin = Twin(module, path, "module", scale, hardened=bool(layers), asvp_layers=layers,
                asvp=params[0] if params else None, placement=placement, tol=tol, output_key=output_key)
    if layers and placement == "inline":
        add_asvp_hooks(module, layers, params)
    if check:
        note = "given input" if x is not None else ""
        check_parity(twin, x, note, output=output)
    return twin
