"""Pictures of an attack report: an image grid per task and the teacher-drop vs student-drop curve.

Both read only what the runner wrote (``OUT/images/*.png`` and the summary rows), so a report can be redrawn
from a results folder without rerunning anything.  matplotlib (the 'attacks' extra) draws them with the Agg
backend: no display needed.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np


def to_uint8(x: np.ndarray) -> np.ndarray:
    """(1, 3, H, W) or (3, H, W) float in [0, 1] -> (H, W, 3) uint8 (clipped, rounded)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 4:
        x = x[0]
    return (np.clip(x, 0.0, 1.0).transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8)


def save_png(path: Path, x: np.ndarray) -> None:
    from skimage import io

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp.png")  # unique per writer
    try:
        io.imsave(str(tmp), to_uint8(x), check_contrast=False)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def image_grid(path: Path, title: str, rows: list[list[tuple[str, Path | None]]]) -> None:
    """One figure: ``rows`` of (caption, PNG path) panels; a missing path leaves an empty panel."""
    from skimage import io

    plt = _pyplot()
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.3 * n_cols, 2.7 * n_rows), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_axis_off()
            if j >= len(row):
                continue
            caption, png = row[j]
            if png is not None and Path(png).is_file():
                ax.imshow(io.imread(str(png)), interpolation="nearest")
            ax.set_title(caption, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(h_pad=1.2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tradeoff_curve(path: Path, rows: list[dict]) -> int:
    """Teacher PSNR drop (x) vs student PSNR drop (y) for each defended (task, student) under the naive
    attacker, points labelled with the defence; the diagonal y = x marks "students lose what the teacher
    loses" (protection means points above it).  Returns the number of points drawn."""
    plt = _pyplot()
    points = [r for r in rows if r["attacker"] == "naive" and r["student_psnr_drop"] is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    groups: dict[tuple, list[dict]] = {}
    for r in points:
        groups.setdefault((r["task"], r["student"]), []).append(r)
    for (task, student), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["teacher_psnr_drop"])
        x = [r["teacher_psnr_drop"] for r in rs]
        y = [r["student_psnr_drop"] for r in rs]
        err = [r.get("student_psnr_drop_std") or 0.0 for r in rs]
        ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=2, lw=1, label=f"{task} / {student}")
        for r in rs:
            ax.annotate(r["defence"].replace("asvp-", ""), (r["teacher_psnr_drop"], r["student_psnr_drop"]),
                        fontsize=6, xytext=(3, 3), textcoords="offset points")
    if points:
        hi = max(max(r["teacher_psnr_drop"] for r in points), max(r["student_psnr_drop"] for r in points), 0.1)
        lo = min(min(r["student_psnr_drop"] for r in points), 0.0)
        ax.plot([0, hi], [0, hi], "k--", lw=0.8, label="student drop = teacher drop")
        ax.set_ylim(lo - 0.1, hi * 1.1 + 0.1)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("teacher PSNR drop from hardening (dB)")
    ax.set_ylabel("student PSNR drop vs student of the original teacher (dB)")
    ax.set_title("What hardening costs the teacher vs what it costs a distilled student (naive attacker)",
                 fontsize=8)
    ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return len(points)
