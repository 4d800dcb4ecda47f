"""The `harden` command as a user meets it: the group and its default command, --demo, --help, exit codes."""
from __future__ import annotations

import json
import sys

import onnx
import pytest

from hardener.cli import main
from hardener.model_io import sha256_file
from hardener.rewrite import read_manifest

from conftest import TEACHER, invoke, run_cli




def test_demo_quiet_hardens_the_bundled_teacher_on_real_photos(tmp_path):
    proc = run_cli("-q", "--demo", cwd=tmp_path)  # a group option-looking first word still reaches `run`
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("PASSED | 4 layer(s) hardened"), proc.stdout
    assert "demo:" not in proc.stderr  # -q: no echo of the equivalent command line
    report = json.loads((tmp_path / "sr_x2.hardened.onnx.report.json").read_text())
    sr = report["validation"]["outputs"]["sr"]
    assert report["validation"]["samples"] == 4  # the four bundled held-out photos
    assert sr["psnr_original_vs_truth"] > 30  # a real SR teacher on real photos, not noise
    assert 0 < sr["psnr_drop_vs_truth"] <= 0.5  # the hardening costs something, within budget
    assert report["calibration"] is not None  # no --gain: the gain was calibrated
    gapped = [layer["reference_rel_error_gap_le_0.8"] for layer in report["validation"]["layers"]]
    assert any(e is not None for e in gapped)  # agreement with the float64 SVD where it is well posed
    assert all(e <= 1e-4 for e in gapped if e is not None), gapped
    manifest = read_manifest(onnx.load(str(tmp_path / "sr_x2.hardened.onnx")))
    assert [l["module"] for l in manifest["layers"]] == [f"body.{i}.conv2" for i in range(4)]


def test_list_layers_on_both_exporters(dynamo_model, torchscript_model):
    for path in (dynamo_model, torchscript_model, TEACHER):
        proc = run_cli(path, "--list-layers")
        assert proc.returncode == 0, proc.stderr
        rows = [line.split() for line in proc.stdout.splitlines()]
        assert rows[0][:4] == ["module", "node", "op", "tensor"]
        modules = {row[0] for row in rows[1:-1]}
        assert {"head", "body.1.conv2", "body.1", "tail"} <= modules
        conv = next(row for row in rows if row[0] == "body.1.conv2")
        assert conv[2] == "Conv" and len(conv[4].split("x")) == 4 and conv[5] == "float32"


def test_help_teaches_every_option_with_examples():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for option in ("--layers", "--list-layers", "--mode", "--placement", "--rank", "--gain", "--iterations",
                   "--adaptive-energy", "--seed", "--inputs", "--truth", "--providers", "--min-psnr",
                   "--max-psnr-drop", "--atol", "--rtol", "--report", "--force", "--demo", "--precision", "--squarings",
                   "--synthetic", "--target-psnr-drop", "--target-psnr", "--version"):
        assert option in proc.stdout, option
    assert "Examples:" in proc.stdout and "Exit codes:" in proc.stdout and "re:" in proc.stdout
    for command in ("run", "layers", "inspect", "compare"):  # the subcommands are listed
        assert f"\n  {command} " in proc.stdout, command
    assert "_HARDEN_COMPLETE=bash_source harden" in proc.stdout


@pytest.mark.parametrize("command", ["run", "layers", "inspect", "compare"])
def test_each_subcommand_help_has_examples(capsys, monkeypatch, command):
    code, out, _ = invoke(capsys, monkeypatch, command, "--help")
    assert code == 0
    assert "Examples:" in out and "Exit codes:" in out
    assert f"harden {command}" in out or command == "run"
    if command == "run":
        assert "Layer selectors" in out and "--target-psnr-drop" in out


def test_old_and_explicit_invocations_are_the_same_command(capsys, monkeypatch, tmp_path):
    old, new = tmp_path / "old.onnx", tmp_path / "new.onnx"
    args = ["--layers", "body.0.conv2", "--gain", "1.3", "--no-validate"]
    code, out, err = invoke(capsys, monkeypatch, TEACHER, *args, "-o", old)
    assert code == 0, err
    assert "4 layer" not in out and "1 layer(s) hardened" in out.splitlines()[-1]
    code, _, err = invoke(capsys, monkeypatch, "run", TEACHER, *args, "-o", new)
    assert code == 0, err
    assert sha256_file(old) == sha256_file(new)  # same command, same seed: same bytes
    manifest = read_manifest(onnx.load(str(old)))
    assert manifest["params"]["gain"] == 1.3 and [l["module"] for l in manifest["layers"]] == ["body.0.conv2"]


def test_usage_errors_exit_2_and_write_nothing(capsys, monkeypatch, tmp_path):
    out_file = tmp_path / "x.onnx"
    cases = [
        ([], "missing MODEL"),
        ([TEACHER, "--layers", "body.0.conv2", "--gain", "1.3", "--target-psnr-drop", "0.2", "-o", out_file],
         "--gain fixes h"),
        ([TEACHER, "--layers", "body.0.conv2", "--gain", "1.3", "--target-psnr", "40", "-o", out_file],
         "--gain fixes h"),
        ([TEACHER, "--layers", "body.0.conv2", "--synthetic", "--inputs", str(tmp_path), "-o", out_file],
         "--synthetic"),
        ([TEACHER, "--layers", "body.0.conv2", "--target-psnr", "-3", "-o", out_file], "target-psnr"),
        ([TEACHER, "-o", out_file], "no --layers"),
        (["--bogus-option"], "No such option"),
        ([TEACHER, "--layers", "body.9.conv2", "--gain", "1.3", "-o", out_file], "matched nothing"),
    ]
    for args, message in cases:
        code, out, err = invoke(capsys, monkeypatch, *args)
        assert code == 2, (args, out, err)
        assert message in err, (args, err)
        assert "Traceback" not in err
        assert not out_file.exists() and not list(tmp_path.iterdir())


def test_version_and_group_options(capsys, monkeypatch):
    code, out, _ = invoke(capsys, monkeypatch, "--version")
    assert code == 0 and "0.1.0" in out


def test_missing_onnxruntime_is_one_line_exit_3(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    out_file = tmp_path / "x.onnx"
    for args in ([TEACHER, "--layers", "body.0.conv2", "--gain", "1.3", "--no-validate", "-o", out_file],
                 ["--demo"],
                 ["compare", TEACHER, TEACHER]):
        monkeypatch.chdir(tmp_path)
        code, out, err = invoke(capsys, monkeypatch, *args)
        assert code == 3, (args, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "ONNX Runtime is not installed" in lines[0], err
        assert "hardener[cpu]" in lines[0] and "hardener[gpu]" in lines[0]
        assert not list(tmp_path.iterdir())  # refused: nothing written
    code, out, err = invoke(capsys, monkeypatch, "layers", TEACHER)  # reading a model needs no runtime
    assert code == 0 and "suggested" in out, err


def test_shell_completion(capsys, monkeypatch):
    monkeypatch.setenv("_HARDEN_COMPLETE", "bash_source")
    with pytest.raises(SystemExit) as exc:
        main.main(args=[], prog_name="harden", complete_var="_HARDEN_COMPLETE")
    assert exc.value.code == 0
    assert "_harden_completion" in capsys.readouterr().out
    monkeypatch.setenv("_HARDEN_COMPLETE", "bash_complete")
    monkeypatch.setenv("COMP_WORDS", "harden ins")
    monkeypatch.setenv("COMP_CWORD", "1")
    with pytest.raises(SystemExit):
        main.main(args=[], prog_name="harden", complete_var="_HARDEN_COMPLETE")
    assert "plain,inspect" in capsys.readouterr().out.splitlines()
    monkeypatch.setenv("COMP_WORDS", "harden model.onnx --pla")  # options of the default command
    monkeypatch.setenv("COMP_CWORD", "2")
    with pytest.raises(SystemExit):
        main.main(args=[], prog_name="harden", complete_var="_HARDEN_COMPLETE")
    assert "plain,--placement" in capsys.readouterr().out.splitlines()


def test_commands_of_other_modules_are_registered_when_present(capsys, monkeypatch):
    import types

    import click

    from hardener import cli

    @click.command("verify")
    def verify():
        """Stand-in provenance command."""
        click.echo("verified")
        return 0

    import hardener

    fake = types.ModuleType("hardener.provenance_cli")
    fake.COMMANDS = [verify]
    monkeypatch.setitem(sys.modules, "hardener.provenance_cli", fake)
    monkeypatch.setattr(hardener, "provenance_cli", fake, raising=False)
    monkeypatch.setattr(cli.main, "commands", {n: c for n, c in cli.main.commands.items()
                                               if n in ("run", "layers", "inspect", "compare")})
    cli._register_optional()
    code, out, _ = invoke(capsys, monkeypatch, "verify")
    assert code == 0 and out == "verified\n"  # a subcommand now, no longer a model path for `run`
    # the module absent (or failing to import): skipped, and the name is a model path for `run` again
    monkeypatch.setitem(sys.modules, "hardener.provenance_cli", None)
    monkeypatch.delattr(hardener, "provenance_cli")
    monkeypatch.setattr(cli.main, "commands", {n: c for n, c in cli.main.commands.items() if n != "verify"})
    cli._register_optional()
    code, _, err = invoke(capsys, monkeypatch, "verify", "--layers", "x")
    assert code == 2 and "model file not found: verify" in err
