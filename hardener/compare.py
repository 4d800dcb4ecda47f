"""``harden compare``: the fidelity of one ONNX model against another, Polygraphy style.

Model A is the reference.  Both run with ONNX Runtime (``hardener.runtime``) on the same feeds (readers of
``hardener.inputs``); per output the absolute and relative difference (``hardener.metrics.DiffStats``, plus
where the worst element sits) and, for image outputs (N, 1|3, H, W), PSNR and SSIM of B against A: PSNR of
the mean squared error over all images (inf when identical), as the harden budgets are judged.

Budgets: ``atol``/``rtol`` (every element |B - A| <= atol + rtol |A|) and ``min_psnr``; with none given,
atol = rtol = 1e-5 (Polygraphy's defaults).  A NaN or inf in one model where the other has a finite value
fails.  Models that disagree on their inputs (names, element types, ranks, static sizes) or outputs are a
usage error (exit 2).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from .errors import FidelityError, HardenerError, InvalidModelError, UsageError
from .inputs import open_inputs
from .metrics import DiffStats, psnr_of_mse
from .model_io import load_model
from .runtime import make_session, resolve_providers
from .validate import Budgets, ImageStats, compare_outputs, split_truth

SCHEMA = "hardener.compare/1"
DEFAULT_TOL = 1e-5


@dataclass
class CompareConfig:
    atol: float | None = None
    rtol: float | None = None
    min_psnr: float | None = None
    data_range: float = 1.0
    crop_border: int = 0
    providers: list[str] | None = None
    tf32: bool = False
    outputs: list[str] | None = None
    inputs: str | None = None
    synthetic: bool = False
    num_samples: int | None = None
    seed: int = 0

    def budgets(self) -> tuple[float | None, float | None, float | None]:
        """(atol, rtol, min_psnr) as enforced (None: not checked); with none given, Polygraphy's 1e-5 / 1e-5."""
        for name in ("atol", "rtol", "min_psnr"):
            value = getattr(self, name)
            if value is not None and not np.isfinite(value):
                raise UsageError(f"{name.replace('_', '-')} must be a finite number, got {value}")
        for name in ("atol", "rtol"):
            if (getattr(self, name) or 0) < 0:
                raise UsageError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (np.isfinite(self.data_range) and self.data_range > 0):
            raise UsageError(f"data range must be a positive number, got {self.data_range}")
        if self.crop_border < 0:
            raise UsageError(f"crop border must be >= 0, got {self.crop_border}")
        if self.atol is None and self.rtol is None and self.min_psnr is None:
            return DEFAULT_TOL, DEFAULT_TOL, None
        if self.atol is None and self.rtol is None:
            return None, None, self.min_psnr  # only a PSNR budget: no elementwise check
        return self.atol or 0.0, self.rtol or 0.0, self.min_psnr


def _signature(vis) -> dict[str, tuple]:
    out = {}
    for vi in vis:
        t = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim) \
            if t.HasField("shape") else None
        out[vi.name] = (t.elem_type, dims)
    return out


def _type_text(sig: tuple) -> str:
    elem, dims = sig
    name = onnx.TensorProto.DataType.Name(elem) if elem else "?"
    shape = "?" if dims is None else "x".join("?" if d is None else str(d) for d in dims)
    return f"{name.lower()} {shape}"


def check_interfaces(a: onnx.ModelProto, b: onnx.ModelProto, outputs: list[str] | None) -> list[str]:
    """The outputs to compare; a ``UsageError`` (exit 2) where A and B cannot be compared."""
    inits_a = {i.name for i in a.graph.initializer}
    inits_b = {i.name for i in b.graph.initializer}
    ins_a = _signature(vi for vi in a.graph.input if vi.name not in inits_a)
    ins_b = _signature(vi for vi in b.graph.input if vi.name not in inits_b)
    if set(ins_a) != set(ins_b):
        raise UsageError(f"the models take different inputs: A {sorted(ins_a)}, B {sorted(ins_b)}")
    for name, sig_a in ins_a.items():
        sig_b = ins_b[name]
        dims_a, dims_b = sig_a[1], sig_b[1]
        clash = sig_a[0] != sig_b[0] or (dims_a is not None and dims_b is not None and (
            len(dims_a) != len(dims_b) or any(x and y and x != y for x, y in zip(dims_a, dims_b))))
        if clash:
            raise UsageError(f"input '{name}' differs: A {_type_text(sig_a)}, B {_type_text(sig_b)}")
    outs_a = [o.name for o in a.graph.output]
    outs_b = [o.name for o in b.graph.output]
    if outputs:
        absent = [(n, m) for n in outputs for m, names in (("A", outs_a), ("B", outs_b)) if n not in names]
        if absent:
            raise UsageError("no output " + ", ".join(f"'{n}' in {m}" for n, m in absent)
                             + f" (A has {outs_a}, B has {outs_b})")
        return list(dict.fromkeys(outputs))
    if set(outs_a) != set(outs_b):
        only_a = sorted(set(outs_a) - set(outs_b))
        only_b = sorted(set(outs_b) - set(outs_a))
        raise UsageError(f"the models give different outputs (only in A: {only_a}, only in B: {only_b}); "
                         "name the common ones with --outputs")
    sig_a, sig_b = _signature(a.graph.output), _signature(b.graph.output)
    for name in outs_a:
        if sig_a[name][0] != sig_b[name][0]:
            raise UsageError(f"output '{name}' differs: A {_type_text(sig_a[name])}, B {_type_text(sig_b[name])}")
    return outs_a


def _session(loaded, providers: list[str], tf32: bool):
    try:
        return make_session(loaded.path, providers, tf32)
    except HardenerError:
        raise
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own load errors: invalid model, exit 4
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidModelError(f"ONNX Runtime cannot load {loaded.path}: {first}") from None


class _Worst:
    """The largest value seen so far and where: (input number, index within that input's output)."""

    def __init__(self):
        self.value, self.sample, self.index = -1.0, None, None

    def add(self, values: np.ndarray, sample: int) -> None:
        if values.size == 0:
            return
        flat = int(np.argmax(values))
        value = float(values.flat[flat])
        if value > self.value:
            self.value, self.sample = value, sample
            self.index = tuple(int(i) for i in np.unravel_index(flat, values.shape))


def compare_models(path_a: str | os.PathLike, path_b: str | os.PathLike, config: CompareConfig) -> dict:
    atol, rtol, min_psnr = config.budgets()
    a, b = load_model(path_a), load_model(path_b)
    names = check_interfaces(a.model, b.model, config.outputs)
    providers = resolve_providers(config.providers)
    kwargs = {"synthetic": True} if config.synthetic else {}
    reader = open_inputs(config.inputs, a.model, count=config.num_samples or 4, limit=config.num_samples,
                         seed=config.seed, **kwargs)
    sess_a, sess_b = _session(a, providers, config.tf32), _session(b, providers, config.tf32)
    image_budget = Budgets(data_range=config.data_range, crop_border=config.crop_border)
    stats = {n: DiffStats() for n in names}
    worst_abs = {n: _Worst() for n in names}
    worst_rel = {n: _Worst() for n in names}
    info: dict[str, dict] = {n: {"nonfinite_mismatch": 0, "dtype": None, "shape": None} for n in names}
    images: dict[str, ImageStats] = {}
    samples = 0
    while (feed := reader.get_next()) is not None:
        feed, _ = split_truth(feed)
        outs_a = sess_a.run(names, feed)
        outs_b = sess_b.run(names, feed)
        for name, oa, ob in zip(names, outs_a, outs_b):
            if oa.shape != ob.shape:
                raise UsageError(f"output '{name}' has shape {oa.shape} in A but {ob.shape} in B (input {samples})")
            info[name]["dtype"], info[name]["shape"] = str(oa.dtype), list(oa.shape)
            fa, fb = np.asarray(oa, np.float64), np.asarray(ob, np.float64)
            finite_a, finite_b = np.isfinite(fa), np.isfinite(fb)
            info[name]["nonfinite_mismatch"] += int(np.count_nonzero(finite_a != finite_b))
            both = finite_a & finite_b
            fa, fb = np.where(both, fa, 0.0), np.where(both, fb, 0.0)
            diff, rel = stats[name].add(fb, fa, atol or 0.0, rtol or 0.0)
            worst_abs[name].add(diff, samples)
            worst_rel[name].add(rel, samples)
            compare_outputs([name], [oa], [ob], {}, image_budget, None, images)
        samples += 1
    if samples == 0:
        raise UsageError("the inputs hold no samples")

    results, failures = {}, []
    for name in names:
        d = stats[name].summary()
        row = {"dtype": info[name]["dtype"], "shape": info[name]["shape"], "difference": d,
               "max_abs_at": {"input": worst_abs[name].sample, "index": worst_abs[name].index},
               "max_rel_at": {"input": worst_rel[name].sample, "index": worst_rel[name].index},
               "nonfinite_mismatch": info[name]["nonfinite_mismatch"]}
        if name in images:
            mses = images[name].vs_original
            per_image = [psnr_of_mse(m, config.data_range) for m in mses]
            worst = int(np.argmin(per_image))
            ssims = [s for s in images[name].ssim_vs_original if np.isfinite(s)]
            row.update({"psnr": psnr_of_mse(float(np.mean(mses)), config.data_range),
                        "psnr_worst_image": per_image[worst], "psnr_worst_image_index": worst,
                        "ssim": float(np.mean(ssims)) if ssims else None, "images": len(mses)})
        checks = []
        if row["nonfinite_mismatch"]:
            checks.append(f"{row['nonfinite_mismatch']} element(s) are NaN/inf in one model but not the other")
        if atol is not None and d["tolerance_violations"]:
            checks.append(f"{d['tolerance_violations']} of {d['elements']} elements exceed atol={atol:g} + "
                          f"rtol={rtol:g} * |A| (max abs {d['max_abs']:.3g}, max rel {d['max_rel']:.3g})")
        if min_psnr is not None:
            if "psnr" not in row:
                checks.append("--min-psnr needs an image output (N, 1|3, H, W)")
            elif row["psnr"] < min_psnr:
                checks.append(f"PSNR {row['psnr']:.2f} dB < --min-psnr {min_psnr:g}")
        row["passed"] = not checks
        row["failures"] = checks
        failures += [f"output '{name}': {c}" for c in checks]
        results[name] = row

    failed = bool(failures)
    return {
        "schema": SCHEMA,
        "model_a": {"path": str(a.path), "sha256": a.sha256},
        "model_b": {"path": str(b.path), "sha256": b.sha256},
        "inputs": getattr(reader, "description", None) or (config.inputs or "default inputs"),
        "samples": samples,
        "providers": sess_a.get_providers(),
        "tf32": config.tf32 if "CUDAExecutionProvider" in providers else None,
        "config": asdict(config),
        "budgets": {"atol": atol, "rtol": rtol, "min_psnr": min_psnr},
        "outputs": results,
        "failures": failures,
        "status": "FAILED" if failed else "PASSED",
        "exit_code": FidelityError.exit_code if failed else 0,
    }


def _g(v) -> str:
    return "inf" if v == float("inf") else f"{v:.4g}"


def _at(where: dict) -> str:
    return f"input {where['input']} index {where['index']}" if where["index"] is not None else "-"


def compare_text(doc: dict) -> str:
    bud = doc["budgets"]
    tol = f"atol={bud['atol']:g}, rtol={bud['rtol']:g}" if bud["atol"] is not None else "no elementwise budget"
    psnr_budget = f", min PSNR {bud['min_psnr']:g} dB" if bud["min_psnr"] is not None else ""
    lines = [f"[I] Comparing A: {doc['model_a']['path']}  vs  B: {doc['model_b']['path']}",
             f"[I]     on {', '.join(doc['providers'])}, {doc['samples']} input(s) ({doc['inputs']}); "
             f"budgets: {tol}{psnr_budget}"]
    for name, r in doc["outputs"].items():
        d = r["difference"]
        lines.append(f"[I] Output '{name}' ({r['dtype']}, shape {tuple(r['shape'])} per input)")
        lines.append(f"[I]     Absolute Difference | max={_g(d['max_abs'])} at {_at(r['max_abs_at'])}, "
                     f"mean={_g(d['mean_abs'])}, p99={_g(d['p99_abs'])}")
        lines.append(f"[I]     Relative Difference | max={_g(d['max_rel'])} at {_at(r['max_rel_at'])}")
        lines.append(f"[I]     Minimum Required Tolerance: elemwise error | [abs={_g(d['max_abs'])}] OR "
                     f"[rel={_g(d['max_rel'])}]")
        if "psnr" in r:
            if r["psnr"] == float("inf"):
                quality = "PSNR inf dB (identical)"
            else:
                quality = (f"PSNR {r['psnr']:.2f} dB (worst image {r['psnr_worst_image_index']}: "
                           f"{_g(r['psnr_worst_image'])} dB)")
            ssim_text = f", SSIM {r['ssim']:.5f}" if r["ssim"] is not None else ""
            lines.append(f"[I]     Image | {quality}{ssim_text} over {r['images']} image(s)")
        for failure in r["failures"]:
            lines.append(f"[E]     FAILED | Output: '{name}' | {failure}")
        if r["passed"]:
            lines.append(f"[I]     PASSED | Output: '{name}' | within budget ({tol}{psnr_budget})")
    names = list(doc["outputs"])
    if doc["failures"]:
        bad = [n for n, r in doc["outputs"].items() if not r["passed"]]
        lines.append(f"FAILED | {len(bad)} of {len(names)} output(s) out of budget | Outputs: {bad}")
    else:
        lines.append(f"PASSED | All {len(names)} output(s) matched | Outputs: {names}")
    return "\n".join(lines)

