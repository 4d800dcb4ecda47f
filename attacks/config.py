"""An attack suite's configuration: the grid (:class:`Suite`: tasks x defences x attackers x students x seeds,
and the thief's budget), each defence (:class:`Defence`), the bundled teachers (:data:`BUNDLED`) and the suite
files that ship with the package (:data:`SUITES`, :func:`packaged_suites`).  A suite file is TOML validated
completely by :mod:`attacks.schema`; running it is :mod:`attacks.runner`'s job, reporting it
:mod:`attacks.report`'s.
"""
from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

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
    # evaluation photos: the centre crop of at most eval_size pixels (HR side); 512 = whole photos (the loader
    # caps the longer side at 512)
    eval_size: int = 512
    # metric conventions (hardener.metrics.Conventions): RGB or BT.601 Y, and optional 8-bit rounding of the
    # outputs; the crop border is the scale for SR and 0 for same-size tasks
    metric_channel: str = "rgb"
    metric_rounding: str = "none"
    # where the thief's queries come from: "shared" = the teachers' training photos, "disjoint" = photos no
    # teacher was trained on (attacks.data split "disjoint"); the evaluation photos are the same in both
    protocol: str = "shared"
    provenance_probes: int = 16  # default probe photos each student's provenance statistic runs on
    provenance_null_keys: int = 256  # public null keys of that statistic
    # innocent trials per run: the student is also tested against this many candidate keys that no teacher
    # was marked with (attacks.innocents.candidate_keys); each (student, candidate key) is one innocent trial
    provenance_candidate_keys: int = 0

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
