"""The CUDA path: validation and the overhead benchmark on a GPU (marked `gpu`, skipped without CUDA), and
the CPU-side guarantees of hardener.runtime's CUDA handling (always run, with a stand-in onnxruntime)."""
from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from hardener import runtime
from hardener.errors import ProviderUnavailableError

from conftest import TEACHER, run_cli

ROOT = Path(__file__).resolve().parents[1]


def _cuda_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


requires_cuda = pytest.mark.skipif(not _cuda_available(), reason="CUDAExecutionProvider unavailable (no "
                                   "onnxruntime-gpu or no GPU): pip install 'hardener[gpu]' on a CUDA machine")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("placement", ["inline", "tap"])
def test_cuda_validation(tmp_path, placement):
    proc = run_cli(TEACHER, "--layers", "body.*.conv2", "--gain", "1.3", "--placement", placement,
                   "--providers", "cuda", "--synthetic", "-o", tmp_path / "h.onnx", "-q")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "h.onnx.report.json").read_text())
    assert report["validation"]["providers"][0] == "CUDAExecutionProvider"
    assert report["validation"]["tf32"] is False


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("extra", [[], ["--cuda-graph"]], ids=["iobinding", "cuda-graph"])
def test_cuda_benchmark_quick(tmp_path, extra):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_overhead.py"), "--providers", "cuda",
                           "--quick", "--points", "1", *extra, "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["provider"] == "CUDAExecutionProvider" for r in rows)
    assert all(r["hardened_ms"] > 0 and r["ratio_median"] > 0 for r in rows)


# -- the CUDA handling of hardener.runtime, with a stand-in onnxruntime (no GPU needed) ----------------------
class _FakeSession:
    def __init__(self, model, sess_options=None, providers=None, log=None, cuda_works=True):
        self.log = log
        self.log.append("session")
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        self.ran = names if cuda_works else [n for n in names if n != "CUDAExecutionProvider"]

    def get_providers(self):
        return self.ran


def _fake_ort(cuda_works: bool, preload_prints: str = "", has_preload: bool = True):
    log: list[str] = []
    ort = types.ModuleType("onnxruntime")
    ort.get_available_providers = lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]

    class Options:
        def add_session_config_entry(self, *a):
            pass

    ort.SessionOptions = Options
    ort.InferenceSession = lambda model, sess_options=None, providers=None: _FakeSession(
        model, sess_options, providers, log, cuda_works)
    if has_preload:
        def preload_dlls():
            log.append("preload")
            print(preload_prints, end="")

        ort.preload_dlls = preload_dlls
    return ort, log


def test_cuda_session_preloads_dlls_first(monkeypatch, capsys):
    ort, log = _fake_ort(cuda_works=True)
    monkeypatch.setitem(sys.modules, "onnxruntime", ort)
    runtime.make_session(b"model", ["CUDAExecutionProvider", "CPUExecutionProvider"], tf32=False)
    assert log == ["preload", "session"]
    log.clear()
    runtime.make_session(b"model", ["CPUExecutionProvider"], tf32=False)
    assert log == ["session"]  # no CUDA asked: nothing preloaded
    ort, log = _fake_ort(cuda_works=True, has_preload=False)  # onnxruntime < 1.21
    monkeypatch.setitem(sys.modules, "onnxruntime", ort)
    runtime.make_session(b"model", ["CUDAExecutionProvider"], tf32=False)
    assert log == ["session"]


def test_cuda_fallback_is_exit_3_with_advice_that_can_be_followed(monkeypatch, capsys):
    ort, _ = _fake_ort(cuda_works=False, preload_prints="Failed to load libcublasLt.so.13: cannot open shared "
                                                        "object file\nPlease follow https://onnxruntime.ai/\n")
    monkeypatch.setitem(sys.modules, "onnxruntime", ort)
    with pytest.raises(ProviderUnavailableError) as exc:
        runtime.make_session(b"model", ["CUDAExecutionProvider", "CPUExecutionProvider"], tf32=False)
    message = str(exc.value)
    assert exc.value.exit_code == 3 and "\n" not in message
    assert "libcublasLt.so.13" in message and "hardener[gpu]" in message and "import torch" not in message
    assert capsys.readouterr().out == ""  # preload_dlls' prints do not reach stdout (it may carry --json)


def test_cuda_request_without_gpu_build_names_the_extra(monkeypatch):
    ort, _ = _fake_ort(cuda_works=True)
    ort.get_available_providers = lambda: ["CPUExecutionProvider"]
    monkeypatch.setitem(sys.modules, "onnxruntime", ort)
    with pytest.raises(ProviderUnavailableError) as exc:
        runtime.resolve_providers(["cuda"])
    assert "hardener[gpu]" in str(exc.value) and "pip uninstall onnxruntime" in str(exc.value)
