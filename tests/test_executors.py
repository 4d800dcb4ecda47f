"""Executors: the same grid gives the same numbers in this process, in a local process pool and on a 2-worker
Dask LocalCluster; a worker killed mid-run loses that run only, and a rerun redoes just it."""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading

import pytest

from attacks.executors import (DaskExecutor, LocalExecutor, Progress, RunsFailed, SerialExecutor,
                               make_executor)
from attacks.suite import Defence, Runner, Suite

GRID = dict(tasks=["sr2"], attackers=["naive"], students=["tiny"], seeds=[0, 1, 2], queries=12, patch=32, steps=4,
            batch=4, eval_size=32)


# the cheapest provenance check the schema allows, where the suite has one (it dominates a tiny run's time)
CHEAP = {k: v for k, v in (("provenance_probes", 1), ("provenance_null_keys", 20))
         if k in Suite.__dataclass_fields__}


def grid() -> Suite:  # 3 runs (3 seeds) against the bundled teacher; the hardened path is the same task code
    return Suite(defences=[Defence("none")], **GRID, **CHEAP)


def numbers(out) -> dict:
    """Each run file's content minus its wall time, keyed by file name (the name carries the run hash)."""
    runs = {}
    for p in sorted((out / "runs").glob("*.json")):
        data = json.loads(p.read_text())
        data.pop("seconds")
        runs[p.name] = json.dumps(data, sort_keys=True)
    return runs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The grid run serially in this process with one thread (the local executor's per-worker budget here)."""
    out = tmp_path_factory.mktemp("serial")
    Runner(grid(), out, progress=False).run_all(executor=SerialExecutor(threads=1))
    return out


def seeded(tmp_path, reference):
    """A fresh results folder with the reference's hardened teachers (cached by hash; saves rebuilding)."""
    shutil.copytree(reference / "teachers", tmp_path / "teachers", dirs_exist_ok=True)
    return tmp_path


def test_dask_local_cluster_matches_serial_byte_for_byte(tmp_path, reference):
    """(The local pool's runs are compared with the same reference in the killed-worker test below.)"""
    pytest.importorskip("distributed")
    want = numbers(reference)
    assert len(want) == 3
    out = seeded(tmp_path, reference)
    runner = Runner(grid(), out, progress=False)
    results = runner.run_all(executor=DaskExecutor(workers=2, threads=1))
    assert numbers(out) == want and len(results) == 3
    assert sorted(o.status for o in runner.outcomes) == ["done"] * 3
    assert len({o.worker for o in runner.outcomes}) == 2  # two worker processes (by pid) shared the grid


class KillOne(Progress):
    """Progress that kills the worker process holding ``victim`` shortly after the run is dispatched."""

    def __init__(self, victim_prefix: str, *a, **k):
        super().__init__(*a, **k)
        self.victim_prefix, self.killed = victim_prefix, []

    def started(self, key, worker):
        super().started(key, worker)
        if key.startswith(self.victim_prefix) and not self.killed:
            pid = int(worker.split("pid ")[1])
            self.killed.append(key)
            threading.Timer(0.3, os.kill, (pid, signal.SIGKILL)).start()


def test_a_killed_worker_loses_only_its_run_and_resume_redoes_it(tmp_path, reference):
    out = seeded(tmp_path, reference)
    runner = Runner(grid(), out, progress=False)
    # worker 1's first run, 0.3 s after dispatch (the worker is still importing torch for it: mid-run)
    progress = KillOne("sr2__none__naive__tiny__s1", [], set(), enabled=False)
    with pytest.raises(RunsFailed) as exc:
        runner.run_all(executor=LocalExecutor(workers=2, threads=1), progress=progress)
    (victim,) = progress.killed
    assert len({o.worker for o in runner.outcomes if o.status == "done"}) >= 1
    assert [f.key for f in exc.value.failures] == [victim]
    assert "died" in exc.value.failures[0].error and "1 of 3 runs failed" in str(exc.value)
    # every other run finished (a replacement worker joined) and equals the serial reference byte for byte
    want = numbers(reference)
    have = numbers(out)
    assert sorted(have) == sorted(k for k in want if not k.startswith("sr2__none__naive__tiny__s1"))
    assert all(have[k] == want[k] for k in have)
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    # resume: only the killed run is redone; the others' files are untouched
    runner = Runner(grid(), out, progress=False)
    runner.run_all(executor=SerialExecutor(threads=1))
    assert [(o.key, o.status) for o in runner.outcomes] == [(victim, "done")]
    assert numbers(out) == want
    assert {k: v for k, v in ((p.name, p.stat().st_mtime_ns) for p in (out / "runs").glob("*.json"))
            if k in stamps} == stamps


def test_executor_choices_and_refusals():
    assert isinstance(make_executor("local", workers=1), SerialExecutor)  # one worker: in this process
    assert isinstance(make_executor("local", workers=2, threads=1), LocalExecutor)
    with pytest.raises(ValueError, match="oversubscribe"):
        make_executor("local", workers=2, threads=os.cpu_count() or 1)
    with pytest.raises(ValueError, match="one each"):
        make_executor("local", workers=2, threads=1, gpus=["0"])
    with pytest.raises(ValueError, match="unknown executor"):
        make_executor("ray", workers=2)


def test_gpu_placement_sets_one_device_per_worker():
    pool = LocalExecutor(workers=2, threads=1, gpus=["3", "5"])
    assert [pool._env(i)["CUDA_VISIBLE_DEVICES"] for i in range(2)] == ["3", "5"]
    assert pool._env(0)["OMP_NUM_THREADS"] == "1"


def test_plain_progress_is_one_line_per_run(capsys):
    import io

    from attacks.executors import Outcome

    stream = io.StringIO()
    p = Progress([("a", "sr2", "none"), ("b", "sr2", "none")], {"a"}, stream=stream, live=False, executor="x")
    p.started("b", "w0")
    p.finished(Outcome("b", "done", "w0", 1.25))
    assert stream.getvalue().splitlines() == ["attack: 1/2 runs already finished; 1 to run (x)",
                                              "[2/2] done b 1.2s (w0)"]
    assert "\x1b" not in stream.getvalue()


def test_live_progress_redraws_the_grid_and_the_runs_in_flight():
    import io

    from attacks.executors import Outcome

    stream = io.StringIO()
    p = Progress([("a", "sr2", "none"), ("b", "sr2", "asvp")], set(), stream=stream, live=True, executor="x")
    p.started("a", "w0 pid 1")
    p.started("b", "w1 pid 2")
    p.finished(Outcome("a", "done", "w0", 1.0))
    text = stream.getvalue()
    assert "1/2 done, 1 in flight, 0 failed" in text and "\x1b[4F" in text  # redrawn in place
    assert any("sr2" in s and "asvp" in s and "0/1" in s for s in text.splitlines())
    assert "> b" in text.split("1/2 done")[-1] and "> a" not in text.split("1/2 done")[-1]


def test_cli_refuses_oversubscription_in_one_line(tmp_path):
    from click.testing import CliRunner

    from attacks.cli import main

    result = CliRunner().invoke(main, ["run", "--quick", "--out", str(tmp_path), "--workers", "2", "--threads",
                                       str(4 * (os.cpu_count() or 1))])
    assert result.exit_code == 2 and "oversubscribe" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_runs_in_flight_show_their_step_counts(tmp_path):
    """Workers write "step n/total" beside the results (any executor); the live display reads it."""
    import io

    from attacks.executors import Progress
    from attacks.suite import StepCounter, step_file

    path = step_file(tmp_path, "sr2__none__naive__tiny__s0__abc")
    counter = StepCounter(path, total=50, every=20)
    for _ in range(45):
        counter.update(1)
    assert path.read_text() == "40/50"
    stream = io.StringIO()
    progress = Progress([(path.stem, "sr2", "none")], set(), stream=stream, live=True, executor="test", out=tmp_path)
    progress.started(path.stem, "w0")
    assert "step 40/50" in stream.getvalue()
    for _ in range(5):
        counter.update(1)
    assert not path.exists()  # a finished run leaves nothing behind
    assert progress.steps(path.stem) == ""
