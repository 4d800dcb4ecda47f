"""``attack``: run an attack suite and write its report."""
from __future__ import annotations

import os
import sys
from dataclasses import fields
from pathlib import Path

# Before torch loads: busy-waiting OpenMP threads slowed training steps up to 5x on a shared 2-core machine
# (measured while training the bundled teacher); passive waiting does not change results.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click  # noqa: E402

from .suite import SUITES, Runner, Suite, packaged_suites, summarize, write_report  # noqa: E402

EXAMPLE = """\
\b
Example suite file:
  tasks = ["sr2"]
  attackers = ["naive", "charbonnier", "lowpass", "strip", "ground_truth"]
  students = ["tiny", "edsr"]
  seeds = [0, 1]
  steps = 600
  [[defences]]
  name = "none"
  [[defences]]
  name = "asvp-k4-h1.3"
  layers = ["body.*.conv2"]
  rank = 4
  gain = 1.3
"""


def _fail(exc: Exception, code: int = 4):
    """One line naming the error, then exit ``code`` (never a traceback)."""
    click.echo(f"attack: error: {type(exc).__name__}: {' '.join(str(exc).split())}", err=True)
    sys.exit(code)


def _run_help() -> str:
    """``attack run --help``, generated from the registries and the suite schema (never hand-kept)."""
    from .degrade import TASKS
    from .distill import ATTACKERS, Attacker
    from .schema import defence_keys, suite_keys
    from .students import SPANDREL_STUDENTS, STUDENTS

    def attacker_text(a: Attacker) -> str:
        changed = [f"{f.name}={getattr(a, f.name)}" for f in fields(Attacker)
                   if f.name != "name" and getattr(a, f.name) != f.default]
        return a.name + (f" ({', '.join(changed)})" if changed else " (L1 on the teacher's answers)")

    lines = ["Run SUITE (a TOML file, or the name of a packaged suite; default: the built-in sr2 suite) and "
             "write OUT/report.{json,md}.", "",
             "Runs and hardened teachers are keyed on a digest of everything that determines them (teacher "
             "file, defence, hardener code, suite settings, attacker, student, seed); a finished run is reused "
             "only if its stored configuration is the one asked for. The suite is validated completely "
             "(types, ranges, names, layer selectors against each teacher) before any run starts.", "",
             EXAMPLE,
             "\b", "Packaged suites: " + (", ".join(packaged_suites()) or "-"),
             "", "\b", "Tasks:"]
    lines += [f"  {name}  (scale {t.scale})" for name, t in TASKS.items()]
    lines += ["", "\b", "Attackers:"] + [f"  {attacker_text(a)}" for a in ATTACKERS.values()]
    lines += ["", "\b", "Students:"] + [f"  {name}  ({c} channels, {b} blocks)" for name, (c, b) in STUDENTS.items()]
    lines += [f"  {name}  (needs the spandrel extra)" for name in SPANDREL_STUDENTS]
    lines += ["", "\b", "Suite keys:"] + [f"  {k}: {v}" for k, v in suite_keys().items()]
    lines += ["", "\b", "[[defences]] keys:"] + [f"  {k}: {v}" for k, v in defence_keys().items()]
    return "\n".join(lines)


def resolve_suite(arg: str) -> Path:
    """A suite file path, or a packaged suite's name (``tasks_all`` or ``tasks_all.toml``)."""
    path = Path(arg)
    if path.is_file():
        return path
    if path.exists():
        raise click.UsageError(f"suite {arg!r} is a folder, not a TOML file")
    name = arg.removesuffix(".toml")
    if "/" not in arg and os.sep not in arg and name in packaged_suites():
        return SUITES / f"{name}.toml"
    raise click.UsageError(f"suite {arg!r}: no such file, and not a packaged suite "
                           f"(packaged: {', '.join(packaged_suites()) or 'none'})")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Distill students from hardened and original teachers and measure the protection."""


@main.command(help=_run_help())
@click.argument("suite_file", metavar="[SUITE]", required=False)
@click.option("--quick", is_flag=True, help="A CPU smoke profile that runs in minutes (not for conclusions).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("attack_results"),
              show_default=True, help="Results folder; finished runs there are reused (resumable).")
@click.option("--no-progress", is_flag=True,
              help="No progress display (by default: live on a terminal, one line per run otherwise).")
@click.option("--executor", type=click.Choice(["local", "dask", "serial"]), default="local", show_default=True,
              help="Where runs execute: a local process pool (1 worker = in this process), Dask distributed, "
                   "or serial in this process.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes (local pool, or the Dask LocalCluster started when --scheduler is not "
                   "given) [default: 1, or one per --gpus id].")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch and ONNX Runtime threads per worker [default: cores / workers; 1 on a remote "
                   "scheduler]. workers x threads may not exceed the cores.")
@click.option("--scheduler", metavar="ADDRESS", default=None,
              help="An existing Dask scheduler, e.g. tcp://HOST:8786 (implies --executor dask).")
@click.option("--gpus", metavar="IDS", default=None,
              help="Local pool: comma-separated GPU ids, one worker per GPU (CUDA_VISIBLE_DEVICES per worker).")
def run(suite_file, quick, out, no_progress, executor, workers, threads, scheduler, gpus):
    from hardener.errors import HardenerError

    from .executors import RunsFailed, make_executor

    try:
        if suite_file:
            suite = Suite.load(resolve_suite(suite_file))
        else:
            suite = Suite.quick() if quick else Suite()
            suite.check("built-in suite")
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if scheduler:
        executor = "dask"
    gpu_ids = [g.strip() for g in gpus.split(",") if g.strip()] if gpus else None
    workers = workers or (len(gpu_ids) if gpu_ids else 1)  # by default one worker per GPU
    try:
        pool = make_executor(executor, workers=workers, threads=threads, scheduler=scheduler, gpus=gpu_ids)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except ImportError as exc:
        click.echo(f"attack: error: {exc}", err=True)
        sys.exit(3)
    failed = None
    try:
        runner = Runner(suite, out, progress=not no_progress, check=False)
        try:
            results = runner.run_all(executor=pool)
        except RunsFailed as exc:
            failed, results = exc, runner.collect()
        foreign = runner.foreign_runs()
        write_report(summarize(results), out, results)
    except KeyboardInterrupt:
        click.echo(f"attack: interrupted; finished runs are kept in {out / 'runs'}", err=True)
        sys.exit(130)
    except HardenerError as exc:
        click.echo(f"attack: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except (OSError, RuntimeError, ValueError, ImportError) as exc:
        _fail(exc)
    if foreign:
        click.echo(f"attack: note: {len(foreign)} run file(s) in {out / 'runs'} belong to other configurations "
                   "(another suite, or changed parameters or code) and are not in this report", err=True)
    click.echo((out / "report.md").read_text())
    if failed is not None:
        click.echo(f"attack: error: {' '.join(str(failed).split())}; the report covers the finished runs only",
                   err=True)
        sys.exit(4)


REPORT_HELP = """\
Write OUT/report.{json,md} again from the run files in OUT/runs, as they were recorded: nothing is rerun,
whatever code or suite made them (each run file keeps its own configuration and code version).  Use it
after the report's code changes, or for a folder whose suite is gone.  Every run file in OUT/runs is
reported, so the folder must hold one run per cell (task, defence, attacker, student, seed): two runs of a
cell (say, made by two code versions) are an error naming both.  The pictures are drawn again only where
the runs' images are still in OUT/images.

\b
Example:
  attack report attacks/results/cpu-2026-12-02/provenance_tasks_edsr

Exit codes: 0 written; 2 no run files, a file that is not a run, or two runs of a cell; 4 the report
could not be written.
"""


ADVERSARIAL_HELP = """\
White-box PSNR attack on MODEL: how far can a small input perturbation drag its output away from the clean
image?  MODEL is an ONNX file or an entry name: a task's bundled teacher (sr2, sr4, denoise, lowlight,
underwater, dehaze, derain) or a bundled codec (codec_q1, codec_q2).  A file hardened from a bundled model
(recognised by its hardening manifest) is attacked as deployed, ASVP included.

\b
How: a differentiable PyTorch twin of the file (weights read from the ONNX initializers, or the codec's
PyTorch original; ASVP as forward hooks replicating the file's subspace iteration) is checked against
ONNX Runtime and refused if it differs by more than --tol.  Through it:
  pgd  L_inf PGD, random start, step eps/4, --steps sign steps, for each --eps;
  mse  Chen & Ma's MSE-bounded attack: Adam on the perturbation, projected onto mean(delta^2) <= --budget.
Both maximise MSE(model(x'), clean image); the clean image is the ground truth (restoration) or the input
itself (codec).  Adversarial images are rounded to 8 bits and replayed through ONNX Runtime: every number
printed comes from the deployed file.

\b
Images: the held-out photos (attacks.data test split), centre crop --size (HR side), inputs 8-bit.
Reported per attack: attacked PSNR (mean ± sd over seeds), the PSNR drop with a 95 % bootstrap interval
over seeds and images, the vulnerability index VI = 10 log10(MSE(f(x'), f(x)) / MSE(x', x)) (dB; > 0: the
model amplifies the perturbation), the perturbation's L_inf and MSE, and, for a codec, the attacked bpp.

\b
Examples:
  attack adversarial denoise --seed 0,1,2 --json denoise_adv.json
  attack adversarial teacher.hardened.onnx --eps 4 --variant pgd
  attack adversarial codec_q1 --size 256 --variant mse --budget 1e-3
"""


def _csv(text: str, cast, what: str) -> list:
    try:
        values = [cast(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.UsageError(f"{what}: expected comma-separated values, got {text!r}") from None
    if not values:
        raise click.UsageError(f"{what}: empty")
    return values


@main.command(help=REPORT_HELP)
@click.argument("out", type=click.Path(file_okay=False, exists=True, path_type=Path))
def report(out):
    from .report import recorded_runs

    try:
        results = recorded_runs(out)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    pictures = all((out / r[k]).is_file() for r in results for k in ("image", "input_image", "truth_image")
                   if r.get(k))
    try:
        write_report(summarize(results), out, results if pictures else None)
    except OSError as exc:
        _fail(exc)
    click.echo((out / "report.md").read_text())
    if not pictures:
        click.echo(f"attack: note: images of these runs are not in {out / 'images'}: no pictures drawn", err=True)


@main.command(help=ADVERSARIAL_HELP)
@click.argument("model", metavar="MODEL")
@click.option("--task", default=None, help="Degradation to evaluate on (a task of attacks.degrade, or 'codec'); "
              "inferred for bundled models and files hardened from them.")
@click.option("--eps", "eps_text", default="2,4,8", show_default=True,
              help="L_inf radii of the pgd attack, in 1/255 units, comma-separated.")
@click.option("--steps", type=click.IntRange(min=0, max=10_000), default=20, show_default=True,
              help="Attack iterations (gradient steps).")
@click.option("--variant", "variant_text", default="pgd,mse", show_default=True,
              help="pgd, mse, or both (comma-separated).")
@click.option("--budget", type=click.FloatRange(min=0, min_open=True, max=1), default=1e-3, show_default=True,
              help="Input MSE budget of the mse variant ([0, 1] images).")
@click.option("--images", "images_text", default=None,
              help="Held-out photos to attack, comma-separated [default: all of the test split].")
@click.option("--size", type=click.IntRange(min=16, max=512), default=128, show_default=True,
              help="Centre crop of each photo (HR / clean side; a multiple of 64 for the codec).")
@click.option("--seed", "seed_text", default="0", show_default=True,
              help="Random-start seed(s), comma-separated; 3 or more for numbers you publish.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the full report (per image and seed) as JSON here.")
@click.option("--tol", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Largest max-abs difference twin vs ONNX Runtime accepted [default: 1e-4; 1e-3 for a codec].")
@click.option("--twin-asvp", type=click.Choice(["iteration", "svd"]), default="iteration", show_default=True,
              help="ASVP in the twin: the file's subspace iteration, or the exact SVD (its parity may fail "
                   "where singular values nearly coincide).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch threads.")
def adversarial(model, task, eps_text, steps, variant_text, budget, images_text, size, seed_text, json_out, tol,
                twin_asvp, threads):
    eps = _csv(eps_text, float, "--eps")
    if any(e <= 0 or e > 255 for e in eps):
        raise click.UsageError("--eps: values must be in (0, 255] (units of 1/255)")
    variants = _csv(variant_text, str, "--variant")
    bad = [v for v in variants if v not in ("pgd", "mse")]
    if bad:
        raise click.UsageError(f"--variant: unknown {', '.join(bad)} (choose pgd, mse or pgd,mse)")
    seeds = _csv(seed_text, int, "--seed")
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise click.UsageError("--seed: non-negative, distinct integers")
    names = _csv(images_text, str, "--images") if images_text else None
    try:
        import torch

        torch.set_num_threads(threads)
        from .adversarial.models import TargetError, eval_images, resolve
        from .adversarial.report import attack_configs, run_attacks, summary_text
        from .adversarial.twin import ParityError, TwinError

        try:
            target = resolve(model, task, tol=tol, how=twin_asvp)
            if target.task == "codec" and size % 64:
                raise TargetError(f"--size {size}: the codec needs a multiple of 64")
            names, x8, y = eval_images(target.task, size, names)
        except (TargetError, TwinError) as exc:
            if isinstance(exc, ParityError):
                raise
            raise click.UsageError(" ".join(str(exc).split())) from None

        def progress(spec, metrics):
            click.echo(f"  {spec.label} seed {spec.seed}: attacked PSNR {metrics['mean_psnr_adv']:.2f} dB "
                       f"({metrics['seconds']:.1f} s)", err=True)

        report = run_attacks(target, names, x8, y, attack_configs(eps, variants, budget), steps, seeds, progress)
    except click.UsageError:
        raise
    except KeyboardInterrupt:
        click.echo("attack: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback
        name = "error" if type(exc).__name__ == "ParityError" else f"error: {type(exc).__name__}"
        click.echo(f"attack: {name}: {' '.join(str(exc).split())}", err=True)
        sys.exit(4)
    click.echo(summary_text(report))
    if json_out:
        import json

        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=1))
        click.echo(f"\nreport: {json_out}")
