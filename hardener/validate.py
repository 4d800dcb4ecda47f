"""Teacher-fidelity validation: run original and hardened models with ONNX Runtime and compare.

Providers: ``cuda`` and/or ``cpu`` as asked, or by default CUDA when this onnxruntime build offers it and
CPU otherwise.  A session that asked for CUDA but runs without it (ONNX Runtime logs and falls back to CPU
without raising) is a ``ProviderUnavailableError``, never a silent pass.  TF32 is off unless asked: with it
on, fp32 Conv/MatMul on Ampere+ differ from CPU by about 1e-3, which would blur what the hardening itself
changes.

Budgets: ``min_psnr`` (hardened vs original output, dB), ``max_psnr_drop`` (dB of PSNR against ground
truth lost by hardening; needs ground truth), ``atol``/``rtol`` (every element |h - o| <= atol + rtol |o|).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from .errors import ProviderUnavailableError, UsageError
from .inputs import TRUTH_PREFIX, DataReader
from .metrics import DiffStats, is_image_batch, psnr, ssim

PROVIDER_NAMES = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
GAP_LIMIT = 0.8  # reference agreement is judged where sigma_(k+1)/sigma_k <= this


@dataclass
class Budgets:
    min_psnr: float | None = 40.0
    max_psnr_drop: float | None = 0.5
    atol: float | None = None
    rtol: float | None = None
    data_range: float = 1.0
    crop_border: int = 0

    def check(self) -> None:
        for name in ("min_psnr", "max_psnr_drop", "atol", "rtol"):
            value = getattr(self, name)
            if value is not None and not np.isfinite(value):
                raise UsageError(f"{name.replace('_', '-')} must be a finite number, got {value}")
        for name in ("max_psnr_drop", "atol", "rtol"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UsageError(f"{name.replace('_', '-')} must be >= 0, got {value}")
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


def resolve_providers(requested: list[str] | None) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if not requested:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available \
            else ["CPUExecutionProvider"]
    names = []
    for r in requested:
        key = r.strip().lower()
        if key not in PROVIDER_NAMES:
            raise UsageError(f"unknown provider '{r}'; choose from {', '.join(PROVIDER_NAMES)}")
        names.append(PROVIDER_NAMES[key])
    if "CUDAExecutionProvider" in names and "CUDAExecutionProvider" not in available:
        raise ProviderUnavailableError(
            "CUDA was requested but this onnxruntime build has no CUDAExecutionProvider "
            f"(available: {', '.join(available)}); install the 'gpu' extra (onnxruntime-gpu, CUDA 13) "
            "in an environment without the CPU-only onnxruntime"
        )
    return names


def make_session(source: Path | bytes, providers: list[str], tf32: bool, threads: int | None = None,
                 cuda_options: dict | None = None):
    """An InferenceSession on a model path (or serialized bytes) that fails if CUDA was asked but not used.

    ``cuda_options``: extra CUDA provider options (for example ``{"enable_cuda_graph": "1"}``).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    cuda = {"use_tf32": "1" if tf32 else "0", **(cuda_options or {})}
    provider_args = [(p, cuda) if p == "CUDAExecutionProvider" else p for p in providers]
    model = source if isinstance(source, bytes) else str(source)
    session = ort.InferenceSession(model, sess_options=opts, providers=provider_args)
    ran = session.get_providers()
    if "CUDAExecutionProvider" in providers and "CUDAExecutionProvider" not in ran:
        raise ProviderUnavailableError(
            f"CUDA was requested but the session runs on {', '.join(ran)}: the CUDA libraries could not be "
            "loaded (check CUDA 13 / cuDNN, or `import torch` first so it loads them)"
        )
    return session


def probe_model(model: onnx.ModelProto, tensors: list[tuple[str, int]]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs ``tensors`` (name, elem type)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name, elem_type in tensors:
        if name not in existing:
            probe.graph.output.append(helper.make_tensor_value_info(name, elem_type, None))
    return probe


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
    probe_samples: int = 2,
    progress=None,
) -> ValidationResult:
    """Compare hardened against original outputs on every feed of ``reader``; check budgets."""
    original = make_session(original_path, providers, tf32)
    hardened = make_session(hardened_path, providers, tf32)
    output_names = [o.name for o in original.get_outputs()]
    atol = budgets.atol if budgets.atol is not None else 0.0
    rtol = budgets.rtol if budgets.rtol is not None else 0.0
    diffs = {name: DiffStats() for name in output_names}
    image = {name: {"psnr_vs_original": [], "ssim_vs_original": [], "psnr_original_vs_truth": [],
                    "psnr_hardened_vs_truth": [], "ssim_original_vs_truth": [], "ssim_hardened_vs_truth": []}
             for name in output_names}
    feeds, count = [], 0
    while (feed := reader.get_next()) is not None:
        count += 1
        truth = {k[len(TRUTH_PREFIX):]: v for k, v in feed.items() if k.startswith(TRUTH_PREFIX)}
        feed = {k: v for k, v in feed.items() if not k.startswith(TRUTH_PREFIX)}
        if len(feeds) < probe_samples:
            feeds.append(feed)
        o_outs = original.run(output_names, feed)
        h_outs = hardened.run(output_names, feed)
        for name, o, h in zip(output_names, o_outs, h_outs):
            diffs[name].add(h, o, atol, rtol)
            if not is_image_batch(o):
                continue
            if 2 * budgets.crop_border >= min(o.shape[-2:]):
                raise UsageError(f"crop border {budgets.crop_border} leaves no pixels of output '{name}' "
                                 f"({o.shape[-2]}x{o.shape[-1]})")
            kw = {"data_range": budgets.data_range, "crop_border": budgets.crop_border}
            rows = image[name]
            for i in range(len(o)):
                rows["psnr_vs_original"].append(psnr(h[i], o[i], **kw))
                rows["ssim_vs_original"].append(ssim(h[i], o[i], **kw))
                if name in truth:
                    t = truth[name][i]
                    if t.shape != o[i].shape:
                        raise UsageError(f"ground truth for '{name}' has shape {t.shape}, output has {o[i].shape}")
                    rows["psnr_original_vs_truth"].append(psnr(o[i], t, **kw))
                    rows["psnr_hardened_vs_truth"].append(psnr(h[i], t, **kw))
                    rows["ssim_original_vs_truth"].append(ssim(o[i], t, **kw))
                    rows["ssim_hardened_vs_truth"].append(ssim(h[i], t, **kw))
        if progress is not None:
            progress.update(1)
    if not feeds:
        raise UsageError("the validation inputs are empty")
    result = ValidationResult(list(hardened.get_providers()), tf32 if "CUDAExecutionProvider" in providers
                              else None, samples=count)
    for name in output_names:
        entry = {"difference": diffs[name].summary()}
        entry.update({k: _mean(v) for k, v in image[name].items() if v})
        if "psnr_original_vs_truth" in entry:
            entry["psnr_drop_vs_truth"] = entry["psnr_original_vs_truth"] - entry["psnr_hardened_vs_truth"]
        result.outputs[name] = entry
        _check_budgets(name, entry, budgets, result.failures)
    result.layers = _layer_stats(hardened_path, hardened_model, insertions, params, feeds, providers, tf32)
    for layer in result.layers:  # an insertion that changes nothing protects nothing: never a pass
        if params.gain != 1.0 and layer.get("unperturbed"):
            result.failures.append(
                f"layer {layer['layer']}: the subgraph left every probe input unchanged (max|X| = "
                f"{layer['max_abs']:.3g}: outside the float32 Gram matrix's range of about 1e-17..1e17)")
    return result


def _mean(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    if len(finite) < len(values):
        return float("inf") if all(v == float("inf") for v in values) else float(np.mean(values))
    return float(np.mean(finite))


def _check_budgets(name: str, entry: dict, b: Budgets, failures: list[str]) -> None:
    d = entry["difference"]
    if not np.isfinite(d["max_abs"]):
        failures.append(f"{name}: hardened output has non-finite values")
    if (b.atol is not None or b.rtol is not None) and d["tolerance_violations"]:
        failures.append(f"{name}: {d['tolerance_violations']} elements exceed atol={b.atol or 0} "
                        f"rtol={b.rtol or 0} (max abs {d['max_abs']:.3g})")
    if b.min_psnr is not None and "psnr_vs_original" in entry and not entry["psnr_vs_original"] >= b.min_psnr:
        failures.append(f"{name}: PSNR hardened vs original {entry['psnr_vs_original']:.2f} dB "
                        f"< min {b.min_psnr} dB")
    if b.max_psnr_drop is not None and "psnr_drop_vs_truth" in entry \
            and not entry["psnr_drop_vs_truth"] <= b.max_psnr_drop:
        failures.append(f"{name}: PSNR vs ground truth dropped {entry['psnr_drop_vs_truth']:.3f} dB "
                        f"> max {b.max_psnr_drop} dB")


def _layer_stats(hardened_path: Path, model: onnx.ModelProto, insertions: list, params, feeds: list,
                 providers: list[str], tf32: bool) -> list[dict]:
    """Per inserted layer: spectral gap, perturbation energy and agreement with the float64 reference."""
    try:
        from .reference import asvp_reference, relative_error, spectral_gap
    except ImportError:
        return [{"layer": ins.label, "reference": "unavailable: torch is not installed"} for ins in insertions]
    wanted = [(name, ins.elem_type) for ins in insertions for name in (ins.source, ins.output)]
    fd, tmp = tempfile.mkstemp(prefix=".probe.", suffix=".onnx", dir=hardened_path.parent)
    os.close(fd)
    try:  # beside the hardened model, so relative external-data locations still resolve
        onnx.save(probe_model(model, wanted), tmp)
        session = make_session(Path(tmp), providers, tf32)
        names = [name for name, _ in wanted]
        runs = [dict(zip(names, session.run(names, feed))) for feed in feeds]
    finally:
        os.unlink(tmp)
    stats = []
    for ins in insertions:
        errs, errs_gapped, gaps, energy, ranks = [], [], [], [], []
        unchanged, max_abs = True, 0.0
        for run in runs:
            x = run[ins.source].astype(np.float64)
            y = run[ins.output].astype(np.float64)
            unchanged &= bool(np.array_equal(x, y)) and bool(np.any(x))
            max_abs = max(max_abs, float(np.max(np.abs(x))) if x.size else 0.0)
            ref = asvp_reference(x, params)
            gap = spectral_gap(ref.singular_values, params.rank)
            gaps.append(gap.ravel())
            ranks.append(ref.ranks.ravel())
            errs.append(relative_error(y, ref.output, x))
            ok = gap <= GAP_LIMIT  # per matrix: (N,) in channel mode, (N, C) in spatial mode
            if ok.any():
                errs_gapped.append(relative_error(y[ok], ref.output[ok], x[ok]))
            energy.append(float(np.linalg.norm(y - x) / max(np.linalg.norm(x), 1e-300)))
        gaps_all = np.concatenate(gaps)
        stats.append({
            "layer": ins.label,
            "tensor": ins.tensor,
            "rank": params.rank,
            "effective_rank_mean": float(np.mean(np.concatenate(ranks))),
            "gain": params.gain,
            "iterations": params.iterations,
            "squarings": params.squarings,
            "spectral_gap": {"min": float(gaps_all.min()), "median": float(np.median(gaps_all)),
                             "max": float(gaps_all.max())},
            "perturbation_energy": float(np.mean(energy)),
            "reference_rel_error": float(np.max(errs)),
            f"reference_rel_error_gap_le_{GAP_LIMIT}": float(np.max(errs_gapped)) if errs_gapped else None,
            "probe_samples": len(runs),
            "max_abs": max_abs,
            "unperturbed": unchanged,
        })
    return stats
