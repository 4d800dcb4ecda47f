"""The thief's view of a teacher: a black box answering queries through ONNX Runtime, and a file to edit.

``Oracle`` answers batches of inputs (and, for ``tap`` placement, the exposed perturbed features) and counts
queries.  ``strip_asvp`` is the attack of a thief who holds the ONNX file: it cuts every inserted ASVP
subgraph out, found either from the hardening manifest ("by names") or from the node-name pattern alone
("by pattern"), and rewires the graph so the teacher runs unhardened.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx

from hardener.rewrite import MANIFEST_KEY, NODE_PREFIX, TAP_PREFIX, read_manifest

PATTERN = re.compile(re.escape(NODE_PREFIX) + r"_\d+/")


class Oracle:
    """Batched ONNX Runtime inference on CPU (or the providers given), counting every image queried."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None):
        from hardener.validate import make_session

        self.session = make_session(Path(path), providers or ["CPUExecutionProvider"], tf32=False,
                                    threads=threads)
        self.input = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        self.output = outputs[0]
        self.taps = [o for o in outputs if o.startswith(TAP_PREFIX)]
        self.queries = 0

    def __call__(self, x: np.ndarray, batch: int = 16, features: bool = False):
        """Teacher outputs for ``x`` (N, C, H, W); with ``features``, also {tap name: array}."""
        outs, feats = [], {name: [] for name in self.taps}
        names = [self.output] + (self.taps if features else [])
        for i in range(0, len(x), batch):
            res = self.session.run(names, {self.input: np.ascontiguousarray(x[i:i + batch], np.float32)})
            outs.append(res[0])
            for name, arr in zip(names[1:], res[1:]):
                feats[name].append(arr)
        self.queries += len(x)
        y = np.concatenate(outs)
        return (y, {k: np.concatenate(v) for k, v in feats.items() if v}) if features else y


def strip_asvp(model: onnx.ModelProto, use_manifest: bool = True) -> tuple[onnx.ModelProto, int]:
    """Remove every inserted ASVP subgraph; returns (stripped copy, number of subgraphs removed).

    Inline subgraphs read '<t>/pre_asvp' and write '<t>': the producer's output is renamed back.  Tap
    subgraphs write an extra graph output, which is dropped.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        match = PATTERN.match(node.name)
        if match:
            groups.setdefault(match.group(0), []).append(node)
    manifest = read_manifest(out) if use_manifest else None
    if manifest is not None:
        wanted = {layer["prefix"] + "/" for layer in manifest["layers"]}
        groups = {p: n for p, n in groups.items() if p in wanted}
    removed = {n.name for nodes in groups.values() for n in nodes}
    kept = [n for n in graph.node if n.name not in removed]
    produced_by_kept = {o for n in kept for o in n.output}
    renames: dict[str, str] = {}  # producer output '<t>/pre_asvp' -> '<t>'
    rewires: dict[str, str] = {}  # consumers of '<t>/asvp' (after a graph input) -> '<t>'
    drop_outputs: set[str] = set()
    for prefix, nodes in groups.items():
        produced = {o for n in nodes for o in n.output}
        sources = {i for n in nodes for i in n.input if i not in produced and not i.startswith(prefix)}
        (source,) = sources
        (written,) = [o for o in produced if not any(o in n.input for n in nodes)]
        if written.startswith(TAP_PREFIX):
            drop_outputs.add(written)
        elif source in produced_by_kept:
            renames[source] = written
        else:
            rewires[written] = source
    new_nodes = []
    for node in kept:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        for i, name in enumerate(copy.output):
            copy.output[i] = renames.get(name, name)
        for i, name in enumerate(copy.input):
            copy.input[i] = rewires.get(name, name)
        new_nodes.append(copy)
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {i for n in graph.node for i in n.input}
    inits = [t for t in graph.initializer if t.name in used or not t.name.startswith(tuple(groups))]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    outputs = [o for o in graph.output if o.name not in drop_outputs]
    del graph.output[:]
    graph.output.extend(outputs)
    meta = [p for p in out.metadata_props if p.key != MANIFEST_KEY]
    del out.metadata_props[:]
    out.metadata_props.extend(meta)
    return out, len(groups)

