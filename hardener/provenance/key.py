"""Provenance keys: a 256-bit secret, its public commitment (key id), and the mark weights it determines.

Key file (JSON, written 0600)::

    {"format": "hardener-provenance-key", "version": 1, "secret": "<64 hex>", "key_id": "<64 hex>"}

``key_id`` = sha256("hardener.provenance.key-id\\0" || secret): a hash commitment that names the key in a
marked model's manifest without revealing it.  The mark network's weights are derived from the secret with
SHAKE-256 under a different domain string, so neither the key id nor the weights (which a marked file must
contain) give the secret back.  Weights come from a hash stream, not a numpy generator, so they stay the
same across numpy versions: a key made today verifies years later.

Null keys (for the test statistic) are public: secret_i = sha256("hardener.provenance.null-key\\0" || i).
They go through exactly the same weight derivation as a real key, so under "the suspect has nothing to do
with this key" the real key's score is one more draw from the null keys' distribution.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UsageError

KEY_FORMAT = "hardener-provenance-key"
KEY_VERSION = 1
SECRET_BYTES = 32
HIDDEN = 16  # hidden channels of the mark network
FIRST_LAYER_NORM = 30.0  # L2 norm of each zero-sum 3x3 first-layer filter (puts typical detail near tanh's knee)

_D_KEY_ID = b"hardener.provenance.key-id\0"
_D_WEIGHTS = b"hardener.provenance.mark-weights\0"
_D_SEEDED = b"hardener.provenance.keygen-seed\0"
_D_NULL = b"hardener.provenance.null-key\0"


@dataclass(frozen=True)
class ProvenanceKey:
    secret: bytes

    @property
    def key_id(self) -> str:
        return key_id(self.secret)

    def to_json(self) -> str:
        return json.dumps({"format": KEY_FORMAT, "version": KEY_VERSION, "secret": self.secret.hex(),
                           "key_id": self.key_id,
                           "note": "secret provenance key: anyone holding it can forge or deny marks; "
                                   "keep it private"}, indent=2) + "\n"

    def __repr__(self) -> str:  # never print the secret by accident
        return f"ProvenanceKey(key_id={self.key_id[:16]}...)"


def key_id(secret: bytes) -> str:
    return hashlib.sha256(_D_KEY_ID + secret).hexdigest()


def generate_key(seed: int | None = None) -> ProvenanceKey:
    """A fresh 256-bit key from the OS's CSPRNG, or, with ``seed`` (tests only: guessable), a fixed one."""
    if seed is None:
        return ProvenanceKey(secrets.token_bytes(SECRET_BYTES))
    return ProvenanceKey(hashlib.sha256(_D_SEEDED + str(int(seed)).encode()).digest())


def null_key(index: int) -> ProvenanceKey:
    return ProvenanceKey(hashlib.sha256(_D_NULL + struct.pack(">I", index)).digest())


def write_key(key: ProvenanceKey, path: Path, force: bool = False) -> None:
    """Write the key file atomically with permissions 0600; refuse to replace a file without ``force``."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a folder; give a key file name, e.g. {path / 'mark.key.json'}")
    if not path.parent.is_dir():
        raise UsageError(f"folder {path.parent} for the key file does not exist")
    if path.exists() and not force:
        raise UsageError(f"{path} exists; pass --force to replace it (the old key is then lost)")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(key.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_key(path: Path) -> ProvenanceKey:
    """Read and check a key file; every problem is a one-line UsageError."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"key file not found: {path}" if not path.exists() else f"key path {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"key file {path} is not a JSON key file ({type(exc).__name__}); "
                         "make one with `harden keygen -o KEY.json`") from None
    if not isinstance(data, dict) or data.get("format") != KEY_FORMAT:
        raise UsageError(f"{path} is not a hardener provenance key (format field is not '{KEY_FORMAT}')")
    if data.get("version") != KEY_VERSION:
        raise UsageError(f"{path}: key version {data.get('version')!r} is not supported (expected {KEY_VERSION})")
    hexed = data.get("secret")
    try:
        secret = bytes.fromhex(hexed) if isinstance(hexed, str) else b""
    except ValueError:
        secret = b""
    if len(secret) != SECRET_BYTES:
        raise UsageError(f"{path}: 'secret' must be {SECRET_BYTES * 2} hexadecimal digits; the key file is damaged")
    key = ProvenanceKey(secret)
    if data.get("key_id") != key.key_id:
        raise UsageError(f"{path}: key_id does not match the secret; the key file is damaged or edited")
    return key


def _uniform(secret: bytes, label: bytes, count: int) -> np.ndarray:
    """``count`` numbers uniform in (-1, 1) from SHAKE-256 of the secret (stable across platforms)."""
    raw = hashlib.shake_256(_D_WEIGHTS + secret + label).digest(4 * count)
    ints = np.frombuffer(raw, dtype=">u4").astype(np.float64)
    return (ints + 0.5) / 2.0**32 * 2.0 - 1.0


def mark_weights(secret: bytes, channels: int, output_index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The mark network's weights for one image output with ``channels`` channels.

    W1: (HIDDEN, C, 3, 3), each filter zero-sum (blind to flat regions and brightness) with L2 norm
    FIRST_LAYER_NORM.  W2: (C, HIDDEN) 1x1, each row zero-sum with unit norm, symmetric around 0 over
    keys (so the mean mark over keys is zero).  Zero-sum rows matter: every squared-tanh feature shares a
    component that depends only on local contrast, whatever the key; with it, marks of different keys
    correlate (cross-key cosine std 0.26 on the probes) and z is capped near 4; without it, 0.07.
    Float64; the ONNX graph stores them as float32.
    """
    label = struct.pack(">III", output_index, channels, HIDDEN)
    n1, n2 = HIDDEN * channels * 9, channels * HIDDEN
    u = _uniform(secret, label, n1 + n2)
    w1 = u[:n1].reshape(HIDDEN, channels * 9)
    w1 = w1 - w1.mean(axis=1, keepdims=True)
    w1 = w1 / np.linalg.norm(w1, axis=1, keepdims=True) * FIRST_LAYER_NORM
    w2 = u[n1:].reshape(channels, HIDDEN)
    w2 = w2 - w2.mean(axis=1, keepdims=True)  # zero-sum: cancels the key-independent local-energy component
    w2 = w2 / np.linalg.norm(w2, axis=1, keepdims=True)
    return w1.reshape(HIDDEN, channels, 3, 3), w2
