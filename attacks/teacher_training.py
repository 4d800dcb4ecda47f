"""What the teacher-training scripts share: the bundled x2 teacher (``scripts/train_teacher.py``) and a teacher
per task of :data:`attacks.degrade.TASKS` (``scripts/train_task_teacher.py``), both a
:class:`attacks.students.ResidualRestorer` with ``init="damped"``.

* :func:`set_determinism`, :func:`warmup_cosine` and :func:`fit` (Adam, betas 0.9/0.99, L1 loss, linear
  warm-up over ``steps // 50`` steps then cosine decay to 1 % of the learning rate);
* :func:`export_onnx`: the dynamo exporter, opset 18, one file, dynamic batch/height/width, absolute paths
  scrubbed (:func:`hardener.rewrite.scrub_model`), deterministic bytes;
* :func:`inspect_onnx` and :func:`parity`: the checks a recipe card reports (checker, operators, name scopes,
  absolute paths left, onnxruntime against PyTorch);
* :func:`quality_rows` and :func:`quality_table`: held-out PSNR/SSIM (:mod:`hardener.metrics`) of the
  degraded input's baseline and of the teacher, per photo and mean, as a Markdown table.

Not part of any attack run (not in :data:`attacks.identity.RUN_MODULES`).
"""
from __future__ import annotations

import ast
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hardener.metrics import Conventions, psnr, ssim

REPO_ROOT = Path(__file__).resolve().parents[1]


def set_determinism(seed: int, threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def warmup_cosine(base: float, steps: int) -> tuple[Callable[[int], float], int]:
    """``(lr_at(step), warm-up steps)``: linear warm-up over ``max(1, steps // 50)`` steps, then cosine decay
    from ``base`` to 1 % of it."""
    warmup = max(1, steps // 50)

    def lr_at(step: int) -> float:
        if step < warmup:
            return base * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return base * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * t)))

    return lr_at, warmup


def fit(model: nn.Module, batch_at: Callable[[int], tuple[torch.Tensor, torch.Tensor]], steps: int, lr: float,
        log_every: int = 100) -> float:
    """Train ``model`` on ``batch_at(step) -> (input, target)`` with Adam and an L1 loss under
    :func:`warmup_cosine`, printing the mean loss every ``log_every`` steps; leaves it in eval mode and
    returns the training wall seconds."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99))
    lr_at, _ = warmup_cosine(lr, steps)
    model.train()
    t0 = time.perf_counter()
    running = 0.0
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x, y = batch_at(step)
        loss = F.l1_loss(model(x), y)
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
    return time.perf_counter() - t0


def export_onnx(model: nn.Module, example: tuple[int, int, int, int], input_name: str, output_name: str) -> bytes:
    """dynamo export (opset 18, one file) with dynamic batch/height/width, traced on a seeded random input of
    shape ``example``; absolute directory prefixes scrubbed; deterministic serialisation."""
    from torch.export import Dim

    from hardener.rewrite import scrub_model

    # Quiet, harmless exporter noise ("torchvision is not installed", LeafSpec).
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    model = model.cpu().eval()
    x = torch.rand(*example, generator=torch.Generator().manual_seed(0))
    dyn = {"x": {0: Dim("batch", min=1, max=1024), 2: Dim("height", min=4, max=8192),
                 3: Dim("width", min=4, max=8192)}}
    prog = torch.onnx.export(model, (x,), None, dynamo=True, opset_version=18, external_data=False,
                             input_names=[input_name], output_names=[output_name], dynamic_shapes=dyn,
                             verbose=False)
    proto = prog.model_proto
    n = scrub_model(proto)
    print(f"export: scrubbed absolute paths in {n} node metadata values")
    return proto.SerializeToString(deterministic=True)


def inspect_onnx(path: Path) -> dict:
    """The facts a recipe card states about an exported file: ``onnx.checker`` (full check; raises on
    failure), IR version and opsets, inputs and outputs with their dims, operators, node counts, the module
    paths in ``pkg.torch.onnx.name_scopes``, node metadata keys, and absolute paths left (in any text of the
    model, and this machine's repository, Python, home, working and torch directories in the bytes)."""
    import onnx

    from hardener.rewrite import absolute_dirs

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)

    def dims(vi):
        return [d.dim_param if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim]

    scopes, n_with = set(), 0
    for node in proto.graph.node:
        md = {p.key: p.value for p in node.metadata_props}
        if "pkg.torch.onnx.name_scopes" in md:
            n_with += 1
            # e.g. "['', 'body', 'body.0', 'body.0.conv1', 'conv2d_1']": module paths from the root ('')
            # inwards, then the op's own name.
            val = ast.literal_eval(md["pkg.torch.onnx.name_scopes"])
            scopes.add(val[-2] if len(val) >= 2 else "")
    texts = [p.value for n in proto.graph.node for p in n.metadata_props] + [n.doc_string for n in proto.graph.node]
    texts += [proto.doc_string, proto.graph.doc_string] + [p.value for p in proto.metadata_props]
    leaks = {d for t in texts for d in absolute_dirs(t)}
    blob = Path(path).read_bytes()
    for needle in {str(REPO_ROOT), sys.prefix, str(Path.home()), os.getcwd(), str(Path(torch.__file__).parent)}:
        if len(needle) > 1 and needle.encode() in blob:
            leaks.add(needle)
    return {"ir_version": proto.ir_version, "opsets": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
            "inputs": [(i.name, dims(i)) for i in proto.graph.input],
            "outputs": [(o.name, dims(o)) for o in proto.graph.output],
            "ops": sorted({n.op_type for n in proto.graph.node}), "nodes": len(proto.graph.node),
            "nodes_with_name_scopes": n_with, "name_scopes": sorted(scopes),
            "metadata_keys": sorted({p.key for n in proto.graph.node for p in n.metadata_props}),
            "path_leaks": sorted(leaks)[:10]}


def parity(path: Path, model: nn.Module, cases: Iterable[torch.Tensor], input_name: str,
           output_name: str) -> list[tuple[tuple, tuple, float]]:
    """onnxruntime (CPU) on ``path`` against ``model`` (PyTorch, CPU): ``(input shape, output shape, max abs
    difference)`` per case."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = model.cpu().eval()
    checks = []
    for x in cases:
        with torch.no_grad():
            ref = model(x).numpy()
        out = sess.run([output_name], {input_name: x.numpy()})[0]
        checks.append((tuple(x.shape), tuple(out.shape), float(np.abs(out - ref).max())))
    return checks


def quality_rows(items: Iterable[tuple[str, np.ndarray, np.ndarray, np.ndarray]], conventions: Conventions,
                 base: str) -> list[dict]:
    """Per ``(name, baseline, output, truth)`` of (3, H, W) images: PSNR/SSIM of the baseline (``<base>_psnr``,
    ``<base>_ssim``) and of the teacher (``teacher_psnr``, ``teacher_ssim``) against the truth under
    ``conventions``; then a ``mean`` row."""
    rows = []
    for name, baseline, out, truth in items:
        rows.append({"name": name, "hr_shape": truth.shape[-2:],
                     f"{base}_psnr": psnr(baseline, truth, conventions=conventions),
                     f"{base}_ssim": ssim(baseline, truth, conventions=conventions),
                     "teacher_psnr": psnr(out, truth, conventions=conventions),
                     "teacher_ssim": ssim(out, truth, conventions=conventions)})
    keys = [f"{base}_psnr", f"{base}_ssim", "teacher_psnr", "teacher_ssim"]
    rows.append({"name": "mean", "hr_shape": None, **{k: float(np.mean([r[k] for r in rows])) for k in keys}})
    return rows


def quality_table(rows: list[dict], base: str) -> str:
    """:func:`quality_rows` as Markdown (the mean row in bold)."""
    lines = [f"| image | HR size | {base} PSNR (dB) | teacher PSNR (dB) | gain (dB) | {base} SSIM | teacher SSIM |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        size = "" if r["hr_shape"] is None else f"{r['hr_shape'][0]}x{r['hr_shape'][1]}"
        name = f"**{r['name']}**" if r["name"] == "mean" else r["name"]
        lines.append(f"| {name} | {size} | {r[f'{base}_psnr']:.2f} | {r['teacher_psnr']:.2f} | "
                     f"{r['teacher_psnr'] - r[f'{base}_psnr']:+.2f} | {r[f'{base}_ssim']:.4f} | "
                     f"{r['teacher_ssim']:.4f} |")
    return "\n".join(lines)


def check_export(info: dict, bound: float = 1e-4) -> None:
    """Stop (SystemExit) when onnxruntime and PyTorch differ by ``bound`` or more on any ``info["parity"]``
    case, or when no node carries the name scopes the layer selectors resolve."""
    worst = max(d for _, _, d in info["parity"])
    if worst >= bound:
        raise SystemExit(f"ONNX/PyTorch mismatch: max abs diff {worst:.3e}")
    if info["nodes_with_name_scopes"] == 0:
        raise SystemExit("no pkg.torch.onnx.name_scopes metadata in the exported model")
