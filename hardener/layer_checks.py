"""Per-layer checks of a hardened model: the verdict must not pass a subgraph that does nothing.

On probe inputs (the first validation inputs), each inserted subgraph's perturbation energy ||X' - X|| is
compared with what the float64 SVD reference (:mod:`hardener.reference`) amplifies on the same feature map,
and where the spectrum is gapped (sigma_(k+1)/sigma_k <= GAP_LIMIT) the perturbed map itself is compared with
the reference; either off by more than ``rtol`` (``Budgets.layer_rtol``) fails the layer.  The feature maps are
read from a probe copy of the hardened model that outputs each insertion's input and output as float32.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from .runtime import make_session, probe_model

GAP_LIMIT = 0.8  # reference agreement is judged where sigma_(k+1)/sigma_k <= this
LAYER_RTOL = 0.05  # default tolerance of the per-layer energy / reference checks (relative)
NOTHING_TO_AMPLIFY = 1e-6  # reference perturbation (of ||X||) below which there is no ratio to judge
ROUNDOFF_ENERGY = 1e-2  # what a subgraph may move such a map by (fp16/bf16 maps round at about 1e-3)


def _float32_probe(model: onnx.ModelProto, insertions: list) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of ``model`` that outputs each insertion's input and output as float32.

    fp16/bf16 maps are cast in the graph: ONNX Runtime's Python API cannot hand bfloat16 to NumPy.
    """
    wanted, names, casts = [], {}, []
    for ins in insertions:
        for tensor in (ins.source, ins.output):
            if tensor in names:
                continue
            if ins.elem_type in (TensorProto.FLOAT, TensorProto.DOUBLE):
                names[tensor] = tensor
                wanted.append((tensor, ins.elem_type))
            else:
                cast = f"hardener/probe/{len(casts)}"
                casts.append(helper.make_node("Cast", [tensor], [cast], name=cast + "/Cast", to=TensorProto.FLOAT))
                names[tensor] = cast
                wanted.append((cast, TensorProto.FLOAT))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.node.extend(casts)  # appended last: every tensor they read is produced before them
    return probe_model(probe, wanted), names


def layer_checks(hardened_path: Path, model: onnx.ModelProto, insertions: list, params, feeds: list,
                 providers: list[str], tf32: bool, rtol: float = LAYER_RTOL) -> list[dict]:
    """Per inserted layer: spectral gap, perturbation energy against the float64 reference, and a verdict."""
    from .validate import run_session  # here: validate imports this module

    try:
        from .reference import asvp_reference, relative_error, spectral_gap
    except ImportError:
        return [{"layer": ins.label, "reference": "unavailable: torch is not installed",
                 "check": "skipped: torch is not installed"} for ins in insertions]
    probe, names = _float32_probe(model, insertions)
    fd, tmp = tempfile.mkstemp(prefix=".probe.", suffix=".onnx", dir=hardened_path.parent)
    os.close(fd)
    try:  # beside the hardened model, so relative external-data locations still resolve
        onnx.save(probe, tmp)
        session = make_session(Path(tmp), providers, tf32)
        fetch = list(dict.fromkeys(names.values()))
        runs = [dict(zip(fetch, run_session(session, fetch, feed, "probe model"))) for feed in feeds]
    finally:
        os.unlink(tmp)
    stats = []
    for ins in insertions:
        errs, errs_gapped, gaps, ranks = [], [], [], []
        measured = reference = base = 0.0
        max_abs, finite = 0.0, True
        for run in runs:
            x = run[names[ins.source]].astype(np.float64)
            y = run[names[ins.output]].astype(np.float64)
            if not np.all(np.isfinite(x)):
                finite = False
                continue
            max_abs = max(max_abs, float(np.max(np.abs(x))) if x.size else 0.0)
            ref = asvp_reference(x, params)
            gap = spectral_gap(ref.singular_values, params.rank)
            gaps.append(gap.ravel())
            ranks.append(ref.ranks.ravel())
            errs.append(relative_error(y, ref.output, x))
            ok = gap <= GAP_LIMIT  # per matrix: (N,) in channel mode, (N, C) in spatial mode
            if ok.any():
                errs_gapped.append(relative_error(y[ok], ref.output[ok], x[ok]))
            measured += float(np.sum((y - x) ** 2))
            reference += float(np.sum((ref.output - x) ** 2))
            base += float(np.sum(x ** 2))
        entry = {"layer": ins.label, "tensor": ins.tensor, "rank": params.rank, "gain": params.gain,
                 "iterations": params.iterations, "squarings": params.squarings, "probe_samples": len(runs),
                 "max_abs": max_abs}
        if not gaps:
            entry["check"] = "skipped: the feature map is not finite (NaN/Inf) in the model on every probe" \
                if not finite else "skipped: no probe inputs"
            stats.append(entry)
            continue
        gaps_all = np.concatenate(gaps)
        energy = float(np.sqrt(measured / base)) if base > 0 else 0.0
        energy_ref = float(np.sqrt(reference / base)) if base > 0 else 0.0
        gapped = float(np.max(errs_gapped)) if errs_gapped else None
        entry.update({
            "effective_rank_mean": float(np.mean(np.concatenate(ranks))),
            "spectral_gap": {"min": float(gaps_all.min()), "median": float(np.median(gaps_all)),
                             "max": float(gaps_all.max())},
            "perturbation_energy": energy,  # ||X' - X|| / ||X|| over the probes
            "reference_perturbation_energy": energy_ref,
            "energy_ratio": energy / energy_ref if energy_ref > 0 else None,
            "reference_rel_error": float(np.max(errs)),
            f"reference_rel_error_gap_le_{GAP_LIMIT}": gapped,
            "unperturbed": measured == 0.0,
            "tolerance": rtol,
        })
        entry["check"] = _layer_verdict(entry, params, rtol, finite)
        stats.append(entry)
    return stats


def _layer_verdict(e: dict, params, rtol: float, finite: bool) -> str:
    if e["reference_perturbation_energy"] < NOTHING_TO_AMPLIFY:  # h = 1, or an all-zero map
        if e["perturbation_energy"] > ROUNDOFF_ENERGY:
            return (f"failed: the subgraph moved the map by {e['perturbation_energy']:.3g} of ||X|| where the "
                    "reference moves it by 0")
        return "ok (nothing to amplify: h = 1 or an all-zero map)"
    if e["unperturbed"]:
        why = f" (max|X| = {e['max_abs']:.3g}: outside the float32 Gram matrix's range of about 1e-17..1e17)" \
            if not 1e-17 < e["max_abs"] < 1e17 else ""
        return f"failed: the subgraph left every probe map unchanged{why}; the float64 SVD reference moves it " \
               f"by {e['reference_perturbation_energy']:.3g} of ||X||"
    ratio = e["energy_ratio"]
    if abs(ratio - 1) > rtol:
        return (f"failed: perturbation energy {e['perturbation_energy']:.3g} of ||X|| is {ratio:.3f}x the "
                f"float64 SVD reference's {e['reference_perturbation_energy']:.3g} (tolerance {rtol:g})")
    gapped = e[f"reference_rel_error_gap_le_{GAP_LIMIT}"]
    if gapped is not None and gapped > rtol:
        return (f"failed: where the spectrum is gapped (s(k+1)/s(k) <= {GAP_LIMIT}) the map differs from the "
                f"float64 SVD reference by {gapped:.3g} of the perturbation (tolerance {rtol:g}); "
                "more --iterations may help")
    return "ok" if finite else "ok on the finite probes (others had NaN/Inf features)"
