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
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import platform
import re
import sys
import time
import warnings
from pathlib import Path

# OpenMP threads that sleep instead of spin while waiting.  On a shared or
# oversubscribed 2-vCPU machine spinning made a 2-thread training step up to
# 5x slower than a 1-thread one; the wait policy does not change any result.
# Must be set before torch (libgomp) is loaded; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------
# Data: fixed split BY PHOTOGRAPH (a photo is never in both sets).
# All of these load from files bundled in the scikit-image wheel (no pooch
# download).  ``skimage.data.cat`` is the same photo as ``chelsea`` and
# ``motorcycle_right`` is the other view of ``motorcycle_left``; neither is
# used.  Grey-scale photographs are replicated to three channels and only
# ever used for training.
# --------------------------------------------------------------------------
TRAIN_COLOR = ["motorcycle_left", "hubble_deep_field", "immunohistochemistry", "retina"]
TRAIN_GREY = ["camera", "grass", "gravel", "brick", "coins", "clock", "moon"]
TEST_PHOTOS = ["astronaut", "coffee", "chelsea", "rocket"]

SCALE = 2
EVAL_MAX_HR = 256  # evaluation uses the centre crop of at most 256x256 HR
SAMPLE_HR = 128  # sample pairs: 128x128 HR centre crop, 64x64 LR
CROP_BORDER = 2  # BasicSR-style: pixels ignored at each border for metrics


def load_photo(name: str) -> np.ndarray:
    """Return an HxWx3 uint8 RGB photo from skimage.data (offline)."""
    import skimage.data as skd

    if name == "motorcycle_left":
        img = skd.stereo_motorcycle()[0]
    else:
        img = getattr(skd, name)()
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.shape[-1] == 4:
        img = img[..., :3]
    if img.dtype != np.uint8:
        raise TypeError(f"{name}: unexpected dtype {img.dtype}")
    return np.ascontiguousarray(img)


def to_tensor(img_u8: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 1x3xHxW float32 in [0, 1]."""
    return torch.from_numpy(img_u8).permute(2, 0, 1).unsqueeze(0).float().div(255.0)


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """1x3xHxW float -> HxWx3 uint8 (clamped and rounded)."""
    a = t.detach().float().clamp(0, 1).mul(255.0).round().squeeze(0).permute(1, 2, 0)
    return a.cpu().numpy().astype(np.uint8)


def quantize(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(0, 1).mul(255.0).round().div(255.0)


def even_crop(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    return img[: h - h % SCALE, : w - w % SCALE]


def centre_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    ch = min(size, h - h % SCALE)
    cw = min(size, w - w % SCALE)
    y0 = (h - ch) // 2
    x0 = (w - cw) // 2
    return img[y0 : y0 + ch, x0 : x0 + cw]


def degrade(hr: torch.Tensor) -> torch.Tensor:
    """x2 bicubic (antialiased) downscale, clamped to [0, 1] and 8-bit quantized."""
    assert hr.shape[-2] % SCALE == 0 and hr.shape[-1] % SCALE == 0, hr.shape
    lr = F.interpolate(hr, scale_factor=1.0 / SCALE, mode="bicubic", antialias=True, align_corners=False)
    return quantize(lr)


def bicubic_up(lr: torch.Tensor) -> torch.Tensor:
    return F.interpolate(lr, scale_factor=SCALE, mode="bicubic", align_corners=False)


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------
class ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(x)))


class SRx2(nn.Module):
    """Small residual x2 SR CNN.

    sr = up(tail(body(f) + f)) + bicubic_x2(lr),  with f = head(lr)

    Module paths: head, body.{0..3}.{conv1,act,conv2}, tail, up.
    """

    def __init__(self, ch: int = 32, n_blocks: int = 4) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, ch, 3, padding=1)
        self.body = nn.Sequential(*[ResBlock(ch) for _ in range(n_blocks)])
        self.tail = nn.Conv2d(ch, 3 * SCALE * SCALE, 3, padding=1)
        self.up = nn.PixelShuffle(SCALE)
        # Start close to plain bicubic: the network learns a small correction.
        with torch.no_grad():
            self.tail.weight.mul_(0.1)
            self.tail.bias.zero_()
            for blk in self.body:
                blk.conv2.weight.mul_(0.1)
                blk.conv2.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.head(x)
        res = self.up(self.tail(self.body(f) + f))
        return res + F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)


# Stable class names in the ONNX metadata (pkg.torch.onnx.class_hierarchy),
# whether this file runs as __main__ or is imported.
ResBlock.__module__ = SRx2.__module__ = "train_teacher"


# --------------------------------------------------------------------------
# Metrics (BasicSR-style: RGB, crop_border pixels removed, per image)
# --------------------------------------------------------------------------
def psnr(a: np.ndarray, b: np.ndarray, crop_border: int = CROP_BORDER) -> float:
    a = a.astype(np.float64) / 255.0
    b = b.astype(np.float64) / 255.0
    if crop_border:
        a = a[crop_border:-crop_border, crop_border:-crop_border]
        b = b[crop_border:-crop_border, crop_border:-crop_border]
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(1.0 / mse))


def ssim(a: np.ndarray, b: np.ndarray, crop_border: int = CROP_BORDER) -> float:
    from skimage.metrics import structural_similarity

    a = a.astype(np.float64) / 255.0
    b = b.astype(np.float64) / 255.0
    if crop_border:
        a = a[crop_border:-crop_border, crop_border:-crop_border]
        b = b[crop_border:-crop_border, crop_border:-crop_border]
    # Wang et al. 2004 settings (11x11 Gaussian, sigma 1.5), averaged over RGB.
    return float(
        structural_similarity(
            a, b, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False,
        )
    )


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------
def set_determinism(seed: int, threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def build_train_set(device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    pairs = []
    for name in TRAIN_COLOR + TRAIN_GREY:
        hr = to_tensor(even_crop(load_photo(name)))
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


def train(args, device: torch.device) -> tuple[SRx2, float]:
    pairs = build_train_set(device)
    model = SRx2().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.99))
    warmup = max(1, args.steps // 50)

    def lr_at(step: int) -> float:  # linear warm-up then cosine decay to 1%
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * t)))

    rng = np.random.default_rng(args.seed)
    model.train()
    t0 = time.perf_counter()
    running = 0.0
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        lr_b, hr_b = sample_batch(pairs, rng, args.batch, args.patch)
        loss = F.l1_loss(model(lr_b), hr_b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += float(loss.detach())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            n = (step % args.log_every) + 1
            print(
                f"step {step + 1:5d}/{args.steps}  l1 {running / n:.5f}  lr {lr_at(step):.2e}  "
                f"{time.perf_counter() - t0:6.1f}s",
                flush=True,
            )
            running = 0.0
    model.eval()
    return model, time.perf_counter() - t0


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------
def test_images() -> dict[str, np.ndarray]:
    return {n: centre_crop(load_photo(n), EVAL_MAX_HR) for n in TEST_PHOTOS}


@torch.no_grad()
def evaluate(model: SRx2, device: torch.device) -> list[dict]:
    rows = []
    for name, hr_u8 in test_images().items():
        hr = to_tensor(hr_u8)
        lr = degrade(hr)
        bic = to_uint8(bicubic_up(lr))
        sr = to_uint8(model(lr.to(device)).cpu())
        rows.append(
            {
                "name": name,
                "hr_shape": hr_u8.shape[:2],
                "bicubic_psnr": psnr(bic, hr_u8),
                "bicubic_ssim": ssim(bic, hr_u8),
                "teacher_psnr": psnr(sr, hr_u8),
                "teacher_ssim": ssim(sr, hr_u8),
            }
        )
    keys = ["bicubic_psnr", "bicubic_ssim", "teacher_psnr", "teacher_ssim"]
    rows.append({"name": "mean", "hr_shape": None, **{k: float(np.mean([r[k] for r in rows])) for k in keys}})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [
        "| image | HR size | bicubic PSNR (dB) | teacher PSNR (dB) | gain (dB) | bicubic SSIM | teacher SSIM |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        size = "" if r["hr_shape"] is None else f"{r['hr_shape'][0]}x{r['hr_shape'][1]}"
        name = f"**{r['name']}**" if r["name"] == "mean" else r["name"]
        lines.append(
            f"| {name} | {size} | {r['bicubic_psnr']:.2f} | {r['teacher_psnr']:.2f} | "
            f"{r['teacher_psnr'] - r['bicubic_psnr']:+.2f} | {r['bicubic_ssim']:.4f} | {r['teacher_ssim']:.4f} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------
def write_samples(samples_dir: Path) -> list[str]:
    from PIL import Image

    (samples_dir / "hr").mkdir(parents=True, exist_ok=True)
    (samples_dir / "lr").mkdir(parents=True, exist_ok=True)
    written = []
    for name in TEST_PHOTOS:
        hr_u8 = centre_crop(load_photo(name), SAMPLE_HR)
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
# An absolute directory prefix: POSIX ("/a/b/") or Windows ("C:\a\b\" or "C:/a/").
_ABS_DIR = re.compile(r"""(?<![\w.~])(?:[A-Za-z]:[\\/]|/)(?:[^\s"'<>|:\\/]+[\\/])+""")


def strip_paths(text: str) -> str:
    return _ABS_DIR.sub("", text)


def _scrub_graph(graph, counter: list[int]) -> None:
    for node in graph.node:
        for prop in node.metadata_props:
            new = strip_paths(prop.value)
            if new != prop.value:
                prop.value = new
                counter[0] += 1
        if node.doc_string:
            node.doc_string = strip_paths(node.doc_string)
        for attr in node.attribute:
            if attr.HasField("g"):
                _scrub_graph(attr.g, counter)
            for g in attr.graphs:
                _scrub_graph(g, counter)
    for prop in graph.metadata_props:
        prop.value = strip_paths(prop.value)
    graph.doc_string = strip_paths(graph.doc_string)


def scrub_model(model_proto) -> int:
    counter = [0]
    _scrub_graph(model_proto.graph, counter)
    for fn in model_proto.functions:
        for node in fn.node:
            for prop in node.metadata_props:
                new = strip_paths(prop.value)
                if new != prop.value:
                    prop.value = new
                    counter[0] += 1
    for prop in model_proto.metadata_props:
        prop.value = strip_paths(prop.value)
    model_proto.doc_string = strip_paths(model_proto.doc_string)
    return counter[0]


def export_bytes(model: SRx2) -> bytes:
    """Export with dynamic batch/height/width and return scrubbed model bytes."""
    from torch.export import Dim

    # Quiet, harmless exporter noise ("torchvision is not installed", LeafSpec).
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)

    model = model.cpu().eval()
    x = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    dyn = {"x": {0: Dim("batch", min=1, max=1024), 2: Dim("height", min=4, max=8192), 3: Dim("width", min=4, max=8192)}}
    prog = torch.onnx.export(
        model,
        (x,),
        None,
        dynamo=True,
        opset_version=18,
        external_data=False,
        input_names=["lr"],
        output_names=["sr"],
        dynamic_shapes=dyn,
        verbose=False,
    )
    proto = prog.model_proto
    n = scrub_model(proto)
    print(f"export: scrubbed absolute paths in {n} node metadata values")
    # Deterministic serialization (map fields sorted).
    return proto.SerializeToString(deterministic=True)


def verify_onnx(path: Path, model: SRx2) -> dict:
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    info = {"ir_version": proto.ir_version, "opsets": {o.domain or "ai.onnx": o.version for o in proto.opset_import}}

    def dims(vi):
        return [d.dim_param if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim]

    info["inputs"] = [(i.name, dims(i)) for i in proto.graph.input]
    info["outputs"] = [(o.name, dims(o)) for o in proto.graph.output]
    info["ops"] = sorted({n.op_type for n in proto.graph.node})

    import ast

    scopes, n_with = set(), 0
    for node in proto.graph.node:
        md = {p.key: p.value for p in node.metadata_props}
        if "pkg.torch.onnx.name_scopes" in md:
            n_with += 1
            # e.g. "['', 'body', 'body.0', 'body.0.conv1', 'conv2d_1']": module
            # paths from the root ('') inwards, then the op's own name.
            val = ast.literal_eval(md["pkg.torch.onnx.name_scopes"])
            scopes.add(val[-2] if len(val) >= 2 else "")
    info["nodes"] = len(proto.graph.node)
    info["nodes_with_name_scopes"] = n_with
    info["name_scopes"] = sorted(scopes)
    info["metadata_keys"] = sorted({p.key for n in proto.graph.node for p in n.metadata_props})
    leaks = set()
    texts = [p.value for n in proto.graph.node for p in n.metadata_props]
    texts += [n.doc_string for n in proto.graph.node] + [proto.doc_string, proto.graph.doc_string]
    texts += [p.value for p in proto.metadata_props]
    for t in texts:
        leaks.update(m.group(0) for m in _ABS_DIR.finditer(t))
    blob = path.read_bytes()
    for needle in {str(REPO_ROOT), sys.prefix, str(Path.home()), os.getcwd(), str(Path(torch.__file__).parent)}:
        if len(needle) > 1 and needle.encode() in blob:
            leaks.add(needle)
    leaks = sorted(leaks)
    info["path_leaks"] = leaks[:10]

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = model.cpu().eval()
    name = TEST_PHOTOS[0]
    hr_full = to_tensor(even_crop(load_photo(name)))
    lr_full = degrade(hr_full)
    checks = []
    cases = [lr_full, lr_full[:, :, 37 : 37 + 90, 11 : 11 + 134].contiguous(),
             torch.cat([lr_full[:, :, :50, :70], lr_full[:, :, 60:110, 80:150]])]
    for lr in cases:
        with torch.no_grad():
            ref = model(lr).numpy()
        out = sess.run(["sr"], {"lr": lr.numpy()})[0]
        checks.append((tuple(lr.shape), tuple(out.shape), float(np.abs(out - ref).max())))
    info["parity"] = checks
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
{max(1, args.steps // 50)} steps then cosine decay to 1%), L1 loss, device `{device.type}`,
`torch.set_num_threads({args.threads})`, `OMP_WAIT_POLICY={os.environ.get("OMP_WAIT_POLICY", "")}`,
`torch.use_deterministic_algorithms(True)`. Training is deterministic for a given
seed, step count, thread count and torch build, so re-running the command should
reproduce `sr_x2.onnx` byte for byte (compare the sha256 below).

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

`sr = up(tail(body(f) + f)) + bicubic_x2(lr)`, `f = head(lr)`, where
`bicubic_x2 = F.interpolate(lr, scale_factor=2, mode="bicubic", align_corners=False)`.

* `head`: Conv2d 3->32, 3x3
* `body`: Sequential of 4 residual blocks, each `x + conv2(act(conv1(x)))`
  (`conv1`, `conv2`: Conv2d 32->32 3x3; `act`: ReLU)
* `tail`: Conv2d 32->12, 3x3; `up`: PixelShuffle(2)

The output is not clamped inside the model.

## Evaluation (held-out photos)

Centre crop of at most {EVAL_MAX_HR}x{EVAL_MAX_HR} HR of each test photo, LR made with the
degradation above. Outputs are clamped to [0, 1] and rounded to 8 bit. PSNR: RGB,
data range 1, {CROP_BORDER}-pixel border removed (BasicSR `crop_border={CROP_BORDER}`), per image,
then averaged. SSIM: `skimage.metrics.structural_similarity` on the same crops,
RGB (`channel_axis=-1`), data range 1, 11x11 Gaussian window sigma 1.5,
`use_sample_covariance=False`. "bicubic" = `bicubic_x2` of the LR above.

{format_table(rows)}

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
    params = sum(p.numel() for p in model.parameters())
    print(f"trained {params} parameters in {train_s:.1f}s on {device}")

    rows = evaluate(model, device)
    table = format_table(rows)
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
    worst = max(d for _, _, d in info["parity"])
    if worst >= 1e-4:
        raise SystemExit(f"ONNX/PyTorch mismatch: max abs diff {worst:.3e}")
    if info["nodes_with_name_scopes"] == 0:
        raise SystemExit("no pkg.torch.onnx.name_scopes metadata in the exported model")

    samples = write_samples(args.samples_dir)
    print(f"wrote {len(samples)} sample files to {args.samples_dir}")

    report = args.report or args.out.parent / "TEACHER.md"
    write_report(report, args, argv, params, train_s, time.perf_counter() - t_start, rows, info,
                 sha256(blob1), deterministic, len(blob1), device)
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
