"""Shared fixtures: the bundled teacher, real-photo features from it, and small torch-exported models."""
from __future__ import annotations

import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

TEACHER = Path(str(resources.files("hardener") / "assets" / "sr_x2.onnx"))


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The console entry point in a subprocess: exit code, stdout and stderr as a user sees them."""
    return subprocess.run([sys.executable, "-c", "from hardener.cli import entry; entry()", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


def invoke(capsys, monkeypatch, *args) -> tuple[int, str, str]:
    """The console entry in-process (as `harden ARGS`): exit code, stdout, stderr."""
    monkeypatch.setattr(sys, "argv", ["harden", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        from hardener.cli import entry

        entry()
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def run_model(path_or_model, feed: dict, outputs: list[str] | None = None) -> list[np.ndarray]:
    source = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(outputs, feed)


def expose(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` with extra graph outputs (float tensors of unknown shape)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in names:
        probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return probe


def real_photos(size: int = 64, count: int = 4) -> np.ndarray:
    """Centre crops of scikit-image's bundled colour photographs, (count, 3, size, size) in [0, 1]."""
    from skimage import data

    photos = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"):
        img = getattr(data, name)()
        h, w = img.shape[:2]
        step = max(1, min(h, w) // (size * 2))
        img = img[::step, ::step]
        h, w = img.shape[:2]
        top, left = (h - size) // 2, (w - size) // 2
        photos.append(img[top:top + size, left:left + size, :3].transpose(2, 0, 1) / 255.0)
        if len(photos) == count:
            break
    return np.stack(photos).astype(np.float32)


@pytest.fixture(scope="session")
def teacher() -> onnx.ModelProto:
    assert TEACHER.is_file(), "the bundled teacher hardener/assets/sr_x2.onnx is missing"
    return onnx.load(str(TEACHER))


@pytest.fixture(scope="session")
def teacher_features(teacher) -> dict[str, np.ndarray]:
    """Real feature maps: the bundled teacher's body.*.conv2 outputs on real photographs."""
    from hardener.layers import LayerIndex

    index = LayerIndex(teacher)
    layers = [layer for _, layer in index.select(["body.*.conv2"])]
    photos = real_photos(size=48, count=4)
    outs = run_model(expose(teacher, [l.tensor for l in layers]), {teacher.graph.input[0].name: photos},
                     [l.tensor for l in layers])
    return {l.label(): o for l, o in zip(layers, outs)}


class SmallNet:
    """A tiny x2 SR-shaped net with named modules (head, body.N.conv1/act/conv2, tail, up)."""

    @staticmethod
    def build(channels: int = 8, blocks: int = 2, seed: int = 0):
        import torch
        from torch import nn

        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
                self.act = nn.ReLU()
                self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

            def forward(self, x):
                return x + self.conv2(self.act(self.conv1(x)))

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.head = nn.Conv2d(3, channels, 3, padding=1)
                self.body = nn.Sequential(*[Block() for _ in range(blocks)])
                self.tail = nn.Conv2d(channels, 12, 3, padding=1)
                self.up = nn.PixelShuffle(2)

            def forward(self, x):
                return self.up(self.tail(self.body(self.head(x))))

        torch.manual_seed(seed)
        net = Net().eval()
        with torch.no_grad():  # small weights: a gently perturbing, well-conditioned test net
            for p in net.parameters():
                p.mul_(0.5)
        return net


@pytest.fixture(scope="session")
def dynamo_model(tmp_path_factory) -> Path:
    """SmallNet exported by torch.onnx (dynamo, opset 18) with dynamic batch, height and width."""
    import torch

    path = tmp_path_factory.mktemp("dynamo") / "small.onnx"
    net = SmallNet.build()
    dims = {"x": {0: torch.export.Dim("batch", max=64), 2: torch.export.Dim("h", min=4, max=1024),
                  3: torch.export.Dim("w", min=4, max=1024)}}
    torch.onnx.export(net, (torch.rand(2, 3, 24, 24),), str(path), dynamo=True, opset_version=18,
                      external_data=False, dynamic_shapes=dims, verbose=False)
    return path


@pytest.fixture(scope="session")
def torchscript_model(tmp_path_factory) -> Path:
    """SmallNet exported by the TorchScript exporter (dynamo=False), static shape, opset 17."""
    import warnings

    import torch

    path = tmp_path_factory.mktemp("torchscript") / "small_ts.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(SmallNet.build(), (torch.rand(1, 3, 24, 24),), str(path), dynamo=False,
                          opset_version=17)
    return path
