"""Student architectures the thief distills into (PyTorch).

All are residual restoration CNNs with a global skip (bicubic upsampling for SR, identity otherwise), so
they learn a correction, like most real restoration networks:

| name        | channels | blocks | parameters (x2) | role                               |
| ----------- | -------: | -----: | --------------: | ---------------------------------- |
| tiny        |       16 |      1 |           ~8 k  | a small, cheap student             |
| edsr        |       32 |      4 |          ~80 k  | EDSR-like, the teacher's capacity  |
| edsr_large  |       48 |      8 |         ~340 k  | adaptive thief: about 4x larger    |

``spandrel:<Arch>`` students (real third-party architectures) need the optional spandrel extra.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

STUDENTS = {"tiny": (16, 1), "edsr": (32, 4), "edsr_large": (48, 8)}


class _Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(self.act(self.conv1(x)))


class ResidualRestorer(nn.Module):
    """head -> body (residual blocks, with a long skip) -> tail (-> PixelShuffle) + skip of the input."""

    def __init__(self, channels: int, blocks: int, scale: int):
        super().__init__()
        self.scale = scale
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.body = nn.Sequential(*[_Block(channels) for _ in range(blocks)])
        self.tail = nn.Conv2d(channels, 3 * scale * scale, 3, padding=1)
        self.up = nn.PixelShuffle(scale) if scale > 1 else nn.Identity()
        nn.init.zeros_(self.tail.weight)  # start as the skip path (bicubic / identity), learn a correction
        nn.init.zeros_(self.tail.bias)

    def forward(self, x):
        f = self.head(x)
        y = self.up(self.tail(self.body(f) + f))
        base = F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False) \
            if self.scale > 1 else x
        return y + base


def build_student(name: str, scale: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if name in STUDENTS:
        channels, blocks = STUDENTS[name]
        return ResidualRestorer(channels, blocks, scale)
    if name.startswith("spandrel:"):
        raise NotImplementedError("spandrel students need the optional 'spandrel' extra (torch 2.14.1); "
                                  "not wired in yet")
    raise ValueError(f"unknown student '{name}'; choose from {', '.join(STUDENTS)}")


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
