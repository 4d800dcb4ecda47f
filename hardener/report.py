"""The JSON report (for machines) and the summary (for people) of one ``harden`` run."""
from __future__ import annotations

import json
import math
import platform
from pathlib import Path

SCHEMA = "hardener.report/1"


def versions() -> dict:
    from importlib import metadata

    found = {"python": platform.python_version()}
    for name in ("onnx", "onnxruntime", "onnxruntime-gpu", "numpy", "torch"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    from . import __version__

    found["hardener"] = __version__
    return found


def _clean(value):
    """JSON has no inf/nan: write them as strings so the file stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else "-inf" if value < 0 else "nan"
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(report: dict, path: Path) -> None:
    from .model_io import atomic_write

    atomic_write((json.dumps(_clean(report), indent=2) + "\n").encode(), None, path)


def _db(v) -> str:
    return "inf" if v == float("inf") else f"{v:.2f}"


def summary(report: dict) -> str:
    lines = [f"hardener {report['versions']['hardener']}: {report['model']['path']} -> {report['output']['path']}"]
    p = report["config"]["params"]
    adaptive = f", adaptive energy {p['adaptive_energy']}" if p["adaptive_energy"] is not None else ""
    lines.append(f"  ASVP {report['config']['placement']} / {p['mode']} mode, k={p['rank']}, h={p['gain']}, "
                 f"{p['iterations']} iterations on G^{2 ** p['squarings']} ({p['precision']}){adaptive}, "
                 f"seed {p['seed']}")
    for ins in report["insertions"]:
        where = f" (module {ins['module']})" if ins.get("module") else ""
        lines.append(f"  + {ins['label']}: tensor {ins['tensor']}{where} {ins['shape']}, {ins['nodes']} nodes"
                     + (f" -> output {ins['output']}" if ins["output"] != ins["tensor"] else ""))
    v = report.get("validation")
    if v is None:
        lines.append("  validation skipped (--no-validate)")
    else:
        tf32 = "" if v["tf32"] is None else f", TF32 {'on' if v['tf32'] else 'off'}"
        lines.append(f"  validated on {', '.join(v['providers'])}{tf32}, {v['samples']} input(s)")
        for name, o in v["outputs"].items():
            d = o["difference"]
            parts = [f"max|d| {d['max_abs']:.3g}", f"mean|d| {d['mean_abs']:.3g}"]
            if "psnr_vs_original" in o:
                parts.append(f"PSNR vs original {_db(o['psnr_vs_original'])} dB, "
                             f"SSIM {o['ssim_vs_original']:.4f}")
            if "psnr_original_vs_truth" in o:
                parts.append(f"vs truth {_db(o['psnr_original_vs_truth'])} -> "
                             f"{_db(o['psnr_hardened_vs_truth'])} dB (drop {o['psnr_drop_vs_truth']:.3f})")
            lines.append(f"  output {name}: " + "; ".join(parts))
        for layer in v["layers"]:
            if "reference_rel_error" not in layer:
                lines.append(f"  layer {layer['layer']}: {layer.get('reference')}")
                continue
            g = layer["spectral_gap"]
            gapped = layer.get("reference_rel_error_gap_le_0.8")
            lines.append(f"  layer {layer['layer']}: perturbation {layer['perturbation_energy']:.3g} of ||X||, "
                         f"gap s(k+1)/s(k) median {g['median']:.3f}, vs float64 SVD rel err "
                         f"{layer['reference_rel_error']:.2e}"
                         + (f" ({gapped:.2e} where gap <= 0.8)" if gapped is not None else ""))
    status = report["status"]
    tail = "; ".join(report["failures"]) if report["failures"] else \
        f"{len(report['insertions'])} layer(s) hardened, budgets met"
    lines.append(f"{status} | {tail}")
    return "\n".join(lines)
