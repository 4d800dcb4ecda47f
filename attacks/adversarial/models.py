"""What ``attack adversarial`` accepts: an ONNX file, a suite entry or a bundled codec, and its eval images.

* a suite entry (``sr2``, ``sr4``, ``denoise``, ``lowlight``, ``underwater``, ``dehaze``, ``derain``): the
  bundled teacher of that task (``attacks.suite.BUNDLED``);
* a bundled codec (``codec_q1``, ``codec_q2``: ``attacks.compression.BUNDLED``): its end-to-end ONNX
  ``x -> (x_hat, bpp)``, twinned by its PyTorch original (``load_bundled``);
* an ONNX file: a bundled teacher or codec, a file hardened from one (recognised by the ``source_sha256``
  of its hardening manifest: the task and, for a codec, the PyTorch module follow), or any other
  residual-restorer file (then ``--task`` says which degradation to evaluate on).

Eval images: the held-out photos (``attacks.data.load_photos("test")``), centre crop of at most ``size``
(``attacks.degrade.eval_set``: sides multiples of the scale; for the codec, multiples of 64), RGB; inputs
rounded to 8 bits (a degraded image as a file stores it; this also makes integer eps * 255 exact after
the adversarial image is rounded).  Restoration: the clean image is the ground-truth photo crop and PSNR
drops ``crop_border = scale`` pixels (BasicSR, as the teacher cards); codec: the clean image is the 8-bit
input itself, no border.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from hardener.model_io import sha256_file
from hardener.rewrite import read_manifest

from .pgd import OnnxModel, quantize8
from .twin import DEFAULT_TOL, Twin, load_twin, parity_input, twin_of_module

CODEC = "codec"
CODEC_TOL = 1e-3  # the codec rounds its latents: float differences of 1e-7 may flip a rounding (measured below)


class TargetError(ValueError):
    """A model specification that cannot be resolved (a usage error)."""


@dataclass
class Target:
    name: str  # what the user passed
    path: Path  # the ONNX file attacked (replayed through ONNX Runtime)
    task: str  # a key of attacks.degrade.TASKS, or "codec"
    origin: str  # e.g. "bundled sr2 teacher", "hardened from the bundled codec_q1 codec"
    twin: Twin
    onnx: OnnxModel
    crop: int  # border cropped for PSNR / distortion
    rate_key: str | None  # per-image rate output (codec "bpp")

    def describe(self) -> dict:
        return {"name": self.name, "path": str(self.path), "sha256": sha256_file(self.path), "task": self.task,
                "origin": self.origin,
                "hardened": self.twin.hardened, "crop_border": self.crop, "twin": self.twin.describe()}


def suite_entries() -> dict[str, Path]:
    from attacks.suite import BUNDLED

    return dict(BUNDLED)


def codec_entries() -> dict[str, Path]:
    try:
        from attacks.compression import BUNDLED, bundled_onnx
    except ImportError:
        return {}
    return {name: bundled_onnx(name) for name in BUNDLED}


@functools.lru_cache(maxsize=None)
def _sha(path: str) -> str | None:
    p = Path(path)
    return sha256_file(p) if p.is_file() else None


def known_sources() -> dict[str, tuple[str, str]]:
    """sha256 of every bundled file -> (entry name, kind "teacher" | "codec")."""
    out = {}
    for name, path in suite_entries().items():
        if (sha := _sha(str(path))):
            out[sha] = (name, "teacher")
    for name, path in codec_entries().items():
        if (sha := _sha(str(path))):
            out[sha] = (name, "codec")
    return out


def entry_names() -> list[str]:
    return list(suite_entries()) + list(codec_entries())


def resolve(spec: str, task: str | None = None, tol: float | None = None, how: str = "iteration") -> Target:
    """A :class:`Target` for ``spec`` (entry name or ONNX path), its twin parity-checked."""
    from attacks.degrade import TASKS

    if task is not None and task not in TASKS and task != CODEC:
        raise TargetError(f"unknown task {task!r}; expected one of {', '.join(list(TASKS) + [CODEC])}")
    teachers, codecs = suite_entries(), codec_entries()
    path = Path(spec)
    if spec in teachers and not path.exists():
        path, origin_name, kind, hardened_from = teachers[spec], spec, "teacher", False
    elif spec in codecs and not path.exists():
        path, origin_name, kind, hardened_from = codecs[spec], spec, "codec", False
    else:
        if not path.is_file():
            raise TargetError(f"{spec!r}: no such file, and not a suite entry or bundled codec "
                              f"(entries: {', '.join(entry_names())})")
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # noqa: BLE001
            raise TargetError(f"{spec}: not a readable ONNX file ({type(exc).__name__})") from None
        sources = known_sources()
        manifest = read_manifest(model)
        own = sources.get(_sha(str(path)))
        src = sources.get((manifest or {}).get("source_sha256", ""))
        hit = own or src
        origin_name, kind = hit if hit else (None, "teacher")
        hardened_from = own is None and src is not None
    if not path.is_file():
        raise TargetError(f"{spec}: the bundled file {path} is missing")
    inferred = (CODEC if kind == "codec" else origin_name) if origin_name else None
    if task is not None and inferred is not None and task != inferred:
        raise TargetError(f"{spec} is {'hardened from ' if hardened_from else ''}the bundled {origin_name} "
                          f"{kind}, whose task is {inferred}, not {task}")
    task = task or inferred
    if task is None:
        raise TargetError(f"{spec}: not a bundled teacher or codec, nor hardened from one: say which "
                          f"degradation to evaluate on with --task ({', '.join(TASKS)})")
    origin = (f"{'hardened from the ' if hardened_from else ''}bundled {origin_name} {kind}"
              if origin_name else "user file")
    if task == CODEC:
        if kind != "codec":
            raise TargetError(f"{spec}: --task codec needs a bundled codec or a file hardened from one "
                              "(its PyTorch original is the twin)")
        from attacks.compression import load_bundled

        x, note = parity_input(1, 64)
        twin = twin_of_module(load_bundled(origin_name), path, scale=1, output_key="x_hat", output="x_hat",
                              x=x, tol=tol or CODEC_TOL, how=how)
        twin.parity_input = note
        onnx_model = OnnxModel(path, output="x_hat")
        return Target(spec, path, task, origin, twin, onnx_model, 0, "bpp")
    twin = load_twin(path, tol=tol or DEFAULT_TOL, how=how)
    expected = TASKS[task].scale
    if twin.scale != expected:
        raise TargetError(f"{spec}: the model upscales x{twin.scale} but task {task} is x{expected}")
    return Target(spec, path, task, origin, twin, OnnxModel(path), twin.scale, None)


def test_photo_names() -> list[str]:
    from attacks.data import load_photos

    return [name for name, _ in load_photos("test")]


def eval_images(task: str, size: int = 128, names: list[str] | None = None, seed: int = 0
                ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(names, 8-bit inputs (N, 3, h, w), clean images (N, 3, H, W))`` from the held-out photos."""
    from attacks.data import load_photos
    from attacks.degrade import eval_set

    try:
        from attacks.degrade import centre_crop
    except ImportError:  # the name before it was made public
        from attacks.degrade import _centre_crop as centre_crop

    available = test_photo_names()
    names = names or available
    unknown = [n for n in names if n not in available]
    if unknown:
        raise TargetError(f"unknown photo(s) {', '.join(unknown)}; held-out photos: {', '.join(available)}")
    if size < 16:
        raise TargetError(f"crop size {size} is too small (at least 16; 64 for the codec)")
    if task == CODEC:
        if size < 64:
            raise TargetError("the codec needs crops of at least 64x64")
        photos = dict(load_photos("test"))
        xs = [quantize8(np.ascontiguousarray(centre_crop(photos[n], size, 64).transpose(2, 0, 1)[None],
                                             np.float32)) for n in names]
        if len({x.shape for x in xs}) > 1:
            raise TargetError(f"crop size {size} is larger than some photo: crops differ in shape; "
                              "use a smaller --size")
        return names, np.concatenate(xs), np.concatenate(xs)
    rows = {name: (inp, hr) for name, inp, hr in eval_set(task, "test", hr_size=size, seed=seed)}
    if len({rows[n][1].shape for n in names}) > 1:
        raise TargetError(f"crop size {size} is larger than some photo: crops differ in shape; use a smaller --size")
    x = np.concatenate([quantize8(rows[n][0]) for n in names])
    y = np.concatenate([rows[n][1] for n in names]).astype(np.float32)
    return names, x, y
