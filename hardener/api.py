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
from .calibrate import Calibration, calibrate_gain, image_output_index
from .errors import FidelityError, HardenerError, InvalidModelError, UsageError
from .inputs import CheckedReader, DataReader, ListReader, open_inputs
from .layers import LayerIndex, normalize_layers
from .model_io import check_output_paths, load_model, remove_written, runtime_refusal, save_model, sha256_file
from .report import SCHEMA, summary, versions, write_json
from .rewrite import anonymize, insert_asvp, make_node_names_unique
from .runtime import import_onnxruntime, make_session, resolve_providers
from .validate import Budgets, compare_outputs, run_session, split_truth, validate


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
    inputs: str | None = None  # .npz, image folder or image file; None: real photos (seeded noise if synthetic)
    truth: str | None = None  # ground-truth image folder matching an image-folder ``inputs``
    num_samples: int | None = None  # at most this many validation inputs (synthetic: exactly; default 4)
    synthetic: bool = False  # validate on seeded noise instead of the default real photographs
    # Choose the gain h from a fidelity target (hardener.calibrate) instead of params.gain.  The CLI
    # calibrates whenever --gain is not given; the API only when this is set.
    calibration: Calibration | None = None
    # False: no manifest in the file and opaque names for everything the rewrite adds (the report, a separate
    # file, still says what was done); the subgraphs can then be found only by their structure.
    manifest: bool = True


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
    ``config.inputs`` (real photographs when that is None; seeded noise with ``config.synthetic``).  Every
    feed is checked against the model before it runs.  With ``raise_on_failure`` a failed budget raises
    ``FidelityError`` after everything is written.
    """
    output = Path(output_path)
    report_file = Path(report_path) if report_path else output.with_name(output.name + ".report.json")
    config = replace(config, layers=normalize_layers(config.layers))  # a str is one selector; [] refused
    import_onnxruntime()  # a missing runtime is exit 3 before anything is read or written
    loaded = load_model(model_path)
    check_output_paths(loaded, output, report_file, config.force)
    config.params.check()
    config = replace(config, params=config.params.resolved())  # the report states what was used
    config.budgets.check()
    providers = resolve_providers(config.providers) if config.validate else []
    reader = None
    if config.validate:  # opened before anything is written: bad inputs are a usage error, not a half-run
        reader = _open_reader(config, loaded, data_reader)
    index = LayerIndex(loaded.model)
    selections = index.select(config.layers)
    calibration = None
    if config.calibration is not None:
        feeds = _drain(reader if reader is not None else _open_reader(config, loaded, None))
        calibration = _calibrate(loaded, selections, config, feeds, providers or resolve_providers(config.providers))
        config = replace(config, params=replace(config.params, gain=calibration["chosen_gain"]))
        reader = _replay(feeds, reader) if reader is not None else None
    hardened, insertions = insert_asvp(loaded.model, loaded.opset, selections, config.params,
                                       config.placement, loaded.sha256, scrub=config.scrub_paths)
    if not config.manifest:
        hardened, insertions = anonymize(hardened, loaded.model, insertions, config.params.seed)
    written = save_model(hardened, output, loaded)
    try:
        checker = _check_written(output, loaded.path)
        make_session(output, ["CPUExecutionProvider"], tf32=False)
    except Exception as exc:  # noqa: BLE001 - a model we wrote that fails checks is our bug: remove it
        remove_written(written)
        why = runtime_refusal(loaded)
        if why:
            raise InvalidModelError(f"ONNX Runtime cannot run the input model either ({why}); hardener checks every "
                                    "model it writes in ONNX Runtime, so it cannot harden this one") from None
        raise InvalidModelError(f"internal error: the hardened model failed its checks ({exc})") from None

    report = {
        "schema": SCHEMA,
        "versions": versions(),
        "model": {"path": str(loaded.path), "sha256": loaded.sha256, "opset": loaded.opset,
                  "ir_version": loaded.model.ir_version, "external_data": loaded.external_files},
        "output": {"path": str(output), "sha256": sha256_file(output),
                   "files": [str(p) for p in written]},
        "config": {"layers": config.layers, "placement": config.placement, "params": asdict(config.params),
                   "budgets": asdict(config.budgets), "scrub_paths": config.scrub_paths,
                   "manifest": config.manifest},
        "insertions": [asdict(i) for i in insertions],
        "checks": {"onnx_checker": checker, "onnxruntime_cpu_session": "ok"},
        "calibration": calibration,
        "validation": None,
        "failures": [],
    }
    if config.validate:
        bar = _progress_bar(reader, progress)
        try:
            result = validate(_runnable_original(loaded), output, hardened, insertions, config.params, reader,
                              config.budgets, providers, config.tf32, progress=bar, placement=config.placement)
        except HardenerError:  # a refused validation leaves nothing behind
            remove_written(written)
            raise
        finally:
            if bar is not None:
                bar.close()
        report["validation"] = {"providers": result.providers, "tf32": result.tf32, "samples": result.samples,
                                "data": getattr(reader, "description", None) or "custom data reader",
                                "outputs": result.outputs, "layers": result.layers}
        report["failures"] = result.failures
    report["status"] = "FAILED" if report["failures"] else "PASSED" if config.validate else "NOT VALIDATED"
    report["exit_code"] = FidelityError.exit_code if report["failures"] else 0
    report["report_path"] = str(report_file)
    write_json(report, report_file)
    text = summary(report)
    if raise_on_failure and report["failures"]:
        raise FidelityError(text)
    return HardenResult(output, report, text)


def _open_reader(config: HardenConfig, loaded, data_reader: DataReader | None) -> DataReader:
    if data_reader is not None:
        return CheckedReader(data_reader, loaded.model)
    return open_inputs(config.inputs, loaded.model, truth=config.truth, count=config.num_samples or 4,
                       limit=config.num_samples, seed=config.params.seed, synthetic=config.synthetic)


def _drain(reader: DataReader) -> list[dict]:
    feeds = []
    while (feed := reader.get_next()) is not None:
        feeds.append(feed)
    if not feeds:
        raise UsageError("the validation inputs are empty")
    return feeds


def _replay(feeds: list[dict], reader: DataReader) -> DataReader:
    """The drained feeds again, as a reader that keeps the original's description."""
    return ListReader(feeds, getattr(reader, "description", None) or "a custom data reader")


def _calibrate(loaded, selections, config: HardenConfig, feeds: list[dict], providers: list[str]) -> dict:
    """Bisect the gain on ``feeds`` (hardener.calibrate); returns the calibration record for the report."""
    if config.placement != "inline":
        raise UsageError(f"--placement {config.placement} leaves the served output unchanged, so there is no "
                         "fidelity target to calibrate the gain to: give --gain")
    original = make_session(_runnable_original(loaded), providers, config.tf32)
    names = [o.name for o in original.get_outputs()]
    base = []
    for feed in feeds:
        model_feed, truth = split_truth(feed)
        base.append((model_feed, truth, run_session(original, names, model_feed, "original model")))
    index = image_output_index(base[0][2])
    if index is None:
        raise UsageError("gain calibration needs an image output (N, 1 or 3, H, W); this model has none: "
                         "give --gain")
    name = names[index]
    has_truth = all(name in truth for _, truth, _ in base)
    kind, target = config.calibration.resolved(has_truth)
    budgets = config.budgets

    def measure(gain: float) -> float:
        params = replace(config.params, gain=gain)
        model, _ = insert_asvp(loaded.model, loaded.opset, selections, params, config.placement, loaded.sha256,
                               scrub=config.scrub_paths)
        session = make_session(_serialized(model, loaded), providers, config.tf32)
        image: dict = {}
        for model_feed, truth, o_outs in base:
            h_outs = run_session(session, [name], model_feed, "hardened model")  # only the calibrated output
            compare_outputs([name], [o_outs[index]], h_outs, truth, budgets, None, image, with_ssim=False)
        stats = image[name].summary(budgets.data_range)
        return stats["psnr_drop_vs_truth"] if kind == "psnr_drop" else stats["psnr_vs_original"]

    record = calibrate_gain(measure, kind, target)
    record.update({"output": name, "images": len(feeds),
                   "note": "calibrated on the validation images (the verdict below is in-sample)"})
    return record


def _serialized(model: onnx.ModelProto, loaded) -> bytes:
    """``model`` as bytes ONNX Runtime can load without a folder: external tensors read into the copy."""
    if not loaded.has_external_data:
        return model.SerializeToString()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.external_data_helper.load_external_data_for_model(copy, str(loaded.path.parent))
    return copy.SerializeToString()


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
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        try:
            onnx.checker.check_model(str(source), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
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
    return LayerIndex(load_model(model_path, runnable=False).model).feature_layers()
