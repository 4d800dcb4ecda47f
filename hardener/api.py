"""The Python API: ``harden(model, output, config)``, mirroring ONNX Runtime's quantizer.

    from hardener import HardenConfig, harden
    result = harden("model.onnx", "model.hardened.onnx", HardenConfig(layers=["body.3.conv2"]))
    print(result.summary)

The CLI (``harden``) is a thin layer over this module.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import onnx

from .asvp import AsvpParams
from .errors import FidelityError, InvalidModelError
from .inputs import DataReader, open_inputs
from .layers import LayerIndex
from .model_io import check_output_paths, load_model, save_model, sha256_file
from .report import SCHEMA, summary, versions, write_json
from .rewrite import insert_asvp, make_node_names_unique
from .validate import Budgets, make_session, resolve_providers, validate


@dataclass
class HardenConfig:
    layers: list[str]
    params: AsvpParams = field(default_factory=AsvpParams)
    placement: str = "inline"
    validate: bool = True
    budgets: Budgets = field(default_factory=Budgets)
    providers: list[str] | None = None  # None: CUDA if this onnxruntime has it, else CPU
    tf32: bool = False
    scrub_paths: bool = True
    force: bool = False
    inputs: str | None = None  # .npz or image folder for validation; None: seeded synthetic inputs
    truth: str | None = None  # ground-truth image folder matching an image-folder ``inputs``
    num_samples: int | None = None  # at most this many validation inputs (synthetic: exactly; default 4)


@dataclass
class HardenResult:
    output: Path
    report: dict
    summary: str

    @property
    def passed(self) -> bool:
        return self.report["status"] == "PASSED"


def harden(
    model_path: str | os.PathLike,
    output_path: str | os.PathLike,
    config: HardenConfig,
    data_reader: DataReader | None = None,
    report_path: str | os.PathLike | None = None,
    progress: bool = False,
    raise_on_failure: bool = False,
) -> HardenResult:
    """Insert ASVP after the selected layers, write the model atomically, validate, report.

    ``data_reader`` supplies validation feeds (``get_next() -> dict | None``); by default they come from
    ``config.inputs`` (seeded synthetic inputs when that is None).  With ``raise_on_failure`` a failed budget raises ``FidelityError`` after everything is written.
    """
    output = Path(output_path)
    report_file = Path(report_path) if report_path else output.with_name(output.name + ".report.json")
    loaded = load_model(model_path)
    check_output_paths(loaded, output, report_file, config.force)
    config.params.check()
    config = replace(config, params=config.params.resolved())  # the report states what was used
    config.budgets.check()
    providers = resolve_providers(config.providers) if config.validate else []
    reader = None
    if config.validate:  # opened before anything is written: bad inputs are a usage error, not a half-run
        reader = data_reader if data_reader is not None else open_inputs(
            config.inputs, loaded.model, truth=config.truth, count=config.num_samples or 4,
            limit=config.num_samples, seed=config.params.seed)
    index = LayerIndex(loaded.model)
    selections = index.select(config.layers)
    hardened, insertions = insert_asvp(loaded.model, loaded.opset, selections, config.params,
                                       config.placement, loaded.sha256, scrub=config.scrub_paths)
    written = save_model(hardened, output, loaded)
    try:
        checker = _check_written(output, loaded.path)
        make_session(output, ["CPUExecutionProvider"], tf32=False)
    except Exception as exc:  # noqa: BLE001 - a model we wrote that fails checks is our bug: remove it
        for path in written:
            path.unlink(missing_ok=True)
        raise InvalidModelError(f"internal error: the hardened model failed its checks ({exc})") from None

    report = {
        "schema": SCHEMA,
        "versions": versions(),
        "model": {"path": str(loaded.path), "sha256": loaded.sha256, "opset": loaded.opset,
                  "ir_version": loaded.model.ir_version, "external_data": loaded.external_files},
        "output": {"path": str(output), "sha256": sha256_file(output),
                   "files": [str(p) for p in written]},
        "config": {"layers": config.layers, "placement": config.placement, "params": asdict(config.params),
                   "budgets": asdict(config.budgets), "scrub_paths": config.scrub_paths},
        "insertions": [asdict(i) for i in insertions],
        "checks": {"onnx_checker": checker, "onnxruntime_cpu_session": "ok"},
        "validation": None,
        "failures": [],
    }
    if config.validate:
        bar = _progress_bar(reader, progress)
        try:
            result = validate(_runnable_original(loaded), output, hardened, insertions, config.params, reader,
                              config.budgets, providers, config.tf32, progress=bar)
        finally:
            if bar is not None:
                bar.close()
        report["validation"] = {"providers": result.providers, "tf32": result.tf32, "samples": result.samples,
                                "outputs": result.outputs, "layers": result.layers}
        report["failures"] = result.failures
    report["status"] = "FAILED" if report["failures"] else "PASSED"
    report["exit_code"] = FidelityError.exit_code if report["failures"] else 0
    report["report_path"] = str(report_file)
    write_json(report, report_file)
    text = summary(report)
    if raise_on_failure and report["failures"]:
        raise FidelityError(text)
    return HardenResult(output, report, text)


def _runnable_original(loaded) -> Path | bytes:
    """The source as ONNX Runtime can load it: repeated node names (which it rejects) made unique."""
    copy = onnx.ModelProto()
    copy.CopyFrom(loaded.model)
    if not make_node_names_unique(copy):
        return loaded.path
    if loaded.has_external_data:
        raise InvalidModelError("the model repeats node names and stores external data: ONNX Runtime cannot "
                                "run the original for validation; rename its nodes, or pass --no-validate")
    return copy.SerializeToString()


def _check_written(output: Path, source: Path) -> str:
    """onnx.checker with full_check (strict shape inference) on what we wrote.

    Some exported models already fail the strict check; then blaming the rewrite would be wrong, so the
    hardened model is held to the standard its source meets, and the report says which one ran.
    """
    try:
        onnx.checker.check_model(str(output), full_check=True)
        return "full_check passed"
    except onnx.checker.ValidationError as exc:
        try:
            onnx.checker.check_model(str(source), full_check=True)
        except onnx.checker.ValidationError:
            onnx.checker.check_model(str(output))
            return "basic check passed (full_check skipped: the source model already fails it)"
        raise exc


def _progress_bar(reader, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    total = len(reader) if hasattr(reader, "__len__") else None
    return tqdm(total=total, desc="validating", unit="input", leave=False)


def find_layers(model_path: str | os.PathLike) -> list:
    """Every 4D float feature map of the model, for ``harden --list-layers``."""
    return LayerIndex(load_model(model_path).model).feature_layers()
