"""Provenance: a keyed mark in a model's outputs that distilled students inherit, and a test that finds it.

- ``key``: 256-bit keys, key ids (hash commitments), mark weights derived from the key, public null keys.
- ``signal``: the mark function g_K in torch.
- ``mark``: inserting the mark into an ONNX model as standard operators, eps calibrated to a target cost.
- ``probes``: the default real-photo probe set, probe folders.
- ``verify``: the statistic (z against null keys, p-values, effect size) and the verdict.
"""
from .key import ProvenanceKey, generate_key, load_key, write_key
from .mark import MARK_KEY, mark_model
from .verify import verify

__all__ = ["MARK_KEY", "ProvenanceKey", "generate_key", "load_key", "mark_model", "verify", "write_key"]
