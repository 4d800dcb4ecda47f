"""Finding feature layers in an ONNX graph and resolving the user's layer selectors.

A *layer* is a tensor that a node produces (or a graph input), with what is known about it: the producing
node and op, its shape and element type from shape inference, and the PyTorch module path(s) it belongs to.
Module paths come from the dynamo exporter's ``pkg.torch.onnx.name_scopes`` node metadata (a Python-literal
list: ``['', 'body', 'body.0', 'body.0.conv1', 'conv2d_1']``) or from the TorchScript exporter's scoped node
names (``/body/body.0/conv1/Conv``).  A module's output is the one tensor its nodes produce that is used
outside the module (or is a graph output).

Selectors (see ``harden --help``):
  body.3.conv2     a module path, exactly
  body.*.conv2     a shell glob over module paths
  re:body\\.\\d+\\.conv2  a regular expression, full match, over module paths
  node:NAME        the (single) output of a node
  tensor:NAME      a tensor by name
  op:Conv          every output of every node of that op type
A selector that matches nothing, or matches a tensor that is not a float (N, C, H, W) feature map, is a
usage error that names near misses.
"""
from __future__ import annotations

import ast
import difflib
import fnmatch
import re
from dataclasses import dataclass, field

import onnx
from onnx import TensorProto

from .errors import UsageError
from .report import printable

NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
MAX_SCOPES_TEXT = 16384  # characters; real exports write a few hundred (one entry per enclosing module)
MAX_SCOPES_NESTING = 2  # brackets: a flat list of strings
FLOAT_TYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}


@dataclass
class Layer:
    tensor: str
    node: str | None = None
    op: str | None = None
    module: str | None = None  # innermost module path of the producing node
    shape: list | None = None  # ints, symbolic names (str) or None; None when the rank is unknown
    elem_type: int | None = None
    graph_output: bool = False
    graph_input: bool = False
    modules_owning: list[str] = field(default_factory=list)  # modules whose output this tensor is

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    def label(self) -> str:
        return self.modules_owning[-1] if self.modules_owning else self.tensor

    def shape_text(self) -> str:
        if self.shape is None:
            return "?"
        return "x".join("?" if d is None else str(d) for d in self.shape)


def normalize_layers(layers) -> list[str]:
    """The API's ``layers`` as a list of selectors: one string is one selector (not one per character);
    an empty list, or anything but strings, is a usage error (hardening nothing would "pass")."""
    if isinstance(layers, str):
        return [layers]
    if layers is None:
        raise UsageError("layers is None: give at least one layer selector (harden MODEL --list-layers "
                         "lists candidates)")
    try:
        items = list(layers)
    except TypeError:
        raise UsageError(f"layers must be a selector string or a list of them, got {type(layers).__name__}") \
            from None
    if not items:
        raise UsageError("layers is empty: give at least one layer selector (harden MODEL --list-layers lists "
                         "candidates); hardening nothing would pass without protecting anything")
    bad = [x for x in items if not isinstance(x, str)]
    if bad:
        raise UsageError(f"layers must be selector strings, got {type(bad[0]).__name__} {printable(repr(bad[0]))}")
    return items


def parse_name_scopes(text: str) -> list[str] | None:
    """``pkg.torch.onnx.name_scopes`` as a list of strings, or None when it is not one.

    The value comes from the model file, so it is parsed defensively: longer than ``MAX_SCOPES_TEXT`` or
    nested more than a flat list, it is not parsed at all (``ast.literal_eval`` on a huge or deeply nested
    string can exhaust memory or the stack), and any parse error or a value that is not a list of strings
    means "absent" rather than an error.
    """
    if not isinstance(text, str) or len(text) > MAX_SCOPES_TEXT:
        return None
    depth = deepest = 0
    for ch in text:  # brackets inside quoted names are rare; an overcount only makes us skip the metadata
        if ch in "[(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "])":
            depth -= 1
        if deepest > MAX_SCOPES_NESTING:
            return None
    try:
        scopes = ast.literal_eval(text)
    except BaseException as exc:  # noqa: BLE001 - SyntaxError, ValueError, MemoryError, RecursionError, ...
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        return None
    if not isinstance(scopes, (list, tuple)) or not all(isinstance(x, str) for x in scopes):
        return None
    return list(scopes)


def module_scopes_of(node: onnx.NodeProto) -> list[str]:
    """Module paths enclosing ``node``, outermost first ([] when the exporter left no (usable) trace)."""
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES_KEY:
            scopes = parse_name_scopes(prop.value)
            if scopes is None:
                return []
            return [s for s in scopes[1:-1] if s]
    if node.name.startswith("/") and node.name.count("/") >= 2:
        paths, prefix = [], ""
        for seg in node.name.strip("/").split("/")[:-1]:
            full = seg if (not prefix or seg.startswith(prefix + ".")) else f"{prefix}.{seg}"
            paths.append(full)
            prefix = full
        return paths
    return []


def _value_types(model: onnx.ModelProto) -> dict[str, tuple[int, list | None]]:
    types = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        t = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            continue
        shape = None
        if t.HasField("shape"):
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
        types[vi.name] = (t.elem_type, shape)
    return types


class LayerIndex:
    """All candidate layers of a model, indexed for selection."""

    def __init__(self, model: onnx.ModelProto):
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception:  # noqa: BLE001 - inference is best effort; shapes then stay unknown
            inferred = model
        types = _value_types(inferred)
        graph = model.graph
        initializers = {i.name for i in graph.initializer}
        self.initializers = initializers
        outputs = {o.name for o in graph.output}
        self.layers: dict[str, Layer] = {}
        self.node_names: dict[str, list[onnx.NodeProto]] = {}
        node_scopes: dict[int, list[str]] = {}
        for vi in graph.input:
            if vi.name not in initializers:
                et, shape = types.get(vi.name, (None, None))
                self.layers[vi.name] = Layer(vi.name, shape=shape, elem_type=et, graph_input=True,
                                             graph_output=vi.name in outputs)
        for i, node in enumerate(graph.node):
            self.node_names.setdefault(node.name, []).append(node)
            scopes = module_scopes_of(node)
            node_scopes[i] = scopes
            for out in node.output:
                if not out:
                    continue
                et, shape = types.get(out, (None, None))
                self.layers[out] = Layer(out, node.name, node.op_type, scopes[-1] if scopes else None,
                                         shape, et, out in outputs)
        self.modules = self._module_outputs(graph, node_scopes, outputs)
        for path, tensors in self.modules.items():
            if len(tensors) == 1 and tensors[0] in self.layers:
                self.layers[tensors[0]].modules_owning.append(path)

    @staticmethod
    def _module_outputs(graph, node_scopes, graph_outputs) -> dict[str, list[str]]:
        members: dict[str, set[int]] = {}
        for i, scopes in node_scopes.items():
            for path in scopes:
                members.setdefault(path, set()).add(i)
        consumers: dict[str, set[int]] = {}
        for i, node in enumerate(graph.node):
            for name in node.input:
                consumers.setdefault(name, set()).add(i)
        result = {}
        for path in sorted(members, key=lambda p: min(members[p])):
            inside = members[path]
            outs = []
            for i in sorted(inside):
                for out in graph.node[i].output:
                    used_outside = consumers.get(out, set()) - inside
                    if out and (used_outside or out in graph_outputs) and out not in outs:
                        outs.append(out)
            result[path] = outs
        return result

    @property
    def has_module_paths(self) -> bool:
        return bool(self.modules)

    def feature_layers(self) -> list[Layer]:
        """Layers that could be hardened: 4D float tensors."""
        return [l for l in self.layers.values() if l.rank == 4 and l.elem_type in FLOAT_TYPES]

    # -- selection ---------------------------------------------------------------------------------------
    def select(self, selectors: list[str]) -> list[tuple[str, Layer]]:
        chosen: dict[str, tuple[str, Layer]] = {}
        for selector in selectors:
            for layer in self._match(selector):
                self._check_feature(selector, layer)
                chosen.setdefault(layer.tensor, (selector, layer))
        return list(chosen.values())

    def _match(self, selector: str) -> list[Layer]:
        selector = selector.strip()
        if not selector:
            raise UsageError("empty layer selector")
        kind, _, value = selector.partition(":")
        if kind in ("node", "tensor", "op") and value:
            if kind == "node":
                nodes = self.node_names.get(value, [])
                if len(nodes) > 1:
                    raise UsageError(f"selector '{selector}' is ambiguous: {len(nodes)} nodes are named "
                                     f"'{value}'; select by tensor: instead")
                if nodes:
                    outs = [o for o in nodes[0].output if o]
                    if len(outs) != 1:
                        raise UsageError(f"selector '{selector}' is ambiguous: node '{value}' has "
                                         f"{len(outs)} outputs ({', '.join(map(printable, outs))}); use tensor:NAME")
                    return [self.layers[outs[0]]]
                self._no_match(selector, value, list(self.node_names))
            if kind == "tensor":
                if value in self.layers:
                    return [self.layers[value]]
                if value in self.initializers:
                    raise UsageError(f"selector '{selector}' names an initializer (a weight or constant), "
                                     "not a feature map; select the tensor a node computes")
                self._no_match(selector, value, list(self.layers))
            hits = [l for l in self.layers.values() if l.op == value]
            if not hits:
                self._no_match(selector, value, sorted({l.op for l in self.layers.values() if l.op}))
            hits = [l for l in hits if l.rank == 4 and l.elem_type in FLOAT_TYPES]
            if not hits:
                raise UsageError(f"selector '{selector}': no {value} node produces a 4D float feature map")
            return hits
        if kind == "re" and value:
            try:
                pattern = re.compile(value)
            except re.error as exc:
                raise UsageError(f"selector '{selector}': invalid regular expression ({exc})") from None
            paths = [p for p in self.modules if pattern.fullmatch(p)]
            return self._module_layers(selector, value, paths)
        if any(ch in selector for ch in "*?["):
            paths = [p for p in self.modules if fnmatch.fnmatchcase(p, selector)]
            return self._module_layers(selector, selector, paths)
        return self._module_layers(selector, selector, [selector] if selector in self.modules else [])

    def _module_layers(self, selector: str, value: str, paths: list[str]) -> list[Layer]:
        if not self.modules:
            raise UsageError(
                f"selector '{selector}' names a module path, but this model carries no module paths "
                "(no pkg.torch.onnx.name_scopes metadata, no /scoped/node/names); select with node:NAME, "
                "tensor:NAME or op:TYPE (harden MODEL --list-layers shows them)"
            )
        if not paths:
            self._no_match(selector, value, list(self.modules))
        layers = []
        for path in paths:
            outs = self.modules[path]
            if len(outs) != 1:
                if len(paths) > 1:
                    continue  # a pattern spanning containers: keep the modules with one output
                raise UsageError(f"selector '{selector}' is ambiguous: module '{path}' has {len(outs)} "
                                 f"outputs ({', '.join(map(printable, outs)) or 'none'}); select one with tensor:NAME")
            layers.append(self.layers[outs[0]])
        if not layers:
            raise UsageError(f"selector '{printable(selector)}' matched modules "
                             f"{', '.join(map(printable, paths[:5]))} but none has a single output")
        return layers

    def _no_match(self, selector: str, value: str, pool: list[str]) -> None:
        near = difflib.get_close_matches(value, pool, n=5, cutoff=0.5)
        hint = f"; near misses: {', '.join(map(printable, near))}" if near else ""
        raise UsageError(f"selector '{printable(selector)}' matched nothing{hint} (harden MODEL --list-layers "
                         "lists every candidate)")

    def _check_feature(self, selector: str, layer: Layer) -> None:
        P = printable
        near = ", ".join(P(l.label()) for l in self.feature_layers()[:5])
        what = f"selector '{P(selector)}' -> tensor '{P(layer.tensor)}'"
        if layer.rank is None:
            raise UsageError(f"{what} has unknown rank (shape inference could not type it); harden needs "
                             "(N, C, H, W) feature maps")
        if layer.rank != 4:
            raise UsageError(f"{what} has shape {P(layer.shape_text())}, not a 4D (N, C, H, W) feature map; "
                             f"4D candidates: {near}")
        if layer.elem_type not in FLOAT_TYPES:
            name = TensorProto.DataType.Name(layer.elem_type) if layer.elem_type in TensorProto.DataType.values() \
                else "unknown"
            raise UsageError(f"{what} is {name}; harden supports float32, float16 and bfloat16 feature maps")
        zero = [axis for axis, d in zip("NCHW", layer.shape) if d == 0]
        if zero:
            raise UsageError(f"{what} has shape {P(layer.shape_text())}: dimension {', '.join(zero)} is fixed at 0, "
                             "so the map holds no values to perturb (export the model with a batch of 1 or a "
                             "dynamic batch)")
        if not isinstance(layer.shape[1], int) or layer.shape[1] <= 0:
            channel = "unknown" if layer.shape[1] is None else f"symbolic ('{P(layer.shape[1])}')"
            raise UsageError(f"{what} has shape {P(layer.shape_text())}: its channel count is {channel}, and "
                             "hardener needs a fixed C to size the C x HW matrices and check the insertion before "
                             "writing it; select a layer with a static C (harden MODEL --list-layers), or export "
                             "the model with a fixed channel count")
