"""Insert the keyed output mark into an ONNX model, with eps calibrated to a target teacher cost.

At each image output y (float32, (N, C, H, W), static C), the graph gains standard ONNX operators

    Pad(edge) -> Conv 3x3 (C -> 16, W1) -> Tanh -> Mul (square) -> Conv 1x1 (16 -> C, W2)
    -> ReduceMean over H, W -> Sub -> Mul eps -> Add y

(``signal.py`` has the same function in torch).  The producer's output is renamed ``<y>/pre_mark``, internal
consumers keep reading the unmarked tensor, and the graph output keeps its name; IR version, opsets,
metadata and external-data references are kept.  The manifest (metadata ``hardener.mark``) records the key
id (a hash commitment), eps and the calibration, never the key.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .. import __version__
from ..errors import InvalidModelError, UsageError
from ..metrics import psnr
from ..model_io import LoadedModel, atomic_write, check_output_paths, load_model, save_model
from .key import HIDDEN, ProvenanceKey, mark_weights
from .signal import mark_signal

MARK_KEY = "hardener.mark"
MARK_PREFIX = "hardener/mark"
SCHEME = "hardener-mark-v1"
SCHEME_TEXT = ("y' = y + eps * (g(y) - mean_HW g(y)),  g(y) = W2 . tanh(W1 * pad_edge(y))^2, W1: 3x3 zero-sum "
               f"C->{HIDDEN}, W2: 1x1 {HIDDEN}->C, weights = SHAKE-256(secret)")
DEFAULT_DROP = 0.05
DEFAULT_PSNR = 50.0


@dataclass
class ImageOutput:
    index: int  # position among the graph outputs
    name: str
    channels: int


def image_outputs(model: onnx.ModelProto) -> list[ImageOutput]:
    """Graph outputs that are float32 (N, C, H, W) with a static C of 1 or 3."""
    found = []
    for i, out in enumerate(model.graph.output):
        t = out.type.tensor_type
        if t.elem_type != TensorProto.FLOAT or len(t.shape.dim) != 4:
            continue
        c = t.shape.dim[1]
        if c.HasField("dim_value") and c.dim_value in (1, 3):
            found.append(ImageOutput(i, out.name, c.dim_value))
    return found


def read_mark_manifest(model: onnx.ModelProto) -> dict | None:
    for prop in model.metadata_props:
        if prop.key == MARK_KEY:
            try:
                return json.loads(prop.value)
            except json.JSONDecodeError:
                return {"unreadable": True}
    return None


def insert_mark(model: onnx.ModelProto, opset: int, key: ProvenanceKey,
                eps: dict[int, float]) -> tuple[onnx.ModelProto, list[dict]]:
    """A marked copy of ``model`` (never modified): one mark per graph-output index in ``eps``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    producers = {o: idx for idx, node in enumerate(graph.node) for o in node.output}
    after: dict[int, list[onnx.NodeProto]] = {}
    records = []
    outputs = {o.index: o for o in image_outputs(model)}
    for index, e in sorted(eps.items()):
        spec = outputs[index]
        name = spec.name
        if name not in producers:
            raise UsageError(f"output '{name}' is not produced by any node (it passes a graph input or "
                             "initializer through); cannot mark it")
        prefix = f"{MARK_PREFIX}_{index}"
        src = f"{name}/pre_mark"
        producer = graph.node[producers[name]]
        producer.output[list(producer.output).index(name)] = src
        for node in graph.node:  # internal consumers keep the unmarked tensor
            if node is producer:
                continue
            for j, inp in enumerate(node.input):
                if inp == name:
                    node.input[j] = src
        w1, w2 = mark_weights(key.secret, spec.channels, index)
        p = f"{prefix}/"
        inits = [
            numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), p + "pads"),
            numpy_helper.from_array(w1.astype(np.float32), p + "w1"),
            numpy_helper.from_array(w2.astype(np.float32)[:, :, None, None], p + "w2"),
            numpy_helper.from_array(np.array(e, np.float32), p + "eps"),
        ]
        nodes = [
            helper.make_node("Pad", [src, p + "pads"], [p + "padded"], name=p + "Pad", mode="edge"),
            helper.make_node("Conv", [p + "padded", p + "w1"], [p + "u"], name=p + "Conv1", kernel_shape=[3, 3]),
            helper.make_node("Tanh", [p + "u"], [p + "a"], name=p + "Tanh"),
            helper.make_node("Mul", [p + "a", p + "a"], [p + "a2"], name=p + "Square"),
            helper.make_node("Conv", [p + "a2", p + "w2"], [p + "g"], name=p + "Conv2", kernel_shape=[1, 1]),
        ]
        if opset >= 18:
            inits.append(numpy_helper.from_array(np.array([2, 3], np.int64), p + "axes"))
            nodes.append(helper.make_node("ReduceMean", [p + "g", p + "axes"], [p + "mean"], name=p + "Mean",
                                          keepdims=1))
        else:
            nodes.append(helper.make_node("ReduceMean", [p + "g"], [p + "mean"], name=p + "Mean", axes=[2, 3],
                                          keepdims=1))
        nodes += [
            helper.make_node("Sub", [p + "g", p + "mean"], [p + "g0"], name=p + "Center"),
            helper.make_node("Mul", [p + "g0", p + "eps"], [p + "delta"], name=p + "Scale"),
            helper.make_node("Add", [src, p + "delta"], [name], name=p + "Add"),
        ]
        graph.initializer.extend(inits)
        after.setdefault(producers[name], []).extend(nodes)
        records.append({"output": name, "index": index, "channels": spec.channels, "eps": float(e),
                        "prefix": prefix, "nodes": len(nodes)})
    nodes = []
    for idx, node in enumerate(graph.node):
        kept = onnx.NodeProto()
        kept.CopyFrom(node)
        nodes.append(kept)
        nodes.extend(after.get(idx, []))
    del graph.node[:]
    graph.node.extend(nodes)
    return out, records


# ----------------------------------------------------------------------------------------- calibration
def bundled_samples() -> tuple[Path, Path]:
    root = Path(str(resources.files("hardener") / "assets" / "samples"))
    return root / "lr", root / "hr"


def _session(source):
    from ..runtime import make_session

    return make_session(source, ["CPUExecutionProvider"], tf32=False, threads=1)


def _run_all(session, feeds: list[dict], names: list[str]) -> list[list[np.ndarray]]:
    results = []
    for feed in feeds:
        model_feed = {k: v for k, v in feed.items() if not k.startswith("truth:")}
        try:
            results.append(session.run(names, model_feed))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several types for bad feeds
            raise UsageError(f"the model could not run on the calibration inputs: {' '.join(str(exc).split())[:300]}")
    return results


def calibrate_eps(y: list[np.ndarray], g0: list[np.ndarray], truth: list[np.ndarray] | None,
                  target: float, kind: str, crop_border: int = 0) -> dict:
    """Bisection on eps so that the mark costs ``target``: a PSNR drop against truth (``psnr_drop``), or a
    marked-vs-original PSNR (``psnr_vs_original``).  Images are (C, H, W) float arrays."""
    def measure(eps: float) -> float:
        if kind == "psnr_drop":
            return float(np.mean([psnr(a, t, crop_border=crop_border) - psnr(a + eps * g, t, crop_border=crop_border)
                                  for a, g, t in zip(y, g0, truth)]))
        return -float(np.mean([psnr(a + eps * g, a, crop_border=crop_border) for a, g in zip(y, g0)]))

    goal = target if kind == "psnr_drop" else -target
    lo, hi = 0.0, 1e-4
    while measure(hi) < goal:
        lo, hi = hi, hi * 2
        if hi > 10.0:
            raise UsageError(f"no mark strength reaches the target ({kind} {target}); the model's outputs may "
                             "be constant or far outside [0, 1]")
    for _ in range(60):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 2
        if measure(mid) < goal:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-6 * hi:
            break
    eps = hi
    vs_orig = float(np.mean([psnr(a + eps * g, a, crop_border=crop_border) for a, g in zip(y, g0)]))
    record = {"kind": kind, "target": target, "eps": eps, "achieved": measure(eps) * (1 if kind == "psnr_drop" else -1),
              "psnr_marked_vs_original": vs_orig,
              "mark_rms": float(np.sqrt(np.mean([np.mean((eps * g) ** 2) for g in g0])))}
    if truth is not None:
        record["psnr_original_vs_truth"] = float(np.mean([psnr(a, t, crop_border=crop_border) for a, t in zip(y, truth)]))
        record["psnr_marked_vs_truth"] = float(np.mean([psnr(a + eps * g, t, crop_border=crop_border)
                                                        for a, g, t in zip(y, g0, truth)]))
        record["psnr_drop_vs_truth"] = record["psnr_original_vs_truth"] - record["psnr_marked_vs_truth"]
    return record


def _runnable(model: onnx.ModelProto, loaded: LoadedModel) -> bytes:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    if loaded.has_external_data:
        onnx.external_data_helper.load_external_data_for_model(copy, str(loaded.path.parent))
    return copy.SerializeToString()


def mark_model(model_path: Path, key: ProvenanceKey, output: Path, *, target_drop: float | None = None,
               target_psnr: float | None = None, inputs: str | None = None, truth: str | None = None,
               crop_border: int = 0, num_samples: int | None = None, force: bool = False,
               report_path: Path | None = None) -> dict:
    """Mark ``model_path`` with ``key`` and write ``output`` (and the JSON report); returns the report."""
    from ..inputs import open_inputs

    if target_drop is not None and target_psnr is not None:
        raise UsageError("give either --target-psnr-drop or --target-psnr, not both")
    if target_drop is not None and not (0 < target_drop < 20):
        raise UsageError(f"--target-psnr-drop must be in (0, 20) dB, got {target_drop}")
    if target_psnr is not None and not (10 < target_psnr < 120):
        raise UsageError(f"--target-psnr must be in (10, 120) dB, got {target_psnr}")
    loaded = load_model(model_path)
    report_path = report_path or output.with_name(output.name + ".mark.json")
    check_output_paths(loaded, output, report_path, force)  # refuses an existing report without force too
    existing = read_mark_manifest(loaded.model)
    if existing is not None:
        raise UsageError(f"{model_path} already carries a provenance mark (key id "
                         f"{str(existing.get('key_id', '?'))[:16]}); mark the unmarked model instead")
    outputs = image_outputs(loaded.model)
    if not outputs:
        raise UsageError(f"{model_path} has no image output to mark (a float32 (N, C, H, W) output with C = 1 or 3)")

    default_data = inputs is None
    if default_data:
        lr, hr = bundled_samples()
        inputs = str(lr)
        if truth is None:
            truth = str(hr)
    elif truth is not None and target_psnr is not None:
        raise UsageError("--target-psnr calibrates against the original's outputs; drop --truth")
    reader = open_inputs(inputs, loaded.model, truth=truth, limit=num_samples)
    feeds = []
    while (feed := reader.get_next()) is not None:
        feeds.append(feed)
    session = _session(loaded.path if not loaded.has_external_data else _runnable(loaded.model, loaded))
    names = [o.name for o in loaded.model.graph.output]
    originals = _run_all(session, feeds, names)

    eps, calibrations = {}, []
    weights = {spec.index: mark_weights(key.secret, spec.channels, spec.index) for spec in outputs}
    for spec in outputs:
        ys = [res[spec.index][0].astype(np.float64) for res in originals]
        key_truth = "truth:" + spec.name
        truths = [f[key_truth][0].astype(np.float64) for f in feeds] if all(key_truth in f for f in feeds) else None
        if truths is not None and any(t.shape != y.shape for t, y in zip(truths, ys)):
            if not default_data:
                raise UsageError(f"ground truth is {truths[0].shape} but output '{spec.name}' is {ys[0].shape}")
            truths = None  # bundled x2 truth does not fit this model: calibrate against the original
        if truths is None and target_drop is not None:
            raise UsageError("--target-psnr-drop needs ground truth (--inputs DIR --truth DIR); without it use "
                             f"--target-psnr (marked vs original PSNR, default {DEFAULT_PSNR} dB)")
        w1, w2 = weights[spec.index]
        g0 = [mark_signal(y[None], w1, w2)[0] for y in ys]
        if truths is not None and target_psnr is None:
            record = calibrate_eps(ys, g0, truths, target_drop or DEFAULT_DROP, "psnr_drop", crop_border)
        else:
            record = calibrate_eps(ys, g0, None, target_psnr or DEFAULT_PSNR, "psnr_vs_original", crop_border)
        record["output"] = spec.name
        eps[spec.index] = record["eps"]
        calibrations.append(record)

    marked, records = insert_mark(loaded.model, loaded.opset, key, eps)
    manifest = {
        "tool": "hardener", "version": __version__, "scheme": SCHEME, "function": SCHEME_TEXT,
        "key_id": key.key_id, "outputs": records, "source_sha256": loaded.sha256,
        "calibration": {"inputs": "bundled samples (hardener/assets/samples/lr, truth .../hr)" if default_data
                        else inputs, "truth": None if truth is None else ("bundled" if default_data else truth),
                        "images": len(feeds), "crop_border": crop_border, "per_output": calibrations},
    }
    marked.metadata_props.append(onnx.StringStringEntryProto(key=MARK_KEY, value=json.dumps(manifest, sort_keys=True)))
    try:
        onnx.checker.check_model(marked)
    except onnx.checker.ValidationError as exc:
        raise InvalidModelError(f"the marked model fails the ONNX checker: {' '.join(str(exc).split())[:300]}")

    # the graph must compute what was calibrated: run it and compare with the torch mark
    check = _run_all(_session(_runnable(marked, loaded)), feeds, names)
    worst = 0.0
    for spec in outputs:
        w1, w2 = weights[spec.index]
        for res_o, res_m in zip(originals, check):
            want = res_o[spec.index] + eps[spec.index] * mark_signal(res_o[spec.index], w1, w2)
            worst = max(worst, float(np.max(np.abs(res_m[spec.index] - want))))
    others = [i for i in range(len(names)) if i not in eps]
    for res_o, res_m in zip(originals, check):
        for i in others:
            if not np.array_equal(res_o[i], res_m[i]):
                raise InvalidModelError(f"marking changed output '{names[i]}', which it must not touch")
    if worst > 1e-4:
        raise InvalidModelError(f"the inserted mark deviates from its reference by {worst:.2e} (> 1e-4); "
                                "nothing written")
    written = save_model(marked, output, loaded)
    report = {"tool": "hardener", "version": __version__, "command": "mark", "model": str(model_path),
              "output": str(output), "files": [str(p) for p in written], "key_id": key.key_id,
              "outputs": records, "calibration": manifest["calibration"], "max_abs_deviation_onnx_vs_reference": worst,
              "exit_code": 0}
    atomic_write((json.dumps(report, indent=2, sort_keys=True) + "\n").encode(), None, report_path)
    report["report"] = str(report_path)
    return report


def mark_summary(report: dict) -> str:
    lines = [f"marked {report['model']} -> {report['output']} (key id {report['key_id'][:16]})"]
    for rec in report["calibration"]["per_output"]:
        if rec["kind"] == "psnr_drop":
            cost = (f"teacher PSNR vs truth {rec['psnr_original_vs_truth']:.3f} -> {rec['psnr_marked_vs_truth']:.3f} dB "
                    f"(drop {rec['achieved']:.3f} dB, target {rec['target']:g})")
        else:
            cost = f"marked vs original PSNR {rec['achieved']:.2f} dB (target {rec['target']:g})"
        lines.append(f"  output {rec['output']}: eps {rec['eps']:.4g}, mark rms {rec['mark_rms']:.2e}; {cost}; "
                     f"marked vs original {rec['psnr_marked_vs_original']:.2f} dB")
    lines.append(f"  calibrated on {report['calibration']['images']} images: {report['calibration']['inputs']}")
    lines.append(f"  report: {report['report']}")
    lines.append(f"MARKED | key id {report['key_id'][:16]} | onnx vs reference max |diff| "
                 f"{report['max_abs_deviation_onnx_vs_reference']:.1e}")
    return "\n".join(lines)
