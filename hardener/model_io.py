"""Reading models defensively and writing them atomically.

Models are read *without* their external data: the rewrite only touches nodes, so tensors stored beside the
model (external data, the only way past protobuf's 2 GB limit) are copied file by file, never loaded.
Output is written to a temporary file in the destination folder and renamed into place, so a crash never
leaves a half-written model, and the input file is never opened for writing.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import InvalidModelError, UsageError

MIN_OPSET = 13
_UMASK = os.umask(0)
os.umask(_UMASK)
PROTOBUF_LIMIT = 2**31 - 1


@dataclass
class LoadedModel:
    path: Path
    model: onnx.ModelProto  # external tensors left as references
    sha256: str
    opset: int
    external_files: list[str]  # locations relative to the model's folder

    @property
    def has_external_data(self) -> bool:
        return bool(self.external_files)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise InvalidModelError("the model imports no default ('ai.onnx') opset")


def _external_locations(model: onnx.ModelProto) -> list[str]:
    locations = []
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if onnx.external_data_helper.uses_external_data(tensor):
            info = onnx.external_data_helper.ExternalDataInfo(tensor)
            if info.location not in locations:
                locations.append(info.location)
    return locations


def load_model(path: str | os.PathLike) -> LoadedModel:
    path = Path(path)
    if not path.exists():
        raise UsageError(f"model file not found: {path}")
    if path.is_dir():
        raise UsageError(f"expected an .onnx file, got a folder: {path}")
    size = path.stat().st_size
    if size == 0:
        raise InvalidModelError(f"{path} is empty (0 bytes): not an ONNX model")
    if size > PROTOBUF_LIMIT:
        raise InvalidModelError(
            f"{path} is {size / 2**30:.1f} GiB: a single protobuf file cannot exceed 2 GB. Save the model "
            "with external data (onnx.save(model, path, save_as_external_data=True)) and pass that file."
        )
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise InvalidModelError(
            f"{path} could not be parsed as an ONNX model ({type(exc).__name__}: {exc}); "
            "the file is corrupt, truncated or not ONNX"
        ) from None
    if not model.graph.node and not model.graph.output:
        raise InvalidModelError(f"{path} parsed to an empty model: corrupt, truncated or not ONNX")
    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise InvalidModelError(
            f"{path} uses opset {opset}; hardener supports opset {MIN_OPSET} to "
            f"{onnx.defs.onnx_opset_version()}. Convert it first: "
            f"onnx.version_converter.convert_version(model, {MIN_OPSET})"
        )
    if opset > onnx.defs.onnx_opset_version():
        raise InvalidModelError(
            f"{path} uses opset {opset}, newer than this onnx ({onnx.__version__}) knows "
            f"({onnx.defs.onnx_opset_version()}); upgrade onnx"
        )
    locations = _external_locations(model)
    for location in locations:
        if not (path.parent / location).is_file():
            raise InvalidModelError(
                f"{path} stores tensors in external data file '{location}', which is missing next to it"
            )
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise InvalidModelError(f"{path} is not a valid ONNX model: {text}") from None
    return LoadedModel(path, model, sha256_file(path), opset, locations)


def atomic_write(data: bytes | None, src: Path | None, dest: Path) -> None:
    """Write ``data`` (or a copy of file ``src``) to ``dest`` through a temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if data is not None:
                f.write(data)
            else:
                with open(src, "rb") as s:
                    shutil.copyfileobj(s, f, 1 << 24)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def protected_files(source: LoadedModel) -> list[Path]:
    """The input model and its external data files: never written."""
    return [source.path.resolve()] + [(source.path.parent / loc).resolve() for loc in source.external_files]


def output_files(source: LoadedModel, output: Path) -> list[Path]:
    """Every file ``save_model`` will write for ``output``."""
    n = len(source.external_files)
    suffixes = [".data"] if n == 1 else [f".{i}.data" for i in range(n)]
    return [output] + [output.with_name(output.name + s) for s in suffixes]


def check_output_paths(source: LoadedModel, output: Path, report: Path, force: bool) -> None:
    """Refuse, before anything is written, to overwrite the input, its data, or one output with another."""
    protected = protected_files(source)
    written = output_files(source, output)
    for path in written + [report]:
        what = "the report" if path == report else "output"
        if path.resolve() in protected:
            raise UsageError(f"{what} {path} is the input model or its external data: hardener never "
                             "modifies its input")
        if not path.parent.is_dir():
            raise UsageError(f"folder {path.parent} for {what} {path.name} does not exist")
    if report.resolve() in {p.resolve() for p in written}:
        raise UsageError(f"the report {report} would overwrite the hardened model")
    if output.exists() and not force:
        raise UsageError(f"{output} exists; pass --force to replace it")


def save_model(model: onnx.ModelProto, output: Path, source: LoadedModel) -> list[Path]:
    """Write ``model`` atomically; copy external data files beside it under names derived from ``output``.

    Returns every file written.  ``model`` must be the (rewritten) source model with its external tensors
    still unloaded; their locations are rewritten to the copies.
    """
    written = []
    if source.external_files:
        renames = {}
        for location, dest in zip(source.external_files, output_files(source, output)[1:]):
            new_location = dest.name
            atomic_write(None, source.path.parent / location, dest)
            renames[location] = new_location
            written.append(dest)
        for tensor in onnx.external_data_helper._get_all_tensors(model):
            if onnx.external_data_helper.uses_external_data(tensor):
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = renames[entry.value]
    data = model.SerializeToString(deterministic=True)
    if len(data) > PROTOBUF_LIMIT:
        raise InvalidModelError("the hardened model exceeds 2 GB; save the input with external data")
    atomic_write(data, None, output)
    written.insert(0, output)
    return written
