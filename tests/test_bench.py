"""scripts/bench_overhead.py --quick: it runs and its output has the documented form (not its speed)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_overhead.py"


def test_quick_benchmark_writes_ratios(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--points", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {(r["mode"], r["rank"]) for r in rows} == {("channel", 1), ("channel", 4), ("spatial", 1), ("spatial", 4)}
    for r in rows:
        assert r["provider"] == "CPUExecutionProvider" and r["size"] == 64 and r["points"] == 1
        assert r["original_ms"] > 0 and r["ratio_median"] > 0 and r["inserted_nodes"] > 0
    assert sum("hardened/original" in line for line in proc.stdout.splitlines()) == len(rows)
