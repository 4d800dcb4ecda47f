"""Cutting inserted ASVP subgraphs out again: the inverse of ``rewrite.insert_asvp``, and the thief's strip attack.

Two steps, kept apart so that finders can be added without touching the surgery:

1. *Find* regions: each is the set of nodes of one inserted subgraph.  Three finders:
   - ``manifest``: node-name prefixes recorded in the hardening manifest (``hardener.manifest``);
   - ``names``: the node-name pattern ``hardener/asvp_<i>/`` alone (a file whose manifest was deleted);
   - ``structure``: names ignored entirely (a file whose manifest was deleted and whose nodes and values were
     renamed).  A region is found from its Gram product ``MatMul(M, Transpose(M))`` (M the feature map, or its
     (N, C, HW) ``Reshape(.., [0, 0, -1])``, or a float32 ``Cast`` of it) and ends at the first node that
     reads M again and closes the region: everything it computed from M is used only inside it (the
     reconstruction ``MatMul(I + (h-1) Q Q^T, M)`` or ``Add(M, ..)``), plus its tail (a ``Reshape`` back to
     ``Shape(x)``, then a final ``Identity`` or ``Cast`` back to the map's type).  The region is every node
     between the feature map and that end; it must be single-entry, single-exit (one input that is not a
     constant, one output used outside it), or it is not taken.
2. *Remove* each region (``strip_region``): the region's one output is replaced by its one input in every
   use (subgraph bodies included) and graph-output slot, then the input gets the output's name back; a tap
   (the output is only a graph output, the input still feeds the model) just loses its output.  Nodes and
   initializers that only fed the region (a tap's duplicated Conv and its private bias) go with it.
"""
from __future__ import annotations

import json

import onnx
import onnx_ir as ir

from .rewrite import _PREFIX_INDEX, MANIFEST_KEY, read_manifest, to_proto

FINDERS = ("manifest", "names", "structure")
PATTERN = _PREFIX_INDEX  # a subgraph's node prefix, as rewrite names it
MAX_REGION_NODES = 50_000


def strip_asvp(model: onnx.ModelProto, use_manifest: bool = True, by: str | None = None
               ) -> tuple[onnx.ModelProto, int]:
    """Remove every inserted ASVP subgraph; returns (stripped copy, number of subgraphs removed).

    ``by``: one of FINDERS; by default ``manifest`` when ``use_manifest`` and the model has one, else ``names``.
    ``model`` is never modified.
    """
    if by is None:
        by = "manifest" if use_manifest and read_manifest(model) is not None else "names"
    if by not in FINDERS:
        raise ValueError(f"by must be one of {', '.join(FINDERS)}, got {by!r}")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    out = ir.serde.deserialize_model(copy)
    regions = find_regions(out, by)
    removed = 0
    for region in reversed(regions):  # later insertions first: one stacked on another's output unwinds cleanly
        removed += strip_region(out.graph, region)
    out.metadata_props.pop(MANIFEST_KEY, None)
    return to_proto(out, like=model), removed


def find_regions(model: ir.Model, by: str) -> list[list[ir.Node]]:
    """The inserted subgraphs of ``model``'s main graph, each as its nodes in graph order."""
    graph = model.graph
    if by == "structure":
        return structural_regions(graph)
    groups: dict[str, list[ir.Node]] = {}
    for node in graph:
        match = PATTERN.match(node.name or "")
        if match:
            groups.setdefault(match.group(0), []).append(node)
    if by == "manifest":
        text = model.metadata_props.get(MANIFEST_KEY)
        manifest = json.loads(text) if text is not None else None
        wanted = {layer["prefix"] + "/" for layer in (manifest or {}).get("layers", [])}
        groups = {p: nodes for p, nodes in groups.items() if p in wanted}
    return list(groups.values())


def strip_region(graph: ir.Graph, region: list[ir.Node]) -> int:
    """Cut one region out of ``graph`` and reconnect what it replaced; 1 if removed, 0 if not a region."""
    members = set(region)
    produced = {v for n in region for v in n.outputs}
    inputs = []
    for node in region:
        for v in node.inputs:
            if v is not None and v not in produced and v not in inputs:
                inputs.append(v)
    sources = [v for v in inputs if not _is_constant(v)]
    exits = [v for v in produced if v.is_graph_output() or any(u.node not in members for u in v.uses())]
    if len(sources) != 1 or len(exits) != 1:
        return 0
    (source,), (exit_,) = sources, exits
    outside = [u for u in exit_.uses() if u.node not in members]
    # A tap: the exit only leaves as a graph output, while the source still feeds the model (or is an output,
    # or is computed by a private duplicate of a node that feeds the model).
    if not outside and (source.is_graph_output() or any(u.node not in members for u in source.uses())
                        or _duplicates_another(source.producer())):
        _drop_graph_output(graph, exit_)
        graph.remove(region, safe=True)
    else:
        name = exit_.name
        for node, index in outside:
            node.replace_input_with(index, source)
        for j, output in enumerate(graph.outputs):
            if output is exit_:
                graph.outputs[j] = source
        graph.remove(region, safe=True)
        if not (source.is_graph_input() or source.is_initializer()):
            source.metadata_props.update(exit_.metadata_props)
            if source.type is None:
                source.type = exit_.type
            if source.shape is None:
                source.shape = exit_.shape
            if exit_.doc_string:
                source.doc_string = exit_.doc_string
            exit_.name = None
            source.name = name
    for value in inputs:
        _drop_if_dead(graph, value)
    return 1


def _duplicates_another(node: ir.Node | None) -> bool:
    """Whether ``node`` computes what another node computes: same op, attributes and inputs, constants equal."""
    if node is None or not node.inputs or node.inputs[0] is None:
        return False
    for twin in {u.node for u in node.inputs[0].uses()}:
        if twin is node or twin.op_type != node.op_type or twin.domain != node.domain or _attrs(twin) != _attrs(node):
            continue
        width = max(len(twin.inputs), len(node.inputs))  # a missing optional input equals an all-zero constant
        pairs = zip(list(twin.inputs) + [None] * width, list(node.inputs) + [None] * width)
        if all(a is b or _same_constant(a, b) for a, b in list(pairs)[:width]):
            return True
    return False


def _attrs(node: ir.Node) -> dict:
    return {name: (attr.type, repr(attr.value)) for name, attr in node.attributes.items()}


def _same_constant(a: ir.Value | None, b: ir.Value | None) -> bool:
    if (a is None) != (b is None):
        const = (a or b).const_value
        return const is not None and not isinstance(const, ir.ExternalTensor) and not const.numpy().any()
    if a.const_value is None or b.const_value is None:
        return False
    ta, tb = a.const_value, b.const_value
    if ta.dtype != tb.dtype or ta.shape != tb.shape or isinstance(ta, ir.ExternalTensor) or isinstance(
            tb, ir.ExternalTensor):
        return False
    return ta.tobytes() == tb.tobytes()


def _drop_graph_output(graph: ir.Graph, value: ir.Value) -> None:
    for j in reversed(range(len(graph.outputs))):
        if graph.outputs[j] is value:
            graph.outputs.pop(j)


def _drop_if_dead(graph: ir.Graph, value: ir.Value) -> None:
    """Remove ``value`` if it fed only what was just removed: an initializer, or a node's only output."""
    if value.uses() or value.is_graph_output() or value.is_graph_input():
        return
    if value.is_initializer():
        graph.initializers.pop(value.name, None)
        return
    producer = value.producer()
    if producer is None or producer.graph is not graph or any(o.uses() or o.is_graph_output()
                                                              for o in producer.outputs):
        return
    feeding = [v for v in producer.inputs if v is not None]
    graph.remove(producer, safe=True)
    for v in feeding:
        _drop_if_dead(graph, v)


def _is_constant(value: ir.Value) -> bool:
    if value.is_initializer() or (value.const_value is not None and not value.is_graph_input()):
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant" and producer.domain == ""


# -- the structural finder ----------------------------------------------------------------------------------
def structural_regions(graph: ir.Graph) -> list[list[ir.Node]]:
    """ASVP subgraphs recognised by their shape alone (see the module docstring); names play no part."""
    order = {node: i for i, node in enumerate(graph)}
    claimed: set[ir.Node] = set()
    regions = []
    for gram in list(graph):
        if gram in claimed or gram.op_type != "MatMul" or gram.domain != "":
            continue
        m = _gram_operand(gram)
        if m is None:
            continue
        entry = _entry(m)
        region = _region_from(graph, gram, m, entry, order)
        if region is not None and not (set(region) & claimed):
            claimed.update(region)
            regions.append(sorted(region, key=order.__getitem__))
    return regions


def _gram_operand(gram: ir.Node) -> ir.Value | None:
    """M where ``gram`` is MatMul(M, Transpose(M)) with the last two axes swapped."""
    if len(gram.inputs) != 2 or gram.inputs[0] is None or gram.inputs[1] is None:
        return None
    m, t = gram.inputs
    transpose = t.producer()
    if transpose is None or transpose.op_type != "Transpose" or transpose.inputs[0] is not m:
        return None
    perm = transpose.attributes.get("perm")
    perm = list(perm.value) if perm is not None else None
    if perm is None or len(perm) < 2 or perm != list(range(len(perm) - 2)) + [len(perm) - 1, len(perm) - 2]:
        return None
    return m


def _entry(m: ir.Value) -> ir.Value:
    """The feature map behind M: through a Reshape to (N, C, HW) and a Cast to float32, where present."""
    node = m.producer()
    if node is not None and node.op_type == "Reshape" and len(node.inputs) == 2:
        shape = node.inputs[1].const_value if node.inputs[1] is not None else None
        if shape is not None and shape.numpy().tolist() == [0, 0, -1]:
            m = node.inputs[0]
            node = m.producer()
    if node is not None and node.op_type == "Cast":
        to = node.attributes.get("to")
        if to is not None and to.value == ir.DataType.FLOAT:
            m = node.inputs[0]
    return m


def _region_from(graph, gram, m, entry, order) -> list[ir.Node] | None:
    descendants = _descendants(entry)
    if gram not in descendants:
        return None
    transpose = gram.inputs[1].producer()
    candidates = sorted({u.node for u in m.uses() if u.node not in (gram, transpose) and u.node.graph is graph},
                        key=order.__getitem__)
    for end in candidates:
        region = _ancestors(end, entry, descendants)
        if region is None or gram not in region:
            continue
        if not _closed(region, end):
            continue
        return _with_tail(region, end, entry)
    return None


def _descendants(value: ir.Value) -> set[ir.Node]:
    seen: set[ir.Node] = set()
    stack = [u.node for u in value.uses()]
    while stack and len(seen) <= 4 * MAX_REGION_NODES:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(u.node for v in node.outputs for u in v.uses())
    return seen


def _ancestors(end: ir.Node, entry: ir.Value, descendants: set[ir.Node]) -> set[ir.Node] | None:
    """Nodes ``end`` depends on, back to ``entry``; None if a path goes around ``entry``."""
    region: set[ir.Node] = set()
    stack = [end]
    while stack:
        node = stack.pop()
        if node in region:
            continue
        if node not in descendants and any(v is not None and not _is_constant(v) for v in node.inputs):
            return None  # it reads something computed before the feature map: not a single-entry region
        region.add(node)
        if len(region) > MAX_REGION_NODES:
            return None
        for v in node.inputs:
            if v is None or v is entry or v.is_initializer():
                continue
            producer = v.producer()
            if producer is None:
                return None  # a graph input or an outer-scope value other than the entry
            stack.append(producer)
    return region


def _closed(region: set[ir.Node], end: ir.Node) -> bool:
    for node in region:
        for v in node.outputs:
            if node is end:
                continue
            if v.is_graph_output() or any(u.node not in region for u in v.uses()):
                return False
    return True


def _single_use(value: ir.Value) -> ir.Node | None:
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def _with_tail(region: set[ir.Node], end: ir.Node, entry: ir.Value) -> list[ir.Node]:
    """Add the reconstruction's tail: Reshape(y, Shape(x)) back to the map's shape, an identity depthwise 1x1
    Conv (all-ones weights, no bias: it keeps ONNX Runtime's NCHWc layout going), a final Identity or Cast."""
    region = set(region)
    last = end
    nxt = _single_use(last.outputs[0])
    if nxt is not None and nxt.op_type == "Reshape" and nxt.inputs[0] is last.outputs[0]:
        shape = nxt.inputs[1].producer() if nxt.inputs[1] is not None else None
        if (shape is not None and shape.op_type == "Shape" and _single_use(shape.outputs[0]) is nxt
                and (shape.inputs[0] is entry or shape.inputs[0].producer() in region)):
            region.update((shape, nxt))
            last = nxt
            nxt = _single_use(last.outputs[0])
    if nxt is not None and _is_identity_conv(nxt, last.outputs[0]):
        region.add(nxt)
        last = nxt
        nxt = _single_use(last.outputs[0])
    if nxt is not None and nxt.op_type == "Identity":
        region.add(nxt)
    elif nxt is not None and nxt.op_type == "Cast" and entry.type is not None:
        to = nxt.attributes.get("to")
        if to is not None and to.value == entry.type.dtype and entry.type.dtype != ir.DataType.FLOAT:
            region.add(nxt)
    return region


def _is_identity_conv(node: ir.Node, x: ir.Value) -> bool:
    """Conv(x, ones(C, 1, 1, 1), group=C), no bias: y = x exactly."""
    if node.op_type != "Conv" or node.domain != "" or len(node.inputs) != 2 or node.inputs[0] is not x:
        return False
    weight = node.inputs[1].const_value if node.inputs[1] is not None else None
    if weight is None or isinstance(weight, ir.ExternalTensor) or len(weight.shape) != 4:
        return False
    group = node.attributes.get("group")
    array = weight.numpy()
    return (group is not None and group.value == array.shape[0] and array.shape[1:] == (1, 1, 1)
            and bool((array == 1).all()))
