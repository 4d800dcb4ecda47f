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
from .plots import image_grid, save_png, tradeoff_curve
from .students import build_student, parameter_count

_ROOT = Path(__file__).resolve().parents[1]
BUNDLED = {  # teachers that ship with the repo (recipes beside each file)
    "sr2": _ROOT / "hardener" / "assets" / "sr_x2.onnx",
    **{task: _ROOT / "attacks" / "teachers" / f"{task}.onnx"
       for task in ("sr4", "denoise", "lowlight", "underwater", "dehaze", "derain")},
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
    attackers: list[str] | None = None  # restrict the suite's attackers for this defence (None: all)
    # what student drops are measured against: the undefended teacher, or another defence (for example an
    # identity-gain tap, so a feature-distilling thief is compared with one that sees clean features)
    baseline: str = "none"


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
        """A suite from TOML; unknown keys and names are refused with the list of valid ones."""
        from dataclasses import fields

        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML: {exc}") from None
        known = {f.name for f in fields(cls)}
        if set(data) - known:
            raise ValueError(f"{path}: unknown key(s) {', '.join(sorted(set(data) - known))}; "
                             f"valid: {', '.join(sorted(known))}")
        defence_keys = {f.name for f in fields(Defence)}
        for d in data.get("defences", []):
            if set(d) - defence_keys or "name" not in d:
                raise ValueError(f"{path}: a [[defences]] entry needs 'name' and only "
                                 f"{', '.join(sorted(defence_keys))}; got {', '.join(sorted(d))}")
        data["defences"] = [Defence(**d) for d in data.get("defences", [])] or cls().defences
        suite = cls(**data)
        suite.check()
        return suite

    def check(self) -> None:
        from .degrade import TASKS
        from .students import SPANDREL_STUDENTS, STUDENTS

        def unknown(kind, names, valid):
            bad = [n for n in names if n not in valid]
            if bad:
                raise ValueError(f"unknown {kind} {', '.join(map(repr, bad))}; choose from {', '.join(valid)}")

        unknown("task", self.tasks, list(TASKS))
        unknown("attacker", self.attackers, list(ATTACKERS))
        unknown("student", self.students, list(STUDENTS) + list(SPANDREL_STUDENTS))
        if any(ATTACKERS[a].feature_weight > 0 for a in self.attackers) and \
                any(s not in STUDENTS for s in self.students):
            raise ValueError("the 'features' attacker needs a student with head/body modules "
                             f"({', '.join(STUDENTS)}), not {', '.join(s for s in self.students if s not in STUDENTS)}")
        for d in self.defences:
            unknown(f"attacker (defence {d.name})", d.attackers or [], self.attackers)
        names = [d.name for d in self.defences]
        if len(set(names)) != len(names):
            raise ValueError(f"defence names must be unique, got {names}")
        if not any(not d.layers for d in self.defences):
            raise ValueError("a suite needs the undefended teacher: add [[defences]] name = \"none\"")
        for d in self.defences:
            if d.baseline not in names:
                raise ValueError(f"defence {d.name}: baseline {d.baseline!r} is not a defence of this suite")

    @classmethod
    def quick(cls) -> "Suite":
        """Minutes on a CPU: for tests and smoke runs, not for conclusions."""
        return cls(attackers=["naive", "strip", "ground_truth"], students=["tiny"], queries=48, patch=48,
                   steps=30, eval_size=64)


def run_key(task, defence, attacker, student, seed) -> str:
    return f"{task}__{defence}__{attacker}__{student.replace(':', '-')}__s{seed}"


class Runner:
    def __init__(self, suite: Suite, out: Path, progress: bool = True):
        self.suite, self.out, self.progress = suite, out, progress
        (out / "runs").mkdir(parents=True, exist_ok=True)
        (out / "teachers").mkdir(exist_ok=True)
        self._answers: dict[str, tuple] = {}
        self._teacher_metrics: dict[str, dict] = {}
        self._eval: dict[str, list] = {}
        self._train_photos = None

    def eval_set(self, task: str) -> list:
        """The held-out evaluation images of ``task``, built once per runner."""
        from .degrade import eval_set

        if task not in self._eval:
            self._eval[task] = eval_set(task, "test", hr_size=self.suite.eval_size)
            name, x, truth = self._eval[task][0]  # the grid's photo: its input and ground truth
            for kind, image in (("input", x), ("truth", truth)):
                if not self.image(f"{task}__{kind}").exists():
                    save_png(self.image(f"{task}__{kind}"), image)
        return self._eval[task]

    def image(self, stem: str) -> Path:
        """Where the report's PNG of ``stem`` lives (first held-out photo of the task)."""
        return self.out / "images" / f"{stem}.png"

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
                                adaptive_energy=defence.adaptive_energy)  # automatic iterations/precision
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
            images = self.eval_set(task)
            self._teacher_metrics[str(path)] = evaluate(oracle, images, crop_border=TASKS[task].scale)
            png = self.image(f"teacher__{task}__{path.stem}")
            if not png.exists():
                save_png(png, oracle(images[0][1]))
        return self._teacher_metrics[str(path)]

    def answers(self, task: str, path: Path, seed: int):
        """The thief's query set for ``seed`` and the teacher's answers (and tap features)."""
        from .data import load_photos
        from .degrade import make_pairs

        key = f"{task}|{path}|{seed}"
        if key not in self._answers:
            if self._train_photos is None:
                self._train_photos = load_photos("train")
            inputs, truth = make_pairs(task, self._train_photos, hr_size=self.suite.patch,
                                       count=self.suite.queries, seed=1000 + seed)
            answers, feats = Oracle(path)(inputs, features=True)
            self._answers = {key: (inputs, truth, answers, feats)}  # keep one: memory stays bounded
        return self._answers[key]

    # -- runs -------------------------------------------------------------------------------------------
    def plan(self) -> list[tuple]:
        s = self.suite
        # seed outside attacker/student: consecutive runs share one query set and its answers (cached)
        return [(t, d, a, st, seed) for t in s.tasks for d in s.defences for seed in s.seeds
                for a in s.attackers for st in s.students
                if (d.attackers is None or a in d.attackers)
                and not (ATTACKERS[a].strip and not d.layers)  # nothing to strip from an undefended teacher
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
        predict = torch_predictor(student)
        metrics = evaluate(predict, self.eval_set(task), crop_border=scale)
        key = run_key(task, defence.name, attacker_name, student_name, seed)
        save_png(self.image(key), predict(self.eval_set(task)[0][1]))
        result = {
            "task": task, "defence": asdict(defence), "attacker": asdict(attacker), "student": student_name,
            "student_arch": attacker.student or student_name, "student_params": parameter_count(student),
            "seed": seed, "queries": len(inputs), "steps": steps, "final_loss": curve[-1] if curve else None,
            "student_metrics": metrics,
            "teacher_served": self.teacher_metrics(task, queried),
            "teacher_original": self.teacher_metrics(task, self.teacher_path(task, Defence("none"))),
            "seconds": time.perf_counter() - started,
            "image": str(self.image(key).relative_to(self.out)),
            "teacher_image": str(self.image(f"teacher__{task}__{queried.stem}").relative_to(self.out)),
            "conventions": f"PSNR/SSIM per image then averaged, RGB, crop_border={scale}, clipped to [0,1], "
                           f"{len(self.eval_set(task))} held-out photos",
        }
        file = self._file(task, defence, attacker_name, student_name, seed)
        tmp = file.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(file)
        return result

    def collect(self) -> list[dict]:
        """Every finished run; the suite file's baselines apply (it is the authority on comparisons)."""
        baselines = {d.name: d.baseline for d in self.suite.defences}
        results = [json.loads(p.read_text()) for p in sorted((self.out / "runs").glob("*.json"))]
        for r in results:
            r["defence"]["baseline"] = baselines.get(r["defence"]["name"], r["defence"].get("baseline", "none"))
        return results


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
        ref_attacker = "naive" if attacker == "strip" else attacker
        baseline = runs[0]["defence"].get("baseline", "none")
        ref = {r["seed"]: r for r in groups.get((task, baseline, ref_attacker, student), [])} \
            if defence != baseline else {}
        paired = [(ref[r["seed"]]["student_metrics"], r["student_metrics"]) for r in runs if r["seed"] in ref]
        drops = [a["psnr"] - b["psnr"] for a, b in paired]
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
            "student_ssim_drop_pct": float(np.mean(ssim_drops)) if ssim_drops else None,
            "teacher_psnr": t["teacher_served"]["psnr"],
            "teacher_psnr_original": t["teacher_original"]["psnr"],
            "teacher_psnr_drop": t["teacher_original"]["psnr"] - t["teacher_served"]["psnr"],
            "teacher_ssim_drop_pct": 100 * (t["teacher_original"]["ssim"] - t["teacher_served"]["ssim"])
            / t["teacher_original"]["ssim"],
            "conventions": t.get("conventions"),
        })
    return {"schema": "attacks.report/2", "rows": rows}


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
             "`teacher drop` = what the defence costs the teacher against ground truth.", "",
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
              "| task | defence | attacker | student | seeds | student PSNR | +- | student drop (dB) | +- | "
              "SSIM drop (%) | teacher drop (dB) |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        vs = "" if r["baseline"] == "none" else f" (vs {r['baseline']})"
        lines.append(f"| {r['task']} | {r['defence']}{vs} | {r['attacker']} | {r['student']} | {r['seeds']} | "
                     f"{r['student_psnr']:.2f} | {r['student_psnr_std']:.2f} | {_fmt(r['student_psnr_drop'], '.2f')} | "
                     f"{_fmt(r['student_psnr_drop_std'], '.2f')} | {_fmt(r['student_ssim_drop_pct'], '.1f')} | "
                     f"{r['teacher_psnr_drop']:.3f} |")
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
            row = [("input", out / "images" / f"{task}__input.png"),
                   ("ground truth", out / "images" / f"{task}__truth.png"),
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
