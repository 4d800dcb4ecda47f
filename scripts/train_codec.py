#!/usr/bin/env python
"""Train, evaluate and export one bundled learned image codec (a small Balle 2018 scale hyperprior).

What it does, in order (a thin layer over ``attacks.compression``):

1. trains ``ScaleHyperprior(N=32, M=48)`` with ``attacks.compression.train.train_codec`` on random 128x128
   crops of the real TRAINING photos (``attacks.data.load_photos("train")``), minimising
   ``lmbda * 255^2 * MSE + bpp``; deterministic under ``--seed`` (and ``--threads``);
2. writes ``<out-dir>/<name>.pt`` (float32 ``state_dict``) and ``<out-dir>/<name>.onnx`` (end-to-end
   ``x -> (x_hat, bpp)`` graph, TorchScript exporter, opset 17);
3. evaluates on the HELD-OUT photos (``load_photos("test")``, each top-left cropped to multiples of 64):
   bpp from the likelihoods, bpp of a real bitstream (``constriction`` ANS coder, when installed), PSNR;
   checks onnxruntime against PyTorch, and the bitstream round trip;
4. writes the card ``<out-dir>/<name>.md`` with every number it measured.

Every file is written atomically (a temp file in the same folder, then renamed).

Typical use, from the repository root (the two bundled rate points; lower lambda = lower rate)::

    python scripts/train_codec.py --name codec_q1 --steps 4000 --seed 0
    python scripts/train_codec.py --name codec_q2 --steps 4000 --seed 0

``--lmbda`` defaults to ``attacks.compression.LAMBDAS[name]`` for a bundled name.  A quick smoke run that
leaves the bundled files alone::

    python scripts/train_codec.py --name codec_try --lmbda 0.01 --steps 200 --out-dir /tmp/codec
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

from attacks.compression import LAMBDAS, ScaleHyperprior, bpp_per_image, crop64  # noqa: E402
from attacks.compression import entropy  # noqa: E402
from attacks.compression.export import OPSET, export_end_to_end  # noqa: E402
from attacks.compression.model import LIKELIHOOD_BOUND  # noqa: E402
from attacks.compression.train import GRAD_CLIP, train_codec  # noqa: E402
from attacks.data import load_photos, split_names  # noqa: E402
from hardener.metrics import psnr  # noqa: E402
from hardener.model_io import atomic_write  # noqa: E402


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same folder, then rename (``hardener.model_io.atomic_write``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(data, None, path)


def save_state(model: torch.nn.Module, path: Path) -> None:
    import io

    buf = io.BytesIO()
    torch.save({k: v.detach().to(torch.float32).clone() for k, v in model.state_dict().items()}, buf)
    write_atomic(path, buf.getvalue())


@torch.no_grad()
def evaluate(model: ScaleHyperprior, onnx_path: Path) -> tuple[list[dict], dict]:
    """Per held-out photo: size, bpp (likelihoods), bpp (real bitstream), PSNR; and ONNX parity."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    codec = onnx_codec = None
    if entropy.available():
        from attacks.compression.export import export_transforms

        codec = entropy.Codec.from_torch(model)
        tmp = tempfile.TemporaryDirectory()
        export_transforms(model, tmp.name)
        onnx_codec = entropy.Codec.from_onnx(tmp.name)  # decodes what PyTorch encoded: another runtime
    rows = []
    worst_x, worst_b, worst_rt, cross = 0.0, 0.0, 0.0, []
    for name, img in load_photos("test"):
        x = torch.from_numpy(np.ascontiguousarray(crop64(img.transpose(2, 0, 1))))[None]
        out = model(x)
        h, w = x.shape[-2:]
        row = {"name": name, "size": f"{h}x{w}",
               "bpp_lik": float(bpp_per_image(out["likelihoods"], h * w)[0]),
               "psnr": psnr(out["x_hat"][0].numpy(), x[0].numpy()),
               "floor": float((out["likelihoods"]["y"] <= 1.0001 * LIKELIHOOD_BOUND).float().mean())}
        xh_onnx, bpp_onnx = sess.run(None, {"x": x.numpy()})
        worst_x = max(worst_x, float(np.abs(xh_onnx - out["x_hat"].numpy()).max()))
        worst_b = max(worst_b, abs(float(bpp_onnx[0]) - row["bpp_lik"]))
        if codec is not None:
            data = codec.compress(x.numpy())
            row["bpp_real"] = entropy.stream_bits(data) / (h * w)
            row["bpp_real_nohdr"] = entropy.stream_bits(data, header=False) / (h * w)
            worst_rt = max(worst_rt, float(np.abs(codec.decompress(data) - out["x_hat"].numpy()).max()))
            cross.append(float(np.abs(onnx_codec.decompress(data) - out["x_hat"].numpy()).max()) < 1e-4)
        rows.append(row)
    mean = {"name": "mean", "size": ""}
    for k in rows[0]:
        if k not in ("name", "size"):
            mean[k] = float(np.mean([r[k] for r in rows]))
    rows.append(mean)
    # Parity on other shapes: batch 2, non-square, the 64x64 minimum.
    photo = load_photos("test")[0][1].transpose(2, 0, 1)
    shapes = []
    for n, hh, ww in ((2, 128, 192), (1, 64, 64), (1, 320, 256)):
        xb = torch.from_numpy(np.ascontiguousarray(np.stack([photo[:, :hh, :ww], photo[:, -hh:, -ww:]][:n])))
        out = model(xb)
        xh_onnx, bpp_onnx = sess.run(None, {"x": xb.numpy()})
        d_x = float(np.abs(xh_onnx - out["x_hat"].numpy()).max())
        d_b = float(np.abs(bpp_onnx - bpp_per_image(out["likelihoods"], hh * ww).numpy()).max())
        shapes.append((list(xb.shape), d_x, d_b))
    parity = {"x_hat_test": worst_x, "bpp_test": worst_b, "roundtrip": worst_rt if codec else None,
              "cross": (sum(cross), len(cross)) if codec else None,
              "shapes": shapes, "providers": sess.get_providers()}
    return rows, parity


def onnx_info(path: Path) -> dict:
    import onnx

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    blob = path.read_bytes()
    leaks = [n for n in {str(REPO_ROOT), sys.prefix, str(Path.home())} if len(n) > 1 and n.encode() in blob]
    scopes = sorted({"/".join(n.name.split("/")[:-1]).rsplit("/", 1)[-1] for n in proto.graph.node
                     if n.name.startswith("/g_s/") or n.name.startswith("/g_a/")})
    return {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(), "ir": proto.ir_version,
            "opsets": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
            "inputs": [(i.name, dims(i)) for i in proto.graph.input],
            "outputs": [(o.name, dims(o)) for o in proto.graph.output],
            "ops": Counter(n.op_type for n in proto.graph.node), "nodes": len(proto.graph.node),
            "scopes": scopes, "leaks": leaks}


def card(args, model, curve, train_s, total_s, rows, parity, info, pt_path, init_note=None) -> str:
    n_params = sum(p.numel() for p in model.parameters())
    has_real = "bpp_real" in rows[0]
    cmd = " ".join(["python", "scripts/train_codec.py"] + sys.argv[1:])
    tail = np.mean(curve[-100:]) if curve else float("nan")
    head = np.mean(curve[:100]) if curve else float("nan")
    lines = [
        f"# `{args.name}` codec (`{args.name}.onnx`, `{args.name}.pt`)", "",
        "Generated by `scripts/train_codec.py`; every number below was measured by that run.", "",
        "## Command", "", "```", cmd, "```", "",
        f"* model: `attacks.compression.ScaleHyperprior(N=32, M=48)` (Balle et al. 2018 scale hyperprior, plain "
        f"PyTorch; CompressAI does not import beside this CPU torch, see `attacks/compression/model.py`); "
        f"**{n_params:,}** parameters",
        f"* objective: `lmbda * 255^2 * MSE + bpp`, lambda **{args.lmbda}** (noise-quantised bpp from the "
        f"likelihoods, MSE on [0, 1])",
        f"* seed `{args.seed}`, {args.steps} steps, batch {args.batch}, random {args.patch}x{args.patch} crops "
        f"(`attacks.data.patches`, flips/transposes, fresh crops every 50 steps, each used once), Adam (lr "
        f"{args.lr}, linear warm-up over 2 % of the steps then cosine decay to 1 %), gradient norm clipped at "
        f"{GRAD_CLIP}, GDN beta floored at 1e-3, CPU, `torch.set_num_threads({args.threads})`",
        *([f"* {init_note}"] if init_note else []),
        f"* training loss (mean of the first / last 100 steps): {head:.3f} -> {tail:.3f}",
        f"* training wall time: **{train_s:.1f} s** ({train_s / max(1, args.steps):.3f} s/step); whole script: "
        f"{total_s:.1f} s (the machine's 2 cores were shared with other work)",
        f"* machine: {platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}, "
        f"Python {platform.python_version()}",
        f"* weights: `{pt_path.name}`, float32 `state_dict`, {pt_path.stat().st_size:,} bytes, sha256 "
        f"`{hashlib.sha256(pt_path.read_bytes()).hexdigest()}`; load with "
        f"`attacks.compression.load_bundled(\"{args.name}\")`",
        f"* ONNX: {info['bytes']:,} bytes, sha256 `{info['sha256']}`", "",
        "## Data", "",
        "`attacks.data.load_photos` (real photos, split by photograph; longer side <= 512).",
        f"Train: {', '.join(split_names('train'))}. Test (held out): {', '.join(split_names('test'))}.", "",
        "## Evaluation (held-out photos)", "",
        "Each whole test photo, top-left cropped to multiples of 64 (`attacks.compression.crop64`); the PyTorch "
        "model in eval mode (latents rounded). PSNR: RGB, `hardener.metrics.psnr` on the float `x_hat` clipped "
        "to [0, 1], NOT rounded to 8 bits, per image then averaged. "
        "bpp (likelihoods): `-sum log2 p / (H W)` over y and z. ",
    ]
    if has_real:
        lines[-1] += ("bpp (real): size of an actual bitstream from `attacks.compression.entropy.Codec` "
                      "(constriction ANS coder) over H W, with its 14-byte header (and without, in brackets); "
                      f"every bitstream decodes to the model's `x_hat` (max abs diff {parity['roundtrip']:.1e}). "
                      f"Decoded instead through the exported ONNX transforms in onnxruntime (another runtime than the "
                      f"encoder's), {parity['cross'][0]} of {parity['cross'][1]} streams give the same image (max abs "
                      "diff < 1e-4); the coder rounds the scales up to a 64-entry table so that the runtimes' ~1e-5 "
                      "differences in `h_s` rarely matter, but a scale that lands on a table boundary in one runtime "
                      "and not the other derails the decoder (encode and decode with the same runtime).")
        lines += ["", "| image | size | bpp (likelihoods) | bpp (real bitstream) | PSNR (dB) |",
                  "|---|---|---:|---:|---:|"]
    else:
        lines[-1] += "bpp (real): not measured, `constriction` is not installed."
        lines += ["", "| image | size | bpp (likelihoods) | PSNR (dB) |", "|---|---|---:|---:|"]
    for r in rows:
        name = f"**{r['name']}**" if r["name"] == "mean" else r["name"]
        real = f" {r['bpp_real']:.4f} ({r['bpp_real_nohdr']:.4f}) |" if has_real else ""
        lines.append(f"| {name} | {r['size']} | {r['bpp_lik']:.4f} |{real} {r['psnr']:.2f} |")
    floor = 100 * rows[-1]["floor"]
    lines += ["", f"Symbols of y whose likelihood sits at the 1e-9 floor (>= 29.9 bits each in the estimate; the "
              f"real coder's fixed-point Gaussian gives every symbol at least 2^-24, so at most ~24 bits): "
              f"{floor:.3f} % on average"
              + (" (the hyperprior under-predicts the scale there; they make the real bitstream smaller than the "
                 "estimate)." if floor >= 0.1 else ".")]
    ops = ", ".join(f"{k} {v}" for k, v in sorted(info["ops"].items()))
    lines += [
        "", "## ONNX export", "",
        f"`attacks.compression.export.export_end_to_end`: TorchScript exporter (`torch.onnx.export(dynamo=False, "
        f"opset_version={OPSET})`), GDN and prior parameters folded into constants, quantisation by `Round`. "
        "The four transforms (`g_a`, `h_a`, `h_s`, `g_s`) for real bitstreams are written on demand: "
        f"`python -m attacks.compression.export {args.name} -o DIR`.", "",
        f"* IR {info['ir']}, opsets {info['opsets']}; inputs {info['inputs']}; outputs {info['outputs']}",
        "* `x_hat`: the decoded image (not clamped); `bpp`: per-image rate estimate from the likelihoods",
        f"* nodes: {info['nodes']} ({ops})",
        f"* module paths in node names (g_a, g_s): {', '.join(f'`{s}`' for s in info['scopes'])}",
        "* `onnx.checker.check_model(full_check=True)`: passed; absolute paths in the file: "
        f"{'none' if not info['leaks'] else info['leaks']}", "",
        f"onnxruntime ({', '.join(parity['providers'])}) vs PyTorch (eval mode):", "",
        "| input | max abs diff x_hat | max abs diff bpp |", "|---|---:|---:|",
        f"| every test photo above (batch 1) | {parity['x_hat_test']:.2e} | {parity['bpp_test']:.2e} |",
    ]
    for shape, d_x, d_b in parity["shapes"]:
        lines.append(f"| {shape} (crops of {split_names('test')[0]}) | {d_x:.2e} | {d_b:.2e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Writes <name>.pt, <name>.onnx and the card <name>.md.",
        epilog="Example: python scripts/train_codec.py --name codec_q1 --steps 4000 --seed 0",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--name", required=True,
                   help="output stem; bundled names: " + ", ".join(f"{k} (lambda {v})" for k, v in LAMBDAS.items()))
    p.add_argument("--lmbda", type=float, default=None,
                   help="rate-distortion trade-off (loss = lmbda*255^2*MSE + bpp; higher = more bits, better "
                        "PSNR); default: LAMBDAS[name]")
    p.add_argument("--steps", type=int, default=4000,
                   help="training steps (about 0.1 s each on one idle thread with 4 crops of 128x128)")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, the crops and the quantisation noise")
    p.add_argument("--batch", type=int, default=4, help="crops per step")
    p.add_argument("--patch", type=int, default=128,
                   help="crop side (a multiple of 64). 64 (8 crops) costs half as much per step, but the hyperprior "
                        "then only ever sees a 1x1 z and, on whole photos, predicts scales far too small at some "
                        "positions (measured, lambda 0.0035, 5000 steps: 2.7 %% of y symbols at the 1e-9 likelihood "
                        "floor, held-out bpp 0.55 for 25.7 dB)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak Adam learning rate")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it)")
    p.add_argument("--init", type=Path, default=None, metavar="PT",
                   help="start from these weights (a float32 state_dict, e.g. attacks/teachers/codec_q1.pt) "
                        "instead of a fresh initialisation: a higher-rate point fine-tuned from a lower one")
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT / "attacks" / "teachers",
                   help="folder for <name>.pt, <name>.onnx, <name>.md")
    p.add_argument("--log-every", type=int, default=250, help="print the running loss every N steps")
    args = p.parse_args(argv)
    if args.lmbda is None:
        if args.name not in LAMBDAS:
            p.error(f"--lmbda is required for a name outside {sorted(LAMBDAS)}")
        args.lmbda = LAMBDAS[args.name]
    if args.steps < 1:
        p.error("--steps must be >= 1")

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    model = ScaleHyperprior(N=32, M=48)
    init_note = None
    if args.init is not None:
        blob = args.init.read_bytes()
        model.load_state_dict(torch.load(args.init, map_location="cpu", weights_only=True))
        init_note = (f"initialised from `{args.init.name}` (sha256 `{hashlib.sha256(blob).hexdigest()}`), "
                     "not from scratch")

    def progress(step, steps, info):
        print(f"step {step:5d}/{steps}  loss {info['loss']:.4f}  bpp {info['bpp']:.4f}  psnr {info['psnr']:.2f} dB  "
              f"lr {info['lr']:.2e}  {time.perf_counter() - t0:6.1f}s", flush=True)

    t0 = time.perf_counter()
    curve = train_codec(model, args.lmbda, args.steps, args.seed, batch=args.batch, patch=args.patch, lr=args.lr,
                        progress=progress, log_every=args.log_every)
    train_s = time.perf_counter() - t0
    model.eval()

    out = args.out_dir
    pt_path, onnx_path, md_path = out / f"{args.name}.pt", out / f"{args.name}.onnx", out / f"{args.name}.md"
    save_state(model, pt_path)
    export_end_to_end(model, onnx_path, metadata={
        "codec": "attacks.compression.ScaleHyperprior(N=32, M=48)", "lambda": args.lmbda, "seed": args.seed,
        "steps": args.steps, "outputs": "x_hat: decoded image; bpp: per-image rate estimate from the likelihoods"})
    rows, parity = evaluate(model, onnx_path)
    info = onnx_info(onnx_path)
    total_s = time.perf_counter() - t_start
    text = card(args, model, curve, train_s, total_s, rows, parity, info, pt_path, init_note)
    write_atomic(md_path, text.encode())
    mean = rows[-1]
    print(f"wrote {pt_path}, {onnx_path}, {md_path}")
    print(f"held-out mean: bpp(lik) {mean['bpp_lik']:.4f}" + (f", bpp(real) {mean['bpp_real']:.4f}" if "bpp_real" in mean else "")
          + f", PSNR {mean['psnr']:.2f} dB; ONNX parity x_hat {parity['x_hat_test']:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
