"""``harden``: the command line, a thin layer over ``hardener.api`` (and ``inspection``, ``compare``).

A command group in the manner of Polygraphy's subtools.  ``harden run`` is the default subcommand: when the
first argument is not a subcommand name, the whole command line goes to it, so ``harden MODEL --layers ...``,
``harden --demo`` and ``harden MODEL --list-layers`` work as they always did.
"""
from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path

import click

from .asvp import MODES, PRECISIONS, AsvpParams
from .errors import HardenerError, UsageError
from .report import printable
from .rewrite import PLACEMENTS
from .validate import LAYER_RTOL

DEMO_LAYERS = ["body.*.conv2"]
DEFAULT_COMMAND = "run"
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

EXIT_CODES = """\b
Exit codes: 0 success; 1 a fidelity budget failed (harden: files still written); 2 usage error
(including a selector that matched nothing, or models that disagree on inputs/outputs); 3 a required
execution provider was unavailable (or ONNX Runtime is not installed); 4 invalid model or internal error.
"""

COMPLETION = """\b
Shell completion (commands, options, paths):
  eval "$(_HARDEN_COMPLETE=bash_source harden)"    # in ~/.bashrc; zsh: zsh_source, fish: fish_source
"""

GROUP_EPILOG = """\b
Examples:
  harden --demo                                   # bundled x2 SR teacher + real photos
  harden layers model.onnx                        # what can be hardened (--json for machines)
  harden model.onnx --layers body.3.conv2 -o model.hardened.onnx
  harden inspect model.hardened.onnx              # by what, where, and the estimated cost
  harden compare model.onnx model.hardened.onnx --inputs photos/ --min-psnr 40

""" + COMPLETION + "\n" + EXIT_CODES

RUN_EPILOG = """\b
Examples:
  harden --demo                                   # bundled x2 SR teacher + real photos
  harden model.onnx --list-layers                 # what can be hardened (or: harden layers model.onnx)
  harden model.onnx --layers body.3.conv2 -o model.hardened.onnx          # gain calibrated
  harden model.onnx --layers 'body.*.conv2' --target-psnr-drop 0.2 \\
         --inputs lr_images/ --truth hr_images/ -o out.onnx
  harden model.onnx --layers 're:body\\.\\d+\\.conv2' --rank 2 --gain 1.5 \\
         --inputs lr_images/ --truth hr_images/ --max-psnr-drop 0.2 -o out.onnx
  harden model.onnx --layers op:Conv --placement tap --mode spatial --gain 2 -o tapped.onnx
  harden model.onnx --layers node:/body/body.0/conv2/Conv --providers cuda -o out.onnx
  harden run layers.onnx --layers head            # `run` explicitly: a model named like a subcommand

\b
The gain h: with --gain, exactly that; without it, calibrated by bisection on the validation images so
that the PSNR of the output against the ground truth drops by --target-psnr-drop (+-10 %), or, without
ground truth, so that the PSNR of hardened vs original outputs is --target-psnr.

\b
Layer selectors (repeat --layers; each must match something):
  body.3.conv2      PyTorch module path (from torch.onnx metadata or /scoped/node/names)
  'body.*.conv2'    shell glob over module paths
  're:PATTERN'      regular expression, full match, over module paths
  node:NAME  tensor:NAME  op:TYPE

""" + EXIT_CODES


class HardenGroup(click.Group):
    """A group with a default subcommand: a first argument that names no subcommand goes to ``run``.

    Only ``--help``/``-h`` and ``--version`` belong to the group itself; anything else (a model path,
    ``--demo``, ``-q``) starts a ``run`` command line.  A model file named like a subcommand is reached
    with ``harden run NAME`` or ``harden ./NAME``.
    """

    GROUP_OPTIONS = ("-h", "--help", "--version")

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in self.GROUP_OPTIONS:
            args = [DEFAULT_COMMAND, *args]
        elif not args and not ctx.resilient_parsing:  # bare `harden`: run's own "missing MODEL" message
            args = [DEFAULT_COMMAND]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_usage(ctx.command_path, "[run] MODEL [OPTIONS] | harden --demo | harden COMMAND [ARGS]...")

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The default command's options (what `harden MODEL ...` takes), then the subcommands."""
        run = self.commands[DEFAULT_COMMAND]
        run_ctx = click.Context(run, info_name=DEFAULT_COMMAND, parent=ctx)
        help_names = set(ctx.help_option_names)
        rows = [r for p in run.get_params(run_ctx) if isinstance(p, click.Option) and not help_names & set(p.opts)
                if (r := p.get_help_record(run_ctx))]
        rows += [r for p in self.get_params(ctx) if (r := p.get_help_record(ctx))]
        with formatter.section(f"Options of `{ctx.command_path} [run] MODEL` (also `{ctx.command_path} run --help`)"):
            formatter.write_dl(rows)
        self.format_commands(ctx, formatter)

    def shell_complete(self, ctx: click.Context, incomplete: str):
        from click.shell_completion import CompletionItem

        items = super().shell_complete(ctx, incomplete)
        if not incomplete.startswith("-"):  # the first word may also be a model path (default command)
            items.append(CompletionItem(incomplete, type="file"))
        return items


@click.group(cls=HardenGroup, epilog=GROUP_EPILOG, context_settings=CONTEXT)
@click.version_option(package_name="hardener")
def main():
    """Harden an image-restoration ONNX model against unauthorized distillation (ASVP), and inspect
    and compare ONNX models.

    `harden MODEL --layers SELECTOR ...` is `harden run MODEL ...`: after each selected feature layer X
    (N, C, H, W) it inserts a subgraph of standard ONNX ops that amplifies the top-k singular values of X
    by a factor h, X' = X + (h-1) Q Q^T X, then runs original and hardened models with ONNX Runtime,
    checks the fidelity budgets and writes a JSON report. `harden run --help` lists every option.
    """


def _guarded(fn, *args, **kwargs) -> int:
    """One clear line and the documented exit code for every failure, never a traceback."""
    try:
        return fn(*args, **kwargs)
    except HardenerError as exc:
        click.echo(f"error: {printable(str(exc), None)}", err=True)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - the contract is a message and exit 4, not a traceback
        click.echo(f"internal error: {type(exc).__name__}: {printable(str(exc), None)}", err=True)
        return 4


def _demo_paths() -> tuple[Path, Path, Path]:
    assets = Path(str(resources.files("hardener") / "assets"))
    return assets / "sr_x2.onnx", assets / "samples" / "lr", assets / "samples" / "hr"


MODEL_PATH = click.Path(dir_okay=False, path_type=Path)


# -- run (the default) -------------------------------------------------------------------------------------
@main.command("run", epilog=RUN_EPILOG, context_settings=CONTEXT,
              short_help="Harden a model (the default: `harden MODEL ...`).")
@click.argument("model", required=False, type=MODEL_PATH)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Hardened model to write (default: MODEL with suffix .hardened.onnx). Written atomically; "
                   "never the input.")
@click.option("-l", "--layers", "layers", multiple=True, metavar="SELECTOR",
              help="Feature layer(s) to harden, e.g. body.3.conv2, 're:body\\.\\d+\\.conv2', op:Conv "
                   "(`harden layers MODEL` suggests some).")
@click.option("--list-layers", is_flag=True, help="Print every 4D float feature map (module, node, op, tensor, "
              "shape, dtype, note) and the suggested layers, and exit; same as `harden layers MODEL`.")
@click.option("--mode", type=click.Choice(MODES), default="channel", show_default=True,
              help="channel: one C x HW matrix per sample; spatial: one H x W matrix per channel.")
@click.option("--placement", type=click.Choice(PLACEMENTS), default="inline", show_default=True,
              help="inline: perturb the forward path; tap: leave it intact and add the perturbed feature as "
                   "an extra output 'asvp/<layer>' (for feature-distilling consumers; needs --gain).")
@click.option("-k", "--rank", type=int, default=AsvpParams.rank, show_default=True,
              help="How many top singular values to amplify (k).")
@click.option("-g", "--gain", type=float, default=None,
              help="Fixed amplification factor h of those singular values (1 = identity). Default: calibrated "
                   "to --target-psnr-drop / --target-psnr. On the bundled teacher h=1.3 at 4 layers costs "
                   "about 0.09 dB against ground truth (PSNR of the mean MSE, bundled photos), h=2 about 1.7 dB; other networks differ widely.")
@click.option("--target-psnr-drop", type=float, default=None, metavar="DB",
              help="Calibrate h (by bisection) so that the PSNR of the output against ground truth drops by "
                   "DB dB +-10 % (needs --truth or truth:<output> arrays). Default target when truth is given.")
@click.option("--target-psnr", type=float, default=None, metavar="DB",
              help="Without ground truth: calibrate h so that the PSNR of hardened vs original outputs is DB "
                   "(+-0.1 dB). Not together with --gain.")
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
                   "an image folder. Default: real photographs bundled with scikit-image, sized to the model.")
@click.option("--synthetic", is_flag=True,
              help="Validate (and calibrate) on seeded uniform noise instead of the default real photographs "
                   "(noise can fail a model that passes on photos, and pass one that fails).")
@click.option("--truth", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of ground-truth images (same file names as --inputs images).")
@click.option("--num-samples", type=click.IntRange(min=1), default=None, help="Use at most this many inputs "
              "(default: all of --inputs; 4 photos or noise images otherwise).")
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
@click.option("--layer-rtol", type=float, default=LAYER_RTOL, show_default=True,
              help="Per inserted layer, on probe inputs: the perturbation energy ||X'-X|| must be within this "
                   "fraction of what the float64 SVD reference amplifies (and the map itself, where the spectrum "
                   "is gapped); a layer off by more, or left unchanged, fails the run.")
@click.option("--no-budgets", is_flag=True, help="Report metrics but enforce no PSNR budget.")
@click.option("--validate/--no-validate", default=True, show_default=True,
              help="Run original and hardened models and compare (checker and a CPU session always run; "
                   "without --gain, calibration still runs the models).")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON report path (default: OUTPUT.report.json).")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("--no-manifest", is_flag=True, help="Write no hardener manifest into the file and give every "
              "node and tensor the rewrite adds an opaque name (the report still records everything): the "
              "subgraphs can then be found only by their structure.")
@click.option("--keep-paths", is_flag=True, help="Keep absolute file paths found in exporter metadata "
              "(scrubbed to base names by default).")
@click.option("--demo", is_flag=True, help="Harden the bundled x2 super-resolution teacher on the bundled "
              "real photos (layers body.*.conv2), write ./sr_x2.hardened.onnx (replaced on rerun) and print the "
              "validation summary.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar; print only the last summary line.")
def run_command(**kw):
    """Harden MODEL: insert ASVP after the selected layers, validate, write the model and a JSON report.

    After each selected feature layer X (N, C, H, W), insert a subgraph of standard ONNX ops that
    amplifies the top-k singular values of X by a factor h: X' = X + (h-1) Q Q^T X, with Q the top-k
    singular subspace found by subspace iteration. Then run original and hardened models with ONNX
    Runtime on validation inputs, check the fidelity budgets and write a JSON report.
    """
    return _guarded(_run, **kw)


def _run(model, output, layers, list_layers, mode, placement, rank, gain, target_psnr_drop, target_psnr,
         iterations, squarings, precision, adaptive_energy, seed, inputs, synthetic, truth, num_samples,
         providers, tf32, min_psnr, max_psnr_drop, atol, rtol, data_range, crop_border, layer_rtol, no_budgets, validate,
         report, force, no_manifest, keep_paths, demo, quiet) -> int:
    if demo:
        if model is not None:
            raise UsageError("--demo uses the bundled model; give no MODEL")
        model, lr, hr = _demo_paths()
        layers = layers or DEMO_LAYERS
        inputs, truth = inputs or str(lr), truth or hr
        output = output or Path("sr_x2.hardened.onnx")
        crop_border = crop_border or 2
        force = True
    if model is None:
        raise UsageError("missing MODEL (or use --demo); see harden --help")
    if list_layers:
        return _layers(model, as_json=False)
    if not layers:
        raise UsageError("no --layers given; run `harden layers MODEL` to see candidates and suggestions")
    if gain is not None and (target_psnr_drop is not None or target_psnr is not None):
        raise UsageError("--gain fixes h; --target-psnr-drop / --target-psnr calibrate it: give one or the other")
    if synthetic and inputs is not None:
        raise UsageError("--synthetic replaces the default photos; it cannot be combined with --inputs")

    from .api import HardenConfig, harden
    from .calibrate import Calibration
    from .runtime import import_onnxruntime
    from .validate import Budgets

    import_onnxruntime()  # before anything is written: every run opens at least a CPU session
    calibration = None
    if gain is None:
        calibration = Calibration(target_psnr_drop=target_psnr_drop, target_psnr=target_psnr)
        calibration.check()
    if demo and not quiet:
        click.echo(f"demo: harden {model} --layers {' --layers '.join(layers)} --inputs {inputs} "
                   f"--truth {truth} --crop-border {crop_border} -o {output}", err=True)
    output = output or model.with_name(model.stem + ".hardened.onnx")
    params = AsvpParams(rank=rank, mode=mode, iterations=iterations, squarings=squarings, precision=precision,
                        adaptive_energy=adaptive_energy, seed=seed,
                        **({"gain": gain} if gain is not None else {}))
    budgets = Budgets(min_psnr=None if no_budgets else min_psnr,
                      max_psnr_drop=None if no_budgets else max_psnr_drop,
                      atol=atol, rtol=rtol, data_range=data_range, crop_border=crop_border, layer_rtol=layer_rtol)
    config = HardenConfig(layers=list(layers), params=params, placement=placement, validate=validate,
                          budgets=budgets, providers=providers.split(",") if providers else None, tf32=tf32,
                          scrub_paths=not keep_paths, force=force, inputs=inputs,
                          truth=str(truth) if truth else None, num_samples=num_samples,
                          synthetic=synthetic, calibration=calibration, manifest=not no_manifest)
    result = harden(model, output, config, report_path=report, progress=not quiet and sys.stderr.isatty())
    click.echo(result.summary.splitlines()[-1] if quiet else result.summary)
    return result.report["exit_code"]


# -- layers ------------------------------------------------------------------------------------------------
LAYERS_EPILOG = """\b
Examples:
  harden layers model.onnx                 # table: module, node, op, tensor, shape, dtype, note
  harden layers model.onnx --json | jq -r '.suggested[]'
  harden model.onnx $(harden layers model.onnx --json | jq -r '.suggested[] | "--layers " + .') -o out.onnx

\b
Notes: "graph input" / "graph output" mark the model's interface; "suggested" marks the layers worth
hardening by this heuristic: the output of a Conv (or ConvTranspose) inside the network body, that is
neither the first nor the last convolution (those map to and from image space), neither a graph input nor
a graph output, and not fed straight into an activation (Relu, LeakyRelu, PRelu, Sigmoid, ...), whose
nonlinearity multiplies the effect of a perturbation (h = 1.3 before a LeakyReLU cost one network 11 dB).
In a residual network that picks each block's last convolution, just before the skip addition. If no
convolution passes the activation test, every body convolution is suggested. It is a starting point: the
calibrated gain and the validation decide.

""" + EXIT_CODES


@main.command("layers", epilog=LAYERS_EPILOG, context_settings=CONTEXT,
              short_help="List the feature maps that can be hardened; suggest some.")
@click.argument("model", type=MODEL_PATH)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of the table.")
def layers_command(model, as_json):
    """List MODEL's feature maps (4D float tensors) that can be hardened, and suggest which."""
    return _guarded(_layers, model, as_json)


def _layers(model: Path, as_json: bool) -> int:
    from .inspection import layers_text, list_layers

    doc = list_layers(model)
    click.echo(json.dumps(doc, indent=2) if as_json else layers_text(doc))
    return 0


# -- inspect -----------------------------------------------------------------------------------------------
INSPECT_EPILOG = """\b
Examples:
  harden inspect model.hardened.onnx
  harden inspect model.hardened.onnx --size 512x512 --json
  harden inspect model.onnx                # an unhardened model says so

\b
It reads the manifest the hardener writes into the model's metadata (hardener.manifest) and finds the
inserted nodes by their name prefix (hardener/asvp_<i>); a manifest without its nodes, or nodes without
a manifest, is reported as such. Cost: multiply-adds of the model's Conv, ConvTranspose, MatMul and Gemm
nodes from ONNX shape inference, at the model's own input size, or with dynamic dimensions set to batch 1
and --size (default 256x256, stated in the output). Per insertion, estimated from the manifest: channel
mode, Gram matrix C*C*HW + update C*C*HW (dense form, C <= 32) or 2*k*C*HW (low-rank form), plus the small
C x C spectral part (squarings C^3, iterations C*C*k); spatial mode, the same per channel with H rows and
W columns (Gram H*H*W, update 2*k*H*W); plus C*HW where the subgraph ends in an identity depthwise 1x1
Conv (static C a multiple of 8, for ONNX Runtime's blocked CPU layout). The JSON also gives the
multiply-adds counted on the inserted nodes themselves. Elementwise ops are not counted (they are memory
traffic, not multiply-adds): measure latency with scripts/bench_overhead.py.

""" + EXIT_CODES


def _size(ctx, param, value):
    if value is None:
        return None
    text = value.lower().replace("*", "x")
    parts = text.split("x") if "x" in text else [text, text]
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise click.BadParameter(f"expected HxW or N (e.g. 256x256 or 512), got {value!r}") from None
    if h < 1 or w < 1 or len(parts) != 2:
        raise click.BadParameter(f"expected two positive sizes, got {value!r}")
    return h, w


@main.command("inspect", epilog=INSPECT_EPILOG, context_settings=CONTEXT,
              short_help="Is a model hardened: by what, where, at what cost.")
@click.argument("model", type=MODEL_PATH)
@click.option("--size", callback=_size, default="256x256", show_default=True, metavar="HxW",
              help="Height x width assumed for dynamic spatial input dimensions (batch: 1).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of the text.")
def inspect_command(model, size, as_json):
    """Is MODEL hardened, by what, where, and at what estimated cost."""
    return _guarded(_inspect, model, size, as_json)


def _inspect(model: Path, size: tuple[int, int], as_json: bool) -> int:
    from .inspection import inspect_model, inspect_text

    doc = inspect_model(model, size)
    click.echo(json.dumps(doc, indent=2) if as_json else inspect_text(doc))
    return 0


# -- compare -----------------------------------------------------------------------------------------------
COMPARE_EPILOG = """\b
Examples:
  harden compare model.onnx model.hardened.onnx                      # photos, atol=rtol=1e-5
  harden compare model.onnx model.hardened.onnx --inputs lr/ --min-psnr 40
  harden compare model.onnx model.fp16.onnx --inputs feeds.npz --atol 1e-3 --rtol 1e-3 --json
  harden compare a.onnx b.onnx --providers cuda --report compare.json

\b
A is the reference: relative differences are |B - A| / |A|. Per output it prints the absolute and
relative difference (max, where the worst element is: input number and index, mean, p99), the minimum
tolerance that would pass, and for image outputs (N, 1|3, H, W) the PSNR and SSIM of B against A (PSNR of
the mean squared error over all images; inf when identical, with the worst image). Budgets: --atol/--rtol
(every element |B - A| <= atol + rtol*|A|) and --min-psnr; without any of them, atol = rtol = 1e-5 (as
Polygraphy). NaN or inf where the other model has a finite value fails. The models must take the same
inputs (names, types, static sizes) and give the same outputs (or name common ones with --outputs);
otherwise exit 2.

""" + EXIT_CODES


@main.command("compare", epilog=COMPARE_EPILOG, context_settings=CONTEXT,
              short_help="Fidelity of model B against model A (Polygraphy-style, PSNR/SSIM).")
@click.argument("model_a", type=MODEL_PATH)
@click.argument("model_b", type=MODEL_PATH)
@click.option("--inputs", type=str, default=None, metavar="NPZ|DIR",
              help="Inputs: an .npz (arrays named after the model inputs, first axis = samples) or an image "
                   "folder. Default: the real photographs harden validates on.")
@click.option("--synthetic", is_flag=True, help="Seeded uniform noise instead of the default photographs.")
@click.option("--num-samples", type=click.IntRange(min=1), default=None, help="Use at most this many inputs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of synthetic inputs.")
@click.option("--outputs", "outputs", multiple=True, metavar="NAME",
              help="Compare only these outputs (repeat); default: all, which must be the same in A and B.")
@click.option("--atol", type=float, default=None, help="Budget: every |B - A| <= atol + rtol*|A|.")
@click.option("--rtol", type=float, default=None, help="Relative part of the atol/rtol budget.")
@click.option("--min-psnr", type=float, default=None, help="Budget: PSNR (dB) of B vs A on image outputs.")
@click.option("--data-range", type=float, default=1.0, show_default=True, help="Image value range for PSNR/SSIM.")
@click.option("--crop-border", type=int, default=0, show_default=True,
              help="Pixels cropped at each edge before PSNR/SSIM.")
@click.option("--providers", type=str, default=None, metavar="LIST",
              help="Execution providers, e.g. cuda,cpu or cpu (default: CUDA when available, else CPU).")
@click.option("--tf32/--no-tf32", default=False, show_default=True, help="Allow TF32 on CUDA (Ampere+).")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of the text.")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the JSON report to this file (atomically).")
@click.option("-q", "--quiet", is_flag=True, help="Print only the last line (PASSED | ... or FAILED | ...).")
def compare_command(**kw):
    """Compare MODEL_B against MODEL_A on the same inputs (exit 1 if a budget fails)."""
    return _guarded(_compare, **kw)


def _compare(model_a, model_b, inputs, synthetic, num_samples, seed, outputs, atol, rtol, min_psnr, data_range,
             crop_border, providers, tf32, as_json, report, quiet) -> int:
    from .compare import CompareConfig, compare_models, compare_text
    from .report import _clean, write_json

    if synthetic and inputs is not None:
        raise UsageError("--synthetic replaces the default photos; it cannot be combined with --inputs")
    config = CompareConfig(atol=atol, rtol=rtol, min_psnr=min_psnr, data_range=data_range,
                           crop_border=crop_border, providers=providers.split(",") if providers else None,
                           tf32=tf32, outputs=list(outputs) or None, inputs=inputs, synthetic=synthetic,
                           num_samples=num_samples, seed=seed)
    doc = compare_models(model_a, model_b, config)
    if report is not None:
        write_json(doc, report)
    if as_json:
        click.echo(json.dumps(_clean(doc), indent=2))
    else:
        text = compare_text(doc)
        click.echo(text.splitlines()[-1] if quiet else text)
    return doc["exit_code"]


# -- subcommands from other modules ------------------------------------------------------------------------
def _register_optional() -> None:
    """Commands that live elsewhere (provenance: keygen, mark, verify), when their module is present."""
    try:
        from . import provenance_cli
    except ImportError:  # not written yet, or a dependency of it missing: harden works without it
        return
    for command in getattr(provenance_cli, "COMMANDS", []):
        main.add_command(command)


_register_optional()


def entry() -> None:
    """Console-script entry: one clear message and the documented exit code, never a traceback."""
    try:
        code = main.main(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
