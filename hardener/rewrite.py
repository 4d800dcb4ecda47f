"""Splicing ASVP subgraphs into a model, keeping everything else as it was.

We edit the ModelProto directly instead of round-tripping through onnx-graphsurgeon: a graphsurgeon
import/export drops every node's ``metadata_props`` (the module-path mapping) and most ``value_info``
(shared/design/NOTES.md section 4).  Direct splicing keeps all of it, the IR version, the opsets and the
external-data references, and inserting each subgraph right after the node that produces its tensor keeps
the node list topologically sorted without a global sort.

Placement ``inline``: the producer's output is renamed and the subgraph writes the original name, so every
consumer, subgraph bodies and graph outputs included, sees the perturbed tensor and output names never
change.  Placement ``tap``: the forward path is untouched; the perturbed copy is a new graph output
``asvp/<layer>``.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

import onnx
from onnx import helper

from . import __version__
from .asvp import AsvpParams, GraphBuilder, build_asvp
from .errors import UsageError
from .layers import Layer

PLACEMENTS = ("inline", "tap")
MANIFEST_KEY = "hardener.manifest"
NODE_PREFIX = "hardener/asvp"
TAP_PREFIX = "asvp/"
_ABS_DIR = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?(?:[\\/][^\s\"'\\/<>:]+)+[\\/](?=[^\s\"'\\/<>]+)")


@dataclass
class Insertion:
    selector: str
    tensor: str  # the feature tensor as named in the source model
    module: str | None
    label: str
    source: str  # what the subgraph reads: the feature before perturbation
    output: str  # what it writes: inline, the original name (or a new one after a graph input); tap, asvp/...
    shape: str
    elem_type: int
    nodes: int
    prefix: str


def scrub_paths(text: str) -> str:
    """Drop absolute directory prefixes, keep file base names: '/home/a/x.py' -> 'x.py'."""
    return _ABS_DIR.sub("", text)


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {n.name for n in graph.node} | {i.name for i in graph.initializer}
    names |= {v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info)}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


def insert_asvp(
    model: onnx.ModelProto,
    opset: int,
    selections: list[tuple[str, Layer]],
    params: AsvpParams,
    placement: str,
    source_sha256: str,
    scrub: bool = True,
) -> tuple[onnx.ModelProto, list[Insertion]]:
    """Return a rewritten copy of ``model`` (never modified) and what was inserted."""
    if placement not in PLACEMENTS:
        raise UsageError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    params.check()
    if any(p.key == MANIFEST_KEY for p in model.metadata_props):
        raise UsageError("this model is already hardened (its metadata has a hardener manifest); "
                         "harden the original model instead")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    renamed = make_node_names_unique(out)
    taken = _all_names(graph)
    after: dict[int, list[onnx.NodeProto]] = {}  # producer's index -> subgraph nodes to place after it
    at_start: list[onnx.NodeProto] = []
    producers = {o: idx for idx, node in enumerate(graph.node) for o in node.output}
    insertions = []
    for i, (selector, layer) in enumerate(selections):
        prefix = f"{NODE_PREFIX}_{i}"
        builder = GraphBuilder(opset=opset, prefix=prefix, taken=taken)
        src, dst = layer.tensor, layer.tensor
        producer_idx = producers.get(layer.tensor)
        producer = None if producer_idx is None else graph.node[producer_idx]
        if placement == "tap":
            dst = _unique(f"{TAP_PREFIX}{layer.label()}", taken)
            graph.output.append(helper.make_tensor_value_info(dst, layer.elem_type, layer.shape))
        elif producer is not None:
            src = _unique(f"{layer.tensor}/pre_asvp", taken)
            producer.output[list(producer.output).index(layer.tensor)] = src
        else:  # a graph input: rewire its consumers instead of renaming the interface
            dst = _unique(f"{layer.tensor}/asvp", taken)
            for node in graph.node:
                for j, name in enumerate(node.input):
                    if name == layer.tensor:
                        node.input[j] = dst
        channels = layer.shape[1] if layer.shape and isinstance(layer.shape[1], int) and layer.shape[1] > 0 else None
        build_asvp(builder, src, dst, params, layer.elem_type, channels=channels)
        graph.initializer.extend(builder.initializers)
        if producer is not None:
            after.setdefault(producer_idx, []).extend(builder.nodes)
        else:
            at_start.extend(builder.nodes)
        insertions.append(Insertion(selector, layer.tensor, layer.module, layer.label(), src, dst,
                                    layer.shape_text(), layer.elem_type, len(builder.nodes), prefix))

    nodes = list(at_start)
    for idx, node in enumerate(graph.node):
        kept = onnx.NodeProto()
        kept.CopyFrom(node)  # detach from the repeated field before clearing it
        nodes.append(kept)
        nodes.extend(after.get(idx, []))
    del graph.node[:]
    graph.node.extend(nodes)

    if scrub:
        for node in graph.node:
            for prop in node.metadata_props:
                prop.value = scrub_paths(prop.value)
            node.doc_string = scrub_paths(node.doc_string)
        for prop in out.metadata_props:
            prop.value = scrub_paths(prop.value)
    manifest = {
        "tool": "hardener",
        "version": __version__,
        "method": "ASVP: top-k singular values of feature maps amplified by gain h",
        "placement": placement,
        "params": asdict(params),
        "source_sha256": source_sha256,
        "layers": [asdict(ins) for ins in insertions],
    }
    if renamed:
        manifest["renamed_duplicate_nodes"] = renamed
    out.metadata_props.append(onnx.StringStringEntryProto(key=MANIFEST_KEY,
                                                          value=json.dumps(manifest, sort_keys=True)))
    return out, insertions


def make_node_names_unique(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Rename repeated node names in place (the first keeps its name); ONNX Runtime rejects repeats."""
    graph = model.graph
    taken = _all_names(graph)
    seen: set[str] = set()
    renamed: dict[str, list[str]] = {}
    for node in graph.node:
        if node.name and node.name in seen:
            new = _unique(node.name, taken)
            renamed.setdefault(node.name, []).append(new)
            node.name = new
        seen.add(node.name)
    return renamed


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        candidate = f"{name}_{n}"
        n += 1
    taken.add(candidate)
    return candidate


def read_manifest(model: onnx.ModelProto) -> dict | None:
    for prop in model.metadata_props:
        if prop.key == MANIFEST_KEY:
            return json.loads(prop.value)
    return None
