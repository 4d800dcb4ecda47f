"""``harden``: the command line, a thin layer over ``hardener.api``."""
from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

import click

from .api import HardenConfig, find_layers, harden
from .asvp import MODES, PRECISIONS, AsvpParams
from .errors import HardenerError, UsageError
from .rewrite import PLACEMENTS
from .validate import Budgets

DEMO_LAYERS = ["body.*.conv2"]

EPILOG = """\b
Examples:
  harden --demo                                   # bundled x2 SR teacher + real photos
  harden model.onnx --list-layers                 # what can be hardened
  harden model.onnx --layers body.3.conv2 -o model.hardened.onnx
  harden model.onnx --layers 're:body\\.\\d+\\.conv2' --rank 2 --gain 1.5 \\
         --inputs lr_images/ --truth hr_images/ --max-psnr-drop 0.2 -o out.onnx
  harden model.onnx --layers op:Conv --placement tap --mode spatial -o tapped.onnx
  harden model.onnx --layers node:/body/body.0/conv2/Conv --providers cuda -o out.onnx

\b
Layer selectors (repeat --layers; each must match something):
  body.3.conv2      PyTorch module path (from torch.onnx metadata or /scoped/node/names)
  'body.*.conv2'    shell glob over module paths
  're:PATTERN'      regular expression, full match, over module paths
  node:NAME  tensor:NAME  op:TYPE

\b
Exit codes: 0 hardened and validated; 1 a fidelity budget failed (files still written);
2 usage error (including a selector that matched nothing); 3 a required execution provider
was unavailable; 4 invalid model or internal error.
"""


def _demo_paths() -> tuple[Path, Path, Path]:
    assets = Path(str(resources.files("hardener") / "assets"))
    return assets / "sr_x2.onnx", assets / "samples" / "lr", assets / "samples" / "hr"


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("model", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Hardened model to write (default: MODEL with suffix .hardened.onnx). Written atomically; "
                   "never the input.")
@click.option("-l", "--layers", "layers", multiple=True, metavar="SELECTOR",
              help="Feature layer(s) to harden, e.g. body.3.conv2, 're:body\\.\\d+\\.conv2', op:Conv.")
@click.option("--list-layers", is_flag=True, help="Print every 4D float feature map (module, node, op, tensor, "
              "shape) and exit.")
@click.option("--mode", type=click.Choice(MODES), default="channel", show_default=True,
              help="channel: one C x HW matrix per sample; spatial: one H x W matrix per channel.")
@click.option("--placement", type=click.Choice(PLACEMENTS), default="inline", show_default=True,
              help="inline: perturb the forward path; tap: leave it intact and add the perturbed feature as "
                   "an extra output 'asvp/<layer>' (for feature-distilling consumers).")
@click.option("-k", "--rank", type=int, default=AsvpParams.rank, show_default=True,
              help="How many top singular values to amplify (k).")
@click.option("-g", "--gain", type=float, default=AsvpParams.gain, show_default=True,
              help="Amplification factor h of those singular values (1 = identity). On the bundled teacher, "
                   "h=1.3 at 4 layers costs 0.13 dB against ground truth, h=2 costs 1.7 dB.")
@click.option("--iterations", type=int, default=None, metavar="N",
              help="Subspace iterations on G^(2^S). Default: 32 / 2^S (8 with the default S=2), which matches "
                   "the float64 SVD to <= 2e-5 where sigma(k+1)/sigma(k) <= 0.8 on real features; fewer is "
                   "faster and coarser.")
@click.option("--squarings", type=int, default=None, metavar="S",
              help="Iterate on G squared S times: each squaring halves the iterations (and the inserted nodes) "
                   "for the same accuracy. Default: 2 for k <= 4, 1 for larger k, 0 in spatial mode or with "
                   "--precision float32.")
@click.option("--precision", type=click.Choice(sorted(PRECISIONS)), default=None,
              help="Arithmetic of the small C x C (or H x H) spectral part; the Gram matrix and the "
                   "reconstruction are float32 either way. Default: float64 in channel mode (it allows the "
                   "squarings), float32 in spatial mode (no squarings: H x H cubes cost more than they save).")
@click.option("--adaptive-energy", type=float, default=None, metavar="P",
              help="Adaptive k: per input, the smallest k' <= k whose top-k' energy reaches fraction P.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the subspace start block and synthetic inputs; same seed, same bytes.")
@click.option("--inputs", "inputs", type=str, default=None, metavar="NPZ|DIR",
              help="Validation inputs: an .npz (arrays named after model inputs, optional truth:<output>) or "
                   "an image folder. Default: seeded synthetic images.")
@click.option("--truth", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of ground-truth images (same file names as --inputs images).")
@click.option("--num-samples", type=click.IntRange(min=1), default=None, help="Use at most this many images from --inputs "
              "(synthetic default: 4).")
@click.option("--providers", type=str, default=None, metavar="LIST",
              help="Execution providers for validation, e.g. cuda,cpu or cpu. Default: CUDA when "
                   "onnxruntime offers it, else CPU. A CUDA request that would run on CPU fails (exit 3).")
@click.option("--tf32/--no-tf32", default=False, show_default=True, help="Allow TF32 on CUDA (Ampere+).")
@click.option("--min-psnr", type=float, default=40.0, show_default=True,
              help="Budget: PSNR (dB) of hardened vs original outputs must reach this. 'none' via --no-budgets.")
@click.option("--max-psnr-drop", type=float, default=0.5, show_default=True,
              help="Budget: dB of PSNR against ground truth the hardening may lose (with --truth or "
                   "truth:<output> arrays).")
@click.option("--atol", type=float, default=None, help="Budget: every |hardened - original| <= atol + rtol*|original|.")
@click.option("--rtol", type=float, default=None, help="Relative part of the atol/rtol budget.")
@click.option("--data-range", type=float, default=1.0, show_default=True, help="Image value range for PSNR/SSIM.")
@click.option("--crop-border", type=int, default=0, show_default=True,
              help="Pixels cropped at each edge before PSNR/SSIM (BasicSR: the SR scale).")
@click.option("--no-budgets", is_flag=True, help="Report metrics but enforce no PSNR budget.")
@click.option("--validate/--no-validate", default=True, show_default=True,
              help="Run original and hardened models and compare (checker and a CPU session always run).")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON report path (default: OUTPUT.report.json).")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("--keep-paths", is_flag=True, help="Keep absolute file paths found in exporter metadata "
              "(scrubbed to base names by default).")
@click.option("--demo", is_flag=True, help="Harden the bundled x2 super-resolution teacher on the bundled "
              "real photos (layers body.*.conv2), write ./sr_x2.hardened.onnx (replaced on rerun) and print the "
              "validation summary.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar; print only the last summary line.")
@click.version_option(package_name="hardener")
def main(**kw):
    """Harden an image-restoration ONNX model against unauthorized distillation (ASVP).

    After each selected feature layer X (N, C, H, W), insert a subgraph of standard ONNX ops that
    amplifies the top-k singular values of X by a factor h: X' = X + (h-1) Q Q^T X, with Q the top-k
    singular subspace found by subspace iteration. Then run original and hardened models with ONNX
    Runtime on validation inputs, check the fidelity budgets and write a JSON report.
    """
    try:
        return _run(**kw)
    except HardenerError as exc:
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - the contract is a message and exit 4, not a traceback
        click.echo(f"internal error: {type(exc).__name__}: {exc}", err=True)
        return 4


def _run(model, output, layers, list_layers, mode, placement, rank, gain, iterations, squarings, precision, adaptive_energy,
         seed, inputs, truth, num_samples, providers, tf32, min_psnr, max_psnr_drop, atol, rtol, data_range,
         crop_border, no_budgets, validate, report, force, keep_paths, demo, quiet) -> int:
    if demo:
        if model is not None:
            raise UsageError("--demo uses the bundled model; give no MODEL")
        model, lr, hr = _demo_paths()
        layers = layers or DEMO_LAYERS
        inputs, truth = inputs or str(lr), truth or hr
        output = output or Path("sr_x2.hardened.onnx")
        crop_border = crop_border or 2
        force = True
        if not quiet:
            click.echo(f"demo: harden {model} --layers {' --layers '.join(layers)} --inputs {inputs} "
                       f"--truth {truth} --crop-border {crop_border} -o {output}", err=True)
    if model is None:
        raise UsageError("missing MODEL (or use --demo); see harden --help")
    if list_layers:
        _print_layers(model)
        return 0
    if not layers:
        raise UsageError("no --layers given; run `harden MODEL --list-layers` to see candidates")
    output = output or model.with_name(model.stem + ".hardened.onnx")
    params = AsvpParams(rank=rank, gain=gain, mode=mode, iterations=iterations, squarings=squarings,
                        precision=precision,
                        adaptive_energy=adaptive_energy, seed=seed)
    budgets = Budgets(min_psnr=None if no_budgets else min_psnr,
                      max_psnr_drop=None if no_budgets else max_psnr_drop,
                      atol=atol, rtol=rtol, data_range=data_range, crop_border=crop_border)
    config = HardenConfig(layers=list(layers), params=params, placement=placement, validate=validate,
                          budgets=budgets, providers=providers.split(",") if providers else None, tf32=tf32,
                          scrub_paths=not keep_paths, force=force, inputs=inputs,
                          truth=str(truth) if truth else None, num_samples=num_samples)
    result = harden(model, output, config, report_path=report, progress=not quiet and sys.stderr.isatty())
    click.echo(result.summary.splitlines()[-1] if quiet else result.summary)
    return result.report["exit_code"]


def _print_layers(model: Path) -> None:
    layers = find_layers(model)
    rows = [("module", "node", "op", "tensor", "shape", "dtype")]
    from .layers import FLOAT_TYPES

    for layer in layers:
        owner = layer.label() if layer.modules_owning else \
            "(graph input)" if layer.graph_input else f"({layer.module} internal)" if layer.module else "-"
        rows.append((owner,
                     layer.node or "(graph input)", layer.op or "-", layer.tensor, layer.shape_text(),
                     FLOAT_TYPES.get(layer.elem_type, "?")))
    widths = [min(max(len(r[i]) for r in rows), 48) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(str(c)[:w].ljust(w) for c, w in zip(row, widths)).rstrip())
    click.echo(f"{len(layers)} feature maps; select by module path, node:NAME, tensor:NAME, op:TYPE, re:, glob")


def entry() -> None:
    """Console-script entry: one clear message and the documented exit code, never a traceback."""
    try:
        kwargs = main.main(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    sys.exit(kwargs if isinstance(kwargs, int) else 0)
