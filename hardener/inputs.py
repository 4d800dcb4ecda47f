"""Validation inputs: an ``.npz`` file, a folder of images (or one image), real photographs, or seeded noise.

Every source is a *data reader* in ONNX Runtime's quantizer style: ``get_next()`` returns one feed
(``{input name: array}``) or ``None`` when exhausted, and ``description`` says in words what the data is
(the report's ``validation.data``).  Ground truth travels in the same feed under the key
``truth:<output name>`` and is split off before the model runs.

Everything is checked when the source is opened, before anything is written: a bad value is a usage error
(exit 2) that names the array or file and what was expected, never an ONNX Runtime traceback later.

- ``.npz``: arrays named after the model's inputs (first axis = samples) and, optionally,
  ``truth:<output>`` arrays with the same number of samples.  Numeric arrays only (no strings, objects or
  0-d scalars), finite values, the model's rank and static dimensions (channel count included); real
  numbers are cast to the input's float type.  An array that names neither a model input nor
  ``truth:<a model output>`` is refused (a typo would otherwise be dropped silently).  A model with a
  static batch of B > 1 gets B consecutive samples per feed.
- images: a folder of PNG/JPEG/BMP/TIFF/WebP files, or one image file, read in [0, 1] (8-bit / 255,
  16-bit / 65535), as RGB for 3-channel inputs and grey for 1-channel ones (grey+alpha and RGBA are
  composited on white).  With ``truth``, images of the same file stem are the ground truth of the model's
  first output.  Static model sizes are met by a centre crop (an image smaller than that is refused).
- no source: real photographs for image models (one float (N, C, H, W) input, C 1 or 3 or symbolic): the
  bundled samples (``hardener/assets/samples/lr``) first, then scikit-image's photographs; static H x W
  are centre crops (photos smaller than that are enlarged first); symbolic H, W are 64 x 64 (the bundled
  samples' size; scikit-image's photos are shrunk so their short side is 64, then centre-cropped).
- ``synthetic=True``, or a model that takes no image: uniform [0, 1) noise, seeded, with symbolic
  dimensions set to batch 1 and 64 x 64.

``check_feed`` holds any feed (a custom reader's included) to the model's input names, ranks, static
dimensions and element types before ONNX Runtime sees it.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
from onnx import TensorProto, helper

from .errors import UsageError

TRUTH_PREFIX = "truth:"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
DEFAULT_SIDE = 64  # symbolic H / W of image models: the bundled samples' size
SYNTHETIC_SIDE = 64
# scikit-image photographs that ship inside its wheel (no download), used after the bundled samples
SKIMAGE_PHOTOS = ("camera", "immunohistochemistry", "hubble_deep_field", "coins", "moon", "grass", "gravel",
                  "brick", "retina", "clock", "page", "text")
_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


class DataReader(Protocol):
    def get_next(self) -> dict[str, np.ndarray] | None: ...


def _np_dtype(elem_type: int):
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:  # noqa: BLE001 - undefined / unusual element types: unknown
        return None


def _dims(type_proto) -> list | None:
    t = type_proto.tensor_type
    if not type_proto.HasField("tensor_type") or not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


class ModelInput:
    """A graph input (or output): name, numpy dtype (None if unknown), dims (int or None; None if rank unknown)."""

    def __init__(self, vi: onnx.ValueInfoProto):
        t = vi.type.tensor_type
        self.name = vi.name
        self.elem_type = t.elem_type if vi.type.HasField("tensor_type") else 0
        self.dtype = _np_dtype(self.elem_type) if self.elem_type else None
        self.shape = _dims(vi.type)

    @property
    def is_float(self) -> bool:
        return self.elem_type in _FLOAT_TYPES

    def shape_text(self) -> str:
        if self.shape is None:
            return "?"
        return "(" + ", ".join("?" if d is None else str(d) for d in self.shape) + ")"


def model_inputs(model: onnx.ModelProto) -> list[ModelInput]:
    inits = {i.name for i in model.graph.initializer}
    return [ModelInput(vi) for vi in model.graph.input if vi.name not in inits]


def model_outputs(model: onnx.ModelProto) -> list[ModelInput]:
    return [ModelInput(vi) for vi in model.graph.output]


def _printable(text: str) -> str:
    from .report import printable

    return printable(text)


# -- checking feeds --------------------------------------------------------------------------------------------
def _check_array(value, what: str, expected_dims: list | None, dtype, where: str) -> None:
    if not isinstance(value, np.ndarray):
        raise UsageError(f"{where}: {what} is a {type(value).__name__}, expected a numpy array")
    if value.dtype.kind not in "biuf":
        raise UsageError(f"{where}: {what} has dtype {value.dtype}, expected numbers"
                         + (f" ({dtype})" if dtype is not None else ""))
    if dtype is not None and value.dtype != dtype:
        raise UsageError(f"{where}: {what} is {value.dtype}, the model expects {dtype} "
                         f"(cast it with .astype(np.{dtype.name}))")
    if expected_dims is not None:
        if value.ndim != len(expected_dims):
            raise UsageError(f"{where}: {what} has shape {tuple(value.shape)} (rank {value.ndim}), the model "
                             f"expects rank {len(expected_dims)} {_shape_text(expected_dims)}")
        for axis, (got, want) in enumerate(zip(value.shape, expected_dims)):
            if want is not None and got != want:
                name = {0: "batch", 1: "channel count", 2: "height", 3: "width"}[axis] \
                    if len(expected_dims) == 4 else f"dimension {axis}"
                raise UsageError(f"{where}: {what} has shape {tuple(value.shape)}: {name} {got}, the model "
                                 f"expects {want} {_shape_text(expected_dims)}")
    if value.size == 0:
        raise UsageError(f"{where}: {what} is empty (shape {tuple(value.shape)})")
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        bad = int(value.size - np.count_nonzero(np.isfinite(value)))
        raise UsageError(f"{where}: {what} holds {bad} NaN or Inf value(s); validation needs finite inputs")


def _shape_text(dims: list) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"


def check_feed(feed, inputs, outputs=None, where: str = "validation feed") -> None:
    """Refuse (``UsageError``) a feed ONNX Runtime would reject or that would mislead validation.

    ``inputs``: ``model_inputs(model)`` (or a ModelProto); ``outputs``: ``model_outputs(model)`` (or None: then
    ``truth:`` keys are checked for being arrays only).  Checks: a dict of numpy arrays; every model input
    present, no unknown key; each array of the input's dtype, rank and static dimensions, non-empty and
    finite; each ``truth:NAME`` naming a model output, numeric, finite, and matching the output's rank and
    static dimensions.
    """
    if isinstance(inputs, onnx.ModelProto):
        outputs = model_outputs(inputs) if outputs is None else outputs
        inputs = model_inputs(inputs)
    if isinstance(outputs, onnx.ModelProto):
        outputs = model_outputs(outputs)
    if not isinstance(feed, Mapping):
        raise UsageError(f"{where}: the data reader returned a {type(feed).__name__}, expected a dict "
                         "{input name: numpy array} (or None at the end)")
    by_name = {i.name: i for i in inputs}
    out_by_name = {o.name: o for o in outputs} if outputs is not None else None
    for key in feed:
        if not isinstance(key, str):
            raise UsageError(f"{where}: key {key!r} is not a string; keys are input names or truth:<output>")
    missing = [n for n in by_name if n not in feed]
    if missing:
        raise UsageError(f"{where}: no array for model input(s) {', '.join(map(_printable, missing))}; "
                         f"it has {', '.join(map(_printable, feed)) or 'nothing'}")
    for key, value in feed.items():
        if key.startswith(TRUTH_PREFIX):
            name = key[len(TRUTH_PREFIX):]
            if out_by_name is not None and name not in out_by_name:
                raise UsageError(f"{where}: '{_printable(key)}' names no model output; outputs: "
                                 f"{', '.join(map(_printable, out_by_name))}")
            out = out_by_name.get(name) if out_by_name is not None else None
            dims = out.shape if out is not None else None
            _check_array(value, f"ground truth '{_printable(key)}'", dims, None, where)
            continue
        inp = by_name.get(key)
        if inp is None:
            raise UsageError(f"{where}: '{_printable(key)}' names no model input; inputs: "
                             f"{', '.join(map(_printable, by_name))} (ground truth goes under truth:<output>)")
        _check_array(value, f"input '{_printable(key)}'", inp.shape, inp.dtype, where)


class CheckedReader:
    """Wraps any data reader so that every feed passes ``check_feed`` (feed numbers start at 1)."""

    def __init__(self, reader, model: onnx.ModelProto, description: str | None = None):
        self.reader = reader
        self.inputs = model_inputs(model)
        self.outputs = model_outputs(model)
        self.description = description or getattr(reader, "description", None) or "a custom data reader"
        self._n = 0

    def __new__(cls, reader, *args, **kwargs):
        if cls is CheckedReader and hasattr(type(reader), "__len__"):
            cls = _SizedCheckedReader  # len() only where the wrapped reader has one (progress bars ask)
        return super().__new__(cls)

    def get_next(self):
        feed = self.reader.get_next()
        if feed is None:
            return None
        self._n += 1
        check_feed(feed, self.inputs, self.outputs, where=f"feed {self._n} of {self.description}")
        return feed


class _SizedCheckedReader(CheckedReader):
    def __len__(self):
        return len(self.reader)


class ListReader:
    """Feeds held in memory, handed out in order (the reader every input source ends in)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]], description: str = ""):
        self.feeds = feeds
        self.description = description
        self._i = 0

    def get_next(self):
        if self._i >= len(self.feeds):
            return None
        self._i += 1
        return self.feeds[self._i - 1]

    def __len__(self):
        return len(self.feeds)


# -- what the model takes ------------------------------------------------------------------------------------
def _zero_dims(inputs: list[ModelInput]) -> None:
    for inp in inputs:
        if inp.shape and any(d == 0 for d in inp.shape):
            raise UsageError(f"model input '{_printable(inp.name)}' has shape {inp.shape_text()}: a dimension "
                             "fixed at 0 holds no data, so the model cannot be validated (export it with a "
                             "batch of 1 or a dynamic batch)")


def _batch(inp: ModelInput) -> int:
    return inp.shape[0] if inp.shape and inp.shape[0] else 1


def _conv_in_channels(model: onnx.ModelProto, name: str) -> int | None:
    """C of a symbolic-channel input, from the weights of a Conv that reads it directly."""
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Conv" and node.input and node.input[0] == name and len(node.input) > 1 \
                and node.input[1] in inits:
            dims = list(inits[node.input[1]].dims)
            group = next((a.i for a in node.attribute if a.name == "group"), 1) or 1
            if len(dims) == 4:
                return int(dims[1]) * int(group)
    return None


def _image_channels(model: onnx.ModelProto, inp: ModelInput) -> int | None:
    """The channel count an image for ``inp`` needs: 1 or 3, or None if this input takes no image."""
    if inp.shape is None or len(inp.shape) != 4 or not inp.is_float:
        return None
    c = inp.shape[1] or (_conv_in_channels(model, inp.name) if model is not None else None) or 3
    return c if c in (1, 3) else None


def _image_input(model: onnx.ModelProto, inputs: list[ModelInput], what: str) -> tuple[ModelInput, int]:
    if len(inputs) != 1 or inputs[0].shape is None or len(inputs[0].shape) != 4:
        shapes = ", ".join(f"'{_printable(i.name)}' {i.shape_text()}" for i in inputs)
        raise UsageError(f"{what} can feed only a model with one (N, C, H, W) input; this one takes {shapes}: "
                         "use an .npz with one array per input")
    inp = inputs[0]
    if not inp.is_float:
        raise UsageError(f"{what}: input '{_printable(inp.name)}' is "
                         f"{TensorProto.DataType.Name(inp.elem_type) if inp.elem_type else 'untyped'}, "
                         "images feed float inputs only; use an .npz")
    channels = _image_channels(model, inp)
    if channels is None:
        raise UsageError(f"{what}: input '{_printable(inp.name)}' takes {inp.shape[1]} channels; images give 1 "
                         "(grey) or 3 (RGB): use an .npz")
    return inp, channels


# -- synthetic -------------------------------------------------------------------------------------------------
def synthetic_reader(inputs: list[ModelInput], count: int, seed: int, size: int = SYNTHETIC_SIDE,
                     model: onnx.ModelProto | None = None, why: str = "--synthetic") -> ListReader:
    _zero_dims(inputs)
    rng = np.random.default_rng(seed)
    shapes = {}
    for inp in inputs:
        if inp.shape is None:
            raise UsageError(f"model input '{_printable(inp.name)}' has no declared shape, so synthetic inputs "
                             "cannot be made for it; pass --inputs (an .npz)")
        if inp.dtype is None or inp.dtype.kind not in "biuf":
            raise UsageError(f"model input '{_printable(inp.name)}' has element type "
                             f"{TensorProto.DataType.Name(inp.elem_type) if inp.elem_type else 'undefined'}; "
                             "synthetic inputs are numbers: pass --inputs (an .npz)")
        dims = []
        for i, d in enumerate(inp.shape):
            if d:
                dims.append(d)
            elif i == 0:
                dims.append(1)
            elif i == 1 and len(inp.shape) == 4:
                dims.append((model is not None and _conv_in_channels(model, inp.name)) or 3)
            else:
                dims.append(size)
        shapes[inp.name] = dims
    feeds = []
    for _ in range(count):
        feed = {}
        for inp in inputs:
            dims = shapes[inp.name]
            if inp.dtype.kind == "f":
                feed[inp.name] = rng.random(dims, dtype=np.float64).astype(inp.dtype)
            elif inp.dtype.kind == "b":
                feed[inp.name] = rng.random(dims) < 0.5
            else:
                feed[inp.name] = rng.integers(0, 2, dims).astype(inp.dtype)
        feeds.append(feed)
    sizes = ", ".join(f"{_printable(n)} {'x'.join(map(str, d))}" for n, d in shapes.items())
    return ListReader(feeds, f"{count} seeded uniform-noise input(s) ({why}), seed {seed}: {sizes}")


# -- npz -------------------------------------------------------------------------------------------------------
def _load_arrays(path: Path, inputs: list[ModelInput]) -> dict[str, np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise UsageError(f"cannot read validation inputs {path}: {_printable(str(exc))} (expected an .npz "
                         "of numeric arrays named after the model's inputs)") from None
    if isinstance(loaded, np.ndarray):  # a bare .npy: one array for a one-input model
        if len(inputs) != 1:
            raise UsageError(f"{path} holds one array but the model has {len(inputs)} inputs; use an .npz "
                             "with one array per input name")
        return {inputs[0].name: loaded}
    data = {}
    with loaded:
        for key in loaded.files:
            try:
                data[key] = loaded[key]
            except ValueError as exc:
                if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
                    raise UsageError(f"array '{_printable(key)}' in {path} holds Python objects (dtype object); "
                                     "expected numeric arrays") from None
                raise UsageError(f"cannot read array '{_printable(key)}' in {path}: {exc}") from None
            except Exception as exc:  # noqa: BLE001 - corrupt member, bad header, ...
                raise UsageError(f"cannot read array '{_printable(key)}' in {path}: "
                                 f"{_printable(str(exc))}") from None
    return data


def npz_reader(path: Path, inputs: list[ModelInput], limit: int | None = None,
               outputs: list[ModelInput] | None = None, model: onnx.ModelProto | None = None) -> ListReader:
    _zero_dims(inputs)
    data = _load_arrays(path, inputs)
    by_name = {i.name: i for i in inputs}
    out_by_name = {o.name: o for o in outputs} if outputs is not None else None
    missing = [i.name for i in inputs if i.name not in data]
    if missing:
        raise UsageError(f"{path} lacks arrays for model inputs {list(map(_printable, missing))}; it has "
                         f"{sorted(map(_printable, data))}")
    for key, arr in data.items():
        shown = _printable(key)
        if key.startswith(TRUTH_PREFIX):
            name = key[len(TRUTH_PREFIX):]
            if out_by_name is not None and name not in out_by_name:
                raise UsageError(f"array '{shown}' in {path} names no model output; outputs: "
                                 f"{', '.join(map(_printable, out_by_name))}")
        elif key not in by_name:
            raise UsageError(f"array '{shown}' in {path} names no model input; inputs: "
                             f"{', '.join(map(_printable, by_name))} (ground truth goes under truth:<output>)")
        if arr.dtype.kind in "US":
            raise UsageError(f"array '{shown}' in {path} holds strings ({arr.dtype}); expected numbers")
        if arr.dtype.kind not in "biuf":
            raise UsageError(f"array '{shown}' in {path} has dtype {arr.dtype}; expected real numbers")
        if arr.ndim == 0:
            raise UsageError(f"array '{shown}' in {path} is a 0-d scalar; expected a first axis of samples")
    counts = {len(a) for a in data.values()}
    if len(counts) != 1:
        raise UsageError(f"arrays in {path} disagree on the number of samples (first axis): "
                         + ", ".join(f"'{_printable(k)}' {len(a)}" for k, a in data.items()))
    n = counts.pop()
    if n == 0:
        raise UsageError(f"{path} holds zero samples (its arrays are empty along the first axis)")
    batch = max((_batch(i) for i in inputs), default=1)
    if n < batch:
        raise UsageError(f"{path} holds {n} sample(s); the model's static batch needs {batch} per run")
    feeds_n = n // batch
    if limit:
        feeds_n = min(feeds_n, limit)
    # check every array as a whole, once: dtype convertibility, rank, static dims, finiteness
    arrays = {}
    inferred = None
    for key in sorted(data, key=lambda k: k.startswith(TRUTH_PREFIX)):  # inputs first, then ground truth
        arr = data[key]
        if key.startswith(TRUTH_PREFIX):
            if inferred is None:  # output shapes for these input shapes, where shape inference knows them
                concrete = {i.name: (batch,) + tuple(arrays[i.name].shape[1:]) for i in inputs}
                inferred = _infer_output_dims(model, concrete, {}) if model is not None else {}
            out = out_by_name.get(key[len(TRUTH_PREFIX):]) if out_by_name is not None else None
            out_dims = inferred.get(key[len(TRUTH_PREFIX):]) or (out.shape if out is not None else None)
            dims = None if out_dims is None else [None] + list(out_dims[1:])
            dtype = np.dtype(np.float32)
            what = f"ground truth '{_printable(key)}'"
        else:
            inp = by_name[key]
            dims = None if inp.shape is None else [None] + inp.shape[1:]
            dtype = inp.dtype
            what = f"input '{_printable(key)}'"
            if dtype is not None and dtype.kind in "iub" and arr.dtype.kind == "f":
                raise UsageError(f"array '{_printable(key)}' in {path} is {arr.dtype}; input "
                                 f"'{_printable(key)}' takes {dtype}")
        if dims is not None and arr.ndim != len(dims):
            raise UsageError(f"{what} expects rank {len(dims)} {_shape_text(dims)} with the sample axis first; "
                             f"array '{_printable(key)}' in {path} has shape {arr.shape}")
        with np.errstate(over="ignore", invalid="ignore"):
            cast = arr.astype(dtype) if dtype is not None and arr.dtype != dtype else arr
        _check_array(cast, what, dims, None, f"{path}")
        arrays[key] = cast
    feeds = []
    for s in range(feeds_n):
        feed = {key: np.ascontiguousarray(arr[s * batch:(s + 1) * batch]) for key, arr in arrays.items()}
        feeds.append(feed)
    for i, feed in enumerate(feeds):
        check_feed(feed, inputs, outputs, where=f"{path}, samples {i * batch}..{(i + 1) * batch - 1}")
    truth = [k for k in data if k.startswith(TRUTH_PREFIX)]
    extra = f", ground truth for {', '.join(_printable(k[len(TRUTH_PREFIX):]) for k in truth)}" if truth else ""
    used = feeds_n * batch
    dropped = f" (of {n})" if used < n else ""
    kind = "npy" if path.suffix.lower() == ".npy" else "npz"
    return ListReader(feeds, f"{kind} file {path}, {used} sample(s){dropped}{extra}")


# -- images ----------------------------------------------------------------------------------------------------
def _png_bit_depth(path: Path) -> int | None:
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except OSError:
        return None
    if len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return struct.unpack(">B", head[24:25])[0]
    return None


def _to_unit(img: np.ndarray, path: Path) -> np.ndarray:
    """Pixel values in [0, 1] by the file's integer range (8-bit / 255, 16-bit / 65535)."""
    kind = img.dtype.kind
    if kind == "b":
        return img.astype(np.float32)
    if kind == "f":
        img = img.astype(np.float32)
        if not np.isfinite(img).all():
            raise UsageError(f"image {path} holds NaN or Inf pixel values")
        return img
    if kind in "iu":
        if img.dtype == np.uint8:
            return img.astype(np.float32) / 255.0
        if img.dtype == np.uint16:
            return img.astype(np.float32) / 65535.0
        depth = _png_bit_depth(path)
        lo, hi = (int(img.min()), int(img.max())) if img.size else (0, 0)
        if lo >= 0 and (depth == 16 or hi <= 65535) and hi > 255:  # 16-bit data in a wider integer type
            return img.astype(np.float32) / 65535.0
        if lo >= 0 and hi <= 255:
            return img.astype(np.float32) / 255.0
    raise UsageError(f"image {path} has pixel type {img.dtype}, which hardener cannot scale to [0, 1]; "
                     "convert it to 8- or 16-bit")


def _composite(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Colour over a white background, as scikit-image's rgba2rgb does."""
    return colour * alpha + (1.0 - alpha)


def to_channels(img: np.ndarray, channels: int, path) -> np.ndarray:
    """(H, W) / (H, W, 1..4) in [0, 1] -> (channels, H, W) float32; grey+alpha and RGBA composited on white."""
    from skimage.color import gray2rgb, rgb2gray

    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 3 and img.shape[-1] == 2:  # grey + alpha
        img = _composite(img[..., 0], img[..., 1])
    elif img.ndim == 3 and img.shape[-1] == 4:  # RGBA
        img = _composite(img[..., :3], img[..., 3:4])
    if img.ndim == 2:
        out = img[None] if channels == 1 else gray2rgb(img).transpose(2, 0, 1)
    elif img.ndim == 3 and img.shape[-1] == 3:
        out = rgb2gray(img)[None] if channels == 1 else img.transpose(2, 0, 1)
    else:
        raise UsageError(f"image {path} has shape {img.shape}: expected one grey, grey+alpha, RGB or RGBA "
                         "picture (multi-frame and multi-band files are not supported)")
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0) if out.dtype.kind == "f" else out, dtype=np.float32)


def read_image(path: Path, channels: int) -> np.ndarray:
    from skimage import io as skio

    try:
        img = np.asarray(skio.imread(path))
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot read image {path}: {_printable(str(exc))}") from None
    if img.size == 0:
        raise UsageError(f"image {path} is empty")
    return to_channels(_to_unit(img, path), channels, path)


def _centre_crop(img: np.ndarray, h: int | None, w: int | None, path) -> np.ndarray:
    _, ih, iw = img.shape
    h, w = h or ih, w or iw
    if ih < h or iw < w:
        raise UsageError(f"image {path} is {ih}x{iw}, smaller than the model's input {h}x{w}")
    top, left = (ih - h) // 2, (iw - w) // 2
    return img[:, top:top + h, left:left + w]


def _infer_output_dims(model: onnx.ModelProto, input_shapes: dict[str, tuple], cache: dict) -> dict:
    """Output dims (ints or None) for concrete input shapes, by ONNX shape inference (best effort)."""
    key = tuple(sorted(input_shapes.items()))
    if key in cache:
        return cache[key]
    result = {o.name: _dims(o.type) for o in model.graph.output}
    if all(d is not None and all(x is not None for x in d) for d in result.values()):
        cache[key] = result
        return result
    try:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        del probe.graph.value_info[:]
        for vi in probe.graph.input:
            if vi.name in input_shapes:
                vi.type.tensor_type.ClearField("shape")
                for d in input_shapes[vi.name]:
                    vi.type.tensor_type.shape.dim.add().dim_value = int(d)
        for o in probe.graph.output:
            o.type.tensor_type.ClearField("shape")
        inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True)
        for o in inferred.graph.output:
            dims, declared = _dims(o.type), result.get(o.name)
            if dims is None:
                continue
            if declared is None or len(declared) != len(dims):
                result[o.name] = dims
            else:
                result[o.name] = [a if a is not None else b for a, b in zip(declared, dims)]
    except Exception:  # noqa: BLE001 - inference is a convenience; validation still compares shapes
        pass
    cache[key] = result
    return result


def _truth_check(truth: np.ndarray, out_name: str, dims: list | None, img_path, truth_path) -> None:
    if dims is None:
        return
    want = [None] + list(dims[1:])
    got = list(truth.shape)
    if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got[1:], want[1:])):
        raise UsageError(f"ground truth {truth_path} is {'x'.join(map(str, got[1:]))} (CxHxW) but output "
                         f"'{_printable(out_name)}' for input {img_path} is {_shape_text(list(dims[1:]))}")


def image_reader(files: list[Path], model: onnx.ModelProto | None, inputs: list[ModelInput],
                 truth: Path | None = None, limit: int | None = None, what: str = "",
                 outputs: list | None = None) -> ListReader:
    inp, channels = _image_input(model, inputs, f"images ({what})" if what else "images")
    _zero_dims(inputs)
    outputs = outputs if outputs is not None else model_outputs(model)
    out = outputs[0]
    files = files[:limit] if limit else files
    batch = _batch(inp)
    if len(files) < batch:
        raise UsageError(f"{what or 'the images'}: {len(files)} image(s), but the model's static batch needs "
                         f"{batch} per run")
    truth_channels = out.shape[1] if out.shape and len(out.shape) == 4 and out.shape[1] in (1, 3) else channels
    if truth is not None:
        if truth.is_dir():
            truth_files = {p.stem: p for p in sorted(truth.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
        elif truth.is_file():
            if len(files) != 1:
                raise UsageError(f"--truth {truth} is one file, but --inputs holds {len(files)} images; give a "
                                 "folder of ground-truth images with the same file names")
            truth_files = {files[0].stem: truth}
        else:
            raise UsageError(f"ground truth not found: {truth}")
    cache: dict = {}
    images, truths = [], []
    for path in files:
        img = _centre_crop(read_image(path, channels), inp.shape[2], inp.shape[3], path)
        images.append(img)
        if truth is not None:
            match = truth_files.get(path.stem)
            if match is None:
                raise UsageError(f"no ground truth for {path.name} in {truth} (expected an image named "
                                 f"{path.stem}.*)")
            t = read_image(match, truth_channels)
            dims = _infer_output_dims(model, {inp.name: (batch,) + img.shape}, cache).get(out.name) \
                if model is not None else out.shape
            _truth_check(t[None], out.name, dims, path, match)
            truths.append(t)
    feeds = []
    for s in range(len(images) // batch):
        group = slice(s * batch, (s + 1) * batch)
        shapes = {im.shape for im in images[group]}
        if len(shapes) > 1:
            raise UsageError(f"images {', '.join(p.name for p in files[group])} differ in size "
                             f"({sorted(shapes)}); the model's static batch of {batch} needs equal sizes")
        feed = {inp.name: np.stack(images[group]).astype(inp.dtype)}
        if truth is not None:
            feed[TRUTH_PREFIX + out.name] = np.stack(truths[group]).astype(np.float32)
        check_feed(feed, inputs, outputs if model is not None else None,
                   where=f"images {', '.join(p.name for p in files[group])}")
        feeds.append(feed)
    sizes = sorted({f"{im.shape[1]}x{im.shape[2]}" for im in images[:len(feeds) * batch]})
    crop = " centre crops" if inp.shape[2] or inp.shape[3] else ""
    gt = f", ground truth from {truth}" if truth is not None else ""
    return ListReader(feeds, f"{what or 'images'}: {len(feeds) * batch} image(s), {', '.join(sizes)}{crop}{gt}")


def image_folder_reader(folder: Path, model, *args, **kwargs) -> ListReader:
    """The images of ``folder``: ``image_folder_reader(folder, model, truth_dir=None, limit=None)``.

    The older form ``image_folder_reader(folder, model_inputs(model), output_name, truth_dir=None,
    limit=None)`` is still accepted (without the model, a symbolic channel count reads as RGB and ground
    truth is checked against the declared output shape only).
    """
    folder = Path(folder)
    if isinstance(model, onnx.ModelProto):
        names = ("truth_dir", "limit")
        opts = dict(zip(names, args)) | kwargs
        inputs, outputs, proto = model_inputs(model), model_outputs(model), model
    else:
        names = ("output_name", "truth_dir", "limit")
        opts = dict(zip(names, args)) | kwargs
        inputs, proto = list(model), None
        outputs = [_NamedOutput(opts.get("output_name") or "output")]
    truth_dir = opts.get("truth_dir")
    limit = opts.get("limit")
    _image_input(proto, inputs, f"image folder {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UsageError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return image_reader(files, proto, inputs, Path(truth_dir) if truth_dir is not None else None, limit,
                        what=f"image folder {folder}", outputs=outputs)


class _NamedOutput:
    """An output known by name only (the older reader signature)."""

    def __init__(self, name: str):
        self.name, self.shape, self.elem_type, self.dtype = name, None, 0, None


# -- real photographs by default ------------------------------------------------------------------------------
def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    from skimage.transform import resize

    return resize(img.transpose(1, 2, 0), (h, w), order=1, anti_aliasing=True,
                  preserve_range=True).transpose(2, 0, 1).astype(np.float32)


def _fit(img: np.ndarray, h: int, w: int, shrink: bool) -> np.ndarray:
    """Scale (up if smaller than h x w; down to the short side when ``shrink``), then centre-crop to h x w."""
    _, ih, iw = img.shape
    scale = max(h / ih, w / iw)
    if scale > 1 or (shrink and scale < 1):
        img = _resize(img, max(h, round(ih * scale)), max(w, round(iw * scale)))
    return _centre_crop(img, h, w, "photo")


def _photo_sources() -> list[tuple[str, object]]:
    folder = Path(str(resources.files("hardener") / "assets" / "samples" / "lr"))
    sources = [(f"{p.stem} (bundled)", p) for p in sorted(folder.glob("*.png"))] if folder.is_dir() else []
    return sources + [(f"{name} (scikit-image)", name) for name in SKIMAGE_PHOTOS]


def photo_reader(model: onnx.ModelProto, inputs: list[ModelInput], count: int) -> ListReader:
    """Real photographs sized to the model's one image input (see the module docstring)."""
    inp, channels = _image_input(model, inputs, "photos")
    _zero_dims(inputs)
    batch = _batch(inp)
    h, w = inp.shape[2] or DEFAULT_SIDE, inp.shape[3] or DEFAULT_SIDE
    images, used = [], []
    for label, src in _photo_sources():
        if len(images) == count * batch:
            break
        if isinstance(src, Path):
            img = read_image(src, channels)
            bundled = True
        else:
            from skimage import data as skdata

            try:
                raw = np.asarray(getattr(skdata, src)())
            except Exception:  # noqa: BLE001 - a photo this scikit-image lacks: take the next
                continue
            img = to_channels(_to_unit(raw, src), channels, src)
            bundled = False
        images.append(_fit(img, h, w, shrink=not bundled))
        used.append(label)
    feeds_n = len(images) // batch
    if feeds_n == 0:
        raise UsageError(f"too few photos ({len(images)}) for the model's static batch of {batch}; pass --inputs")
    feeds = [{inp.name: np.stack(images[s * batch:(s + 1) * batch]).astype(inp.dtype)} for s in range(feeds_n)]
    for feed in feeds:
        check_feed(feed, inputs, None, where="default photos")
    n = feeds_n * batch
    kinds = []
    bundled_n = sum(1 for u in used[:n] if u.endswith("(bundled)"))
    if bundled_n:
        kinds.append(f"{bundled_n} bundled sample(s)")
    if n - bundled_n:
        kinds.append(f"{n - bundled_n} from scikit-image")
    how = "centre crops" if inp.shape[2] or inp.shape[3] else "centre crops (symbolic H, W)"
    short = f" (only {n} available)" if n < count * batch else ""
    return ListReader(feeds, f"{n} real photo(s){short}: {' + '.join(kinds)}, {h}x{w} {how}, "
                              f"{'grey' if channels == 1 else 'RGB'}")


# -- the entry point ------------------------------------------------------------------------------------------
def open_inputs(source: str | os.PathLike | None, model: onnx.ModelProto, *, truth: str | None = None,
                count: int = 4, seed: int = 0, limit: int | None = None, synthetic: bool = False) -> DataReader:
    """The reader the CLI asks for.

    No source: real photographs for image models (noise with ``synthetic=True``, or for models that take no
    image); a folder: its images; an image file: that one image; another file: an .npz (or .npy).
    """
    for name, value in (("count", count), ("num-samples", limit)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                  or value < 1):
            raise UsageError(f"{name} must be a whole number >= 1, got {value!r}")
    if source is not None and not isinstance(source, (str, os.PathLike)):
        raise UsageError(f"inputs must be a path (an .npz, an image or a folder of images), got "
                         f"{type(source).__name__}")
    if truth is not None and not isinstance(truth, (str, os.PathLike)):
        raise UsageError(f"truth must be a path (an image or a folder of images), got {type(truth).__name__}")
    inputs = model_inputs(model)
    if not inputs:  # a model of constants: one run compares it, and there is nothing to feed
        if source is not None or truth is not None:
            raise UsageError("the model has no inputs, so --inputs / --truth have nothing to feed")
        return ListReader([{}], "none: the model takes no inputs (one run on its constants)")
    if source is None:
        if truth is not None:
            raise UsageError("--truth needs --inputs (ground truth must match real inputs)")
        if synthetic:
            return synthetic_reader(inputs, count, seed, model=model)
        if len(inputs) == 1 and _image_channels(model, inputs[0]) is not None:
            return photo_reader(model, inputs, count)
        return synthetic_reader(inputs, count, seed, model=model,
                                why="the model takes no single (N, C, H, W) image with 1 or 3 channels, so "
                                    "no photos")
    if synthetic:
        raise UsageError("--synthetic and --inputs exclude each other: give one")
    path = Path(source)
    truth_path = Path(truth) if truth is not None else None
    if truth_path is not None and not truth_path.exists():
        raise UsageError(f"ground truth not found: {truth}")
    if path.is_dir():
        if truth_path is not None and not truth_path.is_dir():
            raise UsageError(f"--truth {truth} must be a folder when --inputs {source} is a folder")
        return image_folder_reader(path, model, truth_path, limit)
    if path.is_file():
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return image_reader([path], model, inputs, truth_path, None, what=f"image {path}")
        if truth_path is not None:
            raise UsageError("--truth goes with images; put truth:<output> arrays in the .npz")
        return npz_reader(path, inputs, limit, model_outputs(model), model)
    if path.exists():
        raise UsageError(f"validation inputs {source} are neither a file nor a folder")
    raise UsageError(f"validation inputs not found: {source}")
