"""The JSON report (for machines) and the summary (for people) of one ``harden`` run."""
from __future__ import annotations

import json
import math
import platform
from pathlib import Path

SCHEMA = "hardener.report/1"
NOT_VALIDATED = "NOT VALIDATED"
MAX_NAME = 200  # characters of one name shown; the rest is elided


def printable(value, limit: int | None = MAX_NAME) -> str:
    """``value`` as one safe line of text: every character that is not printable (newline, carriage return,
    escape sequences, other control and format characters such as bidi overrides) is written as a Python
    escape (``\\n``, ``\\x1b``, ``\\u202e``), so a name read from a model file can never start a new line
    (a fake ``PASSED``) or restyle the terminal; longer than ``limit`` characters, the middle is elided."""
    text = value if isinstance(value, str) else str(value)
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
    if limit is not None and len(text) > limit:
        half = (limit - 3) // 2
        text = f"{text[:half]}...{text[-half:]}"
    return text


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
    return _num(v, ".2f")


def _calibration_text(c: dict) -> str:
    """'h = 1.31 chosen for a PSNR drop vs truth of 0.1 dB +- 10 % (measured 0.101 dB, 7 trials on 4 images)'."""
    try:
        target, measured = c["target"], c["measured"]
        if "psnr_drop" in target:
            goal = f"a PSNR drop vs truth of {target['psnr_drop']:g} dB +- {100 * target['tolerance']:g} %"
            got = f"{measured['psnr_drop']:.3f} dB"
        else:
            goal = f"a PSNR vs original of {target['psnr']:g} dB +- {target['tolerance']:g} dB"
            got = f"{measured['psnr']:.2f} dB"
        trials = len(c.get("trials", []))
        return (f"h = {c['chosen_gain']:g} chosen for {goal} (measured {got}, {trials} trial(s) on "
                f"{c.get('images', '?')} image(s), in-sample)")
    except (KeyError, TypeError, ValueError):
        return printable(str(c), 400)


def summary(report: dict) -> str:
    """The human summary; its last line is ``PASSED | ...``, ``FAILED | ...`` or ``NOT VALIDATED | ...``.

    Every name that comes from a file (paths, tensors, modules, outputs, failure texts) goes through
    ``printable``, so nothing in a model can add a line of its own."""
    P = printable
    lines = [f"hardener {report['versions']['hardener']}: {P(report['model']['path'], None)} -> "
             f"{P(report['output']['path'], None)}"]
    p = report["config"]["params"]
    adaptive = f", adaptive energy {p['adaptive_energy']}" if p["adaptive_energy"] is not None else ""
    lines.append(f"  ASVP {report['config']['placement']} / {p['mode']} mode, k={p['rank']}, h={p['gain']}, "
                 f"{p['iterations']} iterations on G^{2 ** p['squarings']} ({p['precision']}){adaptive}, "
                 f"seed {p['seed']}")
    for ins in report["insertions"]:
        where = f" (module {P(ins['module'])})" if ins.get("module") else ""
        lines.append(f"  + {P(ins['label'])}: tensor {P(ins['tensor'])}{where} {ins['shape']}, {ins['nodes']} nodes"
                     + (f" -> output {P(ins['output'])}" if ins["output"] != ins["tensor"] else ""))
    calibration = report.get("calibration") or (report.get("validation") or {}).get("calibration")
    if isinstance(calibration, dict) and calibration:
        lines.append("  calibration: " + _calibration_text(calibration))
    v = report.get("validation")
    if v is None:
        lines.append("  validation skipped (--no-validate): the hardened model's outputs were not compared "
                     "with the original's")
    else:
        tf32 = "" if v.get("tf32") is None else f", TF32 {'on' if v['tf32'] else 'off'}"
        lines.append(f"  validated on {', '.join(map(P, v['providers']))}{tf32}, {v['samples']} input(s)")
        if v.get("data"):
            lines.append(f"  data: {P(v['data'], 400)}")
        for name, o in v["outputs"].items():
            d = o["difference"]
            parts = [f"max|d| {_num(d['max_abs'])}", f"mean|d| {_num(d['mean_abs'])}"]
            if "psnr_vs_original" in o:
                parts.append(f"PSNR vs original {_db(o['psnr_vs_original'])} dB, "
                             f"SSIM {_num(o['ssim_vs_original'], '.4f')}")
            if "psnr_original_vs_truth" in o:
                parts.append(f"vs truth {_db(o['psnr_original_vs_truth'])} -> "
                             f"{_db(o['psnr_hardened_vs_truth'])} dB (drop {_num(o['psnr_drop_vs_truth'], '.3f')})")
            lines.append(f"  output {P(name)}: " + "; ".join(parts))
            if isinstance(o.get("rate"), dict):
                lines.append("  " + _rate_text(o["rate"], name))
        for layer in v["layers"]:
            check = f"; check {P(str(layer['check']), 400)}" if layer.get("check") is not None else ""
            if "reference_rel_error" not in layer:
                parts = [P(str(layer["reference"]), 400)] if layer.get("reference") is not None else []
                parts += [f"check {P(str(layer['check']), 400)}"] if layer.get("check") is not None else []
                lines.append(f"  layer {P(layer['layer'])}: {'; '.join(parts) or 'no statistics'}")
                continue
            g = layer["spectral_gap"]
            gapped = layer.get("reference_rel_error_gap_le_0.8")
            lines.append(f"  layer {P(layer['layer'])}: perturbation {_num(layer['perturbation_energy'])} of ||X||, "
                         f"gap s(k+1)/s(k) median {_num(g['median'], '.3f')}, vs float64 SVD rel err "
                         f"{_num(layer['reference_rel_error'], '.2e')}"
                         + (f" ({_num(gapped, '.2e')} where gap <= 0.8)" if gapped is not None else "") + check)
    failures = [P(f, 400) for f in report.get("failures") or []]
    n = len(report["insertions"])
    if failures:
        status, tail = "FAILED", "; ".join(failures)
    elif v is None:
        status, tail = NOT_VALIDATED, f"{n} layer(s) hardened; outputs not compared (--no-validate), no budget checked"
    else:
        status, tail = "PASSED", f"{n} layer(s) hardened, budgets met"
    lines.append(f"{status} | {tail}")
    return "\n".join(lines)


def _rate_text(r: dict, name: str) -> str:
    """'rate: bpp 0.3120 -> 0.3185 (+2.08 %), mean over 6 images (output bpp)'."""
    change = r.get("change_rel")
    pct = f"{100 * change:+.2f} %" if isinstance(change, (int, float)) and math.isfinite(change) else "n/a"
    return (f"rate: bpp {_num(r.get('original_mean'), '.4f')} -> {_num(r.get('hardened_mean'), '.4f')} ({pct}), "
            f"mean over {_num(r.get('values'))} image(s) (output {printable(name)})")


def _num(value, fmt: str = ".3g") -> str:
    """A number for the summary; non-numbers (the report's "inf"/"nan" strings, None) as text."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return printable(str(value), 40)
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else "-inf" if value < 0 else "nan"
    return format(value, fmt)
