#!/usr/bin/env python
"""Train, evaluate and export a small restoration teacher for any task of ``attacks.degrade.TASKS``.

The network is ``attacks.students.ResidualRestorer(32, 4, scale, init="damped")``, the bundled x2 SR
teacher's (``scripts/train_teacher.py``, ``hardener/assets/TEACHER.md``), module paths included::

    f = head(x);  y = up(tail(body(f) + f)) + skip(x)

``head`` Conv 3->32, ``body`` Sequential of 4 residual blocks (``conv1``/``act``/``conv2``),
``tail`` Conv 32->3*scale^2, ``up`` PixelShuffle(scale) (Identity for scale 1), ``skip`` bicubic
x``scale`` upsampling for SR or the input itself for same-size restoration.

Data: real photos of ``attacks.data.load_photos("train")``; training pairs come from
``attacks.degrade.make_pairs`` in chunks (one fresh chunk every ``--refresh`` steps, each pair used
once, chunk ``i`` seeded by ``(seed, i)``), so a run is deterministic under ``--seed``.
Evaluation: ``attacks.degrade.eval_set(task, "test", hr_size=256)``, PSNR/SSIM from
``hardener.metrics`` (``crop_border = scale``, per image, then averaged).  Training loop, export and
checks: ``attacks.teacher_training`` (shared with ``scripts/train_teacher.py``).

Typical use (from the repository root)::

    python scripts/train_task_teacher.py --task denoise --steps 1000 --seed 0 --out attacks/teachers/denoise.onnx

Writes the ONNX (single file) and a recipe card ``<out stem>.md`` next to it.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train_teacher.py: sleep, don't spin

import torch  # noqa: E402

from attacks.data import load_photos  # noqa: E402
from attacks.degrade import TASKS, eval_set, input_baseline, make_pairs  # noqa: E402
from attacks.students import ResidualRestorer, parameter_count  # noqa: E402
from attacks.teacher_training import (check_export, export_onnx, fit, inspect_onnx, parity,  # noqa: E402
                                      quality_rows, quality_table, set_determinism, warmup_cosine)
from hardener.metrics import Conventions  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = (1, 3, 48, 40)  # the export's example input


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------
def train(task: str, steps: int, seed: int = 0, batch: int = 16, patch: int = 64, lr: float = 1e-3,
          refresh: int = 50, threads: int = 1, log_every: int = 100, photos=None,
          ch: int = 32, n_blocks: int = 4) -> tuple[ResidualRestorer, float]:
    """Train a teacher for ``task``; returns ``(model in eval mode, training wall seconds)``.

    ``patch``: HR (target) patch side.  Pairs: ``make_pairs(task, photos, patch, batch * refresh,
    seed=seed * 1_000_003 + chunk)`` for chunk 0, 1, ... (each pair used once)."""
    t = TASKS[task]
    if patch % t.scale:
        raise ValueError(f"patch {patch} is not a multiple of scale {t.scale}")
    set_determinism(seed, threads)
    photos = load_photos("train") if photos is None else photos
    model = ResidualRestorer(ch, n_blocks, t.scale, init="damped")
    chunk: dict[str, torch.Tensor] = {}

    def batch_at(step: int):
        k = step % refresh
        if k == 0:
            xs, ys = make_pairs(task, photos, patch, batch * refresh, seed=seed * 1_000_003 + step // refresh)
            chunk["x"], chunk["y"] = torch.from_numpy(xs), torch.from_numpy(ys)
        return chunk["x"][k * batch : (k + 1) * batch], chunk["y"][k * batch : (k + 1) * batch]

    return model, fit(model, batch_at, steps, lr, log_every)


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: ResidualRestorer, task: str, hr_size: int = 256, seed: int = 0) -> list[dict]:
    """Per test photo and mean: PSNR/SSIM of the degraded input (bicubic-upsampled for SR) and of the
    teacher vs the truth; float outputs clipped to [0, 1], ``crop_border = scale``."""
    scale = TASKS[task].scale
    items = [(name, input_baseline(x, scale)[0], model(torch.from_numpy(x))[0].numpy(), y[0])
             for name, x, y in eval_set(task, "test", hr_size=hr_size, seed=seed)]
    return quality_rows(items, Conventions(crop_border=scale), "input")


# --------------------------------------------------------------------------
# Export and checks
# --------------------------------------------------------------------------
def export_bytes(model: ResidualRestorer) -> bytes:
    """dynamo export, opset 18, input ``x``, output ``y``, dynamic batch/height/width; scrubbed bytes."""
    return export_onnx(model, EXAMPLE, "x", "y")


def verify_onnx(path: Path, model: ResidualRestorer, task: str) -> dict:
    info = inspect_onnx(path)
    name, x, _ = eval_set(task, "test", hr_size=256)[0]
    xt = torch.from_numpy(x)
    cases = [xt, xt[:, :, 7:7 + 45, 3:3 + 61].contiguous(), torch.cat([xt[:, :, :25, :35], xt[:, :, 30:55, 20:55]])]
    info["parity_photo"] = name
    info["parity"] = parity(path, model, cases, "x", "y")
    return info


def export_and_check(model: ResidualRestorer, out: Path, task: str) -> tuple[bytes, dict]:
    blob = export_bytes(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(blob)
    info = verify_onnx(out, model, task)
    check_export(info)
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
  warm-up {warmup_cosine(args.lr, args.steps)[1]} steps then cosine decay to 1%), L1 loss, CPU,
  `torch.set_num_threads({args.threads})`, deterministic algorithms.
* training wall time: **{train_s:.1f} s** ({train_s / max(1, args.steps):.3f} s/step); whole script: {total_s:.1f} s
* machine: {platform.machine()}, torch {torch.__version__}, Python {platform.python_version()}
* parameters: **{params:,}**
* ONNX: {len(blob):,} bytes, sha256 `{hashlib.sha256(blob).hexdigest()}`

## Data

`attacks.data.load_photos` (real photos, split by photograph).
Train: {train_names}. Test: {test_names}.

## Model

`attacks.students.ResidualRestorer(32, 4, scale={t.scale}, init="damped")`:
`y = up(tail(body(f) + f)) + skip`, `f = head(x)`, skip = {skip}.
`head` Conv2d 3->32 3x3; `body` 4 residual blocks `x + conv2(act(conv1(x)))` (32 ch, ReLU);
`tail` Conv2d 32->{3 * t.scale * t.scale} 3x3; `up` {up}. Output not clamped.

## Evaluation (held-out photos)

`attacks.degrade.eval_set("{args.task}", "test", hr_size={args.eval_hr}, seed=0)`; float outputs; PSNR/SSIM from
`hardener.metrics` ({Conventions(crop_border=t.scale).describe()}).
"input" = the degraded input{' upsampled bicubic' if t.scale > 1 else ''}.

{quality_table(rows, "input")}

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
    params = parameter_count(model)
    print(f"trained {params} parameters in {train_s:.1f}s")
    rows = evaluate(model, args.task, args.eval_hr)
    print(quality_table(rows, "input"))
    blob, info = export_and_check(model, out, args.task)
    for k, v in info.items():
        print(f"onnx {k}: {v}")
    card = out.with_suffix(".md")
    write_card(card, args, argv, params, train_s, time.perf_counter() - t_start, rows, info, blob)
    print(f"wrote {out} ({len(blob)} bytes) and {card}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
