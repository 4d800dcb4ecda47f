"""Student architectures the thief distills into (PyTorch), and the network of every bundled teacher.

:class:`ResidualRestorer` is the one residual restoration CNN of the project: the ``tiny``/``edsr``/
``edsr_large`` students and the bundled teachers (``hardener/assets/sr_x2.onnx`` and
``attacks/teachers/*.onnx``, trained by ``scripts/train_teacher.py`` and ``scripts/train_task_teacher.py``:
32 channels, 4 blocks) are instances of it.  Its global skip (bicubic upsampling for SR, identity otherwise)
makes it learn a correction, like most real restoration networks:

| name        | channels | blocks | parameters (x2) | role                               |
| ----------- | -------: | -----: | --------------: | ---------------------------------- |
| tiny        |       16 |      1 |           ~8 k  | a small, cheap student             |
| edsr        |       32 |      4 |          ~80 k  | EDSR-like, the teacher's capacity  |
| edsr_large  |       48 |      8 |         ~340 k  | adaptive thief: about 4x larger    |

``spandrel:<Arch>`` students are real published architectures, built from the classes of the
`spandrel <https://github.com/chaiNNer-org/spandrel>`_ library (optional extra:
``pip install 'hardener[spandrel]'``), freshly initialised (no pretrained weights), RGB in/out, used as
published (each learns its own mapping; no skip is added). Small configurations, so a student trains on
CPU in minutes; parameters as counted by :func:`parameter_count` (spandrel 0.4.2, torch 2.14.1):

| name            | class   | configuration                                          | x2 params | x1 params |
| --------------- | ------- | ------------------------------------------------------ | --------: | --------: |
| spandrel:SPAN   | SPAN    | feature_channels=16 (6 SPAB blocks), norm, range 255   | 250,932 * | 249,627 * |
| spandrel:ESRGAN | ESRGAN  | old RRDBNet: num_filters=16, num_blocks=1 (growth      |   291,667 |   289,347 |
|                 |         | gc=32 is fixed: 2 blocks are 575 k), upconv upsampler  |           |           |
| spandrel:SwinIR | SwinIR  | embed_dim=48, depths=[2, 2], num_heads=[6, 6],         |   150,324 |   146,427 |
|                 |         | window 8, mlp_ratio=2, img_size=64; x1: upsampler ""   |           |           |
|                 |         | (global residual), x2-4: "pixelshuffledirect" (light)  |           |           |
| spandrel:NAFNet | NAFNet  | width=16, enc_blk_nums=[1, 1], middle_blk_num=1,       |         - |    73,331 |
|                 |         | dec_blk_nums=[1, 1]; same-size restoration only        |           |           |

* SPAN's re-parameterisable convolutions (Conv3XC) also hold their fused 3x3 ``eval_conv`` as
parameters (recomputed from the training branches in eval mode, never trained): 44,528 of the count.

Scales: SPAN, ESRGAN and SwinIR take 1, 2, 3 or 4; NAFNet only 1 (others raise ValueError).

Inputs are float32 NCHW in [0, 1] of any H, W; the output is (N, 3, H*scale, W*scale). SwinIR and NAFNet
need H, W multiples of their window (8) / down-sampling factor (4): :class:`SpandrelStudent` reflect-pads
to that multiple and crops the output back. Stochastic depth (SwinIR's drop_path_rate 0.1) is kept.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn import functional as F

STUDENTS = {"tiny": (16, 1), "edsr": (32, 4), "edsr_large": (48, 8)}


INITS = ("zero_tail", "damped")


class ResBlock(nn.Module):
    """``x + conv2(act(conv1(x)))``, 3x3 convolutions, ReLU."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(self.act(self.conv1(x)))


class ResidualRestorer(nn.Module):
    """``y = up(tail(body(f) + f)) + skip(x)``, ``f = head(x)``.

    Module paths (the ONNX name scopes and ``state_dict`` keys the layer selectors resolve): ``head`` Conv
    3->C, ``body.{i}.{conv1,act,conv2}`` (``blocks`` residual blocks), ``tail`` Conv C->3*scale^2, ``up``
    PixelShuffle(scale) (Identity for scale 1).  ``skip`` is bicubic x``scale`` upsampling
    (``align_corners=False``) for SR and the input itself otherwise.  The output is not clamped.

    Both initialisations start near the skip path and learn a correction, after PyTorch's default
    initialisation (the same random draws either way): ``"zero_tail"`` (students) zeroes ``tail`` so the
    network starts as the skip exactly; ``"damped"`` (the bundled teachers) scales ``tail`` and every block's
    ``conv2`` weights by 0.1 and zeroes their biases."""

    def __init__(self, channels: int = 32, blocks: int = 4, scale: int = 2, init: str = "zero_tail"):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.scale = int(scale)
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.body = nn.Sequential(*[ResBlock(channels) for _ in range(blocks)])
        self.tail = nn.Conv2d(channels, 3 * self.scale * self.scale, 3, padding=1)
        self.up = nn.PixelShuffle(self.scale) if self.scale > 1 else nn.Identity()
        with torch.no_grad():
            if init == "zero_tail":
                self.tail.weight.zero_()
            else:
                self.tail.weight.mul_(0.1)
                for block in self.body:
                    block.conv2.weight.mul_(0.1)
                    block.conv2.bias.zero_()
            self.tail.bias.zero_()

    def skip(self, x):
        """The input brought to the output size: bicubic upsampling for SR, the input itself otherwise."""
        if self.scale > 1:
            return F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return x

    def forward(self, x):
        f = self.head(x)
        return self.up(self.tail(self.body(f) + f)) + self.skip(x)


SPANDREL_STUDENTS = ("spandrel:SPAN", "spandrel:ESRGAN", "spandrel:SwinIR", "spandrel:NAFNet")
_SPANDREL_SCALES = {"SPAN": (1, 2, 3, 4), "ESRGAN": (1, 2, 3, 4), "SwinIR": (1, 2, 3, 4), "NAFNet": (1,)}
_SPANDREL_MISSING = ("spandrel students need the optional extra: pip install 'hardener[spandrel]' "
                     "(torch 2.14.1, torchvision 0.29.1)")


class SpandrelStudent(nn.Module):
    """A spandrel network; reflect-pads H, W to a multiple of ``multiple`` and crops back to H*s, W*s."""

    def __init__(self, arch: str, net: nn.Module, scale: int, multiple: int = 1):
        super().__init__()
        self.arch, self.scale, self.multiple = arch, scale, multiple
        self.net = net

    def forward(self, x):
        h, w = x.shape[-2:]
        ph, pw = -h % self.multiple, -w % self.multiple
        if ph or pw:  # reflect needs pad < size; replicate for (unusually) tiny inputs
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        return self.net(x)[..., : h * self.scale, : w * self.scale]


def _build_spandrel(arch: str, scale: int) -> nn.Module:
    try:
        from spandrel.architectures.ESRGAN import ESRGAN
        from spandrel.architectures.NAFNet import NAFNet
        from spandrel.architectures.SPAN import SPAN
        from spandrel.architectures.SwinIR import SwinIR
    except ImportError as e:
        raise ImportError(_SPANDREL_MISSING) from e
    if arch == "SPAN":
        net = SPAN(num_in_ch=3, num_out_ch=3, feature_channels=16, upscale=scale)
        return SpandrelStudent(arch, net, scale)
    if arch == "ESRGAN":
        net = ESRGAN(in_nc=3, out_nc=3, num_filters=16, num_blocks=1, scale=scale)
        return SpandrelStudent(arch, net, scale)
    if arch == "SwinIR":
        window = 8
        with warnings.catch_warnings():  # torch.meshgrid indexing notice from SwinIR's attention init
            warnings.simplefilter("ignore", UserWarning)
            net = SwinIR(img_size=64, in_chans=3, embed_dim=48, depths=[2, 2], num_heads=[6, 6],
                         window_size=window, mlp_ratio=2.0, upscale=scale, img_range=1.0,
                         upsampler="pixelshuffledirect" if scale > 1 else "", resi_connection="1conv")
        return SpandrelStudent(arch, net, scale, multiple=window)
    if arch == "NAFNet":
        enc = [1, 1]
        net = NAFNet(img_channel=3, width=16, middle_blk_num=1, enc_blk_nums=enc, dec_blk_nums=[1, 1])
        return SpandrelStudent(arch, net, scale, multiple=2 ** len(enc))
    raise AssertionError(arch)


def build_student(name: str, scale: int, seed: int = 0) -> nn.Module:
    if name.startswith("spandrel:"):
        arch = name.split(":", 1)[1]
        if arch not in _SPANDREL_SCALES:
            raise ValueError(f"unknown spandrel student '{name}'; choose from {', '.join(SPANDREL_STUDENTS)}")
        if scale not in _SPANDREL_SCALES[arch]:
            raise ValueError(f"student '{name}' supports scale {', '.join(map(str, _SPANDREL_SCALES[arch]))}"
                             f" only, not {scale}" + (" (NAFNet is a same-size restoration network)"
                                                      if arch == "NAFNet" else ""))
        torch.manual_seed(seed)
        return _build_spandrel(arch, scale)
    torch.manual_seed(seed)
    if name in STUDENTS:
        channels, blocks = STUDENTS[name]
        return ResidualRestorer(channels, blocks, scale)
    raise ValueError(f"unknown student '{name}'; choose from {', '.join(STUDENTS)}, "
                     f"{', '.join(SPANDREL_STUDENTS)}")


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
