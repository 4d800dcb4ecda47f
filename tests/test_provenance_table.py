"""scripts/provenance_table.py: the README's detection table from recorded run files (nothing recomputed)."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("provenance_table", ROOT / "scripts" / "provenance_table.py")
pt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pt)


def _run(task, student, seed, mark, z, cand, psnr=30.0, served=32.95, derived=None):
    return {"task": task, "student": student, "student_arch": student, "seed": seed,
            "defence": {"name": "mark" if mark else "none", "mark": mark, "mark_key": "suite"},
            "attacker": {"name": "naive"}, "student_metrics": {"psnr": psnr},
            "teacher_original": {"psnr": 33.0}, "teacher_served": {"psnr": served if mark else 33.0},
            "provenance": {"z": z, "derived": bool(derived if derived is not None else z > 4.75),
                           "amplitude_over_eps": z / 30, "candidate_z": cand}}


def test_rows_group_by_task_and_student_and_count_trials(tmp_path):
    runs = [_run("sr4", "edsr", 1, True, 4.0, [3.2, 0.1]), _run("sr4", "edsr", 0, True, 5.0, [0.0], psnr=28.0),
            _run("sr4", "edsr", 0, False, 0.5, [-1.0]), _run("sr2", "tiny", 0, True, 1.0, None),
            _run("sr2", "tiny", 0, False, 0.2, None)]
    (tmp_path / "runs").mkdir()
    for i, r in enumerate(runs + [{**runs[0], "attacker": {"name": "ensemble"}}]):
        (tmp_path / "runs" / f"r{i}.json").write_text(json.dumps(r))
    table = pt.rows(pt.load([tmp_path]))
    assert [(r["task"], r["student"]) for r in table] == [("sr2", "tiny"), ("sr4", "edsr")]  # bundled order
    sr4 = table[1]
    assert sr4["z"] == [5.0, 4.0] and sr4["seeds"] == [0, 1]  # by seed; the ensemble thief's run is left out
    assert sr4["p1e3"] == 2 and sr4["derived"] == 1 and sr4["clean_z"] == [0.5]
    assert sr4["mark_cost"] == [0.05] and sr4["psnr"] == [28.0, 30.0]
    assert (sr4["trials"], sr4["trial_z_max"], sr4["trials_1e3"]) == (4, 3.2, 1)
    assert table[0]["trials"] == 0
    md = pt.markdown(table)
    assert "| sr4 | 0.050 | edsr | 29.00 (28.00-30.00) | 5.00 / 4.00 | 2/2 | 1/2 |" in md
    assert "| sr2 | 0.050 | tiny |" in md and md.splitlines()[-2].endswith("| none |")


def test_a_folder_without_runs_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="no run files"):
        pt.load([tmp_path])
