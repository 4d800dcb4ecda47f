"""Running an attack suite: each run (task, defence, attacker, student, seed) distils a student from the served
teacher's answers and writes one JSON file under ``OUT/runs/`` as soon as it finishes.

A run file is named after a digest of everything that determines it (:mod:`attacks.identity`) and holds that
configuration; a rerun reuses a run whose file exists *and* whose stored configuration is the one asked for,
so a crash loses at most the run in flight and a changed parameter (a gain, the steps, the teacher file, the
hardener's code) is rerun, never reprinted.  Hardened (and marked, and stripped) teachers are cached under
``OUT/teachers/`` the same way.  Also here: the teacher's answers to the thief's queries (one query set cached
per runner), the step files a run in flight writes for the executors' live display (:class:`StepCounter`),
and the 8 flips/rotations of the ensemble thief (:func:`dihedral`).  This module's source is part of every
run's identity (:data:`attacks.identity.RUN_MODULES`).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx

from hardener.api import HardenConfig, harden
from hardener.asvp import AsvpParams
from hardener.metrics import Conventions
from hardener.model_io import atomic_write

from . import provenance
from .config import Defence, Suite
from .distill import ATTACKERS, demark_targets, evaluate, torch_predictor, train_student, tune_feature_weight
from .identity import (attacks_fingerprint, digest, environment, file_sha256, hardener_fingerprint,
                       normalized, stored_manifest, teacher_sha256)
from .oracle import Oracle, strip_asvp
from .plots import save_png
from .students import STUDENTS, build_student, parameter_count

RUN_SCHEMA = "attacks.run/4"
ID_CHARS = 16  # hex digits of a run's or a teacher's digest in its file name (64 bits)
EVAL_SPLIT = "eval"  # the held-out photos every run is evaluated on (attacks.data.SPLIT), in both protocols
QUERY_SPLITS = {"shared": "train", "disjoint": "disjoint"}  # where the thief's query patches come from


def run_key(task, defence, attacker, student, seed) -> str:
    """The readable part of a run's file name (the file adds ``__<digest>``: see :meth:`Runner.run_file`)."""
    return f"{task}__{defence}__{attacker}__{student.replace(':', '-')}__s{seed}"


def _write_json(path: Path, data: dict) -> None:
    atomic_write(json.dumps(data, indent=2).encode(), None, path)


class Runner:
    def __init__(self, suite: Suite, out: Path, progress: bool = True, check: bool = True,
                 threads: int | None = None):
        if check:
            suite.check()  # a programmatic suite meets the same schema as a file (SuiteError otherwise)
        self.suite, self.out, self.progress = suite, out, progress
        self.threads = threads  # ONNX Runtime intra-op threads of the teacher's sessions (None: its default)
        (out / "runs").mkdir(parents=True, exist_ok=True)
        (out / "teachers").mkdir(exist_ok=True)
        self._answers: dict[str, tuple] = {}
        self._teacher_metrics: dict[str, dict] = {}
        self._eval: dict[str, list] = {}
        self._train_photos = None

    # -- identity ---------------------------------------------------------------------------------------
    def source_teacher(self, task: str) -> Path:
        from .schema import teacher_file

        source = teacher_file(self.suite, task)
        if not source.is_file():
            raise FileNotFoundError(f"no teacher for task '{task}': set teachers.{task} in the suite file")
        return source

    def teacher_config(self, task: str, defence: Defence) -> dict:
        """What determines the served teacher: the source file's content and, if defended, the hardening."""
        config = {"source_sha256": teacher_sha256(self.source_teacher(task))}
        if defence.layers:
            params = AsvpParams(rank=defence.rank, gain=defence.gain, mode=defence.mode,
                                adaptive_energy=defence.adaptive_energy).resolved()  # automatic schedule
            config["hardening"] = {"layers": list(defence.layers), "placement": defence.placement,
                                   "params": asdict(params)}
            config["hardener"] = hardener_fingerprint()
        mark = provenance.mark_config(defence)
        if mark is not None:  # absent when unmarked: unmarked teachers and runs keep their identity
            config["mark"] = mark
            config["hardener"] = hardener_fingerprint()
        return config

    def run_config(self, task: str, defence: Defence, attacker_name: str, student_name: str, seed: int) -> dict:
        """Everything that determines a run's numbers; its digest names the run file, which stores it."""
        attacker = ATTACKERS[attacker_name]
        arch = attacker.student or student_name
        s = self.suite
        return normalized({
            "schema": RUN_SCHEMA, "task": task, "teacher": self.teacher_config(task, defence),
            "suite": {"queries": s.queries, "patch": s.patch, "steps": s.steps, "batch": s.batch,
                      "eval_size": s.eval_size, "metric_channel": s.metric_channel,
                      "metric_rounding": s.metric_rounding, "protocol": s.protocol},
            "provenance": provenance.verify_config(s),
            "attacker": asdict(attacker),
            "student": {"name": student_name, "arch": arch, "config": STUDENTS.get(arch)},
            "seed": seed, "hardener": hardener_fingerprint(), "attacks": attacks_fingerprint(),
            "environment": environment(arch.startswith("spandrel:")),
        })

    def run_file(self, task, defence: Defence, attacker, student, seed, run_id: str | None = None) -> Path:
        run_id = run_id or digest(self.run_config(task, defence, attacker, student, seed))
        return self.out / "runs" / f"{run_key(task, defence.name, attacker, student, seed)}__{run_id[:ID_CHARS]}.json"

    def _eval_id(self, task: str) -> str:
        return digest({"task": task, "eval_size": self.suite.eval_size, "attacks": attacks_fingerprint(),
                       "environment": environment()})[:12]

    def eval_set(self, task: str) -> list:
        """The held-out evaluation images of ``task``, built once per runner."""
        from .degrade import eval_set

        if task not in self._eval:
            self._eval[task] = eval_set(task, EVAL_SPLIT, hr_size=self.suite.eval_size)
            name, x, truth = self._eval[task][0]  # the grid's photo: its input and ground truth
            for kind, image in (("input", x), ("truth", truth)):
                if not self.eval_image(task, kind).exists():
                    save_png(self.eval_image(task, kind), image)
        return self._eval[task]

    def conventions(self, task: str) -> Conventions:
        """The suite's metric conventions for ``task``: crop border = scale for SR, 0 for same-size tasks."""
        from .degrade import TASKS

        scale = TASKS[task].scale
        return Conventions(channel=self.suite.metric_channel, crop_border=scale if scale > 1 else 0,
                           rounding=None if self.suite.metric_rounding == "none" else self.suite.metric_rounding)

    def eval_image(self, task: str, kind: str) -> Path:
        return self.image(f"{task}__{kind}__{self._eval_id(task)}")

    def image(self, stem: str) -> Path:
        """Where the report's PNG of ``stem`` lives (first held-out photo of the task)."""
        return self.out / "images" / f"{stem}.png"

    def teacher_image(self, task: str, path: Path) -> Path:
        return self.image(f"teacher__{task}__{file_sha256(path)[:ID_CHARS]}__{self._eval_id(task)}")

    # -- teachers ---------------------------------------------------------------------------------------
    def teacher_path(self, task: str, defence: Defence, strip: bool = False, strip_by: str = "manifest") -> Path:
        """The served teacher (the source file, or a cached hardened and/or marked copy keyed on its
        configuration), or with ``strip`` the thief's stripped copy of it.  A cached file whose manifest
        disagrees is rebuilt.  A marked defence marks the hardened file (harden first, then mark)."""
        source = self.source_teacher(task)
        if not defence.layers and not defence.mark:
            return source
        config = self.teacher_config(task, defence)
        unmarked_config = {k: v for k, v in config.items() if k != "mark"}
        stem = f"{task}__{defence.name}__{digest(unmarked_config)[:ID_CHARS]}"
        served = unmarked = source
        if defence.layers:
            served = unmarked = self.out / "teachers" / f"{stem}.onnx"
            if not self._hardened_matches(unmarked, source, config):
                harden(source, unmarked, HardenConfig(
                    layers=defence.layers, params=AsvpParams(**config["hardening"]["params"]),
                    placement=defence.placement, validate=False, force=True))  # written atomically
        if defence.mark:
            stem = f"{stem}__marked_{digest(config)[:ID_CHARS]}"
            served = self.out / "teachers" / f"{stem}.onnx"
            if not provenance.marked_matches(served, file_sha256(unmarked), config["mark"]):
                provenance.mark_teacher(task, unmarked, served, config["mark"])  # written atomically
        if not strip:
            return served
        strip_id = digest({"hardened": config, "attacks": attacks_fingerprint(), "by": strip_by})[:ID_CHARS]
        stripped = self.out / "teachers" / f"{stem}__stripped_{strip_id}.onnx"
        if not stripped.exists():
            model = onnx.load(str(served))
            if strip_by == "structure":  # the thief sees what `harden --no-manifest` ships: no labels at all
                from hardener.rewrite import anonymize

                model, _ = anonymize(model, onnx.load(str(self.source_teacher(task))), [])
            model, removed = strip_asvp(model, by=None if strip_by == "manifest" else strip_by)
            if removed == 0:
                raise RuntimeError(f"strip attack found no ASVP subgraph in {served}")
            atomic_write(model.SerializeToString(), None, stripped)  # a unique temporary: workers may race
        return stripped

    @staticmethod
    def _hardened_matches(path: Path, source: Path, config: dict) -> bool:
        """Whether a cached hardened teacher is what ``config`` asks for (its manifest says so)."""
        from hardener.rewrite import read_manifest

        manifest = stored_manifest(path, read_manifest)
        if manifest is None:
            return False
        want = config["hardening"]
        return (manifest.get("source_sha256") == file_sha256(source)
                and manifest.get("placement") == want["placement"]
                and normalized(manifest.get("params")) == want["params"]
                and manifest.get("version") == config["hardener"]["version"])

    def teacher_metrics(self, task: str, path: Path) -> dict:
        from .degrade import TASKS

        if str(path) not in self._teacher_metrics:
            oracle = Oracle(path, threads=self.threads)
            images = self.eval_set(task)
            self._teacher_metrics[str(path)] = evaluate(oracle, images, self.conventions(task))
            png = self.teacher_image(task, path)
            if not png.exists():
                save_png(png, oracle(images[0][1]))
        return self._teacher_metrics[str(path)]

    def answers(self, task: str, path: Path, seed: int, ensemble: bool = False, one_image: bool = False):
        """The thief's query set for ``seed`` and the teacher's answers (and tap features).

        The queries are patches of the protocol's photos (``shared``: the teachers' training photos;
        ``disjoint``: photos no teacher was trained on).  ``one_image``: every patch from the first of them;
        ``ensemble``: each input queried under the 8 flips/rotations, the answers mapped back and averaged
        (the features are the identity's)."""
        from .data import load_photos
        from .degrade import make_pairs

        key = f"{task}|{path}|{seed}|{ensemble}|{one_image}"
        if key not in self._answers:
            if self._train_photos is None:
                self._train_photos = load_photos(QUERY_SPLITS[self.suite.protocol])
                if not self._train_photos:
                    raise RuntimeError(f"no photos for the {self.suite.protocol!r} protocol's queries (split "
                                       f"{QUERY_SPLITS[self.suite.protocol]!r}: install the attacks extra)")
            photos = self._train_photos[:1] if one_image else self._train_photos
            inputs, truth = make_pairs(task, photos, hr_size=self.suite.patch,
                                       count=self.suite.queries, seed=1000 + seed)
            oracle = Oracle(path, threads=self.threads)
            answers, feats = oracle(inputs, features=True)
            if ensemble:
                answers = np.mean([dihedral(oracle(dihedral(inputs, t)), t, inverse=True) for t in range(8)],
                                  axis=0).astype(np.float32)
            self._answers = {key: (inputs, truth, answers, feats)}  # keep one: memory stays bounded
        return self._answers[key]

    # -- runs -------------------------------------------------------------------------------------------
    def plan(self) -> list[tuple]:
        from .schema import runs_against

        s = self.suite
        # seed outside attacker/student: consecutive runs share one query set and its answers (cached)
        return [(t, d, a, st, seed) for t in s.tasks for d in s.defences for seed in s.seeds
                for a in s.attackers for st in s.students
                if (d.attackers is None or a in d.attackers)
                and runs_against(d, a)]  # strip needs a hardened teacher; ground truth needs no teacher

    def identified_plan(self) -> list[tuple[tuple, dict, str, Path]]:
        """Each planned run with its configuration, digest and file."""
        out = []
        for item in self.plan():
            config = self.run_config(*item)
            run_id = digest(config)
            out.append((item, config, run_id, self.run_file(*item, run_id=run_id)))
        return out

    @staticmethod
    def load_run(file: Path, run_id: str, config: dict) -> dict | None:
        """The finished run in ``file`` if it is exactly the one asked for, else None (to be rerun)."""
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("run_id") != run_id or data.get("config") != config:
            return None
        return data

    def run_all(self, executor=None, progress=None) -> list[dict]:
        """Every planned run not already on disk, then this suite's finished runs.

        ``executor`` (:mod:`attacks.executors`: serial, local process pool, Dask) runs them as tasks that
        each write their own file; without one they run here, one after another.  A run that fails under an
        executor does not stop the others: its outcome is in ``self.outcomes`` and
        :class:`attacks.executors.RunsFailed` is raised after the rest finish (rerun to redo it)."""
        from tqdm import tqdm

        plan = self._plan = self.identified_plan()
        todo = [(item, config, run_id) for item, config, run_id, file in plan
                if self.load_run(file, run_id, config) is None]
        for (task, defence, attacker, _, _), _, _ in todo:  # every teacher first: a bad one fails in seconds
            self.teacher_path(task, defence, strip=ATTACKERS[attacker].strip, strip_by=ATTACKERS[attacker].strip_by)
            self.teacher_path(task, defence)
        if executor is not None:
            from .executors import run_jobs

            self.outcomes = run_jobs(self, executor, plan, todo, progress)  # raises RunsFailed after the rest
            return self.collect(plan)
        bar = tqdm(total=len(plan), initial=len(plan) - len(todo), desc="attack runs", unit="run",
                   disable=not self.progress)
        for item, config, run_id in todo:
            self.run_one(*item, config=config, run_id=run_id)
            bar.update(1)
        bar.close()
        return self.collect(plan)

    def run_one(self, task: str, defence: Defence, attacker_name: str, student_name: str, seed: int,
                config: dict | None = None, run_id: str | None = None) -> dict:
        from .degrade import TASKS

        config = config or self.run_config(task, defence, attacker_name, student_name, seed)
        run_id = run_id or digest(config)
        file = self.run_file(task, defence, attacker_name, student_name, seed, run_id=run_id)
        attacker = ATTACKERS[attacker_name]
        scale = TASKS[task].scale
        started = time.perf_counter()
        path = self.teacher_path(task, defence, strip=attacker.strip, strip_by=attacker.strip_by)
        queried = self.teacher_path(task, defence)  # what is served (the stripped file is the thief's copy)
        inputs, truth, answers, feats = self.answers(task, path, seed, ensemble=attacker.ensemble,
                                                     one_image=attacker.one_image)
        if attacker.queries_factor < 1:  # a smaller budget: the first queries of the same set
            n = max(1, int(round(len(inputs) * attacker.queries_factor)))
            inputs, truth, answers = inputs[:n], truth[:n], answers[:n]
            feats = {k: v[:n] for k, v in feats.items()}
        if attacker.demark:
            answers = demark_targets(answers, truth)
        targets = truth if attacker.ground_truth else answers
        student = build_student(attacker.student or student_name, scale, seed)
        steps = int(self.suite.steps * attacker.steps_factor)
        counter = StepCounter(step_file(self.out, file.stem), total=steps + int(steps * attacker.finetune_factor))
        hint_weight, tuning = 0.0, None
        if attacker.feature_weight > 0 and feats:  # the feature thief picks its hint weight on held-out queries
            candidates = (attacker.feature_weight / 10, attacker.feature_weight)
            counter.total += steps * len({0.0, *candidates})  # tune_feature_weight's trials
            hint_weight, tuning = tune_feature_weight(student, inputs, targets, feats, candidates, steps=steps,
                                                      loss=attacker.loss, target_filter=attacker.target_filter,
                                                      batch=self.suite.batch, seed=seed, progress=counter)
        curve = train_student(student, inputs, targets, steps=steps, loss=attacker.loss,
                              target_filter=attacker.target_filter, features=feats if hint_weight else None,
                              feature_weight=hint_weight, batch=self.suite.batch, seed=seed, progress=counter)
        if attacker.finetune_factor > 0:  # the thief polishes the student on its own ground truth
            finetune = int(steps * attacker.finetune_factor)
            curve += train_student(student, inputs, truth, steps=finetune, loss=attacker.loss, lr=1e-4,
                                   batch=self.suite.batch, seed=seed + 7919, progress=counter)
            steps += finetune
        predict = torch_predictor(student)
        metrics = evaluate(predict, self.eval_set(task), self.conventions(task))
        image = self.image(file.stem)
        save_png(image, predict(self.eval_set(task)[0][1]))
        served = self.teacher_metrics(task, queried)
        original = self.teacher_metrics(task, self.source_teacher(task))
        # provenance: the student's verify statistic against the suite's key (the original: the unmarked
        # source teacher), whatever its teacher; and the served teacher's own, an innocent unless it carries
        # the suite key's mark
        source, s = self.source_teacher(task), self.suite
        verdict = provenance.verdict(predict, source, teacher_sha256(source), s.provenance_probes,
                                     s.provenance_null_keys, eps=provenance.served_eps(queried),
                                     candidates=s.provenance_candidate_keys)
        prov_label, prov_why = provenance.label(defence, attacker)
        result = {
            "schema": RUN_SCHEMA, "run_id": run_id, "config": config,
            "task": task, "defence": asdict(defence), "attacker": asdict(attacker), "student": student_name,
            "student_arch": attacker.student or student_name, "student_params": parameter_count(student),
            "seed": seed, "queries": len(inputs), "steps": steps, "final_loss": curve[-1] if curve else None,
            "feature_weight_chosen": hint_weight if tuning is not None else None,
            "feature_tuning_l1": {str(k): v for k, v in tuning.items()} if tuning is not None else None,
            "student_metrics": metrics,
            "teacher_served": served,
            "teacher_original": original,
            "teacher_file_sha256": file_sha256(queried),
            "provenance": verdict, "provenance_label": prov_label, "provenance_why": prov_why,
            "teacher_provenance": provenance.teacher_verdict(queried, source, s.provenance_probes,
                                                             s.provenance_null_keys),
            "seconds": time.perf_counter() - started,
            "image": str(image.relative_to(self.out)),
            "teacher_image": str(self.teacher_image(task, queried).relative_to(self.out)),
            "input_image": str(self.eval_image(task, "input").relative_to(self.out)),
            "truth_image": str(self.eval_image(task, "truth").relative_to(self.out)),
            "conventions": f"{self.conventions(task).describe()}, {len(self.eval_set(task))} held-out photos "
                           f"({', '.join(name for name, *_ in self.eval_set(task))}; centre crops of at most "
                           f"{s.eval_size} px), queries from the {s.protocol!r} protocol's photos",
        }
        _write_json(file, result)
        return result

    def collect(self, plan: list | None = None) -> list[dict]:
        """This suite's finished runs (only files whose stored configuration is the planned one); the suite
        file's names and baselines apply (it is the authority on comparisons)."""
        plan = plan if plan is not None else self.identified_plan()
        results = []
        for (_, defence, _, _, _), config, run_id, file in plan:
            r = self.load_run(file, run_id, config)
            if r is not None:
                r["defence"]["name"], r["defence"]["baseline"] = defence.name, defence.baseline
                results.append(r)
        return results

    def foreign_runs(self, plan: list | None = None) -> list[Path]:
        """Run files in ``OUT/runs`` that are not this suite's (other configurations): never reported."""
        plan = plan if plan is not None else (getattr(self, "_plan", None) or self.identified_plan())
        mine = {file.name for *_, file in plan}
        return sorted(p for p in (self.out / "runs").glob("*.json") if p.name not in mine)


def step_file(out: Path, stem: str) -> Path:
    """Where a run in progress says how far its training got (read by the executors' live progress)."""
    return Path(out) / "runs" / ".steps" / f"{stem}.txt"


class StepCounter:
    """A ``progress`` for ``train_student`` that writes "step/total" to a small file every ``every`` steps
    (temp + rename), so a driver can show the step counts of runs in flight on any executor; the file is
    removed when the count reaches ``total``."""

    def __init__(self, path: Path, total: int, every: int = 20):
        self.path, self.total, self.every, self.n = path, total, every, 0
        path.parent.mkdir(parents=True, exist_ok=True)

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.n >= self.total:
            self.path.unlink(missing_ok=True)
        elif self.n % self.every == 0:
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(f"{self.n}/{self.total}")
            tmp.replace(self.path)


def dihedral(x: np.ndarray, t: int, inverse: bool = False) -> np.ndarray:
    """One of the 8 flips/rotations of NCHW images (``t`` in 0..7: rotation t % 4, then a flip if t >= 4),
    or its inverse."""
    k = t % 4
    if not inverse:
        y = np.rot90(x, k, axes=(2, 3))
        return np.ascontiguousarray(y[..., ::-1] if t >= 4 else y)
    y = x[..., ::-1] if t >= 4 else x
    return np.ascontiguousarray(np.rot90(y, -k, axes=(2, 3)))
