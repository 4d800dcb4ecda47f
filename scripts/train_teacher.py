#!/usr/bin/env python
"""Train, evaluate and export the small x2 super-resolution teacher shipped in
``hardener/assets``.

Everything this script produces is derived from photographs that ship inside
scikit-image (``skimage.data``; no download needed), so a run needs no
network access:

* ``hardener/assets/sr_x2.onnx``            the exported teacher (single file)
* ``hardener/assets/samples/{lr,hr}/*.png``  held-out LR/HR sample pairs
* ``hardener/assets/TEACHER.md``             recipe and measured numbers

Typical use (from the repository root)::

    python scripts/train_teacher.py --steps 1500 --seed 0 --device cpu

Degradation model (used for training, evaluation and the samples):
HR is a float RGB image in [0, 1] with even height and width;
``LR = clamp(interpolate(HR, scale_factor=0.5, mode="bicubic",
antialias=True, align_corners=False), 0, 1)``, then rounded to 8-bit levels
(``round(255 * LR) / 255``), i.e. exactly what a saved LR PNG holds.

The pieces live in the packages: the network (``attacks.students.ResidualRestorer``), the photos
(``attacks.data``), the degradation (``attacks.degrade.sr2``), the training loop, export and checks
(``attacks.teacher_training``), the metrics (``hardener.metrics``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import time
from pathlib import Path

# OpenMP threads that sleep instead of spin while waiting.  On a shared or
# oversubscribed 2-vCPU machine spinning made a 2-thread training step up to
# 5x slower than a 1-thread one; the wait policy does not change any result.
# Must be set before torch (libgomp) is loaded; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from attacks.data import (SKIMAGE_TRAIN_COLOR, SKIMAGE_TRAIN_GREY, TEACHER_TEST, crop_to_multiple,  # noqa: E402
                          photo_uint8)
from attacks.degrade import centre_crop, input_baseline, sr2  # noqa: E402
from attacks.students import ResidualRestorer, parameter_count  # noqa: E402
from attacks.teacher_training import (check_export, export_onnx, fit, inspect_onnx, parity,  # noqa: E402
                                      quality_rows, quality_table, set_determinism, warmup_cosine)
from hardener.metrics import Conventions  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

# Data: fixed split BY PHOTOGRAPH (a photo is never in both sets), the skimage photos of attacks.data
# (offline, full resolution).  Grey-scale photographs are replicated to three channels and only ever
# used for training.
TRAIN_COLOR, TRAIN_GREY, TEST_PHOTOS = list(SKIMAGE_TRAIN_COLOR), list(SKIMAGE_TRAIN_GREY), list(TEACHER_TEST)

SCALE = 2
EVAL_MAX_HR = 256  # evaluation uses the centre crop of at most 256x256 HR
SAMPLE_HR = 128  # sample pairs: 128x128 HR centre crop, 64x64 LR
CROP_BORDER = 2  # BasicSR-style: pixels ignored at each border for metrics
# Outputs are saved as 8-bit images, and measured as such.
CONVENTIONS = Conventions(crop_border=CROP_BORDER, rounding="uint8")
EXAMPLE = (1, 3, 64, 48)  # the export's example input


def build_model() -> ResidualRestorer:
    """The bundled teacher's network: 32 channels, 4 residual blocks, x2."""
    return ResidualRestorer(32, 4, SCALE, init="damped")


def to_tensor(img_u8: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 1x3xHxW float32 in [0, 1]."""
    return torch.from_numpy(img_u8).permute(2, 0, 1).unsqueeze(0).float().div(255.0)


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """1x3xHxW float -> HxWx3 uint8 (clamped and rounded)."""
    a = t.detach().float().clamp(0, 1).mul(255.0).round().squeeze(0).permute(1, 2, 0)
    return a.cpu().numpy().astype(np.uint8)


def chw(img_u8: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 -> 3xHxW float64 k/255 (what the metrics read)."""
    return img_u8.transpose(2, 0, 1) / 255.0


def degrade(hr: torch.Tensor) -> torch.Tensor:
    """x2 bicubic (antialiased) downscale, clamped to [0, 1] and 8-bit quantized (``attacks.degrade.sr2``)."""
    return torch.from_numpy(sr2(hr.numpy(), None))


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------
def build_train_set(device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    pairs = []
    for name in TRAIN_COLOR + TRAIN_GREY:
        hr = to_tensor(crop_to_multiple(photo_uint8(name), SCALE))
        lr = degrade(hr)
        pairs.append((hr.to(device), lr.to(device)))
    return pairs


def sample_batch(pairs, rng: np.random.Generator, batch: int, patch: int):
    """Aligned random patches (LR patch x patch, HR 2*patch) with flips/rot90.

    Nearly flat patches (HR std < 0.01, e.g. the black border of ``retina``)
    are re-drawn up to 10 times.
    """
    lrs, hrs = [], []
    for _ in range(batch):
        for _attempt in range(10):
            hr, lr = pairs[int(rng.integers(len(pairs)))]
            _, _, h, w = lr.shape
            y = int(rng.integers(h - patch + 1))
            x = int(rng.integers(w - patch + 1))
            lp = lr[:, :, y : y + patch, x : x + patch]
            hp = hr[:, :, SCALE * y : SCALE * (y + patch), SCALE * x : SCALE * (x + patch)]
            if float(hp.std()) >= 0.01:
                break
        flips = rng.integers(2, size=3)
        if flips[0]:
            lp, hp = lp.flip(-1), hp.flip(-1)
        if flips[1]:
            lp, hp = lp.flip(-2), hp.flip(-2)
        if flips[2]:
            lp, hp = lp.transpose(-1, -2), hp.transpose(-1, -2)
        lrs.append(lp)
        hrs.append(hp)
    return torch.cat(lrs).contiguous(), torch.cat(hrs).contiguous()


def train(args, device: torch.device) -> tuple[ResidualRestorer, float]:
    pairs = build_train_set(device)
    model = build_model().to(device)
    rng = np.random.default_rng(args.seed)
    seconds = fit(model, lambda _step: sample_batch(pairs, rng, args.batch, args.patch), args.steps, args.lr,
                  args.log_every)
    return model, seconds


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------
def test_images() -> dict[str, np.ndarray]:
    return {n: centre_crop(photo_uint8(n), EVAL_MAX_HR, SCALE) for n in TEST_PHOTOS}


@torch.no_grad()
def evaluate(model: ResidualRestorer, device: torch.device) -> list[dict]:
    items = []
    for name, hr_u8 in test_images().items():
        lr = degrade(to_tensor(hr_u8))
        bic = to_uint8(torch.from_numpy(input_baseline(lr.numpy(), SCALE)))
        sr = to_uint8(model(lr.to(device)).cpu())
        items.append((name, chw(bic), chw(sr), chw(hr_u8)))
    return quality_rows(items, CONVENTIONS, "bicubic")


# --------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------
def write_samples(samples_dir: Path) -> list[str]:
    from PIL import Image

    (samples_dir / "hr").mkdir(parents=True, exist_ok=True)
    (samples_dir / "lr").mkdir(parents=True, exist_ok=True)
    written = []
    for name in TEST_PHOTOS:
        hr_u8 = centre_crop(photo_uint8(name), SAMPLE_HR, SCALE)
        lr_u8 = to_uint8(degrade(to_tensor(hr_u8)))
        for sub, arr in (("hr", hr_u8), ("lr", lr_u8)):
            path = samples_dir / sub / f"{name}.png"
            # No ancillary chunks (no timestamps) -> byte-stable PNGs.
            Image.fromarray(arr, mode="RGB").save(path, format="PNG", optimize=True)
            written.append(str(path))
    return written


# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------
def export_bytes(model: ResidualRestorer) -> bytes:
    """Export with dynamic batch/height/width (input ``lr``, output ``sr``) and return scrubbed model bytes."""
    return export_onnx(model, EXAMPLE, "lr", "sr")


def verify_onnx(path: Path, model: ResidualRestorer) -> dict:
    info = inspect_onnx(path)
    lr_full = degrade(to_tensor(crop_to_multiple(photo_uint8(TEST_PHOTOS[0]), SCALE)))
    cases = [lr_full, lr_full[:, :, 37 : 37 + 90, 11 : 11 + 134].contiguous(),
             torch.cat([lr_full[:, :, :50, :70], lr_full[:, :, 60:110, 80:150]])]
    info["parity"] = parity(path, model, cases, "lr", "sr")
    return info


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------
def write_report(path: Path, args, argv: list[str], params: int, train_s: float, total_s: float,
                 rows: list[dict], info: dict, onnx_sha: str, deterministic: bool, onnx_size: int,
                 device: torch.device) -> None:
    cmd = "python scripts/train_teacher.py " + " ".join(argv)
    scopes = ", ".join(f"`{s}`" if s else "`(root)`" for s in info["name_scopes"])
    parity = "\n".join(
        f"| {list(i)} | {list(o)} | {d:.2e} |" for i, o, d in info["parity"]
    )
    text = f"""# x2 super-resolution teacher (`sr_x2.onnx`)

Generated by `scripts/train_teacher.py`; every number below was measured by
that run and written by the script itself.

## Command

```
{cmd.strip()}
```

seed `{args.seed}`, {args.steps} steps, batch {args.batch}, LR patch {args.patch}x{args.patch}
(HR {SCALE * args.patch}x{SCALE * args.patch}), Adam (lr {args.lr:g}, betas 0.9/0.99, linear warm-up over
{warmup_cosine(args.lr, args.steps)[1]} steps then cosine decay to 1%), L1 loss, device `{device.type}`,
`torch.set_num_threads({args.threads})`, `OMP_WAIT_POLICY={os.environ.get("OMP_WAIT_POLICY", "")}`,
`torch.use_deterministic_algorithms(True)`. Training is deterministic for a given
seed, step count, thread count and torch build, so re-running the command should
reproduce the weights of `sr_x2.onnx` exactly, and the file byte for byte from the same
sources (node metadata records the exporting code's class names and stack-trace lines;
compare the sha256 below).

* training wall time: **{train_s:.1f} s** ({train_s / max(1, args.steps):.3f} s/step); whole script (training, evaluation, export, checks): {total_s:.1f} s
* machine: {platform.machine()}, torch {torch.__version__}, Python {platform.python_version()}
* parameters: **{params:,}** ({params * 4 / 1024:.1f} KiB as float32)
* `sr_x2.onnx`: {onnx_size:,} bytes, sha256 `{onnx_sha}`

## Data (real photographs bundled with scikit-image {__import__('skimage').__version__}, no download)

Split by photograph; no photo appears in both sets.

* train, colour: {', '.join(TRAIN_COLOR)} (`motorcycle_left` = `skimage.data.stereo_motorcycle()[0]`)
* train, grey-scale photos replicated to RGB: {', '.join(TRAIN_GREY)}
* test (held out): {', '.join(TEST_PHOTOS)}
* not used: `cat` (same photo as `chelsea`), `motorcycle_right` (other view of the
  training `motorcycle_left`), synthetic images (colorwheel, logo, ...), and every
  `skimage.data` image that needs a pooch download.

Training patches are drawn uniformly over images and positions from the full
(even-cropped) photos, with random horizontal/vertical flips and transposition;
nearly flat patches (HR std < 0.01) are re-drawn.

## Degradation

HR: RGB float in [0, 1], height and width even.

```
LR = clamp(F.interpolate(HR, scale_factor=0.5, mode="bicubic",
                         antialias=True, align_corners=False), 0, 1)
LR = round(255 * LR) / 255          # 8-bit, exactly what an LR PNG stores
```

The LR of a training photo is computed once on the whole photo; patches are then
cut at aligned positions (LR `y, x` <-> HR `2y, 2x`).

## Model

`attacks.students.ResidualRestorer(32, 4, scale=2, init="damped")`:
`sr = up(tail(body(f) + f)) + bicubic_x2(lr)`, `f = head(lr)`, where
`bicubic_x2 = F.interpolate(lr, scale_factor=2, mode="bicubic", align_corners=False)`.

* `head`: Conv2d 3->32, 3x3
* `body`: Sequential of 4 residual blocks, each `x + conv2(act(conv1(x)))`
  (`conv1`, `conv2`: Conv2d 32->32 3x3; `act`: ReLU)
* `tail`: Conv2d 32->12, 3x3; `up`: PixelShuffle(2)

Initialisation: PyTorch's default, then `tail` and every `conv2` weight scaled by 0.1 and
their biases zeroed (the network starts close to `bicubic_x2`). The output is not clamped
inside the model.

## Evaluation (held-out photos)

Centre crop of at most {EVAL_MAX_HR}x{EVAL_MAX_HR} HR of each test photo, LR made with the
degradation above. `hardener.metrics` ({CONVENTIONS.describe()}; BasicSR
`crop_border={CROP_BORDER}`): PSNR `skimage.metrics.peak_signal_noise_ratio`, data range 1;
SSIM `skimage.metrics.structural_similarity` on the same crops, all channels, 11x11 Gaussian
window sigma 1.5, `use_sample_covariance=False`. "bicubic" = `bicubic_x2` of the LR above.

{quality_table(rows, "bicubic")}

## ONNX export

`torch.onnx.export(model, (x,), dynamo=True, opset_version=18, external_data=False,
input_names=["lr"], output_names=["sr"], dynamic_shapes=...)` with
`torch.export.Dim` for batch, height and width.

* IR version {info['ir_version']}, opsets {info['opsets']}
* input  `{info['inputs'][0][0]}`: {info['inputs'][0][1]} (float32, NCHW, RGB in [0, 1])
* output `{info['outputs'][0][0]}`: {info['outputs'][0][1]} (float32; not clamped)
* operators: {', '.join(info['ops'])}
* `onnx.checker.check_model(full_check=True)`: passed
* nodes: {info['nodes']}, of which {info['nodes_with_name_scopes']} carry `pkg.torch.onnx.name_scopes`
* module paths in name scopes: {scopes}
* absolute directory prefixes in node metadata (e.g. in `pkg.torch.onnx.stack_trace`) are
  removed, keeping file base names; remaining absolute paths found in the file: {info['path_leaks'] or 'none'}
* export run twice, byte-identical: **{'yes' if deterministic else 'NO'}**

onnxruntime (CPU) vs PyTorch, on the LR of the test photo `{TEST_PHOTOS[0]}`:

| input shape | output shape | max abs diff |
|---|---|---:|
{parity}

## Samples

`samples/hr/NAME.png`: {SAMPLE_HR}x{SAMPLE_HR} RGB centre crop of each held-out test photo;
`samples/lr/NAME.png`: the {SAMPLE_HR // 2}x{SAMPLE_HR // 2} LR of that crop (degradation above, 8-bit).
Names: {', '.join(TEST_PHOTOS)}.
"""
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "hardener/assets/sr_x2.onnx")
    p.add_argument("--samples-dir", type=Path, default=REPO_ROOT / "hardener/assets/samples")
    p.add_argument("--report", type=Path, default=None, help="default: TEACHER.md next to --out")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--patch", type=int, default=48, help="LR patch size")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--log-every", type=int, default=100)
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    set_determinism(args.seed, args.threads)

    model, train_s = train(args, device)
    params = parameter_count(model)
    print(f"trained {params} parameters in {train_s:.1f}s on {device}")

    rows = evaluate(model, device)
    table = quality_table(rows, "bicubic")
    print(table)

    model = model.cpu().eval()
    blob1 = export_bytes(model)
    blob2 = export_bytes(model)
    deterministic = blob1 == blob2
    print(f"export deterministic: {deterministic} ({sha256(blob1)} vs {sha256(blob2)})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(blob1)
    info = verify_onnx(args.out, model)
    for k, v in info.items():
        print(f"onnx {k}: {v}")
    check_export(info)

    samples = write_samples(args.samples_dir)
    print(f"wrote {len(samples)} sample files to {args.samples_dir}")

    report = args.report or args.out.parent / "TEACHER.md"
    write_report(report, args, argv, params, train_s, time.perf_counter() - t_start, rows, info,
                 sha256(blob1), deterministic, len(blob1), device)
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
