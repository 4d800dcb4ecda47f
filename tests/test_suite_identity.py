"""A run is what its file says it is: content-keyed runs and teachers, complete suite validation, help, suites
by name."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

import onnx
import pytest
from click.testing import CliRunner

from attacks import identity
from attacks.cli import _run_help, main, resolve_suite
from attacks.schema import SuiteError
from attacks.suite import Defence, Runner, Suite, packaged_suites, summarize, write_report

from conftest import TEACHER

TINY = dict(tasks=["sr2"], attackers=["naive"], students=["tiny"], seeds=[0], queries=12, patch=32, steps=4,
            batch=4, eval_size=32)


def tiny_suite(gain: float = 1.3, **over) -> Suite:
    return Suite(defences=[Defence("none"), Defence("asvp", layers=["body.*.conv2"], rank=2, gain=gain)],
                 **{**TINY, **over})


def stamps(folder):
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob("*")) if p.is_file()}


def run(suite, out):
    runner = Runner(suite, out, progress=False)
    results = runner.run_all()
    summary = summarize(results)
    write_report(summary, out)
    return runner, results, {(r["defence"], r["attacker"]): r for r in summary["rows"]}


# ------------------------------------------------------------------------------------- identity of runs
def test_changed_gain_reruns_and_the_report_follows(tmp_path):
    """Same --out, gain 1.3 -> 3.0: the defended run is redone on a new teacher; the old one is not reported."""
    _, first, rows = run(tiny_suite(1.3), tmp_path)
    assert rows[("asvp", "naive")]["gain"] == 1.3
    runs_before, teachers_before = stamps(tmp_path / "runs"), stamps(tmp_path / "teachers")
    runner, second, rows3 = run(tiny_suite(3.0), tmp_path)
    r13 = {r["defence"]["name"]: r for r in first}
    r30 = {r["defence"]["name"]: r for r in second}
    assert r30["asvp"]["config"]["teacher"]["hardening"]["params"]["gain"] == 3.0
    assert r30["asvp"]["defence"]["gain"] == 3.0 and rows3[("asvp", "naive")]["gain"] == 3.0
    assert r30["asvp"]["run_id"] != r13["asvp"]["run_id"]
    # a real change: gain 3 costs the teacher more than 1.3
    assert rows3[("asvp", "naive")]["teacher_psnr_drop"] > rows[("asvp", "naive")]["teacher_psnr_drop"] + 0.1
    assert r30["asvp"]["teacher_file_sha256"] != r13["asvp"]["teacher_file_sha256"]
    # the undefended run does not depend on the gain: reused, file untouched
    assert r30["none"]["run_id"] == r13["none"]["run_id"]
    after = stamps(tmp_path / "runs")
    assert {k: after[k] for k in runs_before} == runs_before and len(after) == 3
    # the gain-1.3 run is still on disk but belongs to another configuration: never reported
    old = [p for p in (tmp_path / "runs").glob("*.json") if json.loads(p.read_text())["run_id"] == r13["asvp"]["run_id"]]
    assert runner.foreign_runs() == old and len(old) == 1
    report = (tmp_path / "report.md").read_text()
    assert "| 3 |" in report and "| 1.3 |" not in report
    assert [r["gain"] for r in json.loads((tmp_path / "report.json").read_text())["rows"] if r["defence"] == "asvp"] == [3.0]
    assert len(stamps(tmp_path / "teachers")) > len(teachers_before)  # a new hardened teacher, beside the old
    # going back to 1.3 reuses the old run again, without rerunning anything
    before = stamps(tmp_path / "runs")
    _, back, _ = run(tiny_suite(1.3), tmp_path)
    assert stamps(tmp_path / "runs") == before
    assert {r["run_id"] for r in back} == {r["run_id"] for r in first}


def test_unchanged_rerun_reuses_runs_and_teachers(tmp_path):
    _, first, _ = run(tiny_suite(), tmp_path)
    files = {d: stamps(tmp_path / d) for d in ("runs", "teachers", "images")}
    _, again, _ = run(tiny_suite(), tmp_path)
    assert {d: stamps(tmp_path / d) for d in files} == files
    assert again == first


def test_attack_report_rewrites_the_report_from_the_run_files_alone(tmp_path):
    """`attack report OUT`: the same report from the recorded runs, nothing rerun, whatever code made them."""
    run(tiny_suite(), tmp_path)
    expected = json.loads((tmp_path / "report.json").read_text())
    (tmp_path / "report.json").unlink()
    f = sorted((tmp_path / "runs").glob("*.json"))[0]
    data = json.loads(f.read_text())
    data["config"]["attacks"]["source_sha256"] = "0" * 64  # as if made by other code: still reported
    f.write_text(json.dumps(data))
    runs = stamps(tmp_path / "runs")
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "report.json").read_text()) == expected and "# Attack report" in result.output
    assert stamps(tmp_path / "runs") == runs
    # two runs of one cell: a usage error naming both, and nothing written
    shutil.copy(f, f.with_name("copy.json"))
    (tmp_path / "report.json").unlink()
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "two runs of the cell sr2/" in result.output and "copy.json" in result.output
    assert not (tmp_path / "report.json").exists()
    f.with_name("copy.json").write_text("{}")
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "is not a run file" in result.output
    f.with_name("copy.json").write_text(json.dumps({"schema": data["schema"], "task": "sr2"}))
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "is not a complete run file" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(main, ["report", str(empty)])
    assert result.exit_code == 2 and "no run files" in result.output and "Traceback" not in result.output


def test_a_run_file_that_disagrees_with_its_configuration_is_rerun(tmp_path):
    runner, first, _ = run(tiny_suite(), tmp_path)
    (file,) = [p for p in (tmp_path / "runs").glob("sr2__none__*.json")]
    data = json.loads(file.read_text())
    data["config"]["suite"]["steps"] = 9999  # e.g. written by another version under the same name
    data["student_metrics"]["psnr"] = 99.0
    file.write_text(json.dumps(data))
    assert runner.collect() == [r for r in first if r["defence"]["name"] != "none"]  # not reported as is
    _, again, rows = run(tiny_suite(), tmp_path)
    assert rows[("none", "naive")]["student_psnr"] < 90  # rerun, not the tampered number
    assert json.loads(file.read_text())["config"]["suite"]["steps"] == 4
    file.write_text("{ truncated")  # damaged by something else: rerun too
    _, again, _ = run(tiny_suite(), tmp_path)
    assert len(again) == 2 and json.loads(file.read_text())["run_id"] in {r["run_id"] for r in again}


def test_a_cached_teacher_that_disagrees_is_rebuilt(tmp_path):
    """A hardened file at gain 1.3 under the gain-3 name (a stale cache) is detected by its manifest."""
    from hardener.rewrite import read_manifest

    runner = Runner(tiny_suite(3.0), tmp_path, progress=False)
    h3 = Defence("asvp", layers=["body.*.conv2"], rank=2, gain=3.0)
    path = runner.teacher_path("sr2", h3)
    h13 = Runner(tiny_suite(1.3), tmp_path / "other", progress=False).teacher_path("sr2", replace(h3, gain=1.3))
    shutil.copyfile(h13, path)
    assert read_manifest(onnx.load(str(path)))["params"]["gain"] == 1.3
    assert runner.teacher_path("sr2", h3) == path
    assert read_manifest(onnx.load(str(path)))["params"]["gain"] == 3.0


def test_run_identity_covers_what_determines_a_run(tmp_path, monkeypatch):
    runner = Runner(tiny_suite(), tmp_path, progress=False)
    d = Defence("asvp", layers=["body.*.conv2"], rank=2, gain=1.3)
    base = identity.digest(runner.run_config("sr2", d, "naive", "tiny", 0))

    def key(defence=d, attacker="naive", student="tiny", seed=0, suite=None):
        r = Runner(suite, tmp_path, progress=False, check=False) if suite else runner
        return identity.digest(r.run_config("sr2", defence, attacker, student, seed))

    changed = {
        "gain": key(replace(d, gain=1.31)), "rank": key(replace(d, rank=3)), "mode": key(replace(d, mode="spatial")),
        "placement": key(replace(d, placement="tap")), "layers": key(replace(d, layers=["body.1.conv2"])),
        "adaptive_energy": key(replace(d, adaptive_energy=0.9)), "undefended": key(Defence("x")),
        "attacker": key(attacker="charbonnier"), "student": key(student="edsr"), "seed": key(seed=1),
        **{k: key(suite=replace(tiny_suite(), **{k: v}))
           for k, v in dict(queries=13, patch=48, steps=5, batch=8, eval_size=64).items()},
    }
    other = tmp_path / "teacher.onnx"  # the same network, one metadata entry different: another file
    model = onnx.load(str(TEACHER))
    model.metadata_props.add(key="note", value="a different file")
    onnx.save(model, str(other))
    changed["teacher file"] = key(suite=replace(tiny_suite(), teachers={"sr2": str(other)}))
    monkeypatch.setattr("attacks.runner.hardener_fingerprint", lambda: {"version": "0.1.0", "source_sha256": "0" * 64})
    changed["hardener code"] = key()
    monkeypatch.undo()
    monkeypatch.setattr("attacks.runner.attacks_fingerprint", lambda: {"run_format": 3, "source_sha256": "1" * 64})
    changed["attack code"] = key()
    monkeypatch.undo()
    assert {k for k, v in changed.items() if v == base} == set()
    assert len(set(changed.values())) == len(changed)
    # what does not change the numbers does not change the identity (the file name still carries the name)
    assert key(replace(d, name="renamed", attackers=["naive"], baseline="none")) == base
    assert key() == base


def test_source_fingerprint_follows_every_byte(tmp_path):
    for name in ("a.py", "b.py"):
        (tmp_path / name).write_text(f"x = '{name}'\n")
    first = identity.sha_of_files(tmp_path, ["a.py", "b.py"])
    (tmp_path / "b.py").write_text("x = 'b.py' \n")
    assert identity.sha_of_files(tmp_path, ["a.py", "b.py"]) != first
    fp = identity.hardener_fingerprint()
    import hardener

    assert fp["version"] == hardener.__version__ and len(fp["source_sha256"]) == 64


# ------------------------------------------------------------------------------------- validation
BAD = [
    ('steps = "600"', "steps = '600': expected a valid integer"),
    ("steps = 0", "steps = 0: expected greater than or equal to 1"),
    ("steps = true", "steps = True: expected a valid integer"),
    ("seeds = [0, -1]", "seeds[1] = -1"),
    ('tasks = ["sr2", "sr2"]', "tasks = ['sr2', 'sr2']: expected no repeats"),
    ('tasks = ["sr4"]\npatch = 50', "patch = 50: expected a multiple of 4"),
    ("attackers = []", "attackers = []: expected at least one item"),
    ('students = ["tiny", "huge"]', "students[1] = 'huge': expected one of 'tiny', 'edsr'"),
    ('teachers.sr9 = "x.onnx"', "teachers.sr9 (key) = 'sr9': expected one of 'sr2'"),
    ('teachers.sr2 = "missing.onnx"', "teachers.sr2 = "),
    ('[[defences]]\nname = "none"\n[[defences]]\nname = "h"\nlayers = ["body.*.conv3"]',
     "defences[1].layers = ['body.*.conv3']: selector 'body.*.conv3' matched nothing; near misses: body.3.conv2"),
    ('tasks = ["sr2", "denoise"]\n[[defences]]\nname = "none"\n[[defences]]\nname = "h"\nlayers = ["body.9.conv2"]',
     "defences[1].layers = ['body.9.conv2']: selector 'body.9.conv2' matched nothing"),
    ('[[defences]]\nname = "none"\n[[defences]]\nname = "h"\nlayers = ["body.1.conv2"]\nrank = 4.0',
     "defences[1].rank = 4.0: expected a valid integer"),
    ('[[defences]]\nname = "none"\n[[defences]]\nname = "h"\nlayers = ["body.1.conv2"]\ngain = nan',
     "defences[1].gain = nan: expected a finite number"),
    ('[[defences]]\nname = "none"\n[[defences]]\nname = "h"\nlayers = ["body.1.conv2"]\nmode = "spectral"',
     "defences[1].mode = 'spectral': expected one of 'channel' or 'spatial'"),
    ('[[defences]]\nname = "none"\n[[defences]]\nname = "a/b"\nlayers = ["body.1.conv2"]', "defences[1].name = 'a/b'"),
    ('[[defences]]\nname = "none"\n[[defences]]\nname = "none"', "defences[1].name = 'none'"),
    ('attackers = ["naive"]\n[[defences]]\nname = "none"\nattackers = ["strip"]\n',
     "defences[0].attackers[0] = 'strip': expected one of the suite's attackers (naive)"),
    ('[[defences]]\nname = "none"\nattackers = ["strip"]\n',
     "defences[0].attackers = ['strip']: expected at least one attacker that runs against this defence"),
    ('[[defences]]\nlayers = []', "defences[0].name: missing (required)"),
    ('[[defences]]\nname = "none"\ngian = 2',
     "defences[0].gian: unknown key 'gian'; valid keys in a [[defences]] entry: name, layers, rank, gain"),
]


@pytest.mark.parametrize("text,expected", BAD, ids=[b[1][:40] for b in BAD])
def test_suite_file_is_validated_completely_before_any_run(tmp_path, text, expected):
    suite = tmp_path / "s.toml"
    suite.write_text(text + "\n")
    result = CliRunner().invoke(main, ["run", str(suite), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and error == result.output.strip().splitlines()[-1:], result.output  # one line
    assert expected in error[0], error[0]
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_a_programmatic_suite_meets_the_same_schema(tmp_path):
    with pytest.raises(SuiteError, match=r"steps = '600': expected a valid integer"):
        Runner(replace(tiny_suite(), steps="600"), tmp_path / "out", progress=False)
    with pytest.raises(SuiteError, match=r"defences\[1\]\.layers"):
        Runner(Suite(defences=[Defence("none"), Defence("h", layers=["head.conv"])], **TINY), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_teacher_paths_are_relative_to_the_suite_file(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    shutil.copyfile(TEACHER, tmp_path / "models" / "mine.onnx")
    (tmp_path / "s.toml").write_text('teachers.sr2 = "models/mine.onnx"\n')
    monkeypatch.chdir(tmp_path / "models")
    suite = Suite.load(tmp_path / "s.toml")
    assert suite.teachers["sr2"] == str(tmp_path / "models" / "mine.onnx")


# ------------------------------------------------------------------------------------- suites and help
def test_packaged_suites_resolve_by_name_and_validate():
    import importlib.util

    names = packaged_suites()
    assert {"tasks_all", "curve_sr2", "adaptive_sr2"} <= set(names)
    assert resolve_suite("tasks_all") == resolve_suite("tasks_all.toml")
    assert resolve_suite("tasks_all").is_file()
    for name in names:  # every shipped suite is valid, selectors resolved against every task's teacher
        if name.startswith("spandrel") and importlib.util.find_spec("spandrel") is None:
            with pytest.raises(SuiteError, match=r"students\[0\] = 'spandrel:SwinIR': spandrel students need"):
                Suite.load(resolve_suite(name))
            continue
        suite = Suite.load(resolve_suite(name))
        # the README's rule for published numbers: a spread over at least 3 seeds in every shipped suite
        assert len(set(suite.seeds)) >= 3, name
    Suite().check()  # the built-in default and quick profiles meet the schema too
    Suite.quick().check()
    result = CliRunner().invoke(main, ["run", "no_such_suite"])
    assert result.exit_code == 2 and "not a packaged suite" in result.output and "tasks_all" in result.output


def test_help_lists_the_registries(monkeypatch):
    from dataclasses import fields

    from attacks.degrade import TASKS
    from attacks.distill import ATTACKERS, Attacker
    from attacks.students import SPANDREL_STUDENTS, STUDENTS

    text = CliRunner().invoke(main, ["run", "--help"]).output
    for name in [*TASKS, *ATTACKERS, *STUDENTS, *SPANDREL_STUDENTS, *packaged_suites()]:
        assert f" {name}" in text, name
    for f in fields(Defence):
        assert f"    {f.name}: " in text, f.name
    assert "rank: integer >= 1, <= 64; default 4" in text
    # generated, not hand-kept: a new registry entry shows up
    monkeypatch.setitem(ATTACKERS, "median", Attacker("median", loss="l2"))
    assert "median (loss=l2)" in _run_help()
