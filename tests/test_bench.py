"""scripts/bench_overhead.py --quick: it runs and its output has the documented form (not its speed)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_overhead.py"


def test_quick_benchmark_writes_ratios_and_reference(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--points", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["schema"] == "hardener.bench/1"
    rows = report["rows"]
    assert {(r["mode"], r["rank"]) for r in rows} == {("channel", 1), ("channel", 4), ("spatial", 1), ("spatial", 4)}
    for r in rows:
        assert r["provider"] == "CPUExecutionProvider" and r["size"] == 64 and r["points"] == 1
        assert r["original_ms"] > 0 and r["hardened_ms"] > 0 and r["ratio_median"] > 0
        assert r["ratio_p90"] >= r["ratio_median"] and r["inserted_nodes"] > 0
        assert r["cpu_ratio_median"] > 0  # process CPU time ratio, defined on CPU
        schedule = (2, 8, "float64") if r["mode"] == "channel" else (0, 32, "float32")  # defaults, resolved
        assert (r["squarings"], r["iterations"], r["precision"]) == schedule
    # more k, more nodes: the table reflects the subgraph that was really inserted
    nodes = {(r["mode"], r["rank"]): r["inserted_nodes"] for r in rows}
    assert nodes[("channel", 4)] > 2 * nodes[("channel", 1)]
    refs = report["reference"]
    assert {(r["mode"], r["rank"]) for r in refs} == {("channel", 1), ("channel", 4), ("spatial", 1), ("spatial", 4)}
    for r in refs:
        assert r["map_shape"] == [1, 32, 64, 64] and r["svd_device"] == "cpu"
        assert r["subgraph_ms"] > 0 and r["svd_ms"] > 0
    lines = proc.stdout.splitlines()
    assert sum("hardened/original" in line for line in lines) == len(rows)
    assert "floor" in lines[0] and "vs floor" in lines[0]
    assert any("torch.linalg.svd" in line for line in lines)


# The bundled teacher by hand: head 3->32, 8 body convolutions 32->32, tail 32->12, all 3x3, stride 1, padding 1
# (so every output is 64x64 at --quick's 64^2 input; the bicubic skip, PixelShuffle and Adds do no MACs).
TEACHER_MACS_PER_PIXEL = 32 * 3 * 9 + 8 * 32 * 32 * 9 + 12 * 32 * 9  # 78,048


def test_quick_benchmark_reports_the_flop_floor(tmp_path):
    """Each row carries its FLOP floor, computed from shapes: checked against a hand count of the teacher."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--no-reference", "--repeats", "2",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {r["points"] for r in rows} == {1, 3}
    pixels = 64 * 64
    for r in rows:
        assert r["model_macs"] == TEACHER_MACS_PER_PIXEL * pixels
        k = r["rank"]
        if r["mode"] == "channel":  # body.N.conv2 is 1 x 32 x 64 x 64: Gram 32^2 HW, update 2k 32 HW
            per_point = 32 * 32 * pixels + 2 * k * 32 * pixels
        else:  # 32 matrices of 64 x 64: Gram 64^2 x 64 each, update 2k 64 x 64 each
            per_point = 32 * (64 * 64 * 64 + 2 * k * 64 * 64)
        assert r["insertion_macs"] == r["points"] * per_point
        assert r["flop_floor"] > 1 and abs(r["flop_floor"] - (1 + r["insertion_macs"] / r["model_macs"])) < 1e-12
        assert abs(r["overhead_vs_floor"] - (r["ratio_median"] - 1) / (r["flop_floor"] - 1)) < 1e-9
    floor = {(r["points"], r["mode"], r["rank"]): r["flop_floor"] for r in rows}
    assert abs(floor[(1, "channel", 4)] - (1 + 1280 / 78048)) < 1e-12  # 1.0164
    assert floor[(3, "channel", 4)] > floor[(1, "channel", 4)] > floor[(1, "channel", 1)]


def test_cuda_graph_needs_cuda(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--cuda-graph", "--json", str(tmp_path / "b.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--cuda-graph needs --providers cuda" in proc.stderr
    assert not (tmp_path / "b.json").exists()


def test_quick_mark_benchmark_writes_ratios(tmp_path):
    out = tmp_path / "mark.json"
    script = SCRIPT.with_name("bench_mark.py")
    proc = subprocess.run([sys.executable, str(script), "--quick", "--json", str(out)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    [row] = json.loads(out.read_text())["rows"]
    assert row["model"] == "teacher" and row["size"] == 64 and row["eps"] > 0
    assert row["original_ms"] > 0 and row["marked_ms"] > 0 and row["ratio_p90"] >= row["ratio_median"] > 0
    # the mark on a 3-channel 128^2 output: (9*3*16 + 16*3) MACs per pixel, a small share of the teacher's
    assert row["mark_macs"] == 128 * 128 * (9 * 3 * 16 + 16 * 3) and 1 < row["flop_floor"] < 1.2
    assert "marked/original" in proc.stdout.splitlines()[0]
