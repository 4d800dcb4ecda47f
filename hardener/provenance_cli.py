"""Click commands `keygen`, `mark` and `verify` (provenance marks); registered in the `harden` group.

Each command prints one clear line and exits with the documented code on any error, never a traceback:
keygen/mark: 0 done, 2 usage error, 4 invalid model or internal error.  verify: 0 "derived", 1 "not
shown", 2 usage error (bad key file, mismatched models or probes), 4 invalid model or internal error.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from .errors import UsageError

_CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _guard(fn, *args, **kwargs):
    """Run ``fn`` under `harden`'s own guard (one message, the documented exit code); exit via click's ctx.exit."""
    from .cli import _guarded

    code = _guarded(fn, *args, **kwargs)
    if code:
        click.get_current_context().exit(code)  # click's Exit: CliRunner and `harden`'s entry both honour it
    return code


def _limit_threads() -> None:
    """The statistic is small matrix work: a few torch threads at most, never the whole machine."""
    import torch

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))


# ---------------------------------------------------------------------------------------------- keygen
@click.command("keygen", context_settings=_CTX)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Key file to write (JSON, permissions 0600).")
@click.option("--seed", type=int, default=None,
              help="Derive the key from this integer instead of the OS's random source: reproducible, and "
                   "therefore guessable. For tests only.")
@click.option("--force", is_flag=True, help="Replace an existing key file (the old key is lost).")
def keygen(output: Path, seed: int | None, force: bool):
    """Make a secret 256-bit provenance key.

    The file holds the secret and its key id (sha256 commitment); keep it private. Marked models record
    only the key id.
    """
    def run():
        from .provenance.key import generate_key, write_key

        key = generate_key(seed)
        write_key(key, output, force=force)
        click.echo(f"wrote {output} (0600), key id {key.key_id}" +
                   (" -- seeded key: reproducible and guessable, for tests only" if seed is not None else ""))
        return 0
    _guard(run)


# ------------------------------------------------------------------------------------------------ mark
@click.command("mark", context_settings=_CTX)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--key", "key_path", required=True, type=click.Path(path_type=Path), help="Key file from keygen.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Marked model to write.")
@click.option("--target-psnr-drop", type=float, default=None, metavar="DB",
              help="PSNR (dB) against ground truth the mark may cost; eps is found by bisection. Default "
                   "0.05 when ground truth is available.")
@click.option("--target-psnr", type=float, default=None, metavar="DB",
              help="Without ground truth: PSNR of marked vs original outputs (default 50 dB).")
@click.option("--inputs", type=str, default=None, metavar="DIR|NPZ",
              help="Calibration inputs. Default: the bundled real photos hardener/assets/samples/lr (with "
                   "truth .../hr when the model's output matches their size).")
@click.option("--truth", type=str, default=None, metavar="DIR", help="Ground truth for --inputs images.")
@click.option("--num-samples", type=click.IntRange(min=1), default=None, help="Use at most this many inputs.")
@click.option("--crop-border", type=click.IntRange(min=0), default=0, show_default=True,
              help="Pixels cropped at each edge for PSNR.")
@click.option("--report", type=click.Path(path_type=Path), default=None,
              help="JSON report (default OUTPUT.mark.json).")
@click.option("--force", is_flag=True, help="Replace existing output / report files.")
def mark(model, key_path, output, target_psnr_drop, target_psnr, inputs, truth, num_samples, crop_border, report,
         force):
    """Insert a keyed provenance mark at each image output of MODEL.

    y' = y + eps * (g_K(y) - mean g_K(y)), g_K a small conv net (3x3 conv, squared tanh, 1x1 conv) whose
    weights come from the key; standard ONNX operators, the model's opset. Students distilled from the
    marked model inherit it; `harden verify` tests for it. Works on hardened (ASVP) models too.
    """
    def run():
        from .provenance.key import load_key
        from .provenance.mark import mark_model, mark_summary

        _limit_threads()
        key = load_key(key_path)
        written = [output, report or output.with_name(output.name + ".mark.json")]
        if Path(key_path).resolve() in {p.resolve() for p in written}:
            raise UsageError(f"the output or report would overwrite the key file {key_path}")
        rep = mark_model(model, key, output, target_drop=target_psnr_drop, target_psnr=target_psnr,
                         inputs=inputs, truth=truth, crop_border=crop_border, num_samples=num_samples,
                         force=force, report_path=report)
        click.echo(mark_summary(rep))
        return 0
    _guard(run)


# ---------------------------------------------------------------------------------------------- verify
@click.command("verify", context_settings=_CTX)
@click.argument("suspect", required=False, type=click.Path(path_type=Path))
@click.option("--key", "key_path", type=click.Path(path_type=Path), help="Key file from keygen.")
@click.option("--original", type=click.Path(path_type=Path), help="The UNMARKED original model (.onnx).")
@click.option("--probes", "probes_dir", type=click.Path(path_type=Path), default=None,
              help="Folder of probe input images (default: 16 built-in real photos; see --write-probes).")
@click.option("--num-probes", type=click.IntRange(min=1), default=None, help="Use only the first N probes.")
@click.option("--write-probes", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Write the probe inputs as PNGs to DIR (to send to a model behind a service) and exit. "
                   "Save its answers as DIR2/<probe>.png or .npy and pass DIR2 as SUSPECT.")
@click.option("--null-keys", type=click.IntRange(min=20), default=256, show_default=True,
              help="Public null keys the true key is compared with (empirical p floors at 1/(N+1)).")
@click.option("--alpha", type=float, default=1e-6, show_default=True,
              help="'derived' needs a Gaussian-tail p below this and no null key scoring as high.")
@click.option("--resize", is_flag=True, help="Resample suspect outputs whose size differs from the original's "
              "(bicubic); without it a size mismatch is an error.")
@click.option("--report", type=click.Path(path_type=Path), default=None, help="Write the JSON report here.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of the summary.")
@click.option("--force", is_flag=True, help="With --write-probes or --report: replace existing files.")
def verify(suspect, key_path, original, probes_dir, num_probes, write_probes, null_keys, alpha, resize, report,
           as_json, force):
    """Test whether SUSPECT carries KEY's mark: a model (.onnx) or a folder of its outputs on the probes.

    Prints z against public null keys, an empirical and a Gaussian-tail p-value, the effect size and a
    verdict. Exit 0: derived; 1: not shown; 2: usage error.
    """
    def run():
        from .model_io import atomic_write
        from .provenance.key import load_key
        from .provenance.probes import default_probes, probe_folder, write_probes as write
        from .provenance.verify import verify as run_verify, verify_summary

        _limit_threads()
        if write_probes is not None:
            if suspect is not None or key_path or original:
                raise UsageError("--write-probes writes probe inputs and exits; give no SUSPECT, --key or --original")
            probes = probe_folder(probes_dir, num_probes) if probes_dir else default_probes(num_probes)
            paths = write(write_probes, probes, force=force)
            click.echo(f"wrote {len(paths)} probe inputs to {write_probes}: {', '.join(p.name for p in paths)}")
            return 0
        if suspect is None or key_path is None or original is None:
            raise UsageError("verify needs SUSPECT, --key KEY.json and --original ORIGINAL.onnx "
                             "(or --write-probes DIR)")
        if report is not None:
            if report.exists() and not force:
                raise UsageError(f"{report} exists; pass --force to replace it")
            if not report.parent.is_dir():
                raise UsageError(f"folder {report.parent} for the report does not exist")
            if report.resolve() in {Path(suspect).resolve(), Path(original).resolve(), Path(key_path).resolve()}:
                raise UsageError(f"the report {report} would overwrite an input")
        key = load_key(key_path)
        rep = run_verify(Path(suspect), key, Path(original), probes_dir=probes_dir, num_probes=num_probes,
                         null_keys=null_keys, alpha=alpha, resize=resize)
        text = json.dumps(rep, indent=2, sort_keys=True) + "\n"
        if report is not None:
            atomic_write(text.encode(), None, report)
        click.echo(text if as_json else verify_summary(rep), nl=not as_json)
        return rep["exit_code"]
    _guard(run)


COMMANDS = [keygen, mark, verify]
