"""Where the runs of a grid execute: in this process, in a local pool of worker processes, or on Dask.

Every executor runs the same task, :func:`execute_run`: a worker receives the suite (as plain data), the
results folder, the run's key and its content hash (:mod:`attacks.identity`), rebuilds a ``Runner``,
recomputes the run's configuration and refuses to run if its digest differs from the driver's (other code
or library versions on the worker), reuses a finished run file with that hash, and otherwise trains,
evaluates and writes the run's JSON atomically into the shared ``OUT/runs/``.  The driver only plans,
prepares the shared files (hardened teachers, evaluation images: never built concurrently) and collects
from disk.  A worker that dies loses the run it held and nothing else: the other workers carry on, the run
is reported as failed and a rerun of the same command redoes it (finished runs are skipped by hash).

Threads are explicit: each worker gets ``threads`` torch threads and ``threads`` ONNX Runtime intra-op
threads (default: the machine's cores divided by the workers, at least 1), and workers x threads may not
exceed the cores.  GPU placement: with ``gpus``, worker i sees only ``CUDA_VISIBLE_DEVICES=gpus[i]`` (one
worker per GPU).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

EXECUTORS = ("serial", "local", "dask")


@dataclass
class Outcome:
    """What happened to one planned run (the run itself is the file on disk)."""
    key: str  # the run file's stem (task__defence__attacker__student__sSEED__hash)
    status: str  # "done", "reused" (a finished file with the same hash was already there) or "failed"
    worker: str = ""
    seconds: float = 0.0
    error: str = ""


class RunsFailed(RuntimeError):
    """Some runs failed; the finished ones are on disk and a rerun redoes only the failed ones."""

    def __init__(self, failures: list[Outcome], total: int):
        self.failures = failures
        first = failures[0]
        super().__init__(f"{len(failures)} of {total} runs failed (first: {first.key}: {first.error}); finished "
                         "runs are kept, rerun the same command to redo the failed ones")


# ---------------------------------------------------------------------------------------------- the task
def suite_data(suite) -> dict:
    """The suite as plain data a worker can rebuild it from (teacher paths made absolute)."""
    data = asdict(suite)
    data["teachers"] = {task: str(Path(p).resolve()) for task, p in data["teachers"].items()}
    return data


def suite_from_data(data: dict):
    from .config import Defence, Suite

    return Suite(**{**data, "defences": [Defence(**d) for d in data["defences"]]})


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads(workers: int) -> int:
    return max(1, cpu_count() // max(1, workers))


_RUNNER: dict = {}  # one Runner per worker process (keeps the evaluation set and the last query set warm)


def set_threads(threads: int | None) -> None:
    """torch's intra-op threads in this process (the teacher's ONNX Runtime sessions get theirs from
    ``Runner.threads``, set by :func:`execute_run`)."""
    if not threads:
        return
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _runner(data: dict, out: str):
    from .identity import canonical
    from .runner import Runner

    key = (canonical(data), out)
    if key not in _RUNNER:
        _RUNNER.clear()
        _RUNNER[key] = Runner(suite_from_data(data), Path(out), progress=False, check=False)
    return _RUNNER[key]


def execute_run(data: dict, out: str, item: tuple, run_id: str, threads: int | None = None) -> dict:
    """One run, in whatever process calls it: ``item`` is (task, defence name, attacker, student, seed).

    Returns a small summary (the result itself is the JSON file written into ``out/runs``)."""
    set_threads(threads)
    runner = _runner(data, out)
    runner.threads = threads  # the ONNX Runtime threads of the teacher sessions it opens (None: the default)
    task, defence_name, attacker, student, seed = item
    defence = next(d for d in runner.suite.defences if d.name == defence_name)
    config = runner.run_config(task, defence, attacker, student, seed)
    from .identity import digest

    mine = digest(config)
    if mine != run_id:
        raise RuntimeError(f"the worker computes run hash {mine[:16]}, the driver {run_id[:16]}: different code "
                           "or library versions on the worker")
    file = runner.run_file(task, defence, attacker, student, seed, run_id=run_id)
    started = time.perf_counter()
    if runner.load_run(file, run_id, config) is not None:
        return {"key": file.stem, "status": "reused", "seconds": 0.0, "pid": os.getpid()}
    runner.run_one(task, defence, attacker, student, seed, config=config, run_id=run_id)
    return {"key": file.stem, "status": "done", "seconds": time.perf_counter() - started, "pid": os.getpid()}


def one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


# ------------------------------------------------------------------------------------------- executors
@dataclass
class Job:
    """One run to execute: what the driver hands an executor."""
    item: tuple  # (task, defence name, attacker, student, seed)
    run_id: str
    key: str  # the run file's stem


class Executor:
    name = "executor"
    workers = 1
    threads: int | None = None

    def prepare(self, runner, jobs: list[Job]) -> None:
        """Build what runs share before any worker starts (teachers are built by ``run_all``): the evaluation
        images and the teachers' metrics images, so workers never write the same file at once."""
        seen = set()
        for job in jobs:
            task, defence_name = job.item[:2]
            if (task, defence_name) in seen:
                continue
            seen.add((task, defence_name))
            defence = next(d for d in runner.suite.defences if d.name == defence_name)
            runner.teacher_metrics(task, runner.teacher_path(task, defence))
            runner.teacher_metrics(task, runner.source_teacher(task))

    def run(self, runner, jobs: list[Job], progress) -> list[Outcome]:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name}: {self.workers} worker(s) x {self.threads or 'default'} thread(s)"


class SerialExecutor(Executor):
    """In this process, one run after another (tests, debugging); an error stops the grid at once."""
    name = "serial"

    def __init__(self, threads: int | None = None):
        self.threads = threads

    def prepare(self, runner, jobs):  # nothing runs concurrently
        pass

    def run(self, runner, jobs, progress):
        import torch

        data, out = suite_data(runner.suite), str(Path(runner.out).resolve())
        outcomes = []
        saved = torch.get_num_threads()
        try:
            for job in jobs:
                progress.started(job.key, "main")
                started = time.perf_counter()
                summary = execute_run(data, out, job.item, job.run_id, self.threads)
                outcomes.append(Outcome(job.key, summary["status"], "main", time.perf_counter() - started))
                progress.finished(outcomes[-1])
        finally:  # this process's thread settings are the caller's again
            torch.set_num_threads(saved)
            _RUNNER.clear()
        return outcomes


def _pool_worker(conn, env: dict) -> None:
    """A local worker process: environment first (threads, GPU), then runs until told to stop."""
    os.environ.update(env)
    threads = int(env["OMP_NUM_THREADS"])
    while True:
        try:
            message = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if message is None:
            return
        data, out, item, run_id = message
        try:
            summary = execute_run(data, out, tuple(item), run_id, threads)
            conn.send(("ok", summary))
        except KeyboardInterrupt:
            return
        except BaseException as exc:  # noqa: BLE001 - reported to the driver as one line
            conn.send(("error", one_line(exc)))


class LocalExecutor(Executor):
    """N worker processes on this machine (spawned: no forked torch state), one run each at a time."""
    name = "local"

    def __init__(self, workers: int = 2, threads: int | None = None, gpus: list[str] | None = None):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if gpus is not None and len(gpus) < workers:
            raise ValueError(f"{workers} workers need {workers} GPUs (one each), got {len(gpus)}: {gpus}")
        self.workers, self.gpus = workers, gpus
        self.threads = threads or default_threads(workers)
        if self.workers * self.threads > cpu_count():
            raise ValueError(f"{workers} workers x {self.threads} threads oversubscribe the {cpu_count()} "
                             "cores available")

    def _env(self, index: int) -> dict:
        t = str(self.threads)
        env = {"OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, "OPENBLAS_NUM_THREADS": t,
               "OMP_WAIT_POLICY": "PASSIVE"}
        if self.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.gpus[index])
        return env

    def _start(self, ctx, index: int):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_pool_worker, args=(child, self._env(index)), name=f"attack-worker-{index}",
                           daemon=True)
        proc.start()
        child.close()
        return proc, parent

    def run(self, runner, jobs, progress):
        import multiprocessing as mp
        from multiprocessing.connection import wait

        ctx = mp.get_context("spawn")
        data, out = suite_data(runner.suite), str(Path(runner.out).resolve())
        queue = list(jobs)
        workers: dict[int, list] = {}  # index -> [process, connection, job in flight, started]
        outcomes: list[Outcome] = []
        try:
            for i in range(min(self.workers, len(queue))):
                workers[i] = [*self._start(ctx, i), None, 0.0]
            while queue or any(w[2] for w in workers.values()):
                for i, w in list(workers.items()):  # hand idle workers the next run
                    if w[2] is None and queue and not w[0].is_alive():  # a dead worker: replace it
                        w[0].join()
                        w[1].close()
                        workers[i] = w = [*self._start(ctx, i), None, 0.0]
                    if w[2] is None and queue:
                        job = queue.pop(0)
                        w[1].send((data, out, list(job.item), job.run_id))
                        w[2], w[3] = job, time.perf_counter()
                        progress.started(job.key, f"w{i} pid {w[0].pid}")
                ready = wait([w[1] for w in workers.values() if w[2]] +
                             [w[0].sentinel for w in workers.values() if w[2]], timeout=1.0)
                progress.tick()
                for i, w in list(workers.items()):
                    proc, conn, job, started = w
                    if job is None:
                        continue
                    if conn in ready:
                        try:
                            kind, payload = conn.recv()
                        except (EOFError, OSError):
                            kind, payload = "error", None
                        if kind == "ok":
                            outcome = Outcome(job.key, payload["status"], f"w{i}", time.perf_counter() - started)
                        else:
                            outcome = Outcome(job.key, "failed", f"w{i}", time.perf_counter() - started,
                                              payload or f"worker {i} (pid {proc.pid}) died")
                        w[2] = None
                    elif proc.sentinel in ready or not proc.is_alive():
                        proc.join()
                        outcome = Outcome(job.key, "failed", f"w{i}", time.perf_counter() - started,
                                          f"worker {i} (pid {proc.pid}) died with exit code {proc.exitcode}")
                        w[2] = None
                    else:
                        continue
                    outcomes.append(outcome)  # a dead worker's run is lost, no other; it is replaced above
                    progress.finished(outcome)
        finally:
            for proc, conn, *_ in workers.values():
                try:
                    conn.send(None)
                except (OSError, BrokenPipeError):
                    pass
            for proc, conn, *_ in workers.values():
                proc.join(timeout=5)
                if proc.is_alive():
                    proc.terminate()
                    proc.join()
                conn.close()
        return outcomes


class DaskExecutor(Executor):
    """Dask distributed: an existing scheduler (``scheduler="tcp://HOST:8786"``) or a LocalCluster of
    ``workers`` single-threaded worker processes.  Each run is one task (``execute_run``, not pure: it is
    keyed by the run's hash); a task whose worker dies is rescheduled by Dask on another worker."""
    name = "dask"

    def __init__(self, workers: int = 2, threads: int | None = None, scheduler: str | None = None):
        try:
            import distributed  # noqa: F401
        except ImportError:
            raise ImportError("the dask executor needs the dask extra: pip install 'hardener[dask]'") from None
        self.workers, self.scheduler = workers, scheduler
        if scheduler:
            self.threads = threads or 1  # the driver cannot see the workers' cores: 1 unless told
        else:
            self.threads = threads or default_threads(workers)
            if workers * self.threads > cpu_count():
                raise ValueError(f"{workers} workers x {self.threads} threads oversubscribe the {cpu_count()} "
                                 "cores available")

    def describe(self):
        where = self.scheduler or f"LocalCluster of {self.workers} worker(s)"
        return f"dask ({where}) x {self.threads} thread(s)"

    def run(self, runner, jobs, progress):
        from distributed import Client, LocalCluster, as_completed

        data, out = suite_data(runner.suite), str(Path(runner.out).resolve())
        cluster = None
        if self.scheduler:
            client = Client(self.scheduler, timeout="30s")
        else:
            t = str(self.threads)
            cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None, silence_logs=40,
                                   env={"OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, "OPENBLAS_NUM_THREADS": t,
                                        "OMP_WAIT_POLICY": "PASSIVE"})
            client = Client(cluster)
        outcomes: list[Outcome] = []
        try:
            futures = {}
            for job in jobs:
                f = client.submit(execute_run, data, out, job.item, job.run_id, self.threads,
                                  key=f"attack-run-{job.key}", pure=False)
                futures[f] = (job, time.perf_counter())
                progress.started(job.key, "dask")
            for f in as_completed(futures):
                job, started = futures[f]
                try:
                    summary = f.result()
                    outcome = Outcome(job.key, summary["status"], f"pid {summary['pid']}",
                                      time.perf_counter() - started)
                except Exception as exc:  # noqa: BLE001 - one line per failed run
                    outcome = Outcome(job.key, "failed", "dask", time.perf_counter() - started, one_line(exc))
                outcomes.append(outcome)
                progress.finished(outcome)
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
        return outcomes


def make_executor(name: str, workers: int = 1, threads: int | None = None, scheduler: str | None = None,
                  gpus: list[str] | None = None) -> Executor:
    if name == "serial" or (name == "local" and workers == 1 and gpus is None):
        return SerialExecutor(threads)
    if name == "local":
        return LocalExecutor(workers, threads, gpus)
    if name == "dask":
        if gpus is not None:
            raise ValueError("--gpus applies to the local executor; on Dask start one worker per GPU "
                             "(CUDA_VISIBLE_DEVICES=i dask worker ... --nworkers 1 --nthreads 1)")
        return DaskExecutor(workers, threads, scheduler)
    raise ValueError(f"unknown executor {name!r} (one of {', '.join(EXECUTORS)})")


# -------------------------------------------------------------------------------------------- progress
class Progress:
    """Live progress of a grid: on a terminal, a redrawn block (per task and defence: done/total, then each
    run in flight with its worker and elapsed time); otherwise one plain line per finished run (logs); or
    nothing (``enabled=False``)."""

    def __init__(self, plan_keys: list[tuple[str, str, str]], already: set[str], stream=None,
                 enabled: bool = True, live: bool | None = None, executor: str = "", out=None):
        """``plan_keys``: (run file stem, task, defence name) of every planned run; ``already``: the stems of
        runs finished before this session."""
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.live = self.stream.isatty() if live is None else live
        self.group = {key: (task, defence) for key, task, defence in plan_keys}
        self.totals: dict[tuple, int] = {}
        self.done: dict[tuple, int] = {}
        for key, task, defence in plan_keys:
            self.totals[(task, defence)] = self.totals.get((task, defence), 0) + 1
            self.done.setdefault((task, defence), 0)
            if key in already:
                self.done[(task, defence)] += 1
        self.flight: dict[str, tuple[str, float]] = {}
        self.failed = 0
        self.executor = executor
        self._lines = 0
        self._last = 0.0
        self.total = len(plan_keys)
        self.out = out
        if enabled and not self.live:
            self._print(f"attack: {sum(self.done.values())}/{self.total} runs already finished; "
                        f"{self.total - sum(self.done.values())} to run ({executor})")

    def _print(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def steps(self, key: str) -> str:
        """"step n/total" of a run in flight, from the file its worker writes (attacks.runner.StepCounter)."""
        if self.out is None:
            return ""
        from .runner import step_file

        try:
            return "step " + step_file(self.out, key).read_text().strip()
        except OSError:
            return ""

    def started(self, key: str, worker: str) -> None:
        self.flight[key] = (worker, time.perf_counter())
        self.tick(force=True)

    def finished(self, outcome: Outcome) -> None:
        self.flight.pop(outcome.key, None)
        if outcome.status == "failed":
            self.failed += 1
        else:
            g = self.group.get(outcome.key)
            if g:
                self.done[g] += 1
        if self.enabled and not self.live:
            n = sum(self.done.values())
            tail = f": {outcome.error}" if outcome.error else ""
            self._print(f"[{n}/{self.total}] {outcome.status} {outcome.key} {outcome.seconds:.1f}s "
                        f"({outcome.worker}){tail}")
        self.tick(force=True)

    def tick(self, force: bool = False) -> None:
        if not (self.enabled and self.live):
            return
        now = time.perf_counter()
        if not force and now - self._last < 0.5:
            return
        self._last = now
        lines = [f"attack runs: {sum(self.done.values())}/{self.total} done, {len(self.flight)} in flight, "
                 f"{self.failed} failed  [{self.executor}]"]
        for (task, defence), total in self.totals.items():
            d = self.done[(task, defence)]
            bar = "#" * round(20 * d / total) + "." * (20 - round(20 * d / total))
            lines.append(f"  {task:<10} {defence:<20} {bar} {d}/{total}")
        for key, (worker, started) in list(self.flight.items())[:16]:
            lines.append(f"  > {key[:70]:<70} {worker:<14} {self.steps(key):>11} {now - started:6.1f}s")
        if self._lines:
            self.stream.write(f"\x1b[{self._lines}F")  # back to the block's first line
        self.stream.write("".join(f"{line}\x1b[K\n" for line in lines) + "\x1b[J")
        self.stream.flush()
        self._lines = len(lines)

    def close(self) -> None:
        self.tick(force=True)


def run_jobs(runner, executor: Executor, plan: list, todo: list, progress: Progress | None = None) -> list[Outcome]:
    """``Runner.run_all``'s executor path: the runs in ``todo`` (items of ``runner.identified_plan()``) as
    tasks; returns their outcomes, or raises :class:`RunsFailed` once every other run has finished."""
    from .runner import run_key

    def stem(item, run_id):
        task, defence, attacker, student, seed = item
        from .runner import ID_CHARS

        return f"{run_key(task, defence.name, attacker, student, seed)}__{run_id[:ID_CHARS]}"

    jobs = [Job((item[0], item[1].name, *item[2:]), run_id, stem(item, run_id)) for item, _, run_id in todo]
    if progress is None:
        todo_keys = {j.key for j in jobs}
        keys = [(stem(item, run_id), item[0], item[1].name) for item, _, run_id, _ in plan]
        progress = Progress(keys, {k for k, *_ in keys if k not in todo_keys}, enabled=runner.progress,
                            executor=executor.describe(), out=runner.out)
    if jobs:
        executor.prepare(runner, jobs)
        outcomes = executor.run(runner, jobs, progress)
    else:
        outcomes = []
    progress.close()
    runner.outcomes = outcomes
    failures = [o for o in outcomes if o.status == "failed"]
    if failures:
        raise RunsFailed(failures, len(plan))
    return outcomes
