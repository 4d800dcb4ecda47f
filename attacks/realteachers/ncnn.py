"""A minimal reader for ncnn ``.param``/``.bin`` model files, for plain convolutional chains.

Supported layer types (enough for SRMD, and checked, not assumed): ``Input``, ``Convolution`` (any kernel,
stride, dilation, symmetric or explicit padding, optional bias, fused activation none/ReLU/LeakyReLU),
``ReLU`` and ``PixelShuffle`` (mode 0, the PyTorch channel order).  Anything else is an :class:`NcnnError`
naming the layer, never a silent mis-conversion.

Weight storage (``ncnn::ModelBinFromDataReader::load``): a convolution's weights are one blob with a 4-byte
tag (``0x01306B47``: IEEE half floats, padded to 4 bytes; ``0``: float32; other tags, int8 or a quantized
table, are refused), its bias is raw float32 with no tag.  The reader checks that every byte of the
``.bin`` is consumed, so a layout misunderstanding cannot pass unnoticed.

ncnn's convolution weight order is ``[out][in][kh][kw]``, the same as PyTorch's, and ``PixelShuffle`` mode 0
is PyTorch's ``pixel_shuffle``; :func:`to_torch` therefore copies weights without reordering.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAGIC = 7767517
TAG_FP16 = 0x01306B47
TAG_INT8 = 0x000D4B38


class NcnnError(ValueError):
    """A malformed or unsupported ncnn model (one line, names the file and the layer)."""


@dataclass
class Layer:
    type: str
    name: str
    bottoms: list[str]
    tops: list[str]
    params: dict[int, object]
    weights: dict[str, np.ndarray] = field(default_factory=dict)

    def p(self, key: int, default=None):
        return self.params.get(key, default)


def _value(text: str):
    return float(text) if any(c in text for c in ".eE") else int(text)


def parse_param(text: str, source: str = "param") -> list[Layer]:
    """The layers of a text ``.param`` file, in file order."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines or lines[0] != str(MAGIC):
        raise NcnnError(f"{source}: not an ncnn text .param file (magic {MAGIC} missing)")
    try:
        layer_count, _blob_count = (int(v) for v in lines[1].split())
    except (IndexError, ValueError):
        raise NcnnError(f"{source}: line 2 must be '<layer count> <blob count>'") from None
    layers = []
    for number, line in enumerate(lines[2:], start=3):
        tok = line.split()
        try:
            ltype, name, nb, nt = tok[0], tok[1], int(tok[2]), int(tok[3])
            bottoms, tops = tok[4:4 + nb], tok[4 + nb:4 + nb + nt]
            if len(bottoms) != nb or len(tops) != nt:
                raise ValueError
            params: dict[int, object] = {}
            for kv in tok[4 + nb + nt:]:
                key, val = kv.split("=", 1)
                k = int(key)
                if k <= -23300:  # array: -(23300 + id)=count,v1,v2,...
                    items = val.split(",")
                    params[-k - 23300] = [_value(v) for v in items[1:1 + int(items[0])]]
                else:
                    params[k] = _value(val)
        except (IndexError, ValueError):
            raise NcnnError(f"{source}: line {number} is not a valid layer line: {line!r}") from None
        layers.append(Layer(ltype, name, bottoms, tops, params))
    if len(layers) != layer_count:
        raise NcnnError(f"{source}: header says {layer_count} layers, file has {len(layers)}")
    return layers


class _Reader:
    def __init__(self, data: bytes, source: str):
        self.data, self.pos, self.source = data, 0, source

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise NcnnError(f"{self.source}: ends inside {what} (needs {n} bytes at offset {self.pos}, "
                            f"file has {len(self.data)})")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def tagged(self, count: int, what: str) -> np.ndarray:
        (tag,) = struct.unpack("<I", self.take(4, what))
        if tag == TAG_FP16:
            raw = self.take(count * 2, what)
            self.take((-count * 2) % 4, what)  # aligned to 4 bytes
            return np.frombuffer(raw, dtype="<f2").astype(np.float32)
        if tag == 0:
            return np.frombuffer(self.take(count * 4, what), dtype="<f4").copy()
        kind = "int8" if tag == TAG_INT8 else f"tag 0x{tag:08X}"
        raise NcnnError(f"{self.source}: {what} is stored as {kind}; only float16 and float32 are supported")

    def raw(self, count: int, what: str) -> np.ndarray:
        return np.frombuffer(self.take(count * 4, what), dtype="<f4").copy()


def load(param_path: Path, bin_path: Path) -> list[Layer]:
    """Layers with their weights (float32 numpy arrays); every byte of the .bin accounted for."""
    param_path, bin_path = Path(param_path), Path(bin_path)
    try:
        text = param_path.read_text(encoding="ascii")
        data = bin_path.read_bytes()
    except (OSError, UnicodeDecodeError) as exc:
        raise NcnnError(f"cannot read the ncnn model: {exc}") from None
    layers = parse_param(text, param_path.name)
    reader = _Reader(data, bin_path.name)
    for layer in layers:
        if layer.type == "Convolution":
            out_c, kw = layer.p(0), layer.p(1)
            kh = layer.p(11, kw)
            size = layer.p(6)
            if not out_c or not kw or not size or size % (out_c * kw * kh):
                raise NcnnError(f"{param_path.name}: layer {layer.name}: weight size {size} does not divide "
                                f"into {out_c} outputs x {kh}x{kw}")
            if layer.p(8, 0):
                raise NcnnError(f"{param_path.name}: layer {layer.name}: int8 convolution is not supported")
            w = reader.tagged(size, f"weights of {layer.name}")
            layer.weights["weight"] = w.reshape(out_c, size // (out_c * kw * kh), kh, kw)
            if layer.p(5, 0):
                layer.weights["bias"] = reader.raw(out_c, f"bias of {layer.name}")
        elif layer.type not in ("Input", "ReLU", "PixelShuffle"):
            raise NcnnError(f"{param_path.name}: layer {layer.name}: type {layer.type} is not supported "
                            "(Input, Convolution, ReLU, PixelShuffle are)")
    if reader.pos != len(data):
        raise NcnnError(f"{bin_path.name}: {len(data) - reader.pos} bytes left over after the last layer "
                        "(the .param and .bin do not match)")
    return layers


def chain(layers: list[Layer], source: str = "model") -> list[Layer]:
    """The layers after ``Input`` as a single chain (each layer consumes the previous one's only output)."""
    if not layers or layers[0].type != "Input" or len(layers[0].tops) != 1:
        raise NcnnError(f"{source}: the first layer must be one Input")
    blob = layers[0].tops[0]
    for layer in layers[1:]:
        if layer.bottoms != [blob] or len(layer.tops) != 1:
            raise NcnnError(f"{source}: layer {layer.name} is not part of a single chain "
                            f"(reads {layer.bottoms}, expected [{blob!r}])")
        blob = layer.tops[0]
    return layers[1:]


def to_torch(layer: Layer):
    """The PyTorch module for one chain layer (a Conv2d, or a Sequential of Conv2d and its activation)."""
    import torch
    from torch import nn

    if layer.type == "ReLU":
        slope = float(layer.p(0, 0.0))
        return nn.LeakyReLU(slope) if slope else nn.ReLU()
    if layer.type == "PixelShuffle":
        if layer.p(1, 0) != 0:
            raise NcnnError(f"layer {layer.name}: PixelShuffle mode {layer.p(1)} is not supported (mode 0 is)")
        return nn.PixelShuffle(int(layer.p(0, 1)))
    if layer.type != "Convolution":
        raise NcnnError(f"layer {layer.name}: type {layer.type} has no PyTorch counterpart here")
    w = layer.weights["weight"]
    kw = layer.p(1)
    kh = layer.p(11, kw)
    dw = layer.p(2, 1)
    dh = layer.p(12, dw)
    sw = layer.p(3, 1)
    sh = layer.p(13, sw)
    pl = layer.p(4, 0)
    pt, pr = layer.p(14, pl), layer.p(15, pl)
    pb = layer.p(16, pt)
    if min(pl, pt, pr, pb) < 0:
        raise NcnnError(f"layer {layer.name}: automatic (SAME) padding is not supported")
    if layer.p(18, 0.0):
        raise NcnnError(f"layer {layer.name}: non-zero pad value is not supported")
    if pl != pr or pt != pb:
        raise NcnnError(f"layer {layer.name}: asymmetric padding is not supported")
    conv = nn.Conv2d(w.shape[1], w.shape[0], (kh, kw), stride=(sh, sw), padding=(pt, pl), dilation=(dh, dw),
                     bias="bias" in layer.weights)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(w))
        if conv.bias is not None:
            conv.bias.copy_(torch.from_numpy(layer.weights["bias"]))
    act = layer.p(9, 0)
    if act == 0:
        return conv
    if act == 1:
        return nn.Sequential(conv, nn.ReLU())
    if act == 2:
        slope = layer.p(10, [0.0])
        return nn.Sequential(conv, nn.LeakyReLU(float(slope[0] if isinstance(slope, list) else slope)))
    raise NcnnError(f"layer {layer.name}: fused activation type {act} is not supported (0, 1, 2 are)")
