"""The attack grid: tasks x defences x attackers x students x seeds, resumable, with an honest report.

Each run writes one JSON file under ``OUT/runs/`` as soon as it finishes, named after a digest of everything
that determines it (:mod:`attacks.identity`) and holding that configuration; a rerun reuses a run whose file
exists *and* whose stored configuration is the one asked for, so a crash loses at most the run in flight and
a changed parameter (a gain, the steps, the teacher file, the hardener's code) is rerun, never reprinted.
Hardened teachers are cached under ``OUT/teachers/`` the same way.  ``OUT/report.json`` and ``OUT/report.md``
aggregate this suite's runs only: teacher PSNR with and without each defence (the cost), and each student's
PSNR next to the same student distilled from the undefended teacher (the protection).
"""
from __future__ import annotations

import json
import os
import time
import tomllib
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import onnx

from hardener.api import HardenConfig, harden
from hardener.asvp import AsvpParams
from hardener.model_io import atomic_write

from . import provenance
from .distill import ATTACKERS, demark_targets, evaluate, torch_predictor, train_student
from .identity import (attacks_fingerprint, digest, environment, file_sha256, hardener_fingerprint,
                       normalized, stored_manifest, teacher_sha256)
from .oracle import Oracle, strip_asvp
from .plots import image_grid, save_png, tradeoff_curve
from .students import STUDENTS, build_student, parameter_count

RUN_SCHEMA = "attacks.run/4"
ID_CHARS = 16  # hex digits of a run's or a teacher's digest in its file name (64 bits)
BUNDLED = {  # teachers that ship with the packages (recipes beside each file)
    "sr2": Path(str(resources.files("hardener") / "assets" / "sr_x2.onnx")),
    **{task: Path(str(resources.files("attacks") / "teachers" / f"{task}.onnx"))
       for task in ("sr4", "denoise", "lowlight", "underwater", "dehaze", "derain")},
}
SUITES = Path(str(resources.files("attacks") / "suites"))  # the suites behind the published numbers


def packaged_suites() -> list[str]:
    """Names of the suite files shipped in the package (``attack run NAME``)."""
    return sorted(p.stem for p in SUITES.glob("*.toml")) if SUITES.is_dir() else []


@dataclass
class Defence:
    name: str
    layers: list[str] = field(default_factory=list)  # empty: no defence (the original teacher)
    rank: int = 4
    gain: float = 1.3
    mode: str = "channel"
    placement: str = "inline"
    adaptive_energy: float | None = None
    attackers: list[str] | None = None  # restrict the suite's attackers for this defence (None: all)
    # what student drops are measured against: the undefended teacher, or another defence (for example an
    # identity-gain tap, so a feature-distilling thief is compared with one that sees clean features)
    baseline: str = "none"
    # serve the teacher (after hardening, if any) marked with a provenance key at a 0.05 dB cost
    # (attacks.provenance): "suite" = the key every run is verified against, "other" = a second key
    mark: bool = False
    mark_key: str = "suite"


@dataclass
class Suite:
    tasks: list[str] = field(default_factory=lambda: ["sr2"])
    teachers: dict[str, str] = field(default_factory=dict)  # task -> ONNX path (default: bundled)
    defences: list[Defence] = field(default_factory=lambda: [
        Defence("none"), Defence("asvp-k4-h1.3", layers=["body.*.conv2"])])
    attackers: list[str] = field(default_factory=lambda: ["naive", "charbonnier", "lowpass", "strip",
                                                          "ground_truth"])
    students: list[str] = field(default_factory=lambda: ["tiny", "edsr"])
    seeds: list[int] = field(default_factory=lambda: [0])
    queries: int = 384  # query patches the thief sends (its budget)
    patch: int = 64  # HR patch side
    steps: int = 600
    batch: int = 16
    eval_size: int = 128
    provenance_probes: int = 16  # default probe photos each student's provenance statistic runs on
    provenance_null_keys: int = 256  # public null keys of that statistic

    @classmethod
    def load(cls, path: Path, resolve_layers: bool = True) -> "Suite":
        """A suite from TOML, validated completely (see :mod:`attacks.schema`); relative teacher paths are
        relative to the suite file.  Raises :class:`attacks.schema.SuiteError` (a ValueError), one line per
        problem, each naming the key path, the value and what was expected."""
        from .schema import SuiteError, parse

        try:
            data = tomllib.loads(Path(path).read_text())
        except tomllib.TOMLDecodeError as exc:
            raise SuiteError(f"{path}: not valid TOML: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SuiteError(f"{path}: cannot read the suite file ({exc})") from None
        model = parse(data, str(path))
        given = model.model_dump(exclude_unset=True)
        if "defences" in given:
            given["defences"] = [Defence(**d) for d in given["defences"]]
        if "teachers" in given:
            given["teachers"] = {task: str((Path(path).parent / p) if not Path(p).is_absolute() else Path(p))
                                 for task, p in given["teachers"].items()}
        suite = cls(**given)
        suite.check(source=str(path), resolve_layers=resolve_layers)
        return suite

    def check(self, source: str = "suite", resolve_layers: bool = True) -> None:
        """Types, ranges and names (the same schema as a suite file), cross references, teachers, and each
        defence's layer selectors resolved against each task's teacher.  Raises SuiteError."""
        from .schema import cross_check, parse

        data = asdict(self)
        data["teachers"] = {k: str(v) for k, v in data["teachers"].items()}
        parse(data, source)
        cross_check(self, source, resolve_layers=resolve_layers)

    @classmethod
    def quick(cls) -> "Suite":
        """Minutes on a CPU: for tests and smoke runs, not for conclusions."""
        return cls(attackers=["naive", "strip", "ground_truth"], students=["tiny"], queries=48, patch=48,
                   steps=30, eval_size=64, provenance_probes=4, provenance_null_keys=64)


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
                      "eval_size": s.eval_size},
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
            self._eval[task] = eval_set(task, "test", hr_size=self.suite.eval_size)
            name, x, truth = self._eval[task][0]  # the grid's photo: its input and ground truth
            for kind, image in (("input", x), ("truth", truth)):
                if not self.eval_image(task, kind).exists():
                    save_png(self.eval_image(task, kind), image)
        return self._eval[task]

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
            self._teacher_metrics[str(path)] = evaluate(oracle, images, crop_border=TASKS[task].scale)
            png = self.teacher_image(task, path)
            if not png.exists():
                save_png(png, oracle(images[0][1]))
        return self._teacher_metrics[str(path)]

    def answers(self, task: str, path: Path, seed: int, ensemble: bool = False, one_image: bool = False):
        """The thief's query set for ``seed`` and the teacher's answers (and tap features).

        ``one_image``: every patch from the first training photo; ``ensemble``: each input queried under
        the 8 flips/rotations, the answers mapped back and averaged (the features are the identity's)."""
        from .data import load_photos
        from .degrade import make_pairs

        key = f"{task}|{path}|{seed}|{ensemble}|{one_image}"
        if key not in self._answers:
            if self._train_photos is None:
                self._train_photos = load_photos("train")
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
        curve = train_student(student, inputs, targets, steps=steps, loss=attacker.loss,
                              target_filter=attacker.target_filter, features=feats,
                              feature_weight=attacker.feature_weight, batch=self.suite.batch, seed=seed,
                              progress=counter)
        if attacker.finetune_factor > 0:  # the thief polishes the student on its own ground truth
            finetune = int(steps * attacker.finetune_factor)
            curve += train_student(student, inputs, truth, steps=finetune, loss=attacker.loss, lr=1e-4,
                                   batch=self.suite.batch, seed=seed + 7919, progress=counter)
            steps += finetune
        predict = torch_predictor(student)
        metrics = evaluate(predict, self.eval_set(task), crop_border=scale)
        image = self.image(file.stem)
        save_png(image, predict(self.eval_set(task)[0][1]))
        served = self.teacher_metrics(task, queried)
        original = self.teacher_metrics(task, self.source_teacher(task))
        # provenance: the student's verify statistic against the suite's key (the original: the unmarked
        # source teacher), whatever its teacher; and the served teacher's own, an innocent unless it carries
        # the suite key's mark
        source, s = self.source_teacher(task), self.suite
        verdict = provenance.verdict(predict, source, teacher_sha256(source), s.provenance_probes,
                                     s.provenance_null_keys, eps=provenance.served_eps(queried))
        prov_label, prov_why = provenance.label(defence, attacker)
        result = {
            "schema": RUN_SCHEMA, "run_id": run_id, "config": config,
            "task": task, "defence": asdict(defence), "attacker": asdict(attacker), "student": student_name,
            "student_arch": attacker.student or student_name, "student_params": parameter_count(student),
            "seed": seed, "queries": len(inputs), "steps": steps, "final_loss": curve[-1] if curve else None,
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
            "conventions": f"PSNR/SSIM per image then averaged, RGB, crop_border={scale}, clipped to [0,1], "
                           f"{len(self.eval_set(task))} held-out photos",
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


def summarize(results: list[dict]) -> dict:
    """Per (task, defence, attacker, student): mean/std over seeds, and drops against the baseline run.

    A drop is paired by seed (the same student, attacker, query set and initialisation distilled from the
    defence's baseline teacher, by default the undefended one, minus this one); its std over seeds is the
    spread.  Strip is compared with naive.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["task"], r["defence"]["name"], r["attacker"]["name"], r["student"]), []).append(r)
    rows = []
    order = lambda item: (item[0][0], item[0][1] != "none", item[0][1], item[0][2], item[0][3])  # noqa: E731
    for (task, defence, attacker, student), runs in sorted(groups.items(), key=order):
        runs = sorted(runs, key=lambda r: r["seed"])
        p = [r["student_metrics"]["psnr"] for r in runs]
        s = [r["student_metrics"]["ssim"] for r in runs]
        ref_attacker = "naive" if attacker in ("strip", "strip_blind") else attacker
        baseline = runs[0]["defence"].get("baseline", "none")
        ref = {r["seed"]: r for r in groups.get((task, baseline, ref_attacker, student), [])} \
            if defence != baseline else {}
        paired = [(ref[r["seed"]]["student_metrics"], r["student_metrics"]) for r in runs if r["seed"] in ref]
        drops = [a["psnr"] - b["psnr"] for a, b in paired]
        ci = paired_bootstrap([np.subtract(a["per_image_psnr"], b["per_image_psnr"]) for a, b in paired
                               if "per_image_psnr" in a and "per_image_psnr" in b]) if len(paired) > 1 else None
        ssim_drops = [100 * (a["ssim"] - b["ssim"]) / a["ssim"] for a, b in paired]
        t, d = runs[0], runs[0]["defence"]
        rows.append({
            "task": task, "defence": defence, "attacker": attacker, "student": student,
            "student_params": t.get("student_params"), "seeds": len(runs), "paired_seeds": len(paired),
            "baseline": baseline,
            "placement": d.get("placement"), "mode": d.get("mode"), "rank": d.get("rank") if d["layers"] else None,
            "gain": d.get("gain") if d["layers"] else None, "layers": d["layers"],
            "student_psnr": float(np.mean(p)), "student_psnr_std": float(np.std(p)),
            "student_ssim": float(np.mean(s)),
            "student_psnr_drop": float(np.mean(drops)) if drops else None,
            "student_psnr_drop_std": float(np.std(drops)) if drops else None,
            # 95 % paired bootstrap interval over seeds x images (None with fewer than 2 paired seeds)
            "student_psnr_drop_ci95": ci,
            "within_noise": None if ci is None else bool(ci[0] <= 0.0 <= ci[1]),
            "student_ssim_drop_pct": float(np.mean(ssim_drops)) if ssim_drops else None,
            "teacher_psnr": t["teacher_served"]["psnr"],
            "teacher_psnr_original": t["teacher_original"]["psnr"],
            "teacher_psnr_drop": t["teacher_original"]["psnr"] - t["teacher_served"]["psnr"],
            "teacher_ssim_drop_pct": 100 * (t["teacher_original"]["ssim"] - t["teacher_served"]["ssim"])
            / t["teacher_original"]["ssim"],
            "conventions": t.get("conventions"),
        })
        rows[-1].update(competence(groups, task, baseline, attacker, student))
    return {"schema": "attacks.report/3", "rows": rows, "provenance": provenance.table(results)}


BOOTSTRAP_SAMPLES = 2000


def paired_bootstrap(drops: list, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> list[float] | None:
    """95 % percentile interval of the mean drop, resampling seeds and, within them, images (two-stage,
    with replacement); ``drops`` holds one array of per-image drops per paired seed.  Deterministic."""
    rows = [np.asarray(d, np.float64) for d in drops if len(d)]
    if len(rows) < 2:
        return None
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    for b in range(samples):
        picked = rng.integers(0, len(rows), len(rows))
        means[b] = np.mean([rows[s][rng.integers(0, len(rows[s]), len(rows[s]))].mean() for s in picked])
    lo, hi = np.percentile(means, [2.5, 97.5])
    return [float(lo), float(hi)]


COMPETENCE_MARGIN = 0.05  # dB: the least shortfall against the naive thief that counts as incompetent


def competence(groups: dict, task: str, baseline: str, attacker: str, student: str) -> dict:
    """Is ``attacker`` at least as good as the naive thief against the clean (baseline) teacher?

    Paired by seed: d = PSNR(attacker's student) - PSNR(naive's student), both from the baseline teacher.
    Competent when mean(d) >= -max(COMPETENCE_MARGIN, 2 standard errors); an incompetent attacker's drops do
    not count as protection (``drop_counts`` False).  Strip thieves, the ground-truth control and the naive
    thief itself are not judged (n/a)."""
    if attacker in ("naive", "ground_truth", "strip", "strip_blind"):
        return {"competent": None, "competence_gap": None, "drop_counts": True}
    mine = {r["seed"]: r for r in groups.get((task, baseline, attacker, student), [])}
    naive = {r["seed"]: r for r in groups.get((task, baseline, "naive", student), [])}
    d = [mine[s]["student_metrics"]["psnr"] - naive[s]["student_metrics"]["psnr"] for s in mine if s in naive]
    if not d:
        return {"competent": None, "competence_gap": None, "drop_counts": False}
    gap = float(np.mean(d))
    se = float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
    ok = gap >= -max(COMPETENCE_MARGIN, 2 * se)
    return {"competent": bool(ok), "competence_gap": gap, "drop_counts": bool(ok)}


def _ci_text(row: dict) -> str:
    ci = row.get("student_psnr_drop_ci95")
    if ci is None:
        return "n/a" if row.get("student_psnr_drop") is not None else "-"
    return f"[{ci[0]:+.2f}, {ci[1]:+.2f}]" + (" within noise" if row.get("within_noise") else "")


def _fmt(v, f: str) -> str:
    return "-" if v is None else format(v, f)


def write_report(summary: dict, out: Path, results: list[dict] | None = None) -> None:
    """``report.json``, ``report.md`` and, given the runs, ``grid_<task>.png`` and ``tradeoff.png``."""
    rows = summary["rows"]
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out / "report.json")
    conventions = sorted({r["conventions"] for r in rows if r.get("conventions")})
    lines = ["# Attack report", "",
             "Students are distilled from the teacher's answers to the thief's queries (black box, ONNX "
             "Runtime) and evaluated on held-out photos: " + ("; ".join(conventions) or "-") + ".", "",
             "`student drop` = the same student, attacker and seed distilled from the baseline teacher (the "
             "undefended one unless the row says otherwise) minus this one, mean +- std over seeds (positive = "
             "protection; strip is compared with naive). "
             "`teacher drop` = what the defence costs the teacher against ground truth. "
             "`95 % CI` = paired bootstrap interval of the mean drop over seeds x held-out images "
             f"({BOOTSTRAP_SAMPLES} resamples; n/a with one seed); 'within noise' when it contains 0. "
             "`competent` = the attacker's student from the baseline (clean) teacher is at least as good as the "
             f"naive thief's (paired by seed, within max({COMPETENCE_MARGIN} dB, 2 standard errors)); an "
             "incompetent attacker's drop is struck through: it does not count as protection.", "",
             "## Defences", "",
             "| task | defence | placement | mode | k | h | layers | teacher PSNR | teacher drop (dB) | "
             "teacher SSIM drop (%) |", "|---|---|---|---|---:|---:|---|---:|---:|---:|"]
    seen = set()
    for r in rows:
        if (r["task"], r["defence"]) in seen:
            continue
        seen.add((r["task"], r["defence"]))
        lines.append(f"| {r['task']} | {r['defence']} | {r['placement'] if r['layers'] else '-'} | "
                     f"{r['mode'] if r['layers'] else '-'} | {_fmt(r['rank'], 'd')} | {_fmt(r['gain'], 'g')} | "
                     f"{', '.join(r['layers']) or '-'} | {r['teacher_psnr']:.2f} | {r['teacher_psnr_drop']:.3f} | "
                     f"{r['teacher_ssim_drop_pct']:.2f} |")
    lines += ["", "## Students", "",
              "| task | defence | attacker | student | seeds | competent | student PSNR | +- | student drop (dB) | "
              "+- | 95 % CI | SSIM drop (%) | teacher drop (dB) |",
              "|---|---|---|---|---:|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        vs = "" if r["baseline"] == "none" else f" (vs {r['baseline']})"
        ok = r.get("competent")
        competent = "n/a" if ok is None else "yes" if ok else f"no ({r['competence_gap']:+.2f} dB)"
        drop = _fmt(r["student_psnr_drop"], ".2f")
        drop = drop if r.get("drop_counts", True) or drop == "-" else f"~~{drop}~~"
        lines.append(f"| {r['task']} | {r['defence']}{vs} | {r['attacker']} | {r['student']} | {r['seeds']} | "
                     f"{competent} | {r['student_psnr']:.2f} | {r['student_psnr_std']:.2f} | {drop} | "
                     f"{_fmt(r['student_psnr_drop_std'], '.2f')} | {_ci_text(r)} | "
                     f"{_fmt(r['student_ssim_drop_pct'], '.1f')} | "
                     f"{r['teacher_psnr_drop']:.3f} |")
    lines += provenance.markdown(summary["provenance"]) if summary.get("provenance") else []
    if results:
        pictures = draw(summary, results, out)
        lines += ["", "## Pictures", ""] + [f"- `{p}`" for p in pictures]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def draw(summary: dict, results: list[dict], out: Path) -> list[str]:
    """An image grid per task (rows: defences; columns: input, ground truth, teacher, each student under the
    naive attacker, lowest seed) and the trade-off curve.  Returns the files written, relative to ``out``."""
    written = []
    by_task: dict[str, list[dict]] = {}
    for r in results:
        by_task.setdefault(r["task"], []).append(r)
    for task, runs in sorted(by_task.items()):
        defences = list(dict.fromkeys(r["defence"]["name"] for r in sorted(
            runs, key=lambda r: (bool(r["defence"]["layers"]), r["defence"]["gain"], r["defence"]["rank"]))))
        students = sorted({r["student"] for r in runs})
        grid = []
        for defence in defences:
            mine = [r for r in runs if r["defence"]["name"] == defence]
            first = mine[0]
            ts = first["teacher_served"]["per_image_psnr"][0]
            row = [("input", out / first.get("input_image", f"images/{task}__input.png")),
                   ("ground truth", out / first.get("truth_image", f"images/{task}__truth.png")),
                   (f"teacher [{defence}] {ts:.2f} dB", out / first["teacher_image"] if first.get("teacher_image") else None)]
            for student in students:
                naive = sorted((r for r in mine if r["student"] == student and r["attacker"]["name"] == "naive"),
                               key=lambda r: r["seed"])
                if naive:
                    sp = naive[0]["student_metrics"]["per_image_psnr"][0]
                    row.append((f"{student} (naive) {sp:.2f} dB", out / naive[0]["image"]))
                else:
                    row.append((f"{student} (naive): not run", None))
            grid.append(row)
        name = f"grid_{task}.png"
        image_grid(out / name, f"{task}: first held-out photo, PSNR of that photo", grid)
        written.append(name)
    if tradeoff_curve(out / "tradeoff.png", summary["rows"]):
        written.append("tradeoff.png")
    return written


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
