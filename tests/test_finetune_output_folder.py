"""What ``zo2 finetune`` does with its ``--output-dir``: it writes only into a folder it owns (a marker
names the run), refuses a folder of other files or a previous run's outputs without ``--resume`` or
``--overwrite``, deletes only what it wrote, lets one run at a time in (an flock that a SIGKILLed holder
does not leave stuck), and checks the folder before anything is loaded or trained."""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from finetune_setup import finetune_args

from zo2 import cli
from zo2.cli.finetune.output_folder import LOCK, MARKER, WRITTEN, OutputFolder, needed_bytes
from zo2.tasks import TaskError

ROOT = Path(__file__).resolve().parents[1]
HOLDER = """
import sys, time
from zo2.cli.finetune.output_folder import OutputFolder
held = OutputFolder.claim(sys.argv[1], resume=False, overwrite=False)  # released when the process ends
print("claimed", flush=True)
time.sleep(600)
"""


def _fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err  # progress bars, then the one line
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def test_a_run_marks_its_folder_and_a_rerun_without_resume_is_refused(model_dir: Path, data_file: Path,
                                                                      tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    argv = finetune_args(model_dir, data_file, "--output-dir", str(out))
    assert cli.main(argv) == 0
    marker = json.loads((out / MARKER).read_text())
    assert marker["format"] == "zo2-finetune-output" and len(marker["run"]) == 32
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    used = ", ".join(name for name in WRITTEN if (out / name).exists())
    assert used.startswith("checkpoints") and used.endswith("summary.json, loss_curve.png")
    assert _fails(argv, capsys) == (f"zo2 finetune: error: --output-dir {out} holds a previous run ({used}): pass "
                                    "--resume to continue it, or --overwrite to delete its outputs and start afresh")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing touched


def test_overwrite_removes_only_what_zo2_wrote(model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = finetune_args(model_dir, data_file, "--output-dir", str(out))
    assert cli.main(argv) == 0
    first = json.loads((out / MARKER).read_text())["run"]
    (out / "checkpoints" / "step-000099").mkdir()  # an old checkpoint --overwrite must clear
    assert cli.main([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003"]
    assert json.loads((out / MARKER).read_text())["run"] != first  # a new run


def test_a_folder_of_other_files_is_refused_and_kept(model_dir: Path, data_file: Path, tmp_path: Path,
                                                     capsys) -> None:
    out = tmp_path / "results"
    out.mkdir()
    (out / "results.json").write_text("{}")
    (out / "config.json").write_text("{}")
    for extra in ([], ["--overwrite"]):
        err = _fails(finetune_args(model_dir, data_file, "--output-dir", str(out), *extra), capsys)
        assert err == (f"zo2 finetune: error: --output-dir {out} holds files zo2 did not write (config.json, "
                       "results.json); zo2 writes only into a new or empty folder or one of its own: pass e.g. "
                       f"--output-dir {out / 'zo2-run'}")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "results.json"]


@pytest.mark.parametrize("where, message", [
    ("file", "is a file, not a folder: pass a new or empty folder"),
    ("/proc/zo2-output", "cannot be created (No such file or directory): pass a folder you can write to"),
    ("/proc/self", "is not writable"),
])
def test_an_unusable_output_folder_stops_before_the_data_is_read(model_dir: Path, tmp_path: Path, capsys, where,
                                                                  message) -> None:
    target = tmp_path / "file" if where == "file" else Path(where)
    if where == "file":
        target.write_text("mine")
    err = _fails(finetune_args(model_dir, tmp_path / "missing.csv", "--output-dir", str(target)), capsys)
    assert f"--output-dir {target} {message}" in err  # the missing data file was not reached


def test_room_is_checked_against_what_the_run_will_write(tmp_path: Path) -> None:
    assert needed_bytes(1000, 3, first_order=False) == 5 * 1000 + 16 * 2**20  # 3 kept, 1 written, best/
    assert needed_bytes(1000, 1, first_order=True) == 4 * 1000 + 16 * 2**20  # + final/ as a copy
    folder = OutputFolder.claim(tmp_path / "out", resume=False, overwrite=False)
    try:
        free = shutil.disk_usage(tmp_path).free
        folder.check_room(1)
        with pytest.raises(TaskError, match=r"MiB free but the run will write about .* lower --save-total-limit"):
            folder.check_room(free + 2**30)
    finally:
        folder.release()


def test_one_run_per_folder_and_a_killed_holder_frees_it(model_dir: Path, data_file: Path, tmp_path: Path,
                                                         capsys) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        argv = finetune_args(model_dir, data_file, "--output-dir", str(out))
        err = _fails(argv, capsys)
        assert err == (f"zo2 finetune: error: --output-dir {out} is in use by another zo2 run (pid {holder.pid}); "
                       "wait for it to end or pass another --output-dir")
        holder.send_signal(signal.SIGKILL)  # a crash: no clean-up runs; the kernel drops the flock
        assert holder.wait(timeout=60) == -signal.SIGKILL
    finally:
        holder.kill()
        holder.wait()
    assert (out / LOCK).is_file()
    assert cli.main(argv) == 0


def test_a_write_that_fails_leaves_no_half_checkpoint_and_one_line(model_dir: Path, data_file: Path,
                                                                   tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    limit = 64 * 1024  # a full disk, as a write that fails past 64 KiB per file; the weights are larger
    assert sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) > limit
    argv = finetune_args(model_dir, data_file, "--steps", "4", "--save-every", "2", "--output-dir", str(out))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(rf"zo2 finetune: error: could not write {out / 'checkpoints' / 'step-000002'}: .*File too large"
                        r".*; nothing half-written was left; free space and rerun", last), last
    assert list((out / "checkpoints").iterdir()) == []  # the staging folder was removed
