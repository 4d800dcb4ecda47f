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
        click.echo(f"attack: error: {type(exc).__name__}: {' '.join(str(exc).split())}", err=True)
        sys.exit(4)
    if foreign:
        click.echo(f"attack: note: {len(foreign)} run file(s) in {out / 'runs'} belong to other configurations "
                   "(another suite, or changed parameters or code) and are not in this report", err=True)
    click.echo((out / "report.md").read_text())
    if failed is not None:
        click.echo(f"attack: error: {' '.join(str(failed).split())}; the report covers the finished runs only",
                   err=True)
        sys.exit(4)
