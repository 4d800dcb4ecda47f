#!/usr/bin/env python
"""Issue 13 section 3: robust codecs by adversarial fine-tuning and by KD-guided adversarial training.

Rows (all start from the bundled ``--codec``, same ``lmbda``; training rows for every ``--seeds`` seed):

* ``undefended``: the bundled codec as shipped (attacked with every seed's random start);
* ``finetuned_clean``: a control: the same fine-tuning schedule on clean crops only (what extra training
  alone does);
* ``chen_ma_at``: Chen & Ma adversarial fine-tuning (half of each batch PGD-adversarial, distortion against
  the clean crop; ``attacks.adversarial.robust.adversarial_finetune``);
* ``gr_teacher``: the 2403.06700 robust teacher (input-gradient penalty, ``--beta``);
* ``kd_student``: the 2403.06700 student: the ``chen_ma_at`` recipe plus distillation towards that seed's
  ``gr_teacher`` (``--alpha-y`` on the latents, ``--alpha-x`` on the reconstructions).

Each trained model is exported end to end (``attacks.compression.export.export_end_to_end``), twinned
(parity-checked against ONNX Runtime), and attacked: L_inf PGD (``--eps``, ``--attack-steps`` steps) and
the MSE-bounded attack (``--budget``), one random start per trained model (seed = training seed), on the
held-out photos centre-cropped to ``--size``, every number from ONNX Runtime on the exported file.
Intervals: 95 % two-stage bootstrap over seeds and images (``attacks.suite.paired_bootstrap``); a row is
compared with ``undefended`` paired by image and seed.

Writes ``OUT/models/<row>_s<seed>.{pt,onnx,json}`` (reused when their settings match: resumable),
``OUT/robust_codec.json`` and ``OUT/robust_codec.md``.

    python scripts/robust_codec.py                   # 3 seeds, 300 steps (about 20-30 min on one thread)
    python scripts/robust_codec.py --seeds 0 --steps 20 --out /tmp/rc     # smoke run
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO_ROOT = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from attacks.adversarial.models import CODEC_TOL, Target, eval_images  # noqa: E402
from attacks.adversarial.pgd import OnnxModel  # noqa: E402
from attacks.adversarial.report import code_fingerprint  # noqa: E402
from attacks.identity import digest, environment, hardener_fingerprint  # noqa: E402
from attacks.adversarial.report import attack_configs, paired_difference, run_attacks  # noqa: E402
from attacks.adversarial.robust import (RobustConfig, adversarial_finetune, gradient_regularised_teacher,  # noqa: E402
                                        kd_student)
from attacks.adversarial.twin import twin_of_module  # noqa: E402

ROWS = ("undefended", "finetuned_clean", "chen_ma_at", "gr_teacher", "kd_student")


def _cfg(args) -> RobustConfig:
    return RobustConfig(steps=args.steps, inner_steps=args.inner_steps, lr=args.lr,
                        eps=tuple(args.train_eps), adv_fraction=0.5)


def train_row(row: str, seed: int, args, lmbda: float, start: torch.nn.Module, teacher=None):
    model = copy.deepcopy(start)
    cfg = _cfg(args)
    if row == "finetuned_clean":
        cfg.adv_fraction = 0.0
        log = adversarial_finetune(model, lmbda, cfg, seed)
    elif row == "chen_ma_at":
        log = adversarial_finetune(model, lmbda, cfg, seed)
    elif row == "gr_teacher":
        log = gradient_regularised_teacher(model, lmbda, beta=args.beta, cfg=cfg, seed=seed)
    elif row == "kd_student":
        log = kd_student(model, teacher, lmbda, alpha_y=args.alpha_y, alpha_x=args.alpha_x, cfg=cfg, seed=seed)
    else:
        raise AssertionError(row)
    return model, log


def settings_of(args, row: str) -> dict:
    base = {"codec": args.codec, "codec_pt_sha256": args.codec_sha, "size": args.size, "eps": args.eps, "budget": args.budget,
            "attack_steps": args.attack_steps}
    if row == "undefended":
        return base
    train = {"steps": args.steps, "inner_steps": args.inner_steps, "lr": args.lr, "train_eps": args.train_eps}
    if row in ("gr_teacher", "kd_student"):
        train["beta"] = args.beta
    if row == "kd_student":
        train |= {"alpha_y": args.alpha_y, "alpha_x": args.alpha_x}
    return base | {"train": train}


def attack_model(model, onnx_path: Path, name: str, seeds: list[int], args, images) -> dict:
    names, x8, y = images
    twin = twin_of_module(model, onnx_path, output_key="x_hat", output="x_hat", x=x8[:1], tol=CODEC_TOL)
    twin.parity_input = f"{names[0]} (eval crop)"
    target = Target(name, onnx_path, "codec", name, twin, OnnxModel(onnx_path, output="x_hat"), 0, "bpp")
    return run_attacks(target, names, x8, y, attack_configs(args.eps, ["pgd", "mse"], args.budget),
                       args.attack_steps, seeds)


def main(argv=None) -> int:
    from attacks.compression import LAMBDAS, bundled_pt, load_bundled
    from attacks.compression.export import export_end_to_end

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codec", default="codec_q1")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "attacks" / "results" / "robust_codec")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps per model")
    p.add_argument("--inner-steps", type=int, default=3, help="PGD steps per training batch")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--train-eps", default="2,4,8", help="training eps (/255), one drawn per step")
    p.add_argument("--beta", type=float, default=1.0, help="gradient-regularisation weight of the teacher")
    p.add_argument("--alpha-y", type=float, default=2.0, help="latent distillation weight")
    p.add_argument("--alpha-x", type=float, default=1.0, help="reconstruction distillation weight")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--eps", default="2,4,8")
    p.add_argument("--budget", type=float, default=1e-3)
    p.add_argument("--attack-steps", type=int, default=20)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    args.eps = [float(e) for e in args.eps.split(",")]
    args.train_eps = [float(e) for e in args.train_eps.split(",")]
    rows = args.rows.split(",")
    lmbda = LAMBDAS[args.codec]
    folder = args.out / "models"
    folder.mkdir(parents=True, exist_ok=True)
    # One snapshot of the bundled codec for every row (the bundled file may be retrained while this runs):
    # its weights' sha256 keys the caches, and the undefended row is its own export, not the bundled ONNX.
    args.codec_sha = hashlib.sha256(bundled_pt(args.codec).read_bytes()).hexdigest()
    start = load_bundled(args.codec)
    if hashlib.sha256(bundled_pt(args.codec).read_bytes()).hexdigest() != args.codec_sha:
        raise SystemExit(f"{args.codec} changed while being read; run again")
    images = eval_images("codec", args.size)
    reports: dict[str, list[dict]] = {}

    def cached(path: Path, settings: dict):
        if path.exists():
            old = json.loads(path.read_text())
            if old.get("settings") == settings:
                return old
        return None

    if "undefended" in rows:
        path = folder / "undefended.json"
        settings = settings_of(args, "undefended")
        rep = cached(path, settings)
        if rep is None:
            export_end_to_end(start, folder / "undefended.onnx")
            rep = attack_model(start, folder / "undefended.onnx", "undefended", seeds, args, images)
            rep["settings"] = settings
            path.write_text(json.dumps(rep, indent=1))
        reports["undefended"] = [rep]
        print(f"undefended: clean {rep['clean']['psnr']:.2f} dB", flush=True)
    teachers: dict[int, torch.nn.Module] = {}
    order = [r for r in ROWS if r in rows and r != "undefended"]
    if "kd_student" in order and "gr_teacher" not in order:
        order.insert(order.index("kd_student"), "gr_teacher")
    for row in order:
        reports[row] = []
        for seed in seeds:
            stem = folder / f"{row}_s{seed}"
            settings = settings_of(args, row)
            rep = cached(stem.with_suffix(".json"), settings)
            model = None
            if rep is None or (row == "gr_teacher" and "kd_student" in order):
                pt = stem.with_suffix(".pt")
                if rep is not None and pt.exists():
                    model = copy.deepcopy(start)
                    model.load_state_dict(torch.load(pt, weights_only=True))
                    model.eval()
                else:
                    t0 = time.perf_counter()
                    model, log = train_row(row, seed, args, lmbda, start, teacher=teachers.get(seed))
                    train_s = time.perf_counter() - t0
                    torch.save(model.state_dict(), pt)
                    export_end_to_end(model, stem.with_suffix(".onnx"))
                    rep = attack_model(model, stem.with_suffix(".onnx"), f"{row} seed {seed}", [seed], args, images)
                    rep |= {"settings": settings, "training": log, "train_seconds": train_s}
                    stem.with_suffix(".json").write_text(json.dumps(rep, indent=1))
            if row == "gr_teacher":
                teachers[seed] = model
            if row in rows:
                reports[row].append(rep)
            print(f"{row} seed {seed}: clean {rep['clean']['psnr']:.2f} dB, "
                  + ", ".join(f"{a['label']} {a['summary']['psnr_adv']['mean']:.2f}" for a in rep["attacks"]),
                  flush=True)
    summary = summarize(reports)
    settings = {k: (v if not isinstance(v, Path) else str(v)) for k, v in vars(args).items() if k != "out"}
    identity = {"codec_pt_sha256": args.codec_sha, "settings": settings, "seeds": seeds,
                "code": {"adversarial": code_fingerprint(), "hardener": hardener_fingerprint()},
                "environment": environment(), "row_run_ids": {row: [r.get("run_id") for r in reps]
                                                              for row, reps in reports.items()}}
    (args.out / "robust_codec.json").write_text(json.dumps(
        {"schema": "attacks.robust_codec/1", "run_id": digest(identity), "identity": identity,
         "codec": args.codec, "codec_pt_sha256": args.codec_sha,
         "lmbda": lmbda, "seeds": seeds,
         "settings": {k: (v if not isinstance(v, Path) else str(v)) for k, v in vars(args).items()},
         "images": images[0], "rows": summary}, indent=1))
    md = markdown(summary)
    (args.out / "robust_codec.md").write_text(md + "\n")
    print(md)
    return 0


def _merge(reps: list[dict]) -> dict:
    """One report whose attacks hold every seed of ``reps`` (one trained model per seed)."""
    merged = json.loads(json.dumps(reps[0]))
    for a in merged["attacks"]:
        a["seeds"] = []
    for rep in reps:
        for a, b in zip(merged["attacks"], rep["attacks"]):
            a["seeds"] += b["seeds"]
    merged["clean_per_seed"] = [r["clean"] for r in reps]
    return merged


def _sd(values) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarize(reports: dict[str, list[dict]]) -> list[dict]:
    from attacks.suite import paired_bootstrap

    out = []
    base = _merge(reports["undefended"]) if "undefended" in reports else None
    at = _merge(reports["chen_ma_at"]) if reports.get("chen_ma_at") else None
    for row, reps in reports.items():
        if not reps:
            continue
        merged = _merge(reps)
        clean_psnr = [r["clean"]["psnr"] for r in reps]
        clean_bpp = [r["clean"]["bpp"] for r in reps]
        attacks = {}
        for a in merged["attacks"]:
            per_seed = [s["mean_psnr_adv"] for s in a["seeds"]]
            drops = [[im["psnr_clean"] - im["psnr_adv"] for im in s["images"]] for s in a["seeds"]]
            attacks[a["label"]] = {
                "psnr_adv": {"mean": float(np.mean(per_seed)), "sd": _sd(per_seed),
                             "ci95": paired_bootstrap([[im["psnr_adv"] for im in s["images"]] for s in a["seeds"]])},
                "psnr_drop": {"mean": float(np.mean([np.mean(d) for d in drops])), "ci95": paired_bootstrap(drops)},
                "bpp_adv": float(np.mean([s["mean_bpp_adv"] for s in a["seeds"]])),
                "vi_db": float(np.mean([s["mean_vi_db"] for s in a["seeds"]])),
                "n_seeds": len(a["seeds"])}
        entry = {"row": row, "n_models": len(reps) if row != "undefended" else 1,
                 "clean_psnr": {"mean": float(np.mean(clean_psnr)), "sd": _sd(clean_psnr)},
                 "clean_bpp": {"mean": float(np.mean(clean_bpp)), "sd": _sd(clean_bpp)},
                 "attacks": attacks,
                 "train_seconds": [r.get("train_seconds") for r in reps],
                 "twin_parity_max_abs": max(r["model"]["twin"]["parity_max_abs"] for r in reps)}
        if base is not None and row != "undefended":
            entry["vs_undefended"] = {"psnr_adv": paired_difference(base, merged, "psnr_adv"),
                                      "drop": paired_difference(base, merged, "drop")}
            clean = float(np.mean([r["clean"]["psnr"] for r in reps]) - base["clean"]["psnr"])
            for d in entry["vs_undefended"].values():
                d["clean"] = {"mean": clean}  # every trained seed, not only the first
        if at is not None and row == "kd_student":  # the recipe against its baseline, same seeds and batches
            entry["vs_chen_ma_at"] = {"psnr_adv": paired_difference(at, merged, "psnr_adv")}
            entry["vs_chen_ma_at"]["psnr_adv"]["clean"] = {
                "mean": float(np.mean([r["clean"]["psnr"] for r in reps]) - np.mean([r["clean"]["psnr"]
                                                                                      for r in reports["chen_ma_at"]]))}
        out.append(entry)
    return out


def markdown(summary: list[dict]) -> str:
    labels = list(summary[0]["attacks"]) if summary else []
    head = ("| model | models | clean PSNR (dB) | clean bpp | "
            + " | ".join(f"{lab}: PSNR (bpp)" for lab in labels) + " |")
    lines = [head, "|---|---:|---:|---:|" + "---:|" * len(labels)]
    for e in summary:
        cells = []
        for lab in labels:
            a = e["attacks"][lab]
            cells.append(f"{a['psnr_adv']['mean']:.2f} ± {a['psnr_adv']['sd']:.2f} ({a['bpp_adv']:.3f})")
        lines.append(f"| {e['row']} | {e['n_models']} | {e['clean_psnr']['mean']:.2f} ± {e['clean_psnr']['sd']:.2f} | "
                     f"{e['clean_bpp']['mean']:.3f} ± {e['clean_bpp']['sd']:.3f} | " + " | ".join(cells) + " |")
    lines += ["", "Attacked PSNR minus the undefended codec's (last row: KD-guided minus Chen & Ma), paired by image "
              "and seed [95 % bootstrap CI]:", "",
              "| model | clean | " + " | ".join(labels) + " |", "|---|---:|" + "---:|" * len(labels)]
    pairs = [(e["row"], e["vs_undefended"]["psnr_adv"]) for e in summary if "vs_undefended" in e]
    pairs += [("kd_student - chen_ma_at", e["vs_chen_ma_at"]["psnr_adv"]) for e in summary if "vs_chen_ma_at" in e]
    for name, d in pairs:
        cells = []
        for lab in labels:
            ci = d[lab]["ci95"]
            cells.append(f"{d[lab]['mean']:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")
                         + (" (noise)" if d[lab]["within_noise"] else ""))
        lines.append(f"| {name} | {d['clean']['mean']:+.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
