"""What a run or a cached teacher *is*: content fingerprints, so a result file is keyed on what produced it.

Every cached hardened teacher and every run file is named after a digest of the configuration that
determines it, and stores that configuration; a file whose stored configuration differs from the one asked
for is never reused.  Pieces:

* a teacher file: sha256 of the ``.onnx`` file and of each external-data file it references;
* the hardener: ``hardener.__version__`` and a sha256 over the source files of the ``hardener`` package
  (``*.py``, sorted by relative path).  A version string is not bumped per change and a git commit is absent
  from an installed package and blind to uncommitted edits; hashing the code that runs is exact, works from an
  installed wheel, and invalidates on any edit (a comment edit too: conservative, never wrong);
* the attack code: the same over the modules of ``attacks`` that compute a run (photos, degradations,
  students, distillation, the oracle, the provenance marks and verdicts, and the runner itself), plus
  ``RUN_FORMAT`` (bump it when a run's file format or meaning changes); report and plotting code is left
  out, so redrawing a report never reruns anything (except ``provenance.py``'s table code, which shares the
  module with the verdict);
* the libraries whose numerics a run depends on (torch, onnxruntime, numpy, scikit-image, and spandrel for
  its students).
"""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib import metadata
from pathlib import Path

RUN_FORMAT = 4  # bump when a run's file format or meaning changes (its code is hashed: RUN_MODULES)
# the attacks modules whose code determines a run's numbers: runner.py (what a run computes), not config.py
# (a run stores every setting it uses), report.py, plots.py, suite.py (re-exports) or cli.py
RUN_MODULES = ("data.py", "degrade.py", "distill.py", "oracle.py", "provenance.py", "runner.py", "students.py")
LIBRARIES = ("torch", "onnxruntime", "numpy", "scikit-image")


def digest(config) -> str:
    """sha256 of the canonical JSON of ``config`` (sorted keys, no spaces)."""
    return hashlib.sha256(canonical(config).encode()).hexdigest()


def canonical(config) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)


def normalized(config):
    """``config`` as it reads back from JSON (tuples become lists): what a stored copy is compared with."""
    return json.loads(canonical(config))


def sha_of_files(root: Path, names: list[str]) -> str:
    """sha256 over the names and contents of ``names`` under ``root`` (a code version)."""
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0")
        h.update((root / name).read_bytes())
        h.update(b"\0")
    return h.hexdigest()


@lru_cache(maxsize=None)
def hardener_fingerprint() -> dict:
    import hardener

    root = Path(hardener.__file__).resolve().parent
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    return {"version": hardener.__version__, "source_sha256": sha_of_files(root, files)}


@lru_cache(maxsize=None)
def attacks_fingerprint() -> dict:
    root = Path(__file__).resolve().parent
    return {"run_format": RUN_FORMAT, "source_sha256": sha_of_files(root, sorted(RUN_MODULES))}


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=None)
def environment(spandrel: bool = False) -> dict:
    names = LIBRARIES + (("spandrel", "torchvision") if spandrel else ())
    return {name: _version(name) for name in names}


@lru_cache(maxsize=64)
def _file_sha(path: str, size: int, mtime_ns: int) -> str:
    from hardener.model_io import sha256_file

    return sha256_file(Path(path))


def file_sha256(path: Path) -> str:
    """sha256 of a file (memoised on path, size and modification time)."""
    st = Path(path).stat()
    return _file_sha(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def stored_manifest(path: Path, read) -> dict | None:
    """``read(model)`` (a manifest reader) of a cached ONNX file, loaded without external data, or None when
    the file is absent, unreadable or has no such manifest: the cache entry is then rebuilt."""
    import onnx

    if not Path(path).exists():
        return None
    try:
        return read(onnx.load(str(path), load_external_data=False)) or None
    except Exception:  # noqa: BLE001 - unreadable: rebuild it
        return None


def teacher_sha256(path: Path) -> str:
    """sha256 of an ONNX teacher: the file, and each external-data file it references (sorted by location)."""
    st = Path(path).stat()
    return _teacher_sha(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)
def _teacher_sha(name: str, size: int, mtime_ns: int) -> str:
    import onnx
    from onnx import external_data_helper as ext

    path = Path(name)
    main = file_sha256(path)
    model = onnx.load(str(path), load_external_data=False)
    locations = sorted({ext.ExternalDataInfo(t).location for t in ext._get_all_tensors(model)
                        if ext.uses_external_data(t)})
    if not locations:
        return main
    return digest({"onnx": main, "external": {loc: file_sha256(path.parent / loc) for loc in locations}})
