"""The attack grid: tasks x defences x attackers x students x seeds, resumable, with an honest report.

Each run writes one JSON file under ``OUT/runs/`` as soon as it finishes; a rerun skips runs whose file
exists, so a crash loses at most the run in flight. ``OUT/report.json`` and ``OUT/report.md`` aggregate
whatever runs exist: teacher PSNR with and without each defence (the cost), and each student's PSNR next
to the same student distilled from the undefended teacher (the protection).
"""
from __future__ import annotations

import json
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from hardener.api import HardenConfig, harden
from hardener.asvp import AsvpParams
from hardener.validate import Budgets

from .distill import ATTACKERS, evaluate, torch_predictor, train_student
from .oracle import Oracle, strip_asvp
from .students import build_student, parameter_count

_ROOT = Path(__file__).resolve().parents[1]
BUNDLED = {  # teachers that ship with the repo (recipes beside each file)
    "sr2": _ROOT / "hardener" / "assets" / "sr_x2.onnx",
    "denoise": _ROOT / "attacks" / "teachers" / "denoise.onnx",
    "lowlight": _ROOT / "attacks" / "teachers" / "lowlight.onnx",
}


@dataclass
class Defence:
    name: str
    layers: list[str] = field(default_factory=list)  # empty: no defence (the original teacher)
    rank: int = 4
    gain: float = 1.3
    mode: str = "channel"
    placement: str = "inline"
    adaptive_energy: float | None = None


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

    @classmethod
    def load(cls, path: Path) -> "Suite":
        data = tomllib.loads(path.read_text())
        data["defences"] = [Defence(**d) for d in data.get("defences", [])] or cls().defences
        return cls(**data)

    @classmethod
    def quick(cls) -> "Suite":
        """Minutes on a CPU: for tests and smoke runs, not for conclusions."""
        return cls(attackers=["naive", "strip", "ground_truth"], students=["tiny"], queries=48, patch=48,
                   steps=30, eval_size=64)


def run_key(task, defence, attacker, student, seed) -> str:
    return f"{task}__{defence}__{attacker}__{student}__s{seed}"


class Runner:
    def __init__(self, suite: Suite, out: Path, progress: bool = True):
        self.suite, self.out, self.progress = suite, out, progress
        (out / "runs").mkdir(parents=True, exist_ok=True)
        (out / "teachers").mkdir(exist_ok=True)
        self._answers: dict[str, tuple] = {}
        self._teacher_metrics: dict[str, dict] = {}
        self._eval: dict[str, list] = {}

    def eval_set(self, task: str) -> list:
        """The held-out evaluation images of ``task``, built once per runner."""
        from .degrade import eval_set

        if task not in self._eval:
            self._eval[task] = eval_set(task, "test", hr_size=self.suite.eval_size)
        return self._eval[task]

    # -- teachers ---------------------------------------------------------------------------------------
    def teacher_path(self, task: str, defence: Defence, strip: bool = False) -> Path:
        source = Path(self.suite.teachers.get(task) or BUNDLED.get(task) or "")
        if not source.is_file():
            raise FileNotFoundError(f"no teacher for task '{task}': set teachers.{task} in the suite file")
        if not defence.layers:
            return source
        hardened = self.out / "teachers" / f"{task}__{defence.name}.onnx"
        if not hardened.exists():
            params = AsvpParams(rank=defence.rank, gain=defence.gain, mode=defence.mode,
                                adaptive_energy=defence.adaptive_energy)
            harden(source, hardened, HardenConfig(layers=defence.layers, params=params,
                                                  placement=defence.placement, validate=False, force=True))
        if not strip:
            return hardened
        stripped = self.out / "teachers" / f"{task}__{defence.name}__stripped.onnx"
        if not stripped.exists():
            model, removed = strip_asvp(onnx.load(str(hardened)))
            if removed == 0:
                raise RuntimeError(f"strip attack found no ASVP subgraph in {hardened}")
            onnx.save(model, str(stripped))
        return stripped

    def teacher_metrics(self, task: str, path: Path) -> dict:
        from .degrade import TASKS

        if str(path) not in self._teacher_metrics:
            oracle = Oracle(path)
            self._teacher_metrics[str(path)] = evaluate(oracle, self.eval_set(task), crop_border=TASKS[task].scale)
        return self._teacher_metrics[str(path)]

    def answers(self, task: str, path: Path, seed: int):
        """The thief's query set for ``seed`` and the teacher's answers (and tap features)."""
        from .data import load_photos
        from .degrade import make_pairs

        key = f"{task}|{path}|{seed}"
        if key not in self._answers:
            inputs, truth = make_pairs(task, load_photos("train"), hr_size=self.suite.patch,
                                       count=self.suite.queries, seed=1000 + seed)
            answers, feats = Oracle(path)(inputs, features=True)
            self._answers = {key: (inputs, truth, answers, feats)}  # keep one: memory stays bounded
        return self._answers[key]

    # -- runs -------------------------------------------------------------------------------------------
    def plan(self) -> list[tuple]:
        s = self.suite
        return [(t, d, a, st, seed) for t in s.tasks for d in s.defences for a in s.attackers
                for st in s.students for seed in s.seeds
                if not (ATTACKERS[a].strip and not d.layers)  # nothing to strip from an undefended teacher
                and not (ATTACKERS[a].ground_truth and d.layers)]  # the ground-truth control needs no teacher

    def run_all(self) -> list[dict]:
        from tqdm import tqdm

        plan = self.plan()
        todo = [p for p in plan if not self._file(*p).exists()]
        bar = tqdm(total=len(plan), initial=len(plan) - len(todo), desc="attack runs", unit="run",
                   disable=not self.progress)
        for item in todo:
            self.run_one(*item)
            bar.update(1)
        bar.close()
        return self.collect()

    def _file(self, task, defence, attacker, student, seed) -> Path:
        return self.out / "runs" / (run_key(task, defence.name, attacker, student, seed) + ".json")

    def run_one(self, task: str, defence: Defence, attacker_name: str, student_name: str, seed: int) -> dict:
        from .degrade import TASKS

        attacker = ATTACKERS[attacker_name]
        scale = TASKS[task].scale
        started = time.perf_counter()
        path = self.teacher_path(task, defence, strip=attacker.strip)
        queried = self.teacher_path(task, defence)  # what is served (the stripped file is the thief's copy)
        inputs, truth, answers, feats = self.answers(task, path, seed)
        targets = truth if attacker.ground_truth else answers
        student = build_student(attacker.student or student_name, scale, seed)
        steps = int(self.suite.steps * attacker.steps_factor)
        curve = train_student(student, inputs, targets, steps=steps, loss=attacker.loss,
                              target_filter=attacker.target_filter, features=feats,
                              feature_weight=attacker.feature_weight, batch=self.suite.batch, seed=seed)
        metrics = evaluate(torch_predictor(student), self.eval_set(task), crop_border=scale)
        result = {
            "task": task, "defence": asdict(defence), "attacker": asdict(attacker), "student": student_name,
            "student_arch": attacker.student or student_name, "student_params": parameter_count(student),
            "seed": seed, "queries": len(inputs), "steps": steps, "final_loss": curve[-1] if curve else None,
            "student_metrics": metrics,
            "teacher_served": self.teacher_metrics(task, queried),
            "teacher_original": self.teacher_metrics(task, self.teacher_path(task, Defence("none"))),
            "seconds": time.perf_counter() - started,
            "conventions": f"PSNR/SSIM per image then averaged, RGB, crop_border={scale}, clipped to [0,1], "
                           f"{len(self.eval_set(task))} held-out photos",
        }
        file = self._file(task, defence, attacker_name, student_name, seed)
        tmp = file.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(file)
        return result

    def collect(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted((self.out / "runs").glob("*.json"))]


def summarize(results: list[dict]) -> dict:
    """Per (task, defence, attacker, student): mean/std over seeds, and drops against the undefended run."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["task"], r["defence"]["name"], r["attacker"]["name"], r["student"]), []).append(r)
    rows = []
    for (task, defence, attacker, student), runs in sorted(groups.items()):
        p = [r["student_metrics"]["psnr"] for r in runs]
        s = [r["student_metrics"]["ssim"] for r in runs]
        ref_attacker = "naive" if attacker == "strip" else attacker
        ref = groups.get((task, "none", ref_attacker, student)) if defence != "none" else None
        ref_p = float(np.mean([r["student_metrics"]["psnr"] for r in ref])) if ref else None
        ref_s = float(np.mean([r["student_metrics"]["ssim"] for r in ref])) if ref else None
        t = runs[0]
        rows.append({
            "task": task, "defence": defence, "attacker": attacker, "student": student, "seeds": len(runs),
            "student_psnr": float(np.mean(p)), "student_psnr_std": float(np.std(p)),
            "student_ssim": float(np.mean(s)),
            "student_psnr_drop": None if ref_p is None else ref_p - float(np.mean(p)),
            "student_ssim_drop_pct": None if ref_s is None else 100 * (ref_s - float(np.mean(s))) / ref_s,
            "teacher_psnr": t["teacher_served"]["psnr"],
            "teacher_psnr_drop": t["teacher_original"]["psnr"] - t["teacher_served"]["psnr"],
        })
    return {"schema": "attacks.report/1", "rows": rows}


def write_report(summary: dict, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    lines = ["# Attack report", "",
             "Student PSNR/SSIM on held-out photos (per image, then averaged; RGB; crop_border = scale). "
             "`student drop` = the same student and attacker distilled from the undefended teacher minus "
             "this one (positive = protection); strip is compared with naive. `teacher drop` = what the "
             "defence costs the teacher.", "",
             "| task | defence | attacker | student | seeds | student PSNR | +- | student drop (dB) | "
             "SSIM drop (%) | teacher PSNR | teacher drop (dB) |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in summary["rows"]:
        lines.append(f"| {r['task']} | {r['defence']} | {r['attacker']} | {r['student']} | {r['seeds']} | "
                     f"{r['student_psnr']:.2f} | {r['student_psnr_std']:.2f} | {fmt(r['student_psnr_drop'], '.2f')} | "
                     f"{fmt(r['student_ssim_drop_pct'], '.1f')} | {r['teacher_psnr']:.2f} | "
                     f"{r['teacher_psnr_drop']:.3f} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
