"""Bad and edge input for the ``harden`` CLI: documented exit codes, one clear message, never a traceback.

Exit codes (shared/design/CONVENTIONS.md): 0 ok; 1 fidelity budget failed; 2 usage error (a selector that
matches nothing included); 3 required execution provider unavailable; 4 invalid model or internal error.

Every model here is a tiny graph built with ``onnx.helper`` (seeded numpy weights) and written under
``tmp_path``; the CLI runs in a subprocess through its console entry point.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

ENTRY = "from hardener.cli import entry; entry()"
IR_FOR_OPSET = {11: 6, 13: 7, 17: 8, 21: 10}
INSERTED_PREFIX = "hardener/asvp"


# -- helpers -----------------------------------------------------------------------------------------------
def run_cli(*args) -> subprocess.CompletedProcess:
    """The console entry point in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, "-c", ENTRY, *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def error_line(res: subprocess.CompletedProcess) -> str:
    """The single error line on stderr ('error: ...' from hardener, 'Error: ...' from click)."""
    lines = [l for l in res.stderr.splitlines() if l.lower().startswith(("error:", "internal error:"))]
    assert len(lines) == 1, f"expected exactly one error line on stderr, got:\n{res.stderr}"
    return lines[0]


def assert_fails(res: subprocess.CompletedProcess, code: int, *words) -> str:
    """Exit ``code``, no traceback, one error line naming the problem.

    Each of ``words`` (a string, or a tuple of alternatives) must appear in that line, case-insensitively.
    """
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out
    assert res.returncode == code, \
        f"exit {res.returncode}, expected {code}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    line = error_line(res)
    assert not line.startswith("internal error"), f"an unexpected exception, not a handled error: {line}"
    for word in words:
        alternatives = word if isinstance(word, tuple) else (word,)
        assert any(w.lower() in line.lower() for w in alternatives), f"{alternatives} not in: {line}"
    return line


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _weights(rng, c_out, c_in, k, dtype):
    w = (rng.standard_normal((c_out, c_in, k, k)) * (1.0 / np.sqrt(c_in * k * k))).astype(dtype)
    b = (rng.standard_normal(c_out) * 0.05).astype(dtype)
    return w, b


def conv(name, x, y, w_name, rng, c_out, c_in, k, dtype, inits):
    w, b = _weights(rng, c_out, c_in, k, dtype)
    inits += [numpy_helper.from_array(w, w_name), numpy_helper.from_array(b, w_name.replace("weight", "bias"))]
    return helper.make_node("Conv", [x, w_name, w_name.replace("weight", "bias")], [y], name=name,
                            kernel_shape=[k, k], pads=[k // 2] * 4)


def make(nodes, inits, inputs, outputs, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="test_bad_input")
    model.ir_version = IR_FOR_OPSET.get(opset, 8)
    return model


def chain_model(shape=(1, 3, 16, 16), mid=4, opset=17, dtype=np.float32, relu_names=("relu_0",), seed=0):
    """x -> Conv conv_0 -> f0 -> Relu(s) -> ... -> Conv conv_final -> y (the graph output)."""
    rng = np.random.default_rng(seed)
    n, c, h, w = shape
    k = 3 if h > 1 and w > 1 else 1
    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits: list = []
    nodes = [conv("conv_0", "x", "f0", "conv_0.weight", rng, mid, c, k, dtype, inits)]
    prev = "f0"
    for i, name in enumerate(relu_names):
        out = f"r{i}"
        nodes.append(helper.make_node("Relu", [prev], [out], name=name))
        prev = out
    nodes.append(conv("conv_final", prev, "y", "conv_final.weight", rng, c, mid, k, dtype, inits))
    return make(nodes, inits, [helper.make_tensor_value_info("x", et, list(shape))],
                [helper.make_tensor_value_info("y", et, list(shape))], opset=opset)


def save(model, path: Path, **kw) -> Path:
    onnx.save(model, str(path), **kw)
    return path


@pytest.fixture
def chain(tmp_path) -> Path:
    return save(chain_model(), tmp_path / "chain.onnx")


def run_ort(path: Path, feed: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def rand_input(shape, dtype=np.float32, seed=1):
    return np.random.default_rng(seed).random(shape).astype(dtype)


# -- 1-6: unreadable model files ------------------------------------------------------------------------------
def test_missing_model_file(tmp_path):
    res = run_cli(tmp_path / "nope.onnx", "--layers", "op:Conv")
    assert_fails(res, 2, "not found", "nope.onnx")


def test_folder_as_model(tmp_path):
    folder = tmp_path / "model_dir.onnx"
    folder.mkdir()
    res = run_cli(folder, "--layers", "op:Conv")
    assert_fails(res, 2, ("folder", "directory"), "model_dir.onnx")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    res = run_cli(path, "--layers", "op:Conv")
    assert_fails(res, 4, "empty", "empty.onnx")


def test_corrupt_random_bytes(tmp_path):
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    res = run_cli(path, "--layers", "op:Conv")
    assert_fails(res, 4, "corrupt", "corrupt.onnx")


def test_truncated_model(tmp_path):
    full = save(chain_model(), tmp_path / "full.onnx").read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(full[: len(full) // 2])
    res = run_cli(path, "--layers", "op:Conv")
    assert_fails(res, 4, "truncated.onnx", ("truncated", "corrupt"))


def test_text_file_named_onnx(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model\njust some text\n")
    res = run_cli(path, "--layers", "op:Conv")
    assert_fails(res, 4, "notes.onnx", ("not onnx", "corrupt"))


def test_model_failing_the_checker(tmp_path):
    model = chain_model()
    model.graph.node[1].input[0] = "ghost_tensor"  # Relu reads a tensor nobody produces
    path = save(model, tmp_path / "invalid.onnx")
    res = run_cli(path, "--layers", "op:Conv")
    assert_fails(res, 4, "not a valid onnx model", "ghost_tensor")


# -- 7-12, 29: selectors ---------------------------------------------------------------------------------------
def test_node_selector_typo_lists_near_misses(chain):
    res = run_cli(chain, "--layers", "node:conv_1")
    assert_fails(res, 2, "node:conv_1", "matched nothing", "near misses", "conv_0")


def test_op_selector_typo_lists_near_misses(chain):
    res = run_cli(chain, "--layers", "op:Convv")
    assert_fails(res, 2, "op:Convv", "matched nothing", "Conv")


def test_empty_selector(chain):
    res = run_cli(chain, "--layers", "  ")
    assert_fails(res, 2, "empty", "selector")


def scoped_model() -> onnx.ModelProto:
    """Nodes with TorchScript-style scoped names, so module paths exist: body.0.conv, body.0.act, tail."""
    model = chain_model()
    names = {"conv_0": "/body/body.0/conv/Conv", "relu_0": "/body/body.0/act/Relu", "conv_final": "/tail/Conv"}
    for node in model.graph.node:
        node.name = names[node.name]
    return model


def test_regex_selector_matching_nothing(tmp_path):
    path = save(scoped_model(), tmp_path / "scoped.onnx")
    res = run_cli(path, "--layers", r"re:head\.\d+\.conv")
    assert_fails(res, 2, r"re:head\.\d+\.conv", "matched nothing")


def test_module_path_typo_lists_near_misses(tmp_path):
    path = save(scoped_model(), tmp_path / "scoped.onnx")
    res = run_cli(path, "--layers", "body.0.conv2")
    assert_fails(res, 2, "body.0.conv2", "matched nothing", "body.0.conv")


def test_invalid_regex(chain):
    res = run_cli(chain, "--layers", "re:(")
    assert_fails(res, 2, "re:(", "invalid regular expression")


def test_tensor_selector_naming_an_initializer(chain):
    """The tensor exists, as a weight: 'matched nothing' would send the user looking for a typo."""
    res = run_cli(chain, "--layers", "tensor:conv_0.weight")
    assert_fails(res, 2, "tensor:conv_0.weight", ("initializer", "constant", "not a feature map"))


def flatten_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits: list = []
    nodes = [conv("conv_0", "x", "f0", "conv_0.weight", rng, 4, 3, 3, np.float32, inits),
             helper.make_node("Flatten", ["f0"], ["flat_out"], name="flat", axis=1)]
    return make(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                [helper.make_tensor_value_info("flat_out", TensorProto.FLOAT, [1, 1024])])


@pytest.mark.parametrize("selector", ["node:flat", "tensor:flat_out"])
def test_non_4d_tensor(tmp_path, selector):
    path = save(flatten_model(), tmp_path / "flat.onnx")
    res = run_cli(path, "--layers", selector)
    assert_fails(res, 2, selector, "1x1024", "4D")


def test_ambiguous_node_name(tmp_path):
    path = save(chain_model(relu_names=("dup", "dup")), tmp_path / "dup.onnx")
    res = run_cli(path, "--layers", "node:dup")
    assert_fails(res, 2, "node:dup", "ambiguous", "tensor:")


def split_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits: list = []
    nodes = [conv("conv_0", "x", "f0", "conv_0.weight", rng, 4, 3, 3, np.float32, inits),
             helper.make_node("Split", ["f0"], ["s0", "s1"], name="split_0", axis=1),
             helper.make_node("Add", ["s0", "s1"], ["y"], name="add_0")]
    return make(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 16, 16])])


def test_node_with_two_outputs(tmp_path):
    path = save(split_model(), tmp_path / "split.onnx")
    res = run_cli(path, "--layers", "node:split_0")
    assert_fails(res, 2, "node:split_0", "2 outputs", "s0", "s1")


@pytest.mark.parametrize("selector", ["body.0.conv", "body.*.conv"])
def test_module_path_on_model_without_module_paths(chain, selector):
    res = run_cli(chain, "--layers", selector)
    assert_fails(res, 2, selector, "no module paths", "node:", "tensor:", "op:")


def int_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits: list = []
    nodes = [conv("conv_0", "x", "f0", "conv_0.weight", rng, 4, 3, 3, np.float32, inits),
             helper.make_node("Cast", ["f0"], ["f0_int"], name="to_int", to=TensorProto.INT64),
             helper.make_node("Relu", ["f0"], ["y"], name="relu_0")]
    return make(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16]),
                 helper.make_tensor_value_info("f0_int", TensorProto.INT64, [1, 4, 16, 16])])


@pytest.mark.parametrize("selector, words", [
    ("tensor:f0_int", ("f0_int", "INT64", "float")),
    ("node:to_int", ("f0_int", "INT64", "float")),
    ("op:Cast", ("op:Cast", "4D float")),
])
def test_non_float_4d_tensor(tmp_path, selector, words):
    path = save(int_model(), tmp_path / "int.onnx")
    res = run_cli(path, "--layers", selector)
    assert_fails(res, 2, *words)


# -- runs started together --------------------------------------------------------------------------------------------
# A run that gets as far as writing a model costs about 3 s (most of it `import torch` inside hardener), so those runs
# (every run that must succeed, and the bad values that today are only caught late or not at all) are started by one
# module fixture, as many at a time as there are CPU cores; each test then checks its own run.
@dataclass
class Run:
    model: Path
    out: Path
    res: subprocess.CompletedProcess
    input_untouched: bool  # the model's folder (model, external data) byte-identical afterwards

    def check_ok(self, status: str = "PASSED") -> None:
        """Exit 0, ``status`` on the last line (NOT VALIDATED for --no-validate), no traceback, and the input
        model and its data untouched (case 28)."""
        out = self.res.stdout + self.res.stderr
        assert "Traceback" not in out, out
        assert self.res.returncode == 0, \
            f"exit {self.res.returncode}\nstdout:\n{self.res.stdout}\nstderr:\n{self.res.stderr}"
        lines = self.res.stdout.splitlines()
        assert lines and lines[-1].startswith(f"{status} | "), self.res.stdout
        assert self.input_untouched, f"input model {self.model} (or its external data) was modified"

    def check_fails(self, code: int, *words) -> str:
        line = assert_fails(self.res, code, *words)
        assert self.input_untouched, f"input model {self.model} (or its external data) was modified"
        return line


def _snapshot(folder: Path) -> dict:
    return {p: (sha256(p), p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()}


def _run_job(model: Path, out: Path, args: list) -> Run:
    before = _snapshot(model.parent)
    res = run_cli(model, *args, "-o", out)
    return Run(model, out, res, _snapshot(model.parent) == before)


def external_model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ext.onnx"
    onnx.save(chain_model(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    assert (folder / "ext.onnx.data").is_file()
    return path


def custom_op_model() -> onnx.ModelProto:
    """Relu, then an op of a domain ONNX Runtime does not implement (its custom-op library is absent)."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu_0"),
             helper.make_node("FancyBlur", ["r"], ["y"], name="blur", domain="acme.vision")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("acme.vision", 1)])
    model.ir_version = 8
    return model


def renamed(model: onnx.ModelProto, old: str, new: str) -> onnx.ModelProto:
    for node in model.graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    return model


DUP_SOURCE = chain_model(relu_names=("dup", "dup"))  # two Relu nodes named 'dup' on different tensors

# option, value, words the message must hold, whether it must be refused before any file is written
BAD_VALUES = [
    ("--rank", "0", ("rank", "0"), True),
    ("--rank", "65", ("rank", "65"), True),
    ("--gain", "-1", ("gain", "-1"), True),
    ("--gain", "0", ("gain", "positive"), True),
    ("--gain", "nan", ("gain", "nan"), True),
    ("--gain", "inf", ("gain", "inf"), True),
    ("--iterations", "0", ("iterations", "0"), True),
    ("--squarings", "4", ("squarings", "4"), True),
    ("--squarings", "-1", ("squarings", "-1"), True),
    ("--adaptive-energy", "1.5", ("adaptive", "1.5"), True),
    ("--adaptive-energy", "0", ("adaptive", "(0, 1]"), True),
    ("--rank", "two", ("--rank", "two"), True),
    ("--mode", "diagonal", ("--mode", "diagonal"), True),
    ("--placement", "sideways", ("--placement", "sideways"), True),
    ("--seed", "-1", ("seed", "-1"), True),
    ("--num-samples", "-1", (("num-samples", "num_samples"), "-1"), True),
    ("--min-psnr", "nan", (("min-psnr", "min_psnr"), "nan"), True),
    ("--atol", "-1", ("atol", "-1"), True),
    ("--data-range", "0", (("data-range", "data_range", "data range"), "0"), True),
    ("--crop-border", "-1", (("crop-border", "crop_border", "crop border"), "-1"), True),
    # a border that leaves nothing of the 16x16 output: PSNR over no pixels must not pass a budget
    ("--crop-border", "8", (("crop-border", "crop_border", "crop border"), "8"), False),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    root = tmp_path_factory.mktemp("runs")
    jobs = {}

    def job(name, model, *args, out_name="out.onnx"):
        folder = root / name.replace("/", "_").replace(":", "_")  # the model in folder/src, the output in folder
        (folder / "src").mkdir(parents=True, exist_ok=True)
        if not isinstance(model, Path):
            model = save(model, folder / "src" / "model.onnx")
        if "--gain" not in args:  # an explicit gain: these cases are about inputs, not gain calibration
            args = (*args, "--gain", "1.3")
        jobs[name] = (model, folder / out_name, list(args))
        return folder

    nb = "--no-budgets"
    # 13-18, 22: edge cases that must work
    job("graph_output", chain_model(), "--layers", "tensor:y", nb)
    job("pixel_1x1", chain_model(shape=(1, 8, 1, 1), mid=8), "--layers", "node:conv_0", nb)
    for mode in ("channel", "spatial"):
        job(f"c1_{mode}", chain_model(shape=(1, 1, 16, 16), mid=1), "--layers", "node:conv_0", "--mode", mode, nb)
    job("fp16", chain_model(dtype=np.float16), "--layers", "node:conv_0", "--gain", "1.0", nb)
    job("external", external_model(root / "external" / "src"), "--layers", "node:conv_0", nb, out_name="hard.onnx")
    for opset in (13, 21):
        job(f"opset{opset}", chain_model(opset=opset), "--layers", "node:conv_0", nb)
    job("dup", DUP_SOURCE, "--layers", "tensor:r0", "--layers", "tensor:r1", nb)
    folder = job("force", chain_model(), "--layers", "node:conv_0", "--no-validate", "--force")
    (folder / "out.onnx").write_bytes(b"precious")
    job("once", chain_model(), "--layers", "node:conv_0", "--no-validate")
    # 20 and beyond: files that must never be overwritten
    ext = external_model(root / "ext_over_data" / "src")
    jobs["ext_over_data"] = (ext, ext.with_name("ext.onnx.data"),
                             ["--layers", "node:conv_0", "--no-validate", "--force"])
    folder = root / "report_is_input" / "src"
    folder.mkdir(parents=True)
    model = save(chain_model(), folder / "model.onnx")
    jobs["report_is_input"] = (model, folder.parent / "out.onnx",
                               ["--layers", "node:conv_0", "--no-validate", "--report", model])
    job("report_is_output", chain_model(), "--layers", "node:conv_0", "--no-validate", "--report",
        root / "report_is_output" / "out.onnx")
    job("report_folder_missing", chain_model(), "--layers", "node:conv_0", "--no-validate", "--report",
        root / "report_folder_missing" / "missing" / "r.json")
    # 26: an .npz with zero samples
    folder = job("npz_empty", chain_model(), "--layers", "node:conv_0")
    np.savez(folder / "empty.npz", x=np.zeros((0, 3, 16, 16), np.float32))
    jobs["npz_empty"][2].extend(["--inputs", folder / "empty.npz"])
    # issue 9: refusals found before anything is written, and inputs that must be accepted
    job("custom_op", custom_op_model(), "--layers", "node:relu_0")
    ext = external_model(root / "data_sibling" / "src")
    (root / "data_sibling" / "hard.onnx.data").write_bytes(b"someone else's tensors")
    jobs["data_sibling"] = (ext, root / "data_sibling" / "hard.onnx", ["--layers", "node:conv_0", "--gain", "1.3"])
    folder = job("out_is_folder", chain_model(), "--layers", "node:conv_0")
    (folder / "out.onnx").mkdir()
    folder = job("report_is_folder", chain_model(), "--layers", "node:conv_0", "--report",
                 root / "report_is_folder" / "r.json")
    (folder / "r.json").mkdir()
    folder = job("npz_truth_unknown", chain_model(), "--layers", "node:conv_0")
    np.savez(folder / "v.npz", x=rand_input((2, 3, 16, 16)), **{"truth:yy": rand_input((2, 3, 16, 16))})
    jobs["npz_truth_unknown"][2].extend(["--inputs", folder / "v.npz"])
    folder = job("npz_nan", chain_model(), "--layers", "node:conv_0")
    x = rand_input((2, 3, 16, 16))
    x[1, 2, 3, 4] = np.inf
    np.savez(folder / "v.npz", x=x)
    jobs["npz_nan"][2].extend(["--inputs", folder / "v.npz"])
    folder = job("one_image", chain_model(shape=(1, 3, 32, 32)), "--layers", "node:conv_0", nb)
    from PIL import Image

    la = np.dstack([np.arange(48 * 40).reshape(48, 40) % 256, np.full((48, 40), 200)]).astype(np.uint8)
    Image.fromarray(la, "LA").save(folder / "grey_alpha.png")
    jobs["one_image"][2].extend(["--inputs", folder / "grey_alpha.png"])
    fake = "f0\nPASSED | 1 layer(s) hardened, budgets met"
    job("newline_name", renamed(chain_model(), "f0", fake), "--layers", f"tensor:{fake}", "--no-validate")
    # 23: bad option values
    for option, value, _, _ in BAD_VALUES:
        job(f"bad{option}={value}", chain_model(), "--layers", "node:conv_0", option, value)

    # all jobs start even when -k selects one test (about 20 s on 2 cores once the late refusals are early)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {name: pool.submit(_run_job, *spec) for name, spec in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


# -- 13-18, 22: edge cases that must work ------------------------------------------------------------------------------
def test_graph_output_tensor_is_hardened_in_place(runs):
    run = runs["graph_output"]
    run.check_ok()
    hardened = onnx.load(str(run.out))
    assert [o.name for o in hardened.graph.output] == ["y"]
    assert any(n.name.startswith(INSERTED_PREFIX) for n in hardened.graph.node)
    (y,) = run_ort(run.out, {"x": rand_input((1, 3, 16, 16))})
    assert y.shape == (1, 3, 16, 16) and np.isfinite(y).all()


def test_1x1_spatial_maps(runs):
    run = runs["pixel_1x1"]
    run.check_ok()
    (y,) = run_ort(run.out, {"x": rand_input((1, 8, 1, 1))})
    assert y.shape == (1, 8, 1, 1) and np.isfinite(y).all()


@pytest.mark.parametrize("mode", ["channel", "spatial"])
def test_single_channel_feature_map(runs, mode):
    run = runs[f"c1_{mode}"]
    run.check_ok()
    (y,) = run_ort(run.out, {"x": rand_input((1, 1, 16, 16))})
    assert y.shape == (1, 1, 16, 16) and np.isfinite(y).all()


def test_fp16_model_identity_gain(runs):
    run = runs["fp16"]
    run.check_ok()
    hardened = onnx.load(str(run.out))
    inserted = [n for n in hardened.graph.node if n.name.startswith(INSERTED_PREFIX)]
    casts_to_float = [n for n in inserted if n.op_type == "Cast"
                      and helper.get_attribute_value(n.attribute[0]) == TensorProto.FLOAT]
    assert casts_to_float, [n.op_type for n in inserted]
    x = rand_input((1, 3, 16, 16), np.float16)
    (ref,) = run_ort(run.model, {"x": x})
    (got,) = run_ort(run.out, {"x": x})
    assert got.dtype == np.float16 and np.isfinite(got).all()
    scale = max(float(np.abs(ref.astype(np.float32)).max()), 1e-3)
    assert float(np.abs(got.astype(np.float32) - ref.astype(np.float32)).max()) < 1e-2 * scale


def test_external_data_model(runs):
    run = runs["external"]
    run.check_ok()  # includes: the input's ext.onnx.data has the same sha256 as before
    assert run.model.with_name("ext.onnx.data").is_file()
    assert run.out.parent != run.model.parent
    assert run.out.with_name("hard.onnx.data").is_file()
    locations = {e.value for t in onnx.load(str(run.out), load_external_data=False).graph.initializer
                 for e in t.external_data if e.key == "location"}
    assert locations == {"hard.onnx.data"}
    (y,) = run_ort(run.out, {"x": rand_input((1, 3, 16, 16))})
    assert np.isfinite(y).all()


def test_external_data_file_missing(tmp_path):
    path = external_model(tmp_path / "src")
    path.with_name("ext.onnx.data").unlink()
    res = run_cli(path, "--layers", "node:conv_0", "-o", tmp_path / "out.onnx")
    assert_fails(res, 4, "missing", "ext.onnx.data")
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("opset", [13, 21])
def test_supported_opsets_are_kept(runs, opset):
    run = runs[f"opset{opset}"]
    run.check_ok()
    hardened = onnx.load(str(run.out))
    assert hardened.ir_version == IR_FOR_OPSET[opset]
    assert [(o.domain, o.version) for o in hardened.opset_import] == [("", opset)]
    (y,) = run_ort(run.out, {"x": rand_input((1, 3, 16, 16))})
    assert np.isfinite(y).all()


def test_opset_too_old(tmp_path):
    path = save(chain_model(opset=11), tmp_path / "op11.onnx")
    res = run_cli(path, "--layers", "node:conv_0")
    assert_fails(res, 4, "opset 11", "convert_version")


def test_opset_newer_than_onnx_knows(tmp_path):
    path = save(chain_model(opset=99), tmp_path / "op99.onnx")
    res = run_cli(path, "--layers", "node:conv_0")
    assert_fails(res, 4, "opset 99", "upgrade onnx")


def test_duplicate_node_names_selected_by_tensor(runs):
    """Two Relu nodes named 'dup' (the ONNX checker accepts it; ONNX Runtime refuses it): must still work."""
    run = runs["dup"]
    run.check_ok()
    names = [n.name for n in onnx.load(str(run.out)).graph.node]
    inserted = [n for n in names if n.startswith(INSERTED_PREFIX)]
    assert len(inserted) > 2 * 2, "expected two inserted subgraphs"
    assert len(set(inserted)) == len(inserted), "inserted node names collide"
    assert not set(inserted) & {n.name for n in DUP_SOURCE.graph.node}
    # ONNX Runtime refuses graphs with repeated node names: the hardened model must have none
    assert len(set(names)) == len(names), Counter(names).most_common(3)
    (y,) = run_ort(run.out, {"x": rand_input((1, 3, 16, 16))})
    assert np.isfinite(y).all()


# -- 25: hardening twice -------------------------------------------------------------------------------------------
def test_already_hardened(runs, tmp_path):
    once = runs["once"]
    once.check_ok("NOT VALIDATED")
    res = run_cli(once.out, "--layers", "node:conv_0", "--no-validate", "-o", tmp_path / "twice.onnx")
    assert_fails(res, 2, "already hardened")
    assert not (tmp_path / "twice.onnx").exists()


# -- 20, 21: output paths; files that must never be overwritten ------------------------------------------------------
def test_output_is_input(chain):
    before = sha256(chain)
    res = run_cli(chain, "--layers", "node:conv_0", "-o", chain)
    assert_fails(res, 2, "input model")
    assert sha256(chain) == before


def test_output_is_input_through_another_spelling(chain):
    before = sha256(chain)
    res = run_cli(chain, "--layers", "node:conv_0", "-o", chain.parent / "." / chain.name, "--force")
    assert_fails(res, 2, "input model")
    assert sha256(chain) == before


def test_output_exists_without_force(chain, tmp_path):
    out = tmp_path / "taken.onnx"
    out.write_bytes(b"precious")
    res = run_cli(chain, "--layers", "node:conv_0", "-o", out)
    assert_fails(res, 2, "exists", "--force")
    assert out.read_bytes() == b"precious"


def test_output_exists_with_force_is_replaced(runs):
    run = runs["force"]
    run.check_ok("NOT VALIDATED")
    assert any(p.key == "hardener.manifest" for p in onnx.load(str(run.out)).metadata_props)


def test_output_folder_missing(chain, tmp_path):
    out = tmp_path / "no" / "such" / "dir" / "out.onnx"
    res = run_cli(chain, "--layers", "node:conv_0", "-o", out)
    assert_fails(res, 2, "does not exist")
    assert not out.parent.exists()


def test_output_onto_the_inputs_external_data(runs):
    """-o src/ext.onnx.data --force would replace the tensors the input model points to."""
    run = runs["ext_over_data"]
    run.check_fails(2, "ext.onnx.data", "input")


def test_report_is_the_input_model(runs):
    run = runs["report_is_input"]
    run.check_fails(2, "report", "input")
    assert not run.out.exists()


def test_report_is_the_output_model(runs):
    run = runs["report_is_output"]
    run.check_fails(2, "report", "output")


def test_report_folder_missing(runs):
    """A report path in a missing folder is a usage error found before anything is written."""
    run = runs["report_folder_missing"]
    run.check_fails(2, "does not exist")
    assert not run.out.exists()


# -- 23, 24: option values and providers ---------------------------------------------------------------------------
@pytest.mark.parametrize("option, value, words, early", BAD_VALUES,
                         ids=[f"{o}={v}" for o, v, _, _ in BAD_VALUES])
def test_bad_option_values(runs, option, value, words, early):
    run = runs[f"bad{option}={value}"]
    run.check_fails(2, *words)
    if early:
        assert not run.out.exists(), "a bad option value must be refused before any file is written"


def test_unknown_option(chain):
    res = run_cli(chain, "--layers", "node:conv_0", "--frobnicate")
    assert_fails(res, 2, "--frobnicate")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                    reason="this onnxruntime has CUDA: the unavailable-provider path cannot be reached")
def test_cuda_provider_unavailable(chain, tmp_path):
    out = tmp_path / "o.onnx"
    res = run_cli(chain, "--layers", "node:conv_0", "--providers", "cuda", "-o", out)
    assert_fails(res, 3, "CUDA")
    assert not out.exists()


def test_unknown_provider(chain, tmp_path):
    res = run_cli(chain, "--layers", "node:conv_0", "--providers", "foo", "-o", tmp_path / "o.onnx")
    assert_fails(res, 2, "unknown provider", "foo")


# -- 26: validation inputs ---------------------------------------------------------------------------------------
def test_inputs_path_missing(chain, tmp_path):
    res = run_cli(chain, "--layers", "node:conv_0", "--inputs", tmp_path / "nothere.npz", "-o", tmp_path / "o.onnx")
    assert_fails(res, 2, "not found", "nothere.npz")


def test_npz_lacking_model_input(chain, tmp_path):
    npz = tmp_path / "wrong.npz"
    np.savez(npz, image=rand_input((2, 3, 16, 16)))
    res = run_cli(chain, "--layers", "node:conv_0", "--inputs", npz, "-o", tmp_path / "o.onnx")
    assert_fails(res, 2, "lacks", "'x'", "image")


def test_npz_corrupt(chain, tmp_path):
    npz = tmp_path / "broken.npz"
    npz.write_bytes(b"PK\x03\x04 definitely not a zip")
    res = run_cli(chain, "--layers", "node:conv_0", "--inputs", npz, "-o", tmp_path / "o.onnx")
    assert_fails(res, 2, "cannot read", "broken.npz")


def test_npz_wrong_rank(chain, tmp_path):
    npz = tmp_path / "flat.npz"
    np.savez(npz, x=rand_input((2, 3 * 16 * 16)))
    res = run_cli(chain, "--layers", "node:conv_0", "--inputs", npz, "-o", tmp_path / "o.onnx")
    assert_fails(res, 2, "'x'", "rank 4")


def test_image_folder_without_images(chain, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "readme.txt").write_text("no pictures here")
    res = run_cli(chain, "--layers", "node:conv_0", "--inputs", folder, "-o", tmp_path / "o.onnx")
    assert_fails(res, 2, "no images", "imgs")


def test_npz_with_zero_samples(runs):
    """An empty .npz must not be replaced silently by synthetic inputs."""
    runs["npz_empty"].check_fails(2, "empty")


def test_truth_without_inputs(chain, tmp_path):
    truth = tmp_path / "hr"
    truth.mkdir()
    res = run_cli(chain, "--layers", "node:conv_0", "--truth", truth, "-o", tmp_path / "o.onnx")
    assert_fails(res, 2, "--truth", "--inputs")


# -- 27: missing arguments ----------------------------------------------------------------------------------------
def test_no_layers(chain):
    res = run_cli(chain)
    assert_fails(res, 2, "--layers", ("--list-layers", "harden layers"))


def test_no_model():
    res = run_cli("--layers", "op:Conv")
    assert_fails(res, 2, "MODEL")


def test_layer_out_of_the_subgraphs_range_fails_validation(tmp_path):
    """Activations around 1e25 overflow the float32 Gram matrix: the subgraph passes them through unchanged
    (never NaN), and validation must say so and fail rather than pass an unprotected model."""
    from onnx import numpy_helper

    from hardener.api import HardenConfig, harden
    from hardener.validate import Budgets

    model = chain_model()
    for init in model.graph.initializer:
        if init.name == "conv_0.weight":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1e25), init.name))
    src = save(model, tmp_path / "huge.onnx")
    result = harden(src, tmp_path / "out.onnx", HardenConfig(layers=["node:relu_0"], budgets=Budgets(
        min_psnr=None, max_psnr_drop=None)))
    assert result.report["status"] == "FAILED" and result.report["exit_code"] == 1
    assert any("outside the float32 Gram matrix's range" in f for f in result.report["failures"]), \
        result.report["failures"]
    layer = result.report["validation"]["layers"][0]
    assert layer["unperturbed"] and layer["max_abs"] > 1e20
    # the same model at a normal scale is perturbed and passes
    ok = harden(save(chain_model(), tmp_path / "ok.onnx"), tmp_path / "ok.out.onnx",
                HardenConfig(layers=["node:relu_0"], budgets=Budgets(min_psnr=None, max_psnr_drop=None)))
    assert ok.report["status"] == "PASSED" and not ok.report["validation"]["layers"][0]["unperturbed"]


# -- issue 9: refused before anything is written; accepted inputs ----------------------------------------------------
def _nothing_written(run: Run) -> None:
    assert not run.out.exists(), f"{run.out} was written by a refused run"
    assert not any(p.name.endswith((".report.json", ".tmp")) for p in run.out.parent.iterdir() if p.is_file()), \
        sorted(p.name for p in run.out.parent.iterdir())


def test_custom_domain_op(runs):
    run = runs["custom_op"]
    run.check_fails(4, "custom-domain op FancyBlur", "acme.vision", "custom-op library")
    _nothing_written(run)


def test_existing_external_data_sibling_needs_force(runs):
    run = runs["data_sibling"]
    run.check_fails(2, "hard.onnx.data", "--force")
    assert run.out.with_name("hard.onnx.data").read_bytes() == b"someone else's tensors"
    assert not run.out.exists()


def test_output_is_a_folder(runs):
    run = runs["out_is_folder"]
    run.check_fails(2, "out.onnx", "folder")
    assert run.out.is_dir() and not any(run.out.iterdir())


def test_report_is_a_folder(runs):
    run = runs["report_is_folder"]
    run.check_fails(2, "report", "r.json", "folder")
    assert not run.out.exists()


def test_npz_truth_naming_no_output(runs):
    run = runs["npz_truth_unknown"]
    run.check_fails(2, "truth:yy", "no model output", "y")
    _nothing_written(run)


def test_npz_with_inf(runs):
    run = runs["npz_nan"]
    run.check_fails(2, "'x'", ("nan", "inf"))
    _nothing_written(run)


def test_single_grey_alpha_image_as_inputs(runs):
    run = runs["one_image"]
    run.check_ok()
    report = __import__("json").loads(run.out.with_name("out.onnx.report.json").read_text())
    assert report["validation"]["samples"] == 1
    assert "grey_alpha.png" in report["validation"]["data"]


def test_newline_in_tensor_name_is_escaped(runs):
    run = runs["newline_name"]
    run.check_ok("NOT VALIDATED")
    lines = run.res.stdout.splitlines()
    assert not any(l.startswith("PASSED") for l in lines), run.res.stdout
    assert "f0\\nPASSED" in run.res.stdout
