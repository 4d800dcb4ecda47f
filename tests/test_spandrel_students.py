"""Students built from real third-party architectures (the optional ``spandrel`` extra)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from attacks.distill import train_student
from attacks.students import SPANDREL_STUDENTS, build_student, parameter_count

try:  # the architecture tests need spandrel; the first test does not
    import spandrel  # noqa: F401
    HAVE_SPANDREL = True
except ImportError:
    HAVE_SPANDREL = False
# spandrel's NAFNet LayerNorm2d still reads ctx.saved_variables (deprecated in torch, harmless)
pytestmark = pytest.mark.filterwarnings("ignore:'saved_variables' is deprecated:DeprecationWarning")
needs_spandrel = pytest.mark.skipif(not HAVE_SPANDREL,
                                    reason="optional extra hardener[spandrel] not installed")

# parameter_count at x2 (NAFNet: x1) as documented in attacks/students.py, spandrel 0.4.2
PARAMS = {"spandrel:SPAN": 250_932, "spandrel:ESRGAN": 291_667, "spandrel:SwinIR": 150_324,
          "spandrel:NAFNet": 73_331}
CASES = [(name, scale) for name in SPANDREL_STUDENTS for scale in (1, 2)
         if not (name == "spandrel:NAFNet" and scale != 1)]


def test_missing_spandrel_and_unknown_names(monkeypatch):
    assert set(PARAMS) == set(SPANDREL_STUDENTS)
    with pytest.raises(ValueError, match="spandrel:SPAN"):  # validated before any import
        build_student("spandrel:NOPE", 2)
    if HAVE_SPANDREL:  # simulate an environment without it
        for mod in [m for m in sys.modules if m == "spandrel" or m.startswith("spandrel.")]:
            monkeypatch.setitem(sys.modules, mod, None)
        monkeypatch.setitem(sys.modules, "spandrel", None)
    with pytest.raises(ImportError, match=r"hardener\[spandrel\]"):
        build_student("spandrel:SPAN", 2)


@needs_spandrel
@pytest.mark.parametrize("name,scale", CASES)
def test_shapes_on_odd_sizes(name, scale):
    student = build_student(name, scale, seed=0)
    x = torch.rand(1, 3, 24, 20)
    y = student(x)
    assert y.shape == (1, 3, 24 * scale, 20 * scale) and y.dtype == torch.float32
    y.mean().backward()  # differentiable end to end
    student.eval()
    with torch.no_grad():
        y = student(x)
    assert y.shape == (1, 3, 24 * scale, 20 * scale) and torch.isfinite(y).all()


@needs_spandrel
def test_nafnet_is_same_size_only():
    with pytest.raises(ValueError, match="scale 1 only"):
        build_student("spandrel:NAFNet", 2)


@needs_spandrel
@pytest.mark.parametrize("name", SPANDREL_STUDENTS)
def test_parameter_counts_are_small(name):
    n = parameter_count(build_student(name, 1 if name == "spandrel:NAFNet" else 2))
    assert 50_000 <= n <= 400_000
    assert n == pytest.approx(PARAMS[name], rel=0.02)


@needs_spandrel
@pytest.mark.parametrize("name", SPANDREL_STUDENTS)
def test_seeded_initialisation(name):
    scale = 1 if name == "spandrel:NAFNet" else 2
    a, b, c = (build_student(name, scale, seed=s).state_dict() for s in (3, 3, 4))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


@needs_spandrel
def test_training_reduces_the_loss():
    rng = np.random.default_rng(0)
    x = rng.random((8, 3, 16, 16), dtype=np.float32)
    target = F.interpolate(torch.from_numpy(x), scale_factor=2, mode="bilinear", align_corners=False).numpy()
    student = build_student("spandrel:ESRGAN", 2, seed=0)
    student.eval()

    def loss() -> float:
        with torch.no_grad():
            return F.l1_loss(student(torch.from_numpy(x)), torch.from_numpy(target)).item()

    before = loss()
    curve = train_student(student, x, target, steps=30, batch=4, lr=1e-3, seed=0)
    assert len(curve) == 3 and all(np.isfinite(curve))
    assert loss() < 0.5 * before
