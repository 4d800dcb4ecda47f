"""The suite file's schema: every key, type, range and name checked before any run starts.

pydantic (v2, strict mode: ``steps = "600"`` or ``rank = 4.0`` are refused, not coerced) checks types, ranges
and names; the names come from the registries themselves (:data:`attacks.degrade.TASKS`,
:data:`attacks.distill.ATTACKERS`, :data:`attacks.students.STUDENTS`), and the defaults from the
:class:`attacks.suite.Suite` and :class:`attacks.suite.Defence` dataclasses.  Then :func:`cross_check` checks
what one key cannot (names that refer to each other, students that fit each task, teachers that exist, and
each defence's layer selectors resolved against each task's teacher with :class:`hardener.layers.LayerIndex`).
Every problem is reported as one line naming the key path, the value and what was expected.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import re
from functools import lru_cache
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from hardener.asvp import MODES
from hardener.provenance.probes import DEFAULT_COUNT as PROBE_COUNT
from hardener.rewrite import PLACEMENTS

from .degrade import TASKS
from .distill import ATTACKERS
from .provenance import MARK_KEYS
from .students import _SPANDREL_MISSING, _SPANDREL_SCALES, SPANDREL_STUDENTS, STUDENTS

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")  # defence names become parts of file names
STUDENT_NAMES = tuple(STUDENTS) + tuple(SPANDREL_STUDENTS)


class SuiteError(ValueError):
    """A suite that cannot run; the message is one line per problem, each naming its key path."""


def _unique(values):
    if values is not None:
        seen = set()
        for v in values:
            if v in seen:
                raise ValueError(f"no repeats, but {v!r} appears twice")
            seen.add(v)
    return values


def _name(value: str) -> str:
    if not NAME.fullmatch(value):
        raise ValueError("a name of letters, digits and . _ + - (it becomes part of file names)")
    return value


def _selectors(values: list[str]) -> list[str]:
    if any(not v.strip() for v in values):
        raise ValueError("non-empty layer selectors")
    return values


Task = Literal[tuple(TASKS)]
AttackerName = Literal[tuple(ATTACKERS)]
StudentName = Literal[STUDENT_NAMES]


def _defaults(cls) -> dict[str, Any]:
    """The dataclass's defaults (the single source of them), as pydantic ``Field`` arguments."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = {"default": f.default}
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = {"default_factory": f.default_factory}
    return out


@lru_cache(maxsize=None)
def build_models():
    """The pydantic models of a suite file and of a ``[[defences]]`` entry."""
    from .config import Defence, Suite

    d, s = _defaults(Defence), _defaults(Suite)

    class DefenceEntry(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        name: Annotated[str, AfterValidator(_name)]
        layers: Annotated[list[str], AfterValidator(_selectors), AfterValidator(_unique), Field(**d["layers"])]
        rank: Annotated[int, Field(ge=1, le=64, **d["rank"])]
        gain: Annotated[float, Field(gt=0, le=1000, allow_inf_nan=False, **d["gain"])]
        mode: Annotated[Literal[MODES], Field(**d["mode"])]
        placement: Annotated[Literal[PLACEMENTS], Field(**d["placement"])]
        adaptive_energy: Annotated[float | None, Field(gt=0, le=1, allow_inf_nan=False, **d["adaptive_energy"])]
        attackers: Annotated[Annotated[list[AttackerName], Field(min_length=1)] | None, AfterValidator(_unique),
                             Field(**d["attackers"])]
        baseline: Annotated[str, Field(**d["baseline"])]
        mark: Annotated[bool, Field(**d["mark"])]
        mark_key: Annotated[Literal[MARK_KEYS], Field(**d["mark_key"])]

    class SuiteFile(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        tasks: Annotated[list[Task], AfterValidator(_unique), Field(min_length=1, **s["tasks"])]
        teachers: Annotated[dict[Task, str], Field(**s["teachers"])]
        defences: Annotated[Annotated[list[DefenceEntry], Field(min_length=1)] | None,
                            Field(default=None)]  # None: the Suite dataclass's default defences
        attackers: Annotated[list[AttackerName], AfterValidator(_unique), Field(min_length=1, **s["attackers"])]
        students: Annotated[list[StudentName], AfterValidator(_unique), Field(min_length=1, **s["students"])]
        seeds: Annotated[list[Annotated[int, Field(ge=0, lt=2**31)]], AfterValidator(_unique),
                         Field(min_length=1, **s["seeds"])]
        queries: Annotated[int, Field(ge=1, le=1_000_000, **s["queries"])]
        patch: Annotated[int, Field(ge=8, le=512, **s["patch"])]
        steps: Annotated[int, Field(ge=1, le=10_000_000, **s["steps"])]
        batch: Annotated[int, Field(ge=1, le=4096, **s["batch"])]
        eval_size: Annotated[int, Field(ge=32, le=2048, **s["eval_size"])]
        metric_channel: Annotated[Literal["rgb", "y"], Field(**s["metric_channel"])]
        metric_rounding: Annotated[Literal["none", "uint8"], Field(**s["metric_rounding"])]
        protocol: Annotated[Literal["shared", "disjoint"], Field(**s["protocol"])]
        provenance_probes: Annotated[int, Field(ge=1, le=PROBE_COUNT, **s["provenance_probes"])]
        provenance_null_keys: Annotated[int, Field(ge=20, le=100_000, **s["provenance_null_keys"])]
        provenance_candidate_keys: Annotated[int, Field(ge=0, le=10_000, **s["provenance_candidate_keys"])]

    for model, cls in ((SuiteFile, Suite), (DefenceEntry, Defence)):  # the dataclasses are the source of keys
        keys = {f.name for f in dataclasses.fields(cls)}
        assert set(model.model_fields) == keys, f"{model.__name__} and {cls.__name__} disagree on keys"
    return SuiteFile, DefenceEntry


def defence_keys() -> dict[str, str]:
    """``[[defences]]`` keys -> what each accepts (for ``attack run --help``), from the model itself."""
    _, entry = build_models()
    return {name: _describe(f) for name, f in entry.model_fields.items()}


def suite_keys() -> dict[str, str]:
    model, _ = build_models()
    return {name: _describe(f) for name, f in model.model_fields.items()}


def _type_text(t) -> str:
    origin, args = get_origin(t), get_args(t)
    if origin is Annotated:
        return _type_text(args[0])
    if origin is Literal:
        for kind, names in (("task", TASKS), ("attacker", ATTACKERS), ("student", STUDENT_NAMES)):
            if set(args) == set(names):
                return f"{kind} name"
        return " | ".join(map(repr, args))
    if origin is list:
        return f"list of {_type_text(args[0])}"
    if origin is dict:
        return f"table {_type_text(args[0])} -> {_type_text(args[1])}"
    if origin in (Union, UnionType):
        rest = [a for a in args if a is not type(None)]
        return " | ".join(_type_text(a) for a in rest)
    if isinstance(t, type) and issubclass(t, BaseModel):
        return "[[defences]] entries"
    return {str: "string", int: "integer", float: "number", bool: "true | false"}.get(t, getattr(t, "__name__", str(t)))


def _describe(field) -> str:
    text = _type_text(field.annotation)
    bounds = []
    for m in field.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                bounds.append(f"{sym} {getattr(m, attr)}")
    if bounds:
        text += " " + ", ".join(bounds)
    if field.is_required():
        return text + "; required"
    default = field.get_default(call_default_factory=True)
    if default is None and text.endswith("[[defences]] entries"):
        from .config import Suite

        return text + "; default: " + ", ".join(f"{d.name!r}" for d in Suite().defences)
    return text + ("; optional" if default is None else f"; default {default!r}")


# ------------------------------------------------------------------------------------------ errors
def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if part == "[key]":
            out += " (key)"
        elif isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _value(v) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _line(err: dict, suite_keys_: list[str], defence_keys_: list[str]) -> str:
    loc, kind, value = err["loc"], err["type"], err.get("input")
    path = _path(loc)
    if kind == "extra_forbidden":
        keys = defence_keys_ if loc[:1] == ("defences",) else suite_keys_
        where = "a [[defences]] entry" if loc[:1] == ("defences",) else "a suite file"
        return f"{path}: unknown key {loc[-1]!r}; valid keys in {where}: {', '.join(keys)}"
    if kind == "missing":
        return f"{path}: missing (required)"
    msg = err["msg"].removeprefix("Value error, ")
    msg = re.sub(r"(List|Value|Dictionary) should have at least 1 items? after validation, not 0", "at least one item",
                 msg)
    msg = msg.replace("Input should be ", "one of " if kind == "literal_error" else "")
    return f"{path} = {_value(value)}: expected {msg}"


def parse(data: dict, source: str = "suite"):
    """The validated suite file model, or :class:`SuiteError` with one line per problem."""
    model, entry = build_models()
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = [_line(e, list(model.model_fields), list(entry.model_fields)) for e in exc.errors()]
        raise SuiteError(f"{source}: " + "; ".join(lines)) from None


# ------------------------------------------------------------------------------------------ cross checks
def cross_check(suite, source: str = "suite", resolve_layers: bool = True) -> None:
    """What one key cannot check alone; raises :class:`SuiteError` naming the key path."""
    def fail(path: str, value, expected: str):
        raise SuiteError(f"{source}: {path} = {_value(value)}: {expected}")

    names = [d.name for d in suite.defences]
    for i, d in enumerate(suite.defences):
        if d.name in names[:i]:
            fail(f"defences[{i}].name", d.name, "expected a name not used by another defence (names must be unique)")
    if not any(not d.layers and not d.mark for d in suite.defences):
        raise SuiteError(f"{source}: defences: a suite needs the undefended teacher: add [[defences]] "
                         "name = \"none\" (no layers, no mark)")
    for i, d in enumerate(suite.defences):
        if d.mark_key != "suite" and not d.mark:
            fail(f"defences[{i}].mark_key", d.mark_key, "expected mark = true with it (an unmarked teacher has "
                 "no mark key)")
    for i, d in enumerate(suite.defences):
        for j, a in enumerate(d.attackers or []):
            if a not in suite.attackers:
                fail(f"defences[{i}].attackers[{j}]", a,
                     f"expected one of the suite's attackers ({', '.join(suite.attackers)})")
        if d.baseline not in names:
            fail(f"defences[{i}].baseline", d.baseline, f"expected a defence of this suite ({', '.join(names)})")
        if not any(runs_against(d, a) for a in (d.attackers or suite.attackers)):
            fail(f"defences[{i}].attackers", d.attackers or suite.attackers,
                 "expected at least one attacker that runs against this defence ('strip' needs a hardened "
                 "teacher, 'ground_truth' runs only against the undefended one)")
    if any(ATTACKERS[a].feature_weight > 0 for a in suite.attackers):
        for i, s in enumerate(suite.students):
            if s not in STUDENTS:
                fail(f"students[{i}]", s, "the 'features' attacker needs a student with head/body modules "
                     f"({', '.join(STUDENTS)})")
    for i, s in enumerate(suite.students):
        if s.startswith("spandrel:"):
            if importlib.util.find_spec("spandrel") is None:
                fail(f"students[{i}]", s, _SPANDREL_MISSING)
            arch = s.split(":", 1)[1]
            for task in suite.tasks:
                if TASKS[task].scale not in _SPANDREL_SCALES[arch]:
                    fail(f"students[{i}]", s, f"a student for scale {TASKS[task].scale} (task '{task}'); "
                         f"this one supports scale {', '.join(map(str, _SPANDREL_SCALES[arch]))} only")
    for task in suite.tasks:
        if suite.patch % TASKS[task].scale:
            fail("patch", suite.patch, f"expected a multiple of {TASKS[task].scale} (the scale of task '{task}')")
    hardened = [(i, d) for i, d in enumerate(suite.defences) if d.layers]
    for task in suite.tasks:
        path = teacher_file(suite, task)
        where = f"teachers.{task}" if task in suite.teachers else f"tasks[{suite.tasks.index(task)}]"
        if not path.is_file():
            fail(where, str(path), "expected an existing ONNX teacher file (no such file)")
        if resolve_layers and hardened:
            index = _layer_index(path, where, fail)
            for i, d in hardened:
                try:
                    index.select(d.layers)
                except Exception as exc:  # noqa: BLE001 - hardener's UsageError: a selector that does not fit
                    fail(f"defences[{i}].layers", d.layers, f"{exc} (teacher of task '{task}': {path.name})")


def runs_against(defence, attacker: str) -> bool:
    a = ATTACKERS[attacker]
    return not (a.strip and not defence.layers) and not (a.ground_truth and (defence.layers or defence.mark))


def teacher_file(suite, task: str) -> Path:
    from .config import BUNDLED

    return Path(suite.teachers.get(task) or BUNDLED.get(task) or "")


def _layer_index(path: Path, where: str, fail):
    from hardener.errors import HardenerError
    from hardener.layers import LayerIndex
    from hardener.model_io import load_model

    try:
        return LayerIndex(load_model(path, runnable=False).model)
    except HardenerError as exc:
        fail(where, str(path), f"expected a valid ONNX teacher ({exc})")

