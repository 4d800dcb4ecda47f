"""Teacher-fidelity validation: run original and hardened models with ONNX Runtime and compare.

Sessions come from ``hardener.runtime``.  TF32 is off unless asked: with it on, fp32 Conv/MatMul on
Ampere+ differ from CPU by about 1e-3, which would blur what the hardening itself changes.

Budgets: ``min_psnr`` (hardened vs original output, dB), ``max_psnr_drop`` (dB of PSNR against ground
truth lost by hardening; needs ground truth), ``atol``/``rtol`` (every element |h - o| <= atol + rtol |o|).
PSNR budgets are judged on the PSNR of the mean squared error over all validation images (one image whose
output is unchanged, PSNR = inf, cannot mask the others); the worst image is reported beside it.

For inline placement with h != 1, outputs identical to the original's on every input fail the run; the per-layer
checks of :mod:`hardener.layer_checks` run on the first ``probe_samples`` inputs and a failed layer fails it too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .errors import UsageError
from .inputs import TRUTH_PREFIX, DataReader
from .layer_checks import LAYER_RTOL, layer_checks
from .metrics import DiffStats, is_image_batch, psnr_of_mse, squared_error, ssim
from .runtime import make_session

UNCHANGED_PSNR = 100.0  # an image output this close to the original's (RMS <= 1e-5 of the range) is unchanged
# Tap placement: the served output is bit-identical on CPU where the tapped Conv's bias is in the file (the tap
# reads a private copy of the Conv, so ONNX Runtime's fusions of the original are unchanged); otherwise
# fusion differences move it by about 1.2e-7 (measured on the bundled teacher).  More than this fails.
TAP_BOUND = 1e-6
RATE_OUTPUT = "bpp"  # a codec's per-image rate estimate (bits per pixel): its change is reported (no budget)


@dataclass
class Budgets:
    min_psnr: float | None = 40.0
    max_psnr_drop: float | None = 0.5
    atol: float | None = None
    rtol: float | None = None
    data_range: float = 1.0
    crop_border: int = 0
    layer_rtol: float = LAYER_RTOL

    def check(self) -> None:
        for name in ("min_psnr", "max_psnr_drop", "atol", "rtol", "layer_rtol"):
            value = getattr(self, name)
            if value is not None and not np.isfinite(value):
                raise UsageError(f"{name.replace('_', '-')} must be a finite number, got {value}")
        for name in ("max_psnr_drop", "atol", "rtol"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UsageError(f"{name.replace('_', '-')} must be >= 0, got {value}")
        if not 0 < self.layer_rtol < 1:
            raise UsageError(f"layer-rtol must be in (0, 1), got {self.layer_rtol}")
        if not (np.isfinite(self.data_range) and self.data_range > 0):
            raise UsageError(f"data range must be a positive number, got {self.data_range}")
        if self.crop_border < 0:
            raise UsageError(f"crop border must be >= 0, got {self.crop_border}")


@dataclass
class ValidationResult:
    providers: list[str]
    tf32: bool | None
    samples: int
    outputs: dict = field(default_factory=dict)
    layers: list = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def split_truth(feed: dict) -> tuple[dict, dict]:
    """(model feed, {output name: ground truth}) from one reader feed."""
    truth = {k[len(TRUTH_PREFIX):]: v for k, v in feed.items() if k.startswith(TRUTH_PREFIX)}
    return {k: v for k, v in feed.items() if not k.startswith(TRUTH_PREFIX)}, truth


def run_session(session, names: list[str], feed: dict, what: str) -> list[np.ndarray]:
    """``session.run`` with ONNX Runtime's rejection of a feed turned into one usage-error line."""
    try:
        return session.run(names, feed)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types for bad feeds
        shapes = ", ".join(f"{k} {getattr(v, 'dtype', '?')}{list(getattr(v, 'shape', []))}" for k, v in feed.items())
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"ONNX Runtime could not run the {what} on a validation input ({shapes}): "
                         f"{first[:300]}") from None


class ImageStats:
    """Squared errors per image of one image output: hardened vs original, and both vs truth."""

    def __init__(self):
        self.vs_original: list[float] = []
        self.original_vs_truth: list[float] = []
        self.hardened_vs_truth: list[float] = []
        self.ssim_vs_original: list[float] = []
        self.ssim_original_vs_truth: list[float] = []
        self.ssim_hardened_vs_truth: list[float] = []

    def summary(self, data_range: float) -> dict:
        out = {}
        if self.vs_original:
            out["psnr_vs_original"] = psnr_of_mse(np.mean(self.vs_original), data_range)
            out["psnr_vs_original_worst_image"] = psnr_of_mse(max(self.vs_original), data_range)
            if self.ssim_vs_original:
                out["ssim_vs_original"] = float(np.mean(self.ssim_vs_original))
        if self.original_vs_truth:
            out["psnr_original_vs_truth"] = psnr_of_mse(np.mean(self.original_vs_truth), data_range)
            out["psnr_hardened_vs_truth"] = psnr_of_mse(np.mean(self.hardened_vs_truth), data_range)
            out["psnr_drop_vs_truth"] = out["psnr_original_vs_truth"] - out["psnr_hardened_vs_truth"]
            drops = [10 * np.log10(h / o) if o > 0 else (0.0 if h == 0 else float("inf"))
                     for o, h in zip(self.original_vs_truth, self.hardened_vs_truth)]
            out["psnr_drop_vs_truth_worst_image"] = float(max(drops))
            if self.ssim_original_vs_truth:
                out["ssim_original_vs_truth"] = float(np.mean(self.ssim_original_vs_truth))
                out["ssim_hardened_vs_truth"] = float(np.mean(self.ssim_hardened_vs_truth))
        return out


def compare_outputs(names: list[str], o_outs: list, h_outs: list, truth: dict, budgets: Budgets,
                    diffs: dict | None, image: dict, with_ssim: bool = True) -> None:
    """Accumulate one feed's differences into ``diffs`` (DiffStats per output) and ``image`` (ImageStats)."""
    atol = budgets.atol if budgets.atol is not None else 0.0
    rtol = budgets.rtol if budgets.rtol is not None else 0.0
    kw = {"data_range": budgets.data_range, "crop_border": budgets.crop_border}
    for name, o, h in zip(names, o_outs, h_outs):
        if diffs is not None:
            diffs[name].add(h, o, atol, rtol)
        if not is_image_batch(o):
            continue
        if 2 * budgets.crop_border >= min(o.shape[-2:]):
            raise UsageError(f"crop border {budgets.crop_border} leaves no pixels of output '{name}' "
                             f"({o.shape[-2]}x{o.shape[-1]})")
        rows = image.setdefault(name, ImageStats())
        for i in range(len(o)):
            rows.vs_original.append(squared_error(h[i], o[i], **kw))
            if with_ssim:
                rows.ssim_vs_original.append(ssim(h[i], o[i], **kw))
            if name in truth:
                t = truth[name][i]
                if t.shape != o[i].shape:
                    raise UsageError(f"ground truth for '{name}' has shape {t.shape}, output has {o[i].shape}")
                rows.original_vs_truth.append(squared_error(o[i], t, **kw))
                rows.hardened_vs_truth.append(squared_error(h[i], t, **kw))
                if with_ssim:
                    rows.ssim_original_vs_truth.append(ssim(o[i], t, **kw))
                    rows.ssim_hardened_vs_truth.append(ssim(h[i], t, **kw))


def validate(
    original_path: Path | bytes,
    hardened_path: Path,
    hardened_model: onnx.ModelProto,
    insertions: list,
    params,
    reader: DataReader,
    budgets: Budgets,
    providers: list[str],
    tf32: bool = False,
    probe_samples: int = 4,
    progress=None,
    placement: str = "inline",
) -> ValidationResult:
    """Compare hardened against original outputs on every feed of ``reader``; check budgets and layers."""
    original = make_session(original_path, providers, tf32)
    hardened = make_session(hardened_path, providers, tf32)
    output_names = [o.name for o in original.get_outputs()]
    diffs = {name: DiffStats() for name in output_names}
    image: dict[str, ImageStats] = {}
    feeds, count = [], 0
    broken: dict[str, int] = {}  # output -> inputs on which the ORIGINAL model gives NaN/Inf
    rates: dict[str, list] | None = {"original": [], "hardened": []} if RATE_OUTPUT in output_names else None
    while (feed := reader.get_next()) is not None:
        count += 1
        feed, truth = split_truth(feed)
        unknown = sorted(set(truth) - set(output_names))
        if unknown:
            raise UsageError(f"ground truth names no model output: {', '.join(unknown)} "
                             f"(outputs: {', '.join(output_names)})")
        if len(feeds) < probe_samples:
            feeds.append(feed)
        o_outs = run_session(original, output_names, feed, "original model")
        h_outs = run_session(hardened, output_names, feed, "hardened model")
        for name, o in zip(output_names, o_outs):
            if not np.all(np.isfinite(o)):
                broken[name] = broken.get(name, 0) + 1
        compare_outputs(output_names, o_outs, h_outs, truth, budgets, diffs, image)
        if rates is not None:
            i = output_names.index(RATE_OUTPUT)
            rates["original"].extend(np.ravel(o_outs[i]).astype(np.float64).tolist())
            rates["hardened"].extend(np.ravel(h_outs[i]).astype(np.float64).tolist())
        if progress is not None:
            progress.update(1)
    if not feeds:
        raise UsageError("the validation inputs are empty")
    result = ValidationResult(list(hardened.get_providers()), tf32 if "CUDAExecutionProvider" in providers
                              else None, samples=count)
    for name in output_names:
        entry = {"difference": diffs[name].summary()}
        if name in image:
            entry.update(image[name].summary(budgets.data_range))
        if name == RATE_OUTPUT and rates is not None and name not in image:
            entry["rate"] = rate_summary(rates["original"], rates["hardened"])
        result.outputs[name] = entry
        if name in broken:
            entry["original_non_finite_inputs"] = broken[name]
            result.failures.append(f"{name}: the original model's output is NaN/Inf on {broken[name]} of {count} "
                                   "validation input(s): there is nothing to compare against")
            continue
        _check_budgets(name, entry, budgets, result.failures)
    if placement == "inline" and params.gain != 1.0 and all(_unchanged(result.outputs[n]) for n in output_names):
        result.failures.append(f"the hardened model's outputs equal the original's on all {count} input(s) (to "
                               f"float32 round-off, PSNR >= {UNCHANGED_PSNR:g} dB): the inserted subgraphs change "
                               "nothing the model serves")
    if placement == "tap":
        moved = max(result.outputs[n]["difference"]["max_abs"] for n in output_names)
        if not moved <= TAP_BOUND:
            result.failures.append(f"tap placement moved the served output by {moved:.3g} (bound {TAP_BOUND:g}): the "
                                   "forward path was meant to stay intact")
    result.layers = layer_checks(hardened_path, hardened_model, insertions, params, feeds, providers, tf32,
                                 budgets.layer_rtol)
    for layer in result.layers:  # an insertion that changes nothing (or the wrong thing) protects nothing
        if layer.get("check", "ok").startswith("failed"):
            result.failures.append(f"layer {layer['layer']}: {layer['check'][len('failed: '):]}")
    return result


def rate_summary(original: list[float], hardened: list[float]) -> dict:
    """Mean rate (bits per pixel) of the original and hardened model over the validation images, and the
    relative change of the mean (``(hardened - original) / original``; None when the original's is 0)."""
    o, h = float(np.mean(original)), float(np.mean(hardened))
    return {"unit": "bits per pixel", "values": len(original), "original_mean": o, "hardened_mean": h,
            "change_rel": (h - o) / o if o != 0 else None,
            "max_abs_change": float(np.max(np.abs(np.subtract(hardened, original))))}


def _unchanged(entry: dict) -> bool:
    if "psnr_vs_original" in entry:
        return entry["psnr_vs_original"] >= UNCHANGED_PSNR
    return entry["difference"]["max_abs"] == 0


def _check_budgets(name: str, entry: dict, b: Budgets, failures: list[str]) -> None:
    d = entry["difference"]
    if not np.isfinite(d["max_abs"]):
        failures.append(f"{name}: hardened output has non-finite values")
    if (b.atol is not None or b.rtol is not None) and d["tolerance_violations"]:
        failures.append(f"{name}: {d['tolerance_violations']} elements exceed atol={b.atol or 0} "
                        f"rtol={b.rtol or 0} (max abs {d['max_abs']:.3g})")
    if b.min_psnr is not None and "psnr_vs_original" in entry and not entry["psnr_vs_original"] >= b.min_psnr:
        failures.append(f"{name}: PSNR hardened vs original {entry['psnr_vs_original']:.2f} dB "
                        f"(of the mean squared error over all images) < min {b.min_psnr} dB")
    if b.max_psnr_drop is not None and "psnr_drop_vs_truth" in entry \
            and not entry["psnr_drop_vs_truth"] <= b.max_psnr_drop:
        failures.append(f"{name}: PSNR vs ground truth dropped {entry['psnr_drop_vs_truth']:.3f} dB "
                        f"> max {b.max_psnr_drop} dB")
