"""Validation inputs: an ``.npz`` file, a folder of images, or seeded synthetic images.

Every source is a *data reader* in ONNX Runtime's quantizer style: ``get_next()`` returns one feed
(``{input name: array}``) or ``None`` when exhausted.  Ground truth travels in the same feed under the key
``truth:<output name>`` and is split off before the model runs.

- ``.npz``: arrays named after the model's inputs (first axis = samples) and, optionally,
  ``truth:<output>`` arrays with the same number of samples.
- image folder: PNG/JPEG/BMP/TIFF files, read as RGB (or grey for 1-channel inputs) in [0, 1]; with
  ``truth_dir``, images of the same file name are the ground truth of the model's first output.  Static
  model sizes are met by a centre crop.
- synthetic: uniform [0, 1] noise, seeded, with dynamic dimensions set to batch 1 and 64 x 64.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
from onnx import helper

from .errors import UsageError

TRUTH_PREFIX = "truth:"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


class DataReader(Protocol):
    def get_next(self) -> dict[str, np.ndarray] | None: ...


class ModelInput:
    def __init__(self, vi: onnx.ValueInfoProto):
        t = vi.type.tensor_type
        self.name = vi.name
        self.dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        self.shape = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


def model_inputs(model: onnx.ModelProto) -> list[ModelInput]:
    inits = {i.name for i in model.graph.initializer}
    return [ModelInput(vi) for vi in model.graph.input if vi.name not in inits]


class _ListReader:
    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = feeds
        self._i = 0

    def get_next(self):
        if self._i >= len(self.feeds):
            return None
        self._i += 1
        return self.feeds[self._i - 1]

    def __len__(self):
        return len(self.feeds)


def synthetic_reader(inputs: list[ModelInput], count: int, seed: int, size: int = 64) -> _ListReader:
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        feed = {}
        for inp in inputs:
            dims = [d if d else (1 if i == 0 else size) for i, d in enumerate(inp.shape)]
            feed[inp.name] = rng.random(dims, dtype=np.float64).astype(inp.dtype)
        feeds.append(feed)
    return _ListReader(feeds)


def npz_reader(path: Path, inputs: list[ModelInput], limit: int | None = None) -> _ListReader:
    try:
        data = dict(np.load(path, allow_pickle=False))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise UsageError(f"cannot read validation inputs {path}: {exc}") from None
    missing = [i.name for i in inputs if i.name not in data]
    if missing:
        raise UsageError(f"{path} lacks arrays for model inputs {missing}; it has {sorted(data)}")
    counts = {len(a) for a in data.values()}
    if len(counts) != 1:
        raise UsageError(f"arrays in {path} disagree on the number of samples: {sorted(counts)}")
    n = min(counts.pop(), limit or 2**62)
    if n == 0:
        raise UsageError(f"{path} holds zero samples")
    by_name = {i.name: i for i in inputs}
    feeds = []
    for s in range(n):
        feed = {}
        for key, arr in data.items():
            if key in by_name:
                feed[key] = _batched(arr[s], by_name[key]).astype(by_name[key].dtype)
            elif key.startswith(TRUTH_PREFIX):
                feed[key] = arr[s][None].astype(np.float32)
        feeds.append(feed)
    return _ListReader(feeds)


def _batched(sample: np.ndarray, inp: ModelInput) -> np.ndarray:
    if sample.ndim != len(inp.shape) - 1:
        raise UsageError(f"input '{inp.name}' expects rank {len(inp.shape)} (with a sample axis), got a "
                         f"sample of shape {sample.shape}")
    return sample[None]


def read_image(path: Path, channels: int) -> np.ndarray:
    from skimage import io as skio
    from skimage.color import gray2rgb, rgb2gray, rgba2rgb

    try:
        img = skio.imread(path)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot read image {path}: {exc}") from None
    img = img.astype(np.float32) / (65535.0 if img.dtype == np.uint16 else 255.0 if img.dtype == np.uint8 else 1.0)
    if img.ndim == 3 and img.shape[-1] == 4:
        img = rgba2rgb(img)
    if channels == 1:
        img = rgb2gray(img) if img.ndim == 3 else img
        return img[None].astype(np.float32)
    if img.ndim == 2:
        img = gray2rgb(img)
    return np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)


def _centre_crop(img: np.ndarray, h: int | None, w: int | None, path: Path) -> np.ndarray:
    _, ih, iw = img.shape
    h, w = h or ih, w or iw
    if ih < h or iw < w:
        raise UsageError(f"image {path} is {ih}x{iw}, smaller than the model's input {h}x{w}")
    top, left = (ih - h) // 2, (iw - w) // 2
    return img[:, top:top + h, left:left + w]


def image_folder_reader(folder: Path, inputs: list[ModelInput], output_name: str,
                        truth_dir: Path | None = None, limit: int | None = None) -> _ListReader:
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise UsageError("an image folder can feed only models with one (N, C, H, W) input; use an .npz")
    inp = inputs[0]
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    files = files[:limit] if limit else files
    channels = inp.shape[1] or 3
    feeds = []
    for path in files:
        img = _centre_crop(read_image(path, channels), inp.shape[2], inp.shape[3], path)
        feed = {inp.name: img[None].astype(inp.dtype)}
        if truth_dir is not None:
            match = [p for p in truth_dir.iterdir() if p.stem == path.stem]
            if not match:
                raise UsageError(f"no ground truth for {path.name} in {truth_dir}")
            feed[TRUTH_PREFIX + output_name] = read_image(match[0], channels)[None]
        feeds.append(feed)
    return _ListReader(feeds)


def open_inputs(source: str | None, model: onnx.ModelProto, *, truth: str | None = None,
                count: int = 4, seed: int = 0, limit: int | None = None) -> DataReader:
    """The reader the CLI asks for: None -> synthetic, a folder -> images, a file -> npz."""
    inputs = model_inputs(model)
    if source is None:
        if truth is not None:
            raise UsageError("--truth needs --inputs (ground truth must match real inputs)")
        return synthetic_reader(inputs, count, seed)
    path = Path(source)
    if path.is_dir():
        out = model.graph.output[0].name
        return image_folder_reader(path, inputs, out, Path(truth) if truth else None, limit)
    if path.is_file():
        if truth is not None:
            raise UsageError("--truth goes with an image folder; put truth:<output> arrays in the .npz")
        return npz_reader(path, inputs, limit)
    raise UsageError(f"validation inputs not found: {source}")
