#!/usr/bin/env python
"""Issue 13 section 2: PSNR attacks on every bundled model, hardened (ASVP) and not; JSON + markdown table.

For each model (the seven restoration teachers of ``attacks.suite.BUNDLED`` and the bundled codecs of
``attacks.compression.BUNDLED``, when present): harden it with ``hardener.api.harden`` (the attack suite's
``asvp-k4-h1.3`` defence for the teachers: rank 4, gain 1.3, channel mode, after ``--layers``; for the codecs
``--codec-gain`` 1.05 after ``--codec-layers`` g_s.0, as the decoder is far more sensitive), then run ``attacks.adversarial`` (L_inf PGD at each eps and the
MSE-bounded attack, ``--seeds`` random starts each) on the original and the hardened file, on the held-out
photos cropped to ``--size`` (``--codec-size`` for the codecs).  Hardened minus original attacked PSNR is
paired by image and seed, with a 95 % two-stage bootstrap interval; "within noise" when it contains 0.

Writes ``OUT/<model>.json`` and ``OUT/<model>.hardened.json`` (full reports, reused when their settings
match: resumable), ``OUT/hardened/*.hardened.onnx``, and ``OUT/adversarial_table.{json,md}``.

    python scripts/adversarial_table.py       # everything, 3 seeds (2-4 h on one busy thread: see docs/adversarial.md)
    python scripts/adversarial_table.py --models sr2,denoise --seeds 0
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO_ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from attacks.adversarial.models import eval_images, resolve  # noqa: E402
from attacks.adversarial.report import run_identity  # noqa: E402
from attacks.identity import digest  # noqa: E402
from hardener.model_io import sha256_file  # noqa: E402
from attacks.adversarial.report import attack_configs, paired_difference, run_attacks  # noqa: E402


def harden_file(source: Path, out: Path, layers: list[str], rank: int, gain: float) -> Path:
    from hardener.api import HardenConfig, harden
    from hardener.asvp import AsvpParams

    import onnx

    from hardener.rewrite import read_manifest

    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # reuse only a file hardened as asked
        m = read_manifest(onnx.load(str(out), load_external_data=False)) or {}
        same = (m.get("params", {}).get("rank") == rank and m.get("params", {}).get("gain") == gain
                and sorted({lay["selector"] for lay in m.get("layers", [])}) == sorted(layers)
                and m.get("source_sha256") == sha256_file(source))
        if not same:
            out.unlink()
    if not out.exists():
        harden(source, out, HardenConfig(layers=layers, params=AsvpParams(rank=rank, gain=gain), validate=False,
                                         force=True), report_path=out.with_name(out.name + ".report.json"))
    return out


def settings_of(args, size: int, gain: float) -> dict:
    return {"eps": args.eps, "budget": args.budget, "steps": args.steps, "seeds": args.seeds, "size": size,
            "rank": args.rank, "gain": gain}


def run_one(spec: str, json_path: Path, settings: dict, args) -> dict:
    """One model's attack report: reused only when the stored run_id is the digest of this run's identity
    (file sha256, images, attacks, seeds, attack and hardener code, library versions), else recomputed."""
    t0 = time.perf_counter()
    target = resolve(spec)
    names, x8, y = eval_images(target.task, settings["size"])
    configs = attack_configs(args.eps, ["pgd", "mse"], args.budget)
    if json_path.exists():
        old = json.loads(json_path.read_text())
        if old.get("run_id") == digest(run_identity(target, names, x8, configs, args.steps, args.seeds)):
            print(f"  reuse {json_path}", flush=True)
            return old
    report = run_attacks(target, names, x8, y, configs, args.steps, args.seeds)
    report["settings"] = settings
    report["seconds"] = time.perf_counter() - t0
    json_path.write_text(json.dumps(report, indent=1))
    print(f"  {spec}: {report['seconds']:.0f} s", flush=True)
    return report


def fmt(s: dict) -> str:
    return f"{s['mean']:.2f} ± {s['sd']:.2f}"


def table(rows: list[dict], labels: list[str]) -> str:
    """Attacked PSNR per attack; on hardened rows, the change of the PSNR drop (clean - attacked) that ASVP
    causes, paired by image and seed: > 0 means the hardened model loses more under attack."""
    head = ("| model | ASVP | clean PSNR | " + " | ".join(f"{lab} PSNR" for lab in labels)
            + " | VI at pgd 8/255 (dB) | drop(hardened) - drop(original) (dB) [95 % CI] |")
    lines = [head, "|" + "---|" * 3 + "---:|" * len(labels) + "---:|---|"]
    for r in rows:
        for which in ("original", "hardened"):
            rep = r[which]
            att = {a["label"]: a["summary"] for a in rep["attacks"]}
            clean = f"{rep['clean']['psnr']:.2f}"
            if "bpp" in rep["clean"]:
                clean += f" / {rep['clean']['bpp']:.3f} bpp"
            cells = [fmt(att[lab]["psnr_adv"]) for lab in labels]
            vi = att.get("pgd eps=8/255", {}).get("vi_db")
            diff = ""
            if which == "hardened":
                parts = []
                for lab in labels:
                    d = r["difference"]["drop"][lab]
                    ci = d["ci95"]
                    parts.append(f"{lab.split()[0]} {lab.split('=')[1]}: {d['mean']:+.2f}"
                                 + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")
                                 + (" (noise)" if d["within_noise"] else ""))
                diff = "; ".join(parts) + f"; clean PSNR {r['difference']['psnr_adv']['clean']['mean']:+.2f}"
            lines.append(f"| {r['model']} | {'yes' if which == 'hardened' else 'no'} | {clean} | "
                         + " | ".join(cells) + f" | {fmt(vi) if vi else '-'} | {diff} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from attacks.adversarial.models import codec_entries, suite_entries

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "attacks" / "results" / "adversarial")
    p.add_argument("--models", default=None, help="comma-separated entries [default: every teacher and codec]")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--eps", default="2,4,8")
    p.add_argument("--budget", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=128, help="HR crop of the teachers' photos")
    p.add_argument("--codec-size", type=int, default=128)
    p.add_argument("--layers", default="body.*.conv2")
    p.add_argument("--codec-layers", default="g_s.0",
                   help="the codec's decoder is far more sensitive than the teachers: h = 1.3 after g_s.0, g_s.2 "
                        "and g_s.4 costs about 11 dB, after g_s.0 alone 3.7 dB (codec_q1, 128 crops)")
    p.add_argument("--codec-gain", type=float, default=1.05,
                   help="1.05 after g_s.0 costs codec_q1 0.25 dB clean, the order of h = 1.3 on the teachers")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--gain", type=float, default=1.3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.eps = [float(e) for e in args.eps.split(",")]
    teachers, codecs = suite_entries(), {k: v for k, v in codec_entries().items() if v.is_file()}
    models = args.models.split(",") if args.models else list(teachers) + list(codecs)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in models:
        is_codec = name in codecs
        source = codecs[name] if is_codec else teachers[name]
        size = args.codec_size if is_codec else args.size
        layers = (args.codec_layers if is_codec else args.layers).split(",")
        gain = args.codec_gain if is_codec else args.gain
        print(f"{name}:", flush=True)
        hardened = harden_file(source, args.out / "hardened" / f"{name}.hardened.onnx", layers, args.rank, gain)
        settings = {**settings_of(args, size, gain), "layers": layers}
        orig = run_one(name, args.out / f"{name}.json", settings, args)
        hard = run_one(str(hardened), args.out / f"{name}.hardened.json", settings, args)
        rows.append({"model": name, "layers": layers, "original": orig, "hardened": hard,
                     "difference": {k: paired_difference(orig, hard, k) for k in ("psnr_adv", "drop", "vi_db")}})
    labels = [a["label"] for a in rows[0]["original"]["attacks"]] if rows else []
    summary = [{"model": r["model"], "layers": r["layers"], "settings": r["original"]["settings"],
                **{w: {"clean_psnr": r[w]["clean"]["psnr"], "clean_bpp": r[w]["clean"].get("bpp"),
                       "attacks": {a["label"]: {k: a["summary"][k] for k in ("psnr_adv", "psnr_drop", "vi_db")}
                                   | ({"bpp_adv": a["summary"]["bpp_adv"]} if "bpp_adv" in a["summary"] else {})
                                   for a in r[w]["attacks"]},
                       "twin_parity_max_abs": r[w]["model"]["twin"]["parity_max_abs"]}
                   for w in ("original", "hardened")},
                "difference": r["difference"]} for r in rows]
    (args.out / "adversarial_table.json").write_text(json.dumps(
        {"schema": "attacks.adversarial_table/1", "rows": summary}, indent=1))
    md = table(rows, labels)
    (args.out / "adversarial_table.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
