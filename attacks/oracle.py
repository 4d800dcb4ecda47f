"""The thief's view of a teacher: a black box answering queries through ONNX Runtime, and a file to edit.

``Oracle`` answers batches of inputs (and, for ``tap`` placement, the exposed perturbed features) and counts
queries.  ``strip_asvp`` (re-exported from ``hardener.strip``, where it lives beside its inverse) is the attack of a
thief who holds the ONNX file: it cuts every inserted ASVP subgraph out, found from the hardening manifest,
from the node-name pattern alone, or (``by="structure"``) from the subgraph's shape with names ignored, and
rewires the graph so the teacher runs unhardened.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from hardener.rewrite import TAP_PREFIX
from hardener.strip import PATTERN, strip_asvp  # noqa: F401 - re-exported: attacks.oracle.strip_asvp


class Oracle:
    """Batched ONNX Runtime inference on CPU (or the providers given), counting every image queried."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None):
        from hardener.runtime import make_session

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
