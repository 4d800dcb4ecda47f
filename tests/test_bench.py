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
    assert any("torch.linalg.svd" in line for line in lines)


def test_cuda_graph_needs_cuda(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--cuda-graph", "--json", str(tmp_path / "b.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--cuda-graph needs --providers cuda" in proc.stderr
    assert not (tmp_path / "b.json").exists()
