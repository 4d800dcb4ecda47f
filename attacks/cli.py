"""``attack``: run an attack suite and write its report."""
from __future__ import annotations

import os
import sys
from pathlib import Path

# Before torch loads: busy-waiting OpenMP threads slowed training steps up to 5x on a shared 2-core machine
# (measured while training the bundled teacher); passive waiting does not change results.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click  # noqa: E402

from .suite import Runner, Suite, summarize, write_report  # noqa: E402


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Distill students from hardened and original teachers and measure the protection."""


@main.command()
@click.argument("suite_file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--quick", is_flag=True, help="A CPU smoke profile that runs in minutes (not for conclusions).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("attack_results"),
              show_default=True, help="Results folder; finished runs there are reused (resumable).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def run(suite_file, quick, out, no_progress):
    """Run SUITE_FILE (TOML; default: the built-in sr2 suite) and write OUT/report.{json,md}.

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
    try:
        suite = Suite.load(suite_file) if suite_file else (Suite.quick() if quick else Suite())
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    runner = Runner(suite, out, progress=not no_progress and sys.stderr.isatty())
    results = runner.run_all()
    write_report(summarize(results), out, results)
    click.echo((out / "report.md").read_text())
