"""ONNX Runtime sessions: which execution providers to ask for, and a session that fails loudly.

Providers: ``cuda`` and/or ``cpu`` as asked, or by default CUDA when this onnxruntime build offers it and
CPU otherwise.  A session that asked for CUDA but runs without it (ONNX Runtime logs and falls back to CPU
without raising) is a ``ProviderUnavailableError``, never a silent pass.

ONNX Runtime is an optional dependency chosen by extra: ``hardener[cpu]`` (onnxruntime) or ``hardener[gpu]``
(onnxruntime-gpu with NVIDIA's CUDA 13 and cuDNN 9 wheels); both share the import package ``onnxruntime``,
so install one of them, never both.  Without either, anything that runs a model is a
``ProviderUnavailableError`` naming the extras.  Before a CUDA session, ``onnxruntime.preload_dlls()``
(onnxruntime >= 1.21) loads the CUDA and cuDNN libraries from those NVIDIA wheels, so no system CUDA
toolkit and no ``import torch`` is needed, only the NVIDIA driver.
"""
from __future__ import annotations

import contextlib
import io
import weakref
from pathlib import Path

import onnx
from onnx import helper

from .errors import ProviderUnavailableError, UsageError

PROVIDER_NAMES = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
INSTALL_HINT = ("pip install 'hardener[cpu]' for the CPU runtime, or 'hardener[gpu]' for CUDA "
                "(one of the two, in an environment that has neither onnxruntime nor onnxruntime-gpu)")
CUDA_HINT = ("install the 'gpu' extra, pip install 'hardener[gpu]' (onnxruntime-gpu with NVIDIA's CUDA 13 "
             "and cuDNN 9 wheels, loaded by onnxruntime.preload_dlls()), in an environment without the "
             "CPU-only onnxruntime (pip uninstall onnxruntime first), on a machine with an NVIDIA driver for CUDA 13")


def import_onnxruntime():
    """The ``onnxruntime`` module, or a one-line ``ProviderUnavailableError`` (exit 3) naming the extras."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ProviderUnavailableError(f"ONNX Runtime is not installed ({exc}); {INSTALL_HINT}") from None
    if not hasattr(ort, "InferenceSession"):  # both wheels in one folder, one half uninstalled
        raise ProviderUnavailableError("the onnxruntime package is broken (no InferenceSession: were both "
                                       "onnxruntime and onnxruntime-gpu installed?); uninstall both, then "
                                       + INSTALL_HINT)
    return ort


_PRELOADED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # onnxruntime module -> what preload printed


def _preload_cuda(ort) -> str:
    """Load CUDA/cuDNN from NVIDIA's pip wheels where present (onnxruntime >= 1.21); what it printed."""
    if not hasattr(ort, "preload_dlls"):
        return ""
    if ort not in _PRELOADED:  # once per process: the libraries stay loaded
        _PRELOADED[ort] = _run_preload(ort)
    return _PRELOADED[ort]


def _run_preload(ort) -> str:
    printed = io.StringIO()
    try:  # it reports failures with print(): keep them off stdout (which may carry --json) for our message
        with contextlib.redirect_stdout(printed):
            ort.preload_dlls()
    except Exception as exc:  # noqa: BLE001 - a failed preload shows up as a session without CUDA below
        printed.write(f"preload_dlls failed: {exc}\n")
    return printed.getvalue()


def resolve_providers(requested: list[str] | None) -> list[str]:
    ort = import_onnxruntime()

    available = ort.get_available_providers()
    if not requested:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available \
            else ["CPUExecutionProvider"]
    names = []
    for r in requested:
        key = r.strip().lower()
        if key not in PROVIDER_NAMES:
            raise UsageError(f"unknown provider '{r}'; choose from {', '.join(PROVIDER_NAMES)}")
        names.append(PROVIDER_NAMES[key])
    if "CUDAExecutionProvider" in names and "CUDAExecutionProvider" not in available:
        raise ProviderUnavailableError(
            "CUDA was requested but this onnxruntime build has no CUDAExecutionProvider "
            f"(available: {', '.join(available)}); {CUDA_HINT}"
        )
    return names


def make_session(source: Path | bytes, providers: list[str], tf32: bool, threads: int | None = None,
                 cuda_options: dict | None = None):
    """An InferenceSession on a model path (or serialized bytes) that fails if CUDA was asked but not used.

    ``cuda_options``: extra CUDA provider options (for example ``{"enable_cuda_graph": "1"}``).
    """
    ort = import_onnxruntime()
    preload_log = _preload_cuda(ort) if "CUDAExecutionProvider" in providers else ""

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    cuda = {"use_tf32": "1" if tf32 else "0", **(cuda_options or {})}
    provider_args = [(p, cuda) if p == "CUDAExecutionProvider" else p for p in providers]
    model = source if isinstance(source, bytes) else str(source)
    session = ort.InferenceSession(model, sess_options=opts, providers=provider_args)
    ran = session.get_providers()
    if "CUDAExecutionProvider" in providers and "CUDAExecutionProvider" not in ran:
        failed = [line.strip() for line in preload_log.splitlines() if "failed" in line.lower()]
        detail = f" ({failed[0]})" if failed else ""
        raise ProviderUnavailableError(
            f"CUDA was requested but the session runs on {', '.join(ran)}: the CUDA 13 / cuDNN 9 libraries "
            f"could not be loaded{detail}; {CUDA_HINT}, or put a CUDA 13 toolkit and cuDNN 9 on LD_LIBRARY_PATH"
        )
    return session


def probe_model(model: onnx.ModelProto, tensors: list[tuple[str, int]]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs ``tensors`` (name, elem type)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name, elem_type in tensors:
        if name not in existing:
            probe.graph.output.append(helper.make_tensor_value_info(name, elem_type, None))
    return probe
