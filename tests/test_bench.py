"""The benchmark a GPU session relies on runs end to end (tiny shape on CPU; no timing is asserted)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_bench_writes_rows_with_floors_for_every_mode(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--sizes", "tiny", "--seq", "16", "--warmup", "1",
                    "--steps", "1", "--budgets", "1GB", "--out", str(tmp_path)], check=True, env=env, timeout=600,
                   capture_output=True)
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    assert [(r["mode"], r["budget"]) for r in rows] == [("resident", None), ("offloaded", None),
                                                         ("offloaded-skip", None), ("offloaded", "1GB")]
    assert all(r["floor_s"] > 0 and r["median_step_s"] > 0 for r in rows)
    assert rows[1]["bytes_moved_per_step"] > rows[2]["bytes_moved_per_step"] > 0 == rows[0]["bytes_moved_per_step"]
    assert rows[1]["bytes_moved_per_step"] == rows[1]["predicted_bytes_moved_per_step"]  # counted == planned
    assert rows[3]["resident_blocks"] == 4  # a 1 GB budget holds the tiny model whole
    assert (tmp_path / "results.md").read_text().count("| tiny") == 4
    assert (tmp_path / "budget.png").stat().st_size > 0
