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
from .report import printable

MIN_OPSET = 13
# operator domains ONNX Runtime implements without a custom-op library (its contrib and internal domains)
ORT_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training", "ai.onnx.training", "com.microsoft",
               "com.microsoft.nchwc", "com.microsoft.experimental", "com.ms.internal.nhwc", "com.microsoft.dml"}
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


def custom_ops(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(op type, domain) of nodes, subgraphs included, that ONNX Runtime cannot run without a custom-op
    library: ops of a domain it does not implement and that no function in the model defines."""
    local = {(f.domain, f.name) for f in model.functions}
    found: list[tuple[str, str]] = []

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if node.domain not in ORT_DOMAINS and (node.domain, node.op_type) not in local \
                    and (node.op_type, node.domain) not in found:
                found.append((node.op_type, node.domain))
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        visit(g)

    visit(model.graph)
    for function in model.functions:
        for node in function.node:
            if node.domain not in ORT_DOMAINS and (node.domain, node.op_type) not in local \
                    and (node.op_type, node.domain) not in found:
                found.append((node.op_type, node.domain))
    return found


def load_model(path: str | os.PathLike, runnable: bool = True) -> LoadedModel:
    """Read ``path`` without its external data and check it.  With ``runnable`` (hardening; not for
    listing layers), also refuse models ONNX Runtime cannot run: validation and the written model's own
    session check need it."""
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
        raise InvalidModelError(f"{path} is not a valid ONNX model: {printable(text, 600)}") from None
    if runnable:
        custom = custom_ops(model)
        if custom:
            op, domain = custom[0]
            more = f" (and {len(custom) - 1} more custom op type(s))" if len(custom) > 1 else ""
            raise InvalidModelError(
                f"{printable(path, None)}: the model uses custom-domain op {printable(op)} (domain "
                f"{printable(domain)}){more}, which ONNX Runtime cannot run without its custom-op library; "
                "hardener runs every model it writes in ONNX Runtime, so it cannot harden this one")
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


def check_output_paths(source: LoadedModel, output: Path, report: Path | None, force: bool) -> None:
    """Refuse, before anything is written, every output problem that can be known in advance.

    The input model and its external data are never written; no written file may be another (the report
    the model, ...); each must be a file path (not a folder) in an existing folder we can create files in;
    and without ``force`` none may exist already, the model's external-data copies (``OUT.data``) and the
    report included.
    """
    output, report = Path(output), Path(report) if report is not None else None
    protected = protected_files(source)
    written = output_files(source, output)
    named = [(p, "output" if i == 0 else "external-data file") for i, p in enumerate(written)]
    if report is not None:
        named.append((report, "the report"))
    for path, what in named:
        if path.name in ("", ".", ".."):
            raise UsageError(f"{what} path '{printable(path, None)}' names no file")
        if path.resolve() in protected:
            raise UsageError(f"{what} {printable(path, None)} is the input model or its external data: "
                             "hardener never modifies its input")
        if path.is_dir():
            raise UsageError(f"{what} {printable(path, None)} is a folder; give a file path")
        if not path.parent.is_dir():
            raise UsageError(f"folder {printable(path.parent, None)} for {what} {printable(path.name)} does not "
                             "exist" + (" (it is a file)" if path.parent.exists() else ""))
    resolved = [p.resolve() for p in written]
    if report is not None and report.resolve() in resolved:
        raise UsageError(f"the report {printable(report, None)} would overwrite the hardened model or its data")
    if len(set(resolved)) != len(resolved):
        raise UsageError(f"output {printable(output, None)} would overwrite its own external data")
    for folder in sorted({p.parent.resolve() for p, _ in named}):
        _check_writable(folder)
    if not force:
        taken = [p for p, _ in named if p.exists() or p.is_symlink()]
        if taken:
            raise UsageError(f"{', '.join(printable(p, None) for p in taken)} exist{'s' if len(taken) == 1 else ''}; "
                             "pass --force to replace "
                             + ("it" if len(taken) == 1 else "them"))


def _check_writable(folder: Path) -> None:
    """Create and remove a temporary file: the only check that holds for root, read-only mounts and ACLs."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".hardener-write-check.", dir=folder)
    except OSError as exc:
        raise UsageError(f"cannot write in folder {printable(folder, None)} ({exc.strerror or exc}); choose "
                         "another output folder") from None
    os.close(fd)
    os.unlink(tmp)


def runtime_refusal(source: LoadedModel) -> str | None:
    """Why ONNX Runtime (CPU) cannot load the *input* model, or None if it can.

    For the moment a written model fails its session check: if the source fails too (ops without a CPU
    kernel for its types, such as bfloat16 Relu; contrib ops of another build), the model is the problem
    (exit 4 naming it), not the rewrite.  Node names are made unique first, as validation does.
    """
    import onnxruntime as ort

    from .rewrite import make_node_names_unique

    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        if source.has_external_data:
            ort.InferenceSession(str(source.path), sess_options=opts, providers=["CPUExecutionProvider"])
        else:
            copy = onnx.ModelProto()
            copy.CopyFrom(source.model)
            make_node_names_unique(copy)
            ort.InferenceSession(copy.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - whatever ONNX Runtime raises is the answer
        text = " ".join(str(exc).split()) or type(exc).__name__
        return printable(text, 600)
    return None


def remove_written(paths: list[Path]) -> None:
    """Remove files a refused or failed run wrote (best effort; never raises)."""
    for path in paths:
        try:
            Path(path).unlink(missing_ok=True)
        except OSError:
            pass


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
