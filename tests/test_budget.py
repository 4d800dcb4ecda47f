"""Budget sweep (issue 10 section 2): one suite run per (queries, steps) point, a row per point."""
from __future__ import annotations

import json

from attacks.budget import sweep, table
from attacks.config import Defence, Suite


def test_budget_sweep_runs_each_point_and_tabulates_it(tmp_path):
    suite = Suite(defences=[Defence("none"), Defence("asvp", layers=["body.*.conv2"])], attackers=["naive"],
                  students=["tiny"], seeds=[0], queries=8, patch=32, steps=5, eval_size=32, provenance_probes=2,
                  provenance_null_keys=20)
    report = sweep(suite, [8], [4, 12], tmp_path, progress=False)
    assert report["points"] == [[8, 4], [8, 12]] or report["points"] == [(8, 4), (8, 12)]
    rows = {(r["steps"], r["defence"]): r for r in report["rows"]}
    assert set(rows) == {(4, "none"), (4, "asvp"), (12, "none"), (12, "asvp")}
    assert rows[(4, "none")]["student_psnr"] != rows[(12, "none")]["student_psnr"]  # the budget really changed
    assert rows[(4, "asvp")]["student_psnr_drop"] is not None and rows[(4, "none")]["student_psnr_drop"] is None
    assert json.loads((tmp_path / "budget.json").read_text())["rows"] == json.loads(json.dumps(report["rows"]))
    assert (tmp_path / "q8_s4" / "runs").is_dir() and (tmp_path / "q8_s12" / "runs").is_dir()
    lines = table(report)
    assert len(lines) == 2 + 4 and "| sr2 | asvp | naive | tiny | 8 | 12 | 1 |" in "\n".join(lines)
