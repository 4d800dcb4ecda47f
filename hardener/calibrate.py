"""Choosing the gain h from a fidelity target instead of assuming one.

One fixed gain is unsafe across architectures (h = 1.3 at one middle conv of real third-party SR networks
cost 0.02 dB on one, 0.34 dB on another and 11-12 dB on a third whose convs feed LeakyReLUs).  So, by
default, the gain is calibrated on the validation images:

- with ground truth, ``target_psnr_drop`` D: the PSNR of the model's first image output against the truth
  (of the mean squared error over all images) drops by D +- 10 %;
- without it, ``target_psnr`` P: the PSNR of hardened vs original outputs is P +- 0.1 dB.

The search brackets h - 1 by doubling or halving from 0.3, then bisects log(h - 1) until the metric is
within a quarter of the tolerance; each step hardens the model in memory and runs it on the images.  The chosen h - 1 is rounded to 4 significant digits (so that
``--gain`` with the reported value rebuilds the same file, and gains near 1 keep fine steps) and measured again at that value.  A target that
no gain in (1, MAX_GAIN] reaches is a ``CalibrationError``: nothing is written.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import FidelityError, UsageError
from .metrics import is_image_batch

DEFAULT_PSNR_DROP = 0.1  # dB against ground truth, when truth is given
DEFAULT_PSNR = 45.0  # dB hardened vs original, without truth
DROP_TOLERANCE = 0.10  # relative, for target_psnr_drop
PSNR_TOLERANCE = 0.10  # dB, for target_psnr
MAX_GAIN = 100.0
MIN_EXCESS = 1e-4  # smallest h - 1 tried
MAX_STEPS = 30


class CalibrationError(FidelityError):
    """No gain reaches the calibration target (exit 1; nothing is written)."""


@dataclass
class Calibration:
    """What the gain is calibrated to; both None: the default target for the data at hand."""

    target_psnr_drop: float | None = None
    target_psnr: float | None = None

    def check(self) -> None:
        if self.target_psnr_drop is not None and self.target_psnr is not None:
            raise UsageError("give one calibration target: --target-psnr-drop or --target-psnr, not both")
        if self.target_psnr_drop is not None and not (math.isfinite(self.target_psnr_drop)
                                                      and self.target_psnr_drop > 0):
            raise UsageError(f"target-psnr-drop must be a positive number of dB, got {self.target_psnr_drop}")
        if self.target_psnr is not None and not (math.isfinite(self.target_psnr) and self.target_psnr > 0):
            raise UsageError(f"target-psnr must be a positive number of dB, got {self.target_psnr}")

    def resolved(self, has_truth: bool) -> tuple[str, float]:
        """("psnr_drop", D) or ("psnr", P): the target this run aims at."""
        self.check()
        if self.target_psnr_drop is not None:
            if not has_truth:
                raise UsageError("--target-psnr-drop needs ground truth (--truth, or truth:<output> arrays); "
                                 "without it use --target-psnr")
            return "psnr_drop", float(self.target_psnr_drop)
        if self.target_psnr is not None:
            return "psnr", float(self.target_psnr)
        return ("psnr_drop", DEFAULT_PSNR_DROP) if has_truth else ("psnr", DEFAULT_PSNR)


def calibrate_gain(measure: Callable[[float], float], kind: str, target: float,
                   start: float = 1.3) -> dict:
    """Find h > 1 with ``measure(h)`` on target; ``measure`` returns the drop (kind psnr_drop) or PSNR (psnr).

    Both metrics move monotonically with h in practice (more amplification, more change); the search only
    assumes that a bracket found by doubling/halving h - 1 contains the target.
    """
    trials: list[dict] = []

    def score(h: float) -> float:  # increasing in h: the drop, or minus the PSNR
        value = float(measure(h))
        trials.append({"gain": h, kind: value})
        return value if kind == "psnr_drop" else -value

    goal = target if kind == "psnr_drop" else -target
    tol = DROP_TOLERANCE * target if kind == "psnr_drop" else PSNR_TOLERANCE

    def close(s: float, within: float = 0.25) -> bool:  # aim at a quarter of the tolerance, accept it all
        return abs(s - goal) <= tol * within

    excess = start - 1.0
    s = score(1 + excess)
    lo = hi = None
    if s < goal:
        lo = (excess, s)
        while s < goal and not close(s):
            if 1 + excess * 2 > MAX_GAIN:
                raise CalibrationError(_unreached(kind, target, trials, f"even h = {1 + excess:.4g}"))
            excess *= 2
            s = score(1 + excess)
            if s < goal:
                lo = (excess, s)
        hi = (excess, s)
    else:
        hi = (excess, s)
        while s > goal and not close(s):
            if excess / 2 < MIN_EXCESS:
                raise CalibrationError(_unreached(kind, target, trials, f"h = {1 + excess:.6g}"))
            excess /= 2
            s = score(1 + excess)
            if s > goal:
                hi = (excess, s)
        lo = (excess, s)
    best = excess
    steps = 0
    while not close(s) and steps < MAX_STEPS:
        steps += 1
        best = math.sqrt(lo[0] * hi[0])  # bisect log(h - 1)
        s = score(1 + best)
        if s < goal:
            lo = (best, s)
        else:
            hi = (best, s)
    gain = float(f"{1 + float(f'{best:.4g}'):.12g}")  # h - 1 to 4 significant digits: fine steps near h = 1
    final = score(gain)
    if not close(final, 1.0):
        raise CalibrationError(_unreached(kind, target, trials, f"the closest gain h = {gain}"))
    measured = final if kind == "psnr_drop" else -final
    return {"target": {kind: target, "tolerance": DROP_TOLERANCE if kind == "psnr_drop" else PSNR_TOLERANCE,
                       "tolerance_unit": "relative" if kind == "psnr_drop" else "dB"},
            "chosen_gain": gain, "measured": {kind: measured}, "trials": trials}


def _unreached(kind: str, target: float, trials: list[dict], where: str) -> str:
    what = f"a PSNR drop of {target:g} dB against ground truth" if kind == "psnr_drop" else \
        f"a PSNR of {target:g} dB against the original"
    last = trials[-1][kind] if trials else float("nan")
    return (f"no gain reaches {what}: {where} gives {last:.4g} dB "
            f"({len(trials)} trial(s); search range h in (1, {MAX_GAIN:g}]); give --gain explicitly or another target")


def image_output_index(output_shapes: list[np.ndarray]) -> int | None:
    """Index of the first (N, 1|3, H, W) output among one run's outputs."""
    for i, arr in enumerate(output_shapes):
        if is_image_batch(arr):
            return i
    return None
