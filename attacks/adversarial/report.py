"""Run a set of PSNR attacks on one model over several seeds, aggregate, and write text tables.

Numbers over seeds: the attack's random start is its only randomness (the images and the model are fixed),
so for each attack the per-seed means are reported as mean, sample standard deviation and min..max, and
the PSNR drop (clean - attacked, per image) gets a 95 % two-stage paired bootstrap interval over seeds and,
within them, images (``attacks.suite.paired_bootstrap``, the attack suite's interval).  Comparisons
between two models (hardened vs not) pair the same image and seed and use the same bootstrap on the
differences; "within noise" when that interval contains 0.
"""
from __future__ import annotations

import math
import time

import numpy as np

from ..identity import digest
from .models import Target
from .pgd import AttackSpec, attack, replay_metrics

SCHEMA = "attacks.adversarial/1"
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def t_interval(values) -> list[float] | None:
    """95 % Student-t interval of the mean of ``values`` (None below 2 values)."""
    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return None
    half = T975.get(len(v) - 1, 1.96) * v.std(ddof=1) / math.sqrt(len(v))
    return [float(v.mean() - half), float(v.mean() + half)]


def _stats(values) -> dict:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": int(len(v))}


def attack_configs(eps: list[float], variants: list[str], budget: float) -> list[tuple[str, float]]:
    out = []
    if "pgd" in variants:
        out += [("pgd", e / 255.0) for e in eps]
    if "mse" in variants:
        out.append(("mse", budget))
    return out


def check_bounds(spec: AttackSpec, metrics: dict) -> None:
    """The replayed images respect the attack's bound (an AssertionError is a bug, not a user error)."""
    for row in metrics["images"]:
        if spec.variant == "pgd" and row["linf_255"] > spec.bound * 255 + 1e-3:
            raise AssertionError(f"{spec.label}: L_inf {row['linf_255']:.4f}/255 exceeds the bound")
        if spec.variant == "mse" and row["mse_in"] > spec.bound * (1 + 1e-9):
            raise AssertionError(f"{spec.label}: input MSE {row['mse_in']:.3g} exceeds the budget")


def run_attacks(target: Target, names: list[str], x8: np.ndarray, y: np.ndarray,
                configs: list[tuple[str, float]], steps: int, seeds: list[int], progress=None) -> dict:
    """Every (variant, bound) of ``configs`` with every seed; the JSON-ready report of one model."""
    from attacks.suite import paired_bootstrap

    clean = target.onnx.run(x8)
    clean_metrics = replay_metrics(target.onnx, x8, x8, y, target.crop, clean, target.rate_key)
    rows = []
    for variant, bound in configs:
        per_seed = []
        for seed in seeds:
            spec = AttackSpec(variant, bound, steps, seed)
            t0 = time.perf_counter()
            adv = attack(target.twin, x8, y, spec, crop=target.crop)
            metrics = replay_metrics(target.onnx, x8, adv, y, target.crop, clean, target.rate_key)
            check_bounds(spec, metrics)
            metrics["seconds"] = time.perf_counter() - t0
            per_seed.append({"seed": seed, **metrics})
            if progress:
                progress(spec, metrics)
        drops = [[r["psnr_clean"] - r["psnr_adv"] for r in s["images"]] for s in per_seed]
        summary = {k: _stats([s[f"mean_{k}"] for s in per_seed])
                   for k in ("psnr_adv", "vi_db", "linf_255", "mse_in") + (("bpp_adv",) if target.rate_key else ())}
        summary["psnr_drop"] = _stats([float(np.mean(d)) for d in drops])
        summary["psnr_drop"]["ci95"] = paired_bootstrap(drops)
        rows.append({"variant": variant, "bound": bound, "label": AttackSpec(variant, bound).label,
                     "eps_255": round(bound * 255, 6) if variant == "pgd" else None,
                     "budget": bound if variant == "mse" else None, "steps": steps,
                     "seeds": per_seed, "summary": summary})
    identity = run_identity(target, names, x8, configs, steps, seeds)
    return {
        "schema": SCHEMA,
        "run_id": digest(identity), "identity": identity,
        "model": target.describe(),
        "images": names,
        "input_shape": list(x8.shape), "clean_shape": list(y.shape),
        "clean": {"psnr": clean_metrics["mean_psnr_clean"],
                  "per_image_psnr": [r["psnr_clean"] for r in clean_metrics["images"]],
                  **({"bpp": clean_metrics["mean_bpp_clean"]} if target.rate_key else {})},
        "attacks": rows,
        "conventions": CONVENTIONS,
    }


def code_fingerprint() -> str:
    """sha256 of the attack code that determines the numbers (this package's modules)."""
    from pathlib import Path

    from ..identity import sha_of_files

    root = Path(__file__).resolve().parent
    return sha_of_files(root, sorted(p.name for p in root.glob("*.py")))


def run_identity(target: Target, names: list[str], x8: np.ndarray, configs, steps: int, seeds: list[int]) -> dict:
    """Everything that determines one model's attack numbers: the deployed file's sha256, the images (names
    and the sha256 of their 8-bit inputs), the attacks and seeds, the attack and hardener code, the
    library versions.  Its digest, ``run_id``, is stored beside it, so a changed parameter never reprints
    an old number."""
    import hashlib
    from pathlib import Path

    from ..identity import environment, file_sha256, hardener_fingerprint

    return {"model_sha256": file_sha256(Path(target.describe()["path"])), "images": list(names),
            "inputs_sha256": hashlib.sha256(np.ascontiguousarray(x8, np.float32).tobytes()).hexdigest(),
            "attacks": [[v, float(b)] for v, b in configs], "steps": int(steps), "seeds": [int(s) for s in seeds],
            "twin": {k: v for k, v in target.describe().get("twin", {}).items() if k != "parity_max_abs"},
            "code": {"adversarial": code_fingerprint(), "hardener": hardener_fingerprint()},
            "environment": environment()}


CONVENTIONS = ("RGB, float32 in [0, 1]; clean inputs and adversarial images rounded to 8 bits (k/255) and run "
               "through ONNX Runtime (CPU) on the deployed file; PSNR per image (clipped to [0, 1], "
               "crop_border = scale for restoration, 0 for the codec) then averaged; the clean image is the "
               "ground-truth photo crop (restoration) or the 8-bit input (codec); VI = 10 log10(MSE(f(x'), f(x)) "
               "/ MSE(x', x)) per image then averaged; attacks keep each image's best iterate (twin distortion).")


def _value(row: dict, key: str) -> float:
    return row["psnr_clean"] - row["psnr_adv"] if key == "drop" else row[key]


def paired_difference(a: dict, b: dict, key: str = "psnr_adv") -> dict:
    """b - a of per-image ``key`` (a metric of ``replay_metrics``, or ``drop`` = clean - attacked PSNR) for
    each attack both reports ran (same images and seeds), with the bootstrap interval and a
    ``within_noise`` flag."""
    from attacks.suite import paired_bootstrap

    out = {}
    rows_a = {r["label"]: r for r in a["attacks"]}
    for rb in b["attacks"]:
        ra = rows_a.get(rb["label"])
        if ra is None:
            continue
        seeds_a = {s["seed"]: s for s in ra["seeds"]}
        diffs = [[_value(ib, key) - _value(ia, key) for ia, ib in zip(seeds_a[s["seed"]]["images"], s["images"])]
                 for s in rb["seeds"] if s["seed"] in seeds_a]
        ci = paired_bootstrap(diffs)
        mean = float(np.mean([np.mean(d) for d in diffs])) if diffs else float("nan")
        out[rb["label"]] = {"mean": mean, "ci95": ci, "within_noise": None if ci is None else ci[0] <= 0 <= ci[1]}
    clean = [pb - pa for pa, pb in zip(a["clean"]["per_image_psnr"], b["clean"]["per_image_psnr"])]
    out["clean"] = {"mean": float(np.mean(clean))}
    return out


def _pm(s: dict, f: str = ".2f") -> str:
    return f"{s['mean']:{f}} ± {s['sd']:{f}}" if s["n"] > 1 else f"{s['mean']:{f}}"


def _ci(ci) -> str:
    return "n/a" if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def summary_text(report: dict) -> str:
    m = report["model"]
    tw = m["twin"]
    seeds = sorted({s["seed"] for r in report["attacks"] for s in r["seeds"]})
    lines = [f"{m['name']}: {m['origin']}, task {m['task']}{', hardened (ASVP)' if m['hardened'] else ''}",
             f"  twin: max |twin - ONNX Runtime| = {tw['parity_max_abs']:.2g} on {tw['parity_input']}"
             + (f"; ASVP in the twin: {tw['asvp_in_twin']}" if tw["asvp_in_twin"] else ""),
             f"  images: {', '.join(report['images'])} (inputs {report['input_shape'][2]}x{report['input_shape'][3]}, "
             f"clean {report['clean_shape'][2]}x{report['clean_shape'][3]}); seeds {', '.join(map(str, seeds))}",
             f"  clean PSNR {report['clean']['psnr']:.2f} dB"
             + (f", {report['clean']['bpp']:.3f} bpp" if "bpp" in report["clean"] else ""), ""]
    rate = "bpp" in report["clean"]
    head = ("| attack | steps | attacked PSNR (dB, mean ± sd over seeds) | drop (dB) [95 % CI] | VI (dB) "
            "| L_inf (/255) | input MSE |")
    sep = "|---|---:|---:|---:|---:|---:|---:|"
    if rate:
        head += " attacked bpp |"
        sep += "---:|"
    lines += [head, sep]
    for r in report["attacks"]:
        s = r["summary"]
        row = (f"| {r['label']} | {r['steps']} | {_pm(s['psnr_adv'])} | {s['psnr_drop']['mean']:.2f} "
               f"{_ci(s['psnr_drop']['ci95'])} | {_pm(s['vi_db'])} | {s['linf_255']['max']:.0f} | "
               f"{s['mse_in']['mean']:.2e} |")
        if rate:
            row += f" {_pm(s['bpp_adv'], '.3f')} |"
        lines.append(row)
    return "\n".join(lines)
