#!/usr/bin/env python
"""Train, evaluate and export a small restoration teacher for any task of ``attacks.degrade.TASKS``.

Same architecture family (and module paths) as the bundled x2 SR teacher of
``scripts/train_teacher.py`` (``hardener/assets/TEACHER.md``)::

    f = head(x);  y = up(tail(body(f) + f)) + skip(x)

``head`` Conv 3->32, ``body`` Sequential of 4 residual blocks (``conv1``/``act``/``conv2``),
``tail`` Conv 32->3*scale^2, ``up`` PixelShuffle(scale) (Identity for scale 1), ``skip`` bicubic
x``scale`` upsampling for SR or the input itself for same-size restoration.

Data: real photos of ``attacks.data.load_photos("train")``; training pairs come from
``attacks.degrade.make_pairs`` in chunks (one fresh chunk every ``--refresh`` steps, each pair used
once, chunk ``i`` seeded by ``(seed, i)``), so a run is deterministic under ``--seed``.
Evaluation: ``attacks.degrade.eval_set(task, "test", hr_size=256)``, PSNR/SSIM from
``hardener.metrics`` (``crop_border = scale``, per image, then averaged).

Typical use (from the repository root)::

    python scripts/train_task_teacher.py --task denoise --steps 1000 --seed 0 --out attacks/teachers/denoise.onnx

Writes the ONNX (single file) and a recipe card ``<out stem>.md`` next to it.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train_teacher.py: sleep, don't spin

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
for _p in (str(REPO_ROOT), str(REPO_ROOT / "scripts")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

# Shared pieces of the bundled teacher's script (imported, not copied; that script is unchanged).
from train_teacher import _ABS_DIR, ResBlock, scrub_model, set_determinism  # noqa: E402

from attacks.data import load_photos  # noqa: E402
from attacks.degrade import TASKS, eval_set, make_pairs  # noqa: E402
from hardener.metrics import psnr, ssim  # noqa: E402


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------
class TaskTeacher(nn.Module):
    """``up(tail(body(f) + f)) + skip(x)``, ``f = head(x)``; SRx2 of train_teacher.py generalised to
    any scale (``up`` = Identity and ``skip`` = identity for scale 1).

    Module paths: head, body.{0..3}.{conv1,act,conv2}, tail, up.
    """

    def __init__(self, scale: int, ch: int = 32, n_blocks: int = 4) -> None:
        super().__init__()
        self.scale = int(scale)
        self.head = nn.Conv2d(3, ch, 3, padding=1)
        self.body = nn.Sequential(*[ResBlock(ch) for _ in range(n_blocks)])
        self.tail = nn.Conv2d(ch, 3 * self.scale * self.scale, 3, padding=1)
        self.up = nn.PixelShuffle(self.scale) if self.scale > 1 else nn.Identity()
        # Same initialisation as SRx2: start close to the skip path, learn a correction.
        with torch.no_grad():
            self.tail.weight.mul_(0.1)
            self.tail.bias.zero_()
            for blk in self.body:
                blk.conv2.weight.mul_(0.1)
                blk.conv2.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.head(x)
        res = self.up(self.tail(self.body(f) + f))
        if self.scale > 1:
            return res + F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return res + x


TaskTeacher.__module__ = "train_task_teacher"  # stable class name in ONNX metadata


def skip_of(x: torch.Tensor, scale: int) -> torch.Tensor:
    """The degraded input brought to the target size (bicubic for SR, identity otherwise)."""
    if scale > 1:
        return F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)
    return x


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------
def lr_schedule(base: float, steps: int):
    warmup = max(1, steps // 50)

    def lr_at(step: int) -> float:  # linear warm-up then cosine decay to 1% (as train_teacher.py)
        if step < warmup:
            return base * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return base * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * t)))

    return lr_at, warmup


def train(task: str, steps: int, seed: int = 0, batch: int = 16, patch: int = 64, lr: float = 1e-3,
          refresh: int = 50, threads: int = 1, log_every: int = 100, photos=None,
          ch: int = 32, n_blocks: int = 4) -> tuple[TaskTeacher, float]:
    """Train a teacher for ``task``; returns ``(model in eval mode, training wall seconds)``.

    ``patch``: HR (target) patch side.  Pairs: ``make_pairs(task, photos, patch, batch * refresh,
    seed=seed * 1_000_003 + chunk)`` for chunk 0, 1, ... (each pair used once)."""
    t = TASKS[task]
    if patch % t.scale:
        raise ValueError(f"patch {patch} is not a multiple of scale {t.scale}")
    set_determinism(seed, threads)
    photos = load_photos("train") if photos is None else photos
    model = TaskTeacher(t.scale, ch, n_blocks)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99))
    lr_at, _ = lr_schedule(lr, steps)
    model.train()
    t0 = time.perf_counter()
    running, inputs, targets = 0.0, None, None
    for step in range(steps):
        k = step % refresh
        if k == 0:
            xs, ys = make_pairs(task, photos, patch, batch * refresh, seed=seed * 1_000_003 + step // refresh)
            inputs, targets = torch.from_numpy(xs), torch.from_numpy(ys)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x_b = inputs[k * batch : (k + 1) * batch]
        y_b = targets[k * batch : (k + 1) * batch]
        loss = F.l1_loss(model(x_b), y_b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += float(loss.detach())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            n = (step % log_every) + 1
            print(f"step {step + 1:5d}/{steps}  l1 {running / n:.5f}  lr {lr_at(step):.2e}  "
                  f"{time.perf_counter() - t0:6.1f}s", flush=True)
            running = 0.0
    model.eval()
    return model, time.perf_counter() - t0


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, task: str, hr_size: int = 256, seed: int = 0) -> list[dict]:
    """Per test photo and mean: PSNR/SSIM of the degraded input (bicubic-upsampled for SR) and of the
    teacher vs the truth; float outputs clipped to [0, 1], ``crop_border = scale``."""
    scale = TASKS[task].scale
    rows = []
    for name, x, y in eval_set(task, "test", hr_size=hr_size, seed=seed):
        xt = torch.from_numpy(x)
        base = skip_of(xt, scale)[0].numpy()
        out = model(xt)[0].numpy()
        truth = y[0]
        rows.append({
            "name": name, "hr_shape": truth.shape[-2:],
            "input_psnr": psnr(base, truth, crop_border=scale), "input_ssim": ssim(base, truth, crop_border=scale),
            "teacher_psnr": psnr(out, truth, crop_border=scale), "teacher_ssim": ssim(out, truth, crop_border=scale),
        })
    keys = ["input_psnr", "input_ssim", "teacher_psnr", "teacher_ssim"]
    rows.append({"name": "mean", "hr_shape": None, **{k: float(np.mean([r[k] for r in rows])) for k in keys}})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| image | HR size | input PSNR (dB) | teacher PSNR (dB) | gain (dB) | input SSIM | teacher SSIM |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        size = "" if r["hr_shape"] is None else f"{r['hr_shape'][0]}x{r['hr_shape'][1]}"
        name = f"**{r['name']}**" if r["name"] == "mean" else r["name"]
        lines.append(f"| {name} | {size} | {r['input_psnr']:.2f} | {r['teacher_psnr']:.2f} | "
                     f"{r['teacher_psnr'] - r['input_psnr']:+.2f} | {r['input_ssim']:.4f} | {r['teacher_ssim']:.4f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Export and checks
# --------------------------------------------------------------------------
def export_bytes(model: nn.Module) -> bytes:
    """dynamo export, opset 18, input ``x``, output ``y``, dynamic batch/height/width; scrubbed bytes."""
    from torch.export import Dim

    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    model = model.cpu().eval()
    x = torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(0))
    dyn = {"x": {0: Dim("batch", min=1, max=1024), 2: Dim("height", min=4, max=8192),
                 3: Dim("width", min=4, max=8192)}}
    prog = torch.onnx.export(model, (x,), None, dynamo=True, opset_version=18, external_data=False,
                             input_names=["x"], output_names=["y"], dynamic_shapes=dyn, verbose=False)
    proto = prog.model_proto
    n = scrub_model(proto)
    print(f"export: scrubbed absolute paths in {n} node metadata values")
    return proto.SerializeToString(deterministic=True)


def verify_onnx(path: Path, model: nn.Module, task: str) -> dict:
    import ast

    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)

    def dims(vi):
        return [d.dim_param if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim]

    info = {"ir_version": proto.ir_version, "opsets": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
            "inputs": [(i.name, dims(i)) for i in proto.graph.input],
            "outputs": [(o.name, dims(o)) for o in proto.graph.output],
            "ops": sorted({n.op_type for n in proto.graph.node}), "nodes": len(proto.graph.node)}
    scopes = set()
    for node in proto.graph.node:
        md = {p.key: p.value for p in node.metadata_props}
        if "pkg.torch.onnx.name_scopes" in md:
            val = ast.literal_eval(md["pkg.torch.onnx.name_scopes"])
            scopes.add(val[-2] if len(val) >= 2 else "")
    info["name_scopes"] = sorted(scopes)
    texts = [p.value for n in proto.graph.node for p in n.metadata_props] + [n.doc_string for n in proto.graph.node]
    texts += [proto.doc_string, proto.graph.doc_string] + [p.value for p in proto.metadata_props]
    leaks = {m.group(0) for t in texts for m in _ABS_DIR.finditer(t)}
    blob = path.read_bytes()
    for needle in {str(REPO_ROOT), sys.prefix, str(Path.home()), os.getcwd(), str(Path(torch.__file__).parent)}:
        if len(needle) > 1 and needle.encode() in blob:
            leaks.add(needle)
    info["path_leaks"] = sorted(leaks)[:10]

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name, x, _ = eval_set(task, "test", hr_size=256)[0]
    xt = torch.from_numpy(x)
    cases = [xt, xt[:, :, 7:7 + 45, 3:3 + 61].contiguous(), torch.cat([xt[:, :, :25, :35], xt[:, :, 30:55, 20:55]])]
    checks = []
    model = model.cpu().eval()
    for c in cases:
        with torch.no_grad():
            ref = model(c).numpy()
        out = sess.run(["y"], {"x": c.numpy()})[0]
        checks.append((tuple(c.shape), tuple(out.shape), float(np.abs(out - ref).max())))
    info["parity_photo"] = name
    info["parity"] = checks
    return info


def export_and_check(model: nn.Module, out: Path, task: str) -> tuple[bytes, dict]:
    blob = export_bytes(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(blob)
    info = verify_onnx(out, model, task)
    worst = max(d for _, _, d in info["parity"])
    if worst >= 1e-4:
        raise SystemExit(f"ONNX/PyTorch mismatch: max abs diff {worst:.3e}")
    return blob, info


# --------------------------------------------------------------------------
def write_card(path: Path, args, argv: list[str], params: int, train_s: float, total_s: float,
               rows: list[dict], info: dict, blob: bytes) -> None:
    t = TASKS[args.task]
    cmd = "python scripts/train_task_teacher.py " + " ".join(argv)
    scopes = ", ".join(f"`{s}`" if s else "`(root)`" for s in info["name_scopes"])
    parity = "\n".join(f"| {list(i)} | {list(o)} | {d:.2e} |" for i, o, d in info["parity"])
    train_names = ", ".join(n for n, _ in load_photos("train"))
    test_names = ", ".join(n for n, _ in load_photos("test"))
    skip = f"bicubic x{t.scale} upsampling of x" if t.scale > 1 else "x (identity)"
    up = f"PixelShuffle({t.scale})" if t.scale > 1 else "Identity"
    text = f"""# `{args.task}` teacher (`{path.with_suffix('.onnx').name}`)

Generated by `scripts/train_task_teacher.py`; every number below was measured by that run.

## Command

```
{cmd.strip()}
```

* task: {t.description}
* seed `{args.seed}`, {args.steps} steps, batch {args.batch}, HR patch {args.patch}x{args.patch}
  (input {args.patch // t.scale}x{args.patch // t.scale}), fresh pairs every {args.refresh} steps
  (`attacks.degrade.make_pairs`, each pair used once), Adam (lr {args.lr:g}, betas 0.9/0.99, linear
  warm-up {lr_schedule(args.lr, args.steps)[1]} steps then cosine decay to 1%), L1 loss, CPU,
  `torch.set_num_threads({args.threads})`, deterministic algorithms.
* training wall time: **{train_s:.1f} s** ({train_s / max(1, args.steps):.3f} s/step); whole script: {total_s:.1f} s
* machine: {platform.machine()}, torch {torch.__version__}, Python {platform.python_version()}
* parameters: **{params:,}**
* ONNX: {len(blob):,} bytes, sha256 `{hashlib.sha256(blob).hexdigest()}`

## Data

`attacks.data.load_photos` (real photos, split by photograph).
Train: {train_names}. Test: {test_names}.

## Model

`y = up(tail(body(f) + f)) + skip`, `f = head(x)`, skip = {skip}.
`head` Conv2d 3->32 3x3; `body` 4 residual blocks `x + conv2(act(conv1(x)))` (32 ch, ReLU);
`tail` Conv2d 32->{3 * t.scale * t.scale} 3x3; `up` {up}. Output not clamped.

## Evaluation (held-out photos)

`attacks.degrade.eval_set("{args.task}", "test", hr_size={args.eval_hr}, seed=0)`; float outputs; PSNR/SSIM from
`hardener.metrics` (clipped to [0, 1], RGB, `crop_border={t.scale}`), per image then averaged.
"input" = the degraded input{' upsampled bicubic' if t.scale > 1 else ''}.

{format_table(rows)}

## ONNX export

`torch.onnx.export(dynamo=True, opset_version=18, external_data=False, input_names=["x"],
output_names=["y"])`, dynamic batch/height/width (`torch.export.Dim`).

* IR {info['ir_version']}, opsets {info['opsets']}; input {info['inputs']}, output {info['outputs']}
* operators: {', '.join(info['ops'])}; nodes: {info['nodes']}
* `onnx.checker.check_model(full_check=True)`: passed
* module paths in name scopes: {scopes}
* absolute paths left in the file: {info['path_leaks'] or 'none'}

onnxruntime (CPU) vs PyTorch on `{info['parity_photo']}`:

| input shape | output shape | max abs diff |
|---|---|---:|
{parity}
"""
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="default: attacks/teachers/<task>.onnx")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--patch", type=int, default=64, help="HR (target) patch size")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--refresh", type=int, default=50, help="steps per freshly generated chunk of pairs")
    p.add_argument("--eval-hr", type=int, default=256)
    p.add_argument("--log-every", type=int, default=100)
    args = p.parse_args(argv)
    out = args.out or REPO_ROOT / "attacks" / "teachers" / f"{args.task}.onnx"

    t_start = time.perf_counter()
    model, train_s = train(args.task, args.steps, args.seed, args.batch, args.patch, args.lr, args.refresh,
                           args.threads, args.log_every)
    params = sum(q.numel() for q in model.parameters())
    print(f"trained {params} parameters in {train_s:.1f}s")
    rows = evaluate(model, args.task, args.eval_hr)
    print(format_table(rows))
    blob, info = export_and_check(model, out, args.task)
    for k, v in info.items():
        print(f"onnx {k}: {v}")
    card = out.with_suffix(".md")
    write_card(card, args, argv, params, train_s, time.perf_counter() - t_start, rows, info, blob)
    print(f"wrote {out} ({len(blob)} bytes) and {card}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
