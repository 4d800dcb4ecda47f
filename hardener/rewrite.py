"""Splicing ASVP subgraphs into a model, keeping everything else as it was.

The edit runs on onnx-ir (the IR torch.onnx's own exporter uses), not onnx-graphsurgeon: measured on the
bundled teacher, a graphsurgeon 0.6.1 round trip drops all 110 node ``metadata_props`` (the module paths the
layer selectors resolve) and half the ``value_info``; onnx-ir keeps both, keeps node order, IR version, opsets
and external-data references (tensors are never loaded), and tracks the uses of every value, subgraph bodies
(If/Loop/Scan) included, so rewiring consumers is one loop over ``value.uses()`` instead of a scan of every
node by name.  The model crosses the boundary as a ModelProto both ways.

Placement ``inline``: the producer's output value is renamed ``<t>/pre_asvp`` and the subgraph writes a new
value named ``<t>``; every use of the old value, in subgraph bodies too, and its graph-output slot are moved to
the new one, so consumers and output names never change.  After a graph input (whose name is interface) the
subgraph writes ``<t>/asvp`` and the input's uses are moved to it.

Placement ``tap``: the forward path is untouched; the perturbed copy is a new graph output ``asvp/<layer>``.
Giving a tensor a second consumer can change how ONNX Runtime fuses its producer (a Conv whose only consumer is
an Add is fused into one NCHWc Conv+Sum kernel, whose rounding differs: 1.2e-7 on the bundled teacher's
``body.*.conv2``), so a tapped Conv with a single consumer is duplicated for the tap, with a private copy of its
bias (ONNX Runtime's common-subexpression elimination would merge an exact duplicate back): the original Conv
keeps its single consumer and the served output stays bit-identical.  Each subgraph, a tap's duplicate
included, sits right after the node that produces its tensor, which keeps the node list topologically sorted.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnx_ir as ir

from . import __version__
from .asvp import AsvpParams, GraphBuilder, build_asvp
from .errors import InvalidModelError, UsageError
from .layers import Layer

PLACEMENTS = ("inline", "tap")
MANIFEST_KEY = "hardener.manifest"
NODE_PREFIX = "hardener/asvp"
TAP_PREFIX = "asvp/"
# Producers a tap duplicates so that the original keeps its single consumer (and its fusions).
TAP_DUPLICATED_OPS = ("Conv",)
_PREFIX_INDEX = re.compile(re.escape(NODE_PREFIX) + r"_(\d+)/")
# An absolute directory prefix: POSIX ("/a/b/"), home ("~/a/"), Windows ("C:\a\b\", "C:/a/", "\a\", UNC
# "\\srv\share\"); at least one directory, with or without a file name after it.  Not a relative path ("a/b/",
# "./a/", "../a/").
_ABS_DIR = re.compile(r"""(?<![\w.~])(?:[A-Za-z]:[\\/]|~[\\/]|[\\/]{1,2})(?:[^\s"'<>:\\/]+[\\/])+""")


@dataclass
class Insertion:
    selector: str
    tensor: str  # the feature tensor as named in the source model
    module: str | None
    label: str
    source: str  # what the subgraph reads: the feature before perturbation (a tap: maybe a duplicate's output)
    output: str  # what it writes: inline, the original name (or a new one after a graph input); tap, asvp/...
    shape: str
    elem_type: int
    nodes: int
    prefix: str


def scrub_paths(text: str) -> str:
    """Drop absolute directory prefixes, keep file base names: '/home/a/x.py' -> 'x.py'."""
    return _ABS_DIR.sub("", text)


def absolute_dirs(text: str) -> list[str]:
    """The absolute directory prefixes :func:`scrub_paths` would drop from ``text``."""
    return _ABS_DIR.findall(text)


def scrub_model(model: onnx.ModelProto) -> int:
    """:func:`scrub_paths` on every text of ``model`` in place: node metadata and doc strings (subgraphs and
    functions included), graph and model metadata and doc strings.  Returns how many node metadata values
    changed."""
    changed = _scrub_graph(model.graph)
    for function in model.functions:
        changed += _scrub_nodes(function.node)
    _scrub_texts(model)
    return changed


def _scrub_texts(holder) -> int:
    """Scrub ``holder.metadata_props`` and ``holder.doc_string``; the number of metadata values changed."""
    changed = 0
    for prop in holder.metadata_props:
        new = scrub_paths(prop.value)
        changed += new != prop.value
        prop.value = new
    if holder.doc_string:  # not set when empty: an empty field would still be serialized
        holder.doc_string = scrub_paths(holder.doc_string)
    return changed


def _scrub_nodes(nodes) -> int:
    changed = 0
    for node in nodes:
        changed += _scrub_texts(node)
        for attr in node.attribute:
            for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                changed += _scrub_graph(graph)
    return changed


def _scrub_graph(graph) -> int:
    changed = _scrub_nodes(graph.node)
    _scrub_texts(graph)
    return changed


def insert_asvp(
    model: onnx.ModelProto,
    opset: int,
    selections: list[tuple[str, Layer]],
    params: AsvpParams,
    placement: str,
    source_sha256: str,
    scrub: bool = True,
    exact_taps: bool = True,
) -> tuple[onnx.ModelProto, list[Insertion]]:
    """Return a rewritten copy of ``model`` (never modified) and what was inserted.

    ``exact_taps``: tap a duplicate of a single-consumer Conv (see the module docstring) so that the served
    output stays bit-identical; False taps the Conv itself (cheaper, within 1.2e-7 on the bundled teacher).
    """
    if placement not in PLACEMENTS:
        raise UsageError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    params.check()
    if read_manifest(model) is not None:
        raise UsageError("this model is already hardened (its metadata has a hardener manifest); "
                         "harden the original model instead")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx-ir wraps the proto's tensors without copying them: keep the input out of reach
    renamed = make_node_names_unique(copy)
    try:
        out = ir.serde.deserialize_model(copy)
    except Exception as exc:  # noqa: BLE001 - onnx-ir rejects graphs that break SSA and the like
        cause = exc.__cause__ or exc
        text = " ".join(str(cause).split())[:300]
        raise InvalidModelError(f"the model's graph cannot be edited: {type(cause).__name__}: {text}") from None
    graph = out.graph
    taken = all_names(graph)
    values = _values_by_name(graph)
    # Where the next subgraph after a producer goes: after the previous one, so selection order is node order.
    anchors: dict[ir.Node, ir.Node] = {}
    first_node = next(iter(graph), None)
    insertions = []
    # Prefixes already in the graph (a model hardened before whose manifest is gone) are skipped, so each
    # subgraph's nodes stay one group for strip.
    used = {m.group(1) for name in taken if (m := _PREFIX_INDEX.match(name))}
    indices = (i for i in range(len(used) + len(selections) + 1) if str(i) not in used)
    for (selector, layer), i in zip(selections, indices):
        prefix = f"{NODE_PREFIX}_{i}"
        builder = GraphBuilder(opset=opset, prefix=prefix, taken=taken)
        value = values.get(layer.tensor)
        if value is None:
            raise UsageError(f"tensor {layer.tensor!r} is not in the model's main graph")
        producer = value.producer()
        uses = value.uses()  # snapshot before the subgraph adds its own use
        duplicate = None
        if placement == "tap":
            dst = _unique(f"{TAP_PREFIX}{layer.label()}", taken)
            duplicate = _tap_duplicate(value, builder, graph) if producer is not None and exact_taps else None
            src = duplicate.outputs[0].name if duplicate is not None else value.name
        elif producer is not None:  # the producer's output is renamed; the subgraph's output takes its name
            dst = value.name
            src = value.name = _unique(f"{layer.tensor}/pre_asvp", taken)
        else:  # a graph input: its name is interface, so its consumers move to a new value instead
            src, dst = value.name, _unique(f"{layer.tensor}/asvp", taken)
        channels = layer.shape[1] if layer.shape and isinstance(layer.shape[1], int) and layer.shape[1] > 0 else None
        build_asvp(builder, src, dst, params, layer.elem_type, channels=channels)
        reads = {src: duplicate.outputs[0] if duplicate is not None else value}
        nodes, new_values = _to_ir(builder, graph, reads)
        if duplicate is not None:
            nodes.insert(0, duplicate)
        result = new_values[dst]
        result.type, result.shape = value.type, value.shape  # ASVP keeps type and shape
        if placement == "tap":  # a graph output: typed from shape inference, as the layer index saw it
            result.type = ir.TensorType(ir.DataType(layer.elem_type))
            if layer.shape is not None:
                result.shape = ir.Shape(layer.shape)
            graph.outputs.append(result)
        else:
            if producer is not None:  # the name moves to the new value, and what is recorded about it too
                result.metadata_props.update(value.metadata_props)
                value.metadata_props.clear()
                result.doc_string, value.doc_string = value.doc_string, None
            for node, index in uses:  # subgraph bodies included: onnx-ir resolves outer-scope references
                node.replace_input_with(index, result)
            for j, output in enumerate(graph.outputs):
                if output is value:
                    graph.outputs[j] = result  # the new value carries the output's name
        if producer is not None:
            graph.insert_after(anchors.get(producer, producer), nodes)
            anchors[producer] = nodes[-1]
        elif first_node is not None:
            graph.insert_before(first_node, nodes)
        else:
            graph.extend(nodes)
        values[dst] = result
        values[layer.tensor] = result if placement == "inline" else value
        insertions.append(Insertion(selector, layer.tensor, layer.module, layer.label(), src, dst,
                                    layer.shape_text(), layer.elem_type, len(nodes), prefix))

    if scrub:
        for node in ir.traversal.RecursiveGraphIterator(graph):
            for key, text in node.metadata_props.items():
                node.metadata_props[key] = scrub_paths(text)
            if node.doc_string:
                node.doc_string = scrub_paths(node.doc_string)
        for key, text in out.metadata_props.items():
            out.metadata_props[key] = scrub_paths(text)
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
    out.metadata_props[MANIFEST_KEY] = json.dumps(manifest, sort_keys=True)
    return to_proto(out, like=model), insertions


def to_proto(model: ir.Model, like: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Serialize ``model`` as close to ``like`` (the proto it came from) as a round trip can be.

    onnx-ir adds a ``value_info`` entry for every initializer and drops empty doc strings; both are undone
    here for the main graph, so a model that is rewritten and stripped again comes back byte for byte.
    """
    proto = ir.serde.serialize_model(model)
    if like is not None:
        for mine, theirs in ((proto, like), (proto.graph, like.graph)):
            if theirs.HasField("doc_string") and not mine.HasField("doc_string"):
                mine.doc_string = theirs.doc_string
        known = {v.name for v in like.graph.value_info}
        initializers = {t.name for t in proto.graph.initializer}
        if any(v.name in initializers and v.name not in known for v in proto.graph.value_info):
            kept = [v for v in proto.graph.value_info if v.name in known or v.name not in initializers]
            del proto.graph.value_info[:]
            proto.graph.value_info.extend(kept)
    return proto


def _tap_duplicate(value: ir.Value, builder: GraphBuilder, graph: ir.Graph) -> ir.Node | None:
    """A copy of ``value``'s producer for the tap to read, where tapping the original would change fusions.

    Only a Conv whose output has exactly one consumer (and is no graph output) is duplicated: that is where a
    second consumer stops ONNX Runtime fusing it with what follows.  The copy gets its own bias initializer
    (a zero one where the Conv has none), so common-subexpression elimination cannot merge it back.  Where the
    bias is stored as external data (not loaded here) or the weight's shape is unknown, nothing is duplicated.
    """
    producer = value.producer()
    if (producer.op_type not in TAP_DUPLICATED_OPS or producer.domain != "" or len(producer.outputs) != 1
            or len(value.uses()) != 1 or value.is_graph_output()):
        return None
    inputs = list(producer.inputs)
    bias = inputs[2] if len(inputs) > 2 else None
    if bias is not None:
        tensor = bias.const_value
        if tensor is None or isinstance(tensor, ir.ExternalTensor):
            return None
        array = tensor.numpy().copy()
    else:
        weight = inputs[1] if len(inputs) > 1 else None
        shape = weight.shape if weight is not None else None
        if shape is None or not isinstance(shape[0], int) or weight.type is None:
            return None
        array = np.zeros(shape[0], dtype=weight.type.dtype.numpy())
    bias_copy = ir.Value(name=builder.fresh("tap_bias"), const_value=ir.tensor(array))
    bias_copy.const_value.name = bias_copy.name
    graph.register_initializer(bias_copy)
    inputs[2:3] = [bias_copy]
    output = ir.Value(name=builder.fresh("tap_" + producer.op_type.lower()), type=value.type, shape=value.shape)
    return ir.Node(producer.domain, producer.op_type, inputs, list(producer.attributes.values()),
                   outputs=[output], name=builder.fresh("tap_" + producer.op_type))


def _to_ir(builder: GraphBuilder, graph: ir.Graph, reads: dict[str, ir.Value]):
    """The builder's NodeProtos and initializers as onnx-ir nodes (not yet in a graph) reading ``reads``."""
    values: dict[str, ir.Value] = dict(reads)
    for proto in builder.initializers:
        init = ir.Value(name=proto.name, const_value=ir.serde.deserialize_tensor(proto))
        graph.register_initializer(init)
        values[proto.name] = init
    nodes, new_values = [], {}
    for proto in builder.nodes:
        outputs = [ir.Value(name=name) for name in proto.output]
        node = ir.Node(proto.domain, proto.op_type, [values[name] if name else None for name in proto.input],
                       [ir.serde.deserialize_attribute(a) for a in proto.attribute], outputs=outputs,
                       name=proto.name)
        for output in outputs:
            values[output.name] = new_values[output.name] = output
        nodes.append(node)
    return nodes, new_values


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    values = {v.name: v for v in graph.inputs}
    values.update(graph.initializers)
    for node in graph:
        values.update((v.name, v) for v in node.outputs)
    return values


def all_names(graph: ir.Graph) -> set[str]:
    """Every node and value name in ``graph`` and its subgraphs (ONNX names are unique across scopes)."""
    names: set[str] = set()

    def enter(g) -> None:
        names.update(v.name for v in g.inputs)
        names.update(g.initializers)

    enter(graph)
    for node in ir.traversal.RecursiveGraphIterator(graph, enter_graph=enter):
        names.add(node.name)
        names.update(v.name for v in node.inputs if v is not None)
        names.update(v.name for v in node.outputs)
    names.discard(None)
    return names


def make_node_names_unique(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Rename repeated node names in place (the first keeps its name); ONNX Runtime rejects repeats."""
    graph = model.graph
    taken = _proto_names(graph)  # subgraph bodies included: a new name must clash with none
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


def anonymize(model: onnx.ModelProto, source: onnx.ModelProto, insertions: list[Insertion], seed: int = 0
              ) -> tuple[onnx.ModelProto, list[Insertion]]:
    """``--no-manifest``: drop the manifest and give every name the rewrite created an opaque one.

    Names are ``t<10 hex>`` / ``n<10 hex>`` from a hash of (seed, old name), so the file stays deterministic;
    names of the source model and graph outputs (interface, taps included) are kept.  What remains for a
    thief to find is the subgraphs' structure (``hardener.strip``'s ``structure`` finder).
    """
    import hashlib

    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = _proto_names(source.graph) | {o.name for o in out.graph.output}

    def opaque(kind: str, name: str) -> str:
        return kind + hashlib.sha256(f"{seed}\0{name}".encode()).hexdigest()[:10]

    mapping: dict[str, str] = {}

    def tensor(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in mapping:
            mapping[name] = opaque("t", name)
        return mapping[name]

    def walk(graph: onnx.GraphProto) -> None:
        for init in graph.initializer:
            init.name = tensor(init.name)
        for vi in list(graph.value_info) + list(graph.input):
            vi.name = tensor(vi.name)
        for node in graph.node:
            if node.name and node.name not in keep:
                node.name = opaque("n", node.name)
            node.input[:] = [tensor(n) for n in node.input]
            node.output[:] = [tensor(n) for n in node.output]
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(out.graph)
    kept = [p for p in out.metadata_props if p.key != MANIFEST_KEY]
    del out.metadata_props[:]
    out.metadata_props.extend(kept)
    renamed = [Insertion(**{**asdict(i), "source": tensor(i.source), "output": tensor(i.output), "prefix": ""})
               for i in insertions]
    return out, renamed


def _proto_names(graph: onnx.GraphProto) -> set[str]:
    """Every node, tensor and initializer name of ``graph`` and its subgraph bodies."""
    names = {i.name for i in graph.initializer} | {v.name for v in list(graph.input) + list(graph.output)
                                                    + list(graph.value_info)}
    for node in graph.node:
        names.add(node.name)
        names.update(node.input)
        names.update(node.output)
        for attr in node.attribute:
            if attr.HasField("g"):
                names |= _proto_names(attr.g)
            for g in attr.graphs:
                names |= _proto_names(g)
    return names
