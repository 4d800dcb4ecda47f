"""What a model holds, for ``harden layers`` and ``harden inspect``: feature maps, hardening, cost.

``list_layers``: every 4D float feature map (``hardener.layers``), marking graph inputs and outputs and
suggesting the body layers worth hardening (``suggest``).  ``inspect_model``: whether a model is hardened
(the ``hardener.manifest`` metadata and the inserted nodes, found by their name prefix), with what, where,
and what it costs in multiply-adds against the model's own Conv/ConvTranspose/MatMul/Gemm work.

Neither needs ONNX Runtime; both read the model without its external data.
"""
from __future__ import annotations

import math
import os

import onnx

from . import asvp
from .asvp import DENSE_MAX_CHANNELS, AsvpParams
from .layers import FLOAT_TYPES, Layer, LayerIndex
from .model_io import load_model
from .report import printable
from .rewrite import MANIFEST_KEY, NODE_PREFIX, read_manifest

LAYERS_SCHEMA = "hardener.layers/1"
INSPECT_SCHEMA = "hardener.inspect/1"
CONV_OPS = ("Conv", "ConvTranspose")
ACTIVATIONS = {"Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "Sigmoid", "HardSigmoid", "Tanh",
               "Softplus", "Softsign", "HardSwish", "Mish", "ThresholdedRelu", "Clip"}
HEURISTIC = ("Conv/ConvTranspose outputs inside the body: not the first or last convolution, not a graph input "
             "or output, not fed straight into an activation (if none qualifies: every body convolution)")


def _manifest(model: onnx.ModelProto) -> tuple[dict | None, str | None]:
    """The hardener manifest (or None) and a problem with it, if any."""
    try:
        manifest = read_manifest(model)
    except ValueError as exc:
        return None, f"{MANIFEST_KEY} metadata is not valid JSON ({exc})"
    if manifest is not None and not isinstance(manifest, dict):
        return None, f"{MANIFEST_KEY} metadata is not a JSON object"
    return manifest, None


# -- layers ------------------------------------------------------------------------------------------------
def selector_for(layer: Layer) -> str:
    """A selector that picks exactly this layer: its module path where it owns one, else tensor:NAME."""
    return layer.label() if layer.modules_owning else f"tensor:{layer.tensor}"


def suggest(model: onnx.ModelProto, index: LayerIndex) -> list[Layer]:
    """The body convolutions worth hardening (the heuristic in HEURISTIC, explained in `harden layers --help`)."""
    features = {l.tensor for l in index.feature_layers()}
    convs = [index.layers[out] for node in model.graph.node if node.op_type in CONV_OPS
             for out in node.output[:1] if out in index.layers]
    body = [l for l in convs[1:-1] if l.tensor in features and not l.graph_input and not l.graph_output]
    consumers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    quiet = [l for l in body if not any(op in ACTIVATIONS for op in consumers.get(l.tensor, []))]
    return quiet or body


def list_layers(model_path: str | os.PathLike) -> dict:
    loaded = load_model(model_path, runnable=False)
    index = LayerIndex(loaded.model)
    suggested = {l.tensor for l in suggest(loaded.model, index)}
    rows = []
    for layer in index.feature_layers():
        rows.append({
            "label": layer.label(), "selector": selector_for(layer), "module": layer.module,
            "modules_owning": list(layer.modules_owning), "node": layer.node, "op": layer.op,
            "tensor": layer.tensor, "shape": layer.shape, "shape_text": layer.shape_text(),
            "dtype": FLOAT_TYPES.get(layer.elem_type, "?"), "graph_input": layer.graph_input,
            "graph_output": layer.graph_output, "suggested": layer.tensor in suggested,
        })
    manifest, problem = _manifest(loaded.model)
    return {"schema": LAYERS_SCHEMA, "model": str(loaded.path), "hardened": manifest is not None or bool(problem),
            "layers": rows, "suggested": [r["selector"] for r in rows if r["suggested"]], "heuristic": HEURISTIC}


def layers_text(doc: dict) -> str:
    header = ("module", "node", "op", "tensor", "shape", "dtype", "note")
    table = [header]
    for r in doc["layers"]:
        owner = r["label"] if r["modules_owning"] else \
            "(graph input)" if r["graph_input"] else f"({r['module']} internal)" if r["module"] else "-"
        notes = [n for n, on in (("graph input", r["graph_input"]), ("graph output", r["graph_output"]),
                                 ("suggested", r["suggested"])) if on]
        table.append(tuple(printable(c) for c in (owner, r["node"] or "(graph input)", r["op"] or "-", r["tensor"],
                                                   r["shape_text"], r["dtype"], ", ".join(notes))))
    widths = [min(max(len(row[i]) for row in table), 48) for i in range(len(header))]
    lines = ["  ".join(str(c)[:w].ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    if doc["suggested"]:
        lines.append("suggested: " + " ".join(f"--layers {printable(s)}" for s in doc["suggested"]))
    else:
        lines.append("suggested: none (no convolution inside the body; pick layers by hand)")
    if doc["hardened"]:
        lines.append("note: this model is already hardened (harden inspect MODEL); harden the original instead")
    lines.append(f"{len(doc['layers'])} feature maps, {len(doc['suggested'])} suggested; select by module path, "
                 "node:NAME, tensor:NAME, op:TYPE, re:, glob")
    return "\n".join(lines)


# -- cost --------------------------------------------------------------------------------------------------
def _fixed_size(model: onnx.ModelProto, size: tuple[int, int]) -> tuple[onnx.ModelProto, list[dict], list[str]]:
    """A copy with dynamic input dimensions fixed (batch 1, spatial ``size``), shapes inferred."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    inits = {i.name for i in fixed.graph.initializer}
    inputs, assumed = [], []
    for vi in fixed.graph.input:
        if vi.name in inits or not vi.type.HasField("tensor_type"):
            continue
        dims = vi.type.tensor_type.shape.dim
        shape = []
        for axis, dim in enumerate(dims):
            if not dim.HasField("dim_value") or dim.dim_value <= 0:
                value = 1 if axis == 0 else size[0] if (len(dims) == 4 and axis == 2) else \
                    size[1] if (len(dims) == 4 and axis == 3) else 1
                assumed.append(f"{vi.name}[{axis}]={value}" + (f" ({dim.dim_param})" if dim.dim_param else ""))
                dim.Clear()
                dim.dim_value = value
            shape.append(dim.dim_value)
        inputs.append({"name": vi.name, "shape": shape})
    del fixed.graph.value_info[:]
    for vi in fixed.graph.output:
        if vi.type.HasField("tensor_type"):
            vi.type.tensor_type.ClearField("shape")
    try:
        fixed = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    except Exception:  # noqa: BLE001 - best effort: unknown shapes are reported as uncounted ops
        pass
    return fixed, inputs, assumed


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    shapes = {}
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        t = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return shapes


def _known(shape) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def node_macs(node: onnx.NodeProto, shapes: dict) -> int | None:
    """Multiply-adds of one Conv/ConvTranspose/MatMul/Gemm from its shapes; None when a shape is unknown."""
    get = lambda i: shapes.get(node.input[i]) if len(node.input) > i else None  # noqa: E731
    out = shapes.get(node.output[0])
    if node.op_type == "Conv":
        w = get(1)
        if not (_known(w) and _known(out)):
            return None
        return math.prod(out) * math.prod(w[1:])  # N*M*spatial x (C/group)*kernel
    if node.op_type == "ConvTranspose":
        x, w = get(0), get(1)
        if not (_known(x) and _known(w)):
            return None
        return math.prod(x) * math.prod(w[1:])  # N*C*spatial x (M/group)*kernel
    if node.op_type == "MatMul":
        a = get(0)
        if not (_known(a) and _known(out)):
            return None
        return math.prod(out) * a[-1]
    if node.op_type == "Gemm":
        a = get(0)
        if not (_known(a) and _known(out)) or len(a) != 2:
            return None
        trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
        return math.prod(out) * (a[0] if trans_a else a[1])
    return None


def insertion_macs(params: dict, shape: list[int], static_channels: bool, layout_conv: bool | None = None) -> dict:
    """Estimated multiply-adds of one inserted subgraph on a map of ``shape`` (N, C, H, W).

    ``layout_conv``: whether the subgraph ends in the identity depthwise Conv (None: as this version of
    ``hardener.asvp`` builds it; a file written by another version says so by its nodes).
    """
    p = AsvpParams(**{k: v for k, v in params.items() if k in AsvpParams.__dataclass_fields__}).resolved()
    n, c, h, w = shape
    k = p.rank
    if p.mode == "channel":
        rows, cols, mats = c, h * w, n
        dense = static_channels and c <= DENSE_MAX_CHANNELS
    else:
        rows, cols, mats = h, w, n * c
        dense = False
    gram = rows * rows * cols
    update = rows * rows * cols + rows * rows * k if dense else 2 * k * rows * cols
    # squarings G <- G G; iterations G Q; Gram-Schmidt projections (2 (j) rows per column j, twice in the last)
    spectral = p.squarings * rows**3 + p.iterations * rows * rows * k + (p.iterations + 1) * rows * k * (k - 1)
    if p.adaptive_energy is not None:
        spectral += rows * rows * k
    # an identity depthwise 1x1 Conv ends the subgraph where the static channel count suits ONNX Runtime's
    # blocked CPU layout (asvp.LAYOUT_CHANNEL_MULTIPLE): one multiply per element of the map
    if layout_conv is None:
        multiple = getattr(asvp, "LAYOUT_CHANNEL_MULTIPLE", None)
        layout_conv = bool(static_channels and multiple and c % multiple == 0)
    layout = n * c * h * w if layout_conv else 0
    return {"gram": mats * gram, "update": mats * update, "spectral": mats * spectral, "layout": layout,
            "total": mats * (gram + update + spectral) + layout, "form": "dense" if dense else "low-rank",
            "matrices": mats, "matrix": f"{rows}x{cols}"}


def _static_channels(shape_text: str | None) -> bool:
    parts = (shape_text or "").split("x")
    return len(parts) == 4 and parts[1].isdigit()


def inspect_model(model_path: str | os.PathLike, size: tuple[int, int] = (256, 256)) -> dict:
    loaded = load_model(model_path, runnable=False)
    model = loaded.model
    manifest, manifest_problem = _manifest(model)
    prefix_nodes: dict[str, int] = {}
    for node in model.graph.node:
        if node.name.startswith(NODE_PREFIX + "_"):
            prefix = node.name.split("/", 2)
            prefix = "/".join(prefix[:2]) if len(prefix) > 1 else node.name
            prefix_nodes[prefix] = prefix_nodes.get(prefix, 0) + 1

    fixed, inputs, assumed = _fixed_size(model, size)
    shapes = _shapes(fixed)
    model_macs, uncounted, inserted_counted = 0, [], {}  # inserted: the subgraphs' own MatMuls (and Convs)
    for node in fixed.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
            continue
        macs = node_macs(node, shapes)
        owner = next((p for p in prefix_nodes if node.name.startswith(p + "/")), None)
        if owner is not None:
            counted = inserted_counted.setdefault(owner, {"macs": 0, "uncounted": 0, "conv": False})
            counted["conv"] |= node.op_type == "Conv"
            if macs is None:
                counted["uncounted"] += 1
            else:
                counted["macs"] += macs
        elif macs is None:
            uncounted.append(node.name or node.op_type)
        else:
            model_macs += macs

    doc = {
        "schema": INSPECT_SCHEMA,
        "model": {"path": str(loaded.path), "sha256": loaded.sha256, "opset": loaded.opset,
                  "ir_version": model.ir_version, "nodes": len(model.graph.node),
                  "external_data": loaded.external_files},
        "cost_basis": {"inputs": inputs, "assumed": assumed, "size": list(size),
                       "unit": "multiply-adds (MACs) of Conv, ConvTranspose, MatMul, Gemm",
                       "model_macs": model_macs, "uncounted_model_ops": uncounted},
        "hardened": False, "status": "not hardened", "manifest": manifest, "insertions": [], "problems": [],
    }
    layers = (manifest or {}).get("layers", [])
    manifest_prefixes = {l.get("prefix") for l in layers}
    missing = [l.get("label") for l in layers if prefix_nodes.get(l.get("prefix"), 0) == 0]
    orphans = sorted(p for p in prefix_nodes if p not in manifest_prefixes)
    if manifest_problem:
        doc["problems"].append(manifest_problem)
    if manifest is None and not prefix_nodes:
        if manifest_problem:
            doc["status"] = "unreadable manifest, no hardener nodes"
        return doc
    if manifest is None:
        doc["status"] = "hardener nodes without a manifest (metadata removed or edited)"
        doc["problems"].append(f"{len(orphans)} inserted subgraph(s) ({', '.join(orphans)}) but no {MANIFEST_KEY}")
    elif missing and len(missing) == len(layers):
        doc["status"] = "manifest only: the inserted subgraphs are gone (stripped?)"
    elif missing:
        doc["status"] = "partly hardened: some inserted subgraphs are gone"
    else:
        doc["status"] = "hardened"
    if missing:
        doc["problems"].append(f"manifest lists {len(missing)} insertion(s) whose nodes are missing: "
                               + ", ".join(map(str, missing)))
    if orphans and manifest is not None:
        doc["problems"].append(f"inserted nodes not in the manifest: {', '.join(orphans)}")
    doc["hardened"] = bool(prefix_nodes)

    params = (manifest or {}).get("params", {})
    total = 0
    for layer in layers:
        prefix = layer.get("prefix")
        entry = {k: layer.get(k) for k in ("label", "module", "tensor", "selector", "output", "prefix", "shape")}
        entry["nodes_in_manifest"] = layer.get("nodes")
        entry["nodes_found"] = prefix_nodes.get(prefix, 0)
        entry["present"] = entry["nodes_found"] > 0
        feature = shapes.get(layer.get("source")) or shapes.get(layer.get("tensor"))
        entry["shape_at_size"] = feature
        entry["estimated_macs"] = None
        entry["fraction_of_model"] = None
        if entry["present"] and _known(feature) and len(feature) == 4 and params:
            est = insertion_macs(params, feature, _static_channels(layer.get("shape")),
                                 layout_conv=inserted_counted.get(prefix, {}).get("conv", False))
            entry["estimated_macs"] = est
            total += est["total"]
            if model_macs:
                entry["fraction_of_model"] = est["total"] / model_macs
        counted = inserted_counted.get(prefix)
        entry["counted_macs"] = counted["macs"] if counted and not counted["uncounted"] else None
        doc["insertions"].append(entry)
    doc["cost"] = {"insertions_macs": total, "model_macs": model_macs,
                   "fraction_of_model": total / model_macs if model_macs else None}
    return doc


def _count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f}"


def inspect_text(doc: dict) -> str:
    m, basis = doc["model"], doc["cost_basis"]
    lines = [f"model: {m['path']} (opset {m['opset']}, IR {m['ir_version']}, {m['nodes']} nodes, "
             f"sha256 {m['sha256'][:16]}...)"]
    feeds = ", ".join(f"{i['name']} {'x'.join(map(str, i['shape']))}" for i in basis["inputs"])
    size = f"{basis['size'][0]}x{basis['size'][1]}"
    assumed = f" (assumed for dynamic dimensions: {', '.join(basis['assumed'])}; --size sets {size})" \
        if basis["assumed"] else ""
    work = f"{_count(basis['model_macs'])} multiply-adds (Conv/MatMul/Gemm)"
    if basis["uncounted_model_ops"]:
        work += f", {len(basis['uncounted_model_ops'])} op(s) of unknown shape not counted"
    lines.append(f"cost basis: input {feeds}{assumed}: model {work}")
    manifest = doc["manifest"]
    for problem in doc["problems"] if manifest is None and not doc["hardened"] else []:
        lines.append(f"  ! {problem}")
    if manifest is None and not doc["hardened"]:
        lines.append(f"not hardened: no {'readable ' if doc['problems'] else ''}{MANIFEST_KEY} metadata and no "
                     f"{NODE_PREFIX}_* nodes")
        lines.append("NOT HARDENED | harden layers MODEL suggests layers; harden MODEL --layers ... hardens it")
        return "\n".join(lines)
    if manifest is not None:
        p = manifest.get("params", {})
        lines.append(f"hardened by {manifest.get('tool', '?')} {manifest.get('version', '?')}: ASVP "
                     f"{manifest.get('placement', '?')} / {p.get('mode', '?')} mode, k={p.get('rank', '?')}, "
                     f"h={p.get('gain', '?')}, {p.get('iterations', '?')} iterations on "
                     f"G^{2 ** p['squarings'] if isinstance(p.get('squarings'), int) else '?'} "
                     f"({p.get('precision', '?')}), seed {p.get('seed', '?')}")
        lines.append(f"  source sha256 {manifest.get('source_sha256', '?')}")
    for problem in doc["problems"]:
        lines.append(f"  ! {problem}")
    for e in doc["insertions"]:
        where = f" (module {e['module']})" if e.get("module") else ""
        state = f"{e['nodes_found']} nodes" if e["present"] else "MISSING"
        cost = ""
        if e["estimated_macs"]:
            est = e["estimated_macs"]
            frac = f" = {100 * e['fraction_of_model']:.1f} % of the model" if e["fraction_of_model"] else ""
            cost = (f", {_count(est['total'])} MACs (Gram {_count(est['gram'])}, update {_count(est['update'])} "
                    f"{est['form']}, spectral {_count(est['spectral'])}){frac}")
        shape = "x".join(map(str, e["shape_at_size"])) if _known(e["shape_at_size"]) else e.get("shape")
        lines.append(f"  + {e['label']}: tensor {e['tensor']}{where} {shape}, {state}{cost}")
    cost = doc.get("cost") or {}
    frac = cost.get("fraction_of_model")
    tail = f"{sum(e['present'] for e in doc['insertions'])} insertion(s)"
    if frac is not None:
        tail += f", +{100 * frac:.1f} % multiply-adds over the model's {_count(cost['model_macs'])} (estimate)"
    lines.append(f"{doc['status'].upper() if doc['status'] == 'hardened' else doc['status']} | {tail}")
    return "\n".join(lines)

