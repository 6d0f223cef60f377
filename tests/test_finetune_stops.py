"""How a ``zo2 finetune`` run stops: Ctrl-C in a real subprocess (a checkpoint, one line, exit code 130,
and a resume equal to a straight run), the signal guard itself, and the time budgets."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from finetune_setup import finetune_args, weights

from zo2 import cli
from zo2.checkpoint import load_checkpoint
from zo2.cli.finetune.budget import TimeBudget
from zo2.cli.finetune.interrupt import RunInterrupted, StopGuard, StopRequested

ROOT = Path(__file__).resolve().parents[1]


def _saved_steps(folder: Path) -> list[int]:
    try:
        return [int(p.name.split("-")[1]) for p in folder.iterdir() if p.name.startswith("step-")]
    except FileNotFoundError:
        return []


def _wait_for_checkpoint(folder: Path, step: int, process: subprocess.Popen, timeout: float = 300.0) -> None:
    """Until ``folder`` holds a checkpoint of ``step`` or later (older ones are rotated out as training
    goes on, so waiting for one exact folder can miss it on a fast machine)."""
    deadline = time.monotonic() + timeout
    while max(_saved_steps(folder), default=-1) < step:
        assert process.poll() is None, f"the run ended (code {process.returncode}) before step {step} was saved"
        assert time.monotonic() < deadline, f"no checkpoint of step >= {step} in {folder} within {timeout} s"
        time.sleep(0.05)


def _signal_a_run(argv: list[str], out: Path, stderr_path: Path, checkpoints: int, *signals: int) -> str:
    """Run ``zo2 <argv>`` in a subprocess, send ``signals`` once ``checkpoints`` checkpoints are in ``out``
    (training, with the guard installed); it must exit 130. Returns its stderr."""
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "zo2", *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                                   stderr=stderr)
        try:
            _wait_for_checkpoint(out / "checkpoints", checkpoints, process)
            for signum in signals:
                process.send_signal(signum)
            assert process.wait(timeout=300) == 130
        finally:
            process.kill()
            process.wait()
    return stderr_path.read_text()


def test_ctrl_c_saves_a_checkpoint_and_the_resume_equals_a_straight_run(model_dir: Path, data_file: Path,
                                                                      tmp_path: Path) -> None:
    out, straight = tmp_path / "interrupted", tmp_path / "straight"
    argv = finetune_args(model_dir, data_file, "--steps", "100000", "--save-every", "1", "--output-dir", str(out))
    err = _signal_a_run(argv, out, tmp_path / "stderr.txt", 2, signal.SIGINT)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "Ctrl-C: stopping after the current step" in err
    last = err.strip().splitlines()[-1]
    found = re.fullmatch(r"zo2 finetune: interrupted at step (\d+) of 100000; saved (\S+); resume with: zo2 (.+) "
                         r"--resume", last)
    assert found, last
    step, saved = int(found[1]), Path(found[2])
    assert saved == out / "checkpoints" / f"step-{step:06d}" and step >= 2
    assert [p.name for p in (out / "checkpoints").iterdir()] == [saved.name]
    assert load_checkpoint(saved).step == step
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["stop_reason"], summary["steps"], summary["after"]) == ("interrupted", step, None)

    common = finetune_args(model_dir, data_file, "--steps", str(step + 2))
    assert cli.main([*common, "--output-dir", str(out), "--resume"]) == 0
    assert cli.main([*common, "--output-dir", str(straight)]) == 0
    a, b = (json.loads((d / "summary.json").read_text()) for d in (straight, out))
    assert b["resumed_from"] == str(saved) and a["history"] == b["history"] and a["evals"] == b["evals"]
    wa, wb = (weights(d / "checkpoints" / f"step-{step + 2:06d}") for d in (straight, out))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], v) for k, v in weights(model_dir).items())  # training moved the weights


def test_sigterm_stops_like_ctrl_c(model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    signum, out = signal.SIGTERM, tmp_path / "out"  # SIGHUP takes the same handler (the guard test below)
    argv = finetune_args(model_dir, data_file, "--steps", "100000", "--save-every", "1", "--output-dir", str(out))
    err = _signal_a_run(argv, out, tmp_path / "stderr.txt", 1, signum)
    name = signal.Signals(signum).name
    assert "Traceback" not in err and f"{name}: stopping after the current step and saving" in err
    found = re.fullmatch(rf"zo2 finetune: stopped by {name} at step (\d+) of 100000; saved (\S+); resume with: "
                         r"zo2 (.+) --resume", err.strip().splitlines()[-1])
    assert found, err
    assert load_checkpoint(Path(found[2])).step == int(found[1])
    assert json.loads((out / "summary.json").read_text())["stop_reason"] == "interrupted"


def test_a_second_signal_quits_at_once_and_names_the_newest_checkpoint(model_dir: Path, data_file: Path,
                                                                       tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = finetune_args(model_dir, data_file, "--steps", "100000", "--save-every", "1", "--output-dir", str(out))
    # stopped, both signals are pending together: on SIGCONT the handlers run back to back, so the second
    # lands in training, not after the process has saved and exited
    err = _signal_a_run(argv, out, tmp_path / "stderr.txt", 1, signal.SIGSTOP, signal.SIGINT, signal.SIGTERM,
                        signal.SIGCONT)
    last = err.strip().splitlines()[-1]
    found = re.fullmatch(r"zo2 finetune: interrupted twice: quit at once at step (\d+); the newest checkpoint is "
                         r"(\S+): resume with: zo2 (.+) --resume", last)
    assert found, last
    newest = max((out / "checkpoints").iterdir())
    assert Path(found[2]) == newest and load_checkpoint(newest).step <= int(found[1])


def test_the_guard_turns_the_first_sigint_into_a_request_and_the_second_into_keyboard_interrupt() -> None:
    before = signal.getsignal(signal.SIGINT)
    with StopGuard() as guard:
        assert list(guard.checked(range(3))) == [0, 1, 2]
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs at the next bytecode boundary
        assert guard.requested
        with pytest.raises(StopRequested):
            list(guard.checked(range(3)))
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("signum, cause", [(signal.SIGTERM, "SIGTERM"), (signal.SIGHUP, "SIGHUP")])
def test_the_guard_takes_sigterm_and_sighup_as_ctrl_c(signum, cause, caplog) -> None:
    def ignore(*_: object) -> None:  # without the guard the signal must not end the test session
        pass

    previous = signal.signal(signum, ignore)
    try:
        _guard_takes(signum, cause, ignore)
    finally:
        signal.signal(signum, previous)
    assert f"{cause}: stopping after the current step and saving" in caplog.text


def _guard_takes(signum: int, cause: str, before: object) -> None:
    with StopGuard() as guard:
        os.kill(os.getpid(), signum)
        time.sleep(0.01)  # the handler runs at the next bytecode boundary
        assert (guard.requested, guard.cause) == (True, cause)
        with pytest.raises(KeyboardInterrupt):  # a second signal of any kind quits at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signum) is before


def test_the_interrupt_line_says_what_was_saved_and_how_to_resume(tmp_path: Path) -> None:
    saved = tmp_path / "checkpoints" / "step-000007"
    command = "zo2 finetune --steps 40 --output-dir out"
    assert RunInterrupted(7, 40, saved, resumable=True).describe(command) == (
        f"interrupted at step 7 of 40; saved {saved}; resume with: {command} --resume")
    assert RunInterrupted(7, 40, tmp_path / "final", resumable=False).describe(command) == (
        f"interrupted at step 7 of 40; the weights of step 7 are in {tmp_path / 'final'} (first-order runs do not "
        "resume)")
    assert "nothing saved (pass --output-dir" in RunInterrupted(7, 40, None, resumable=True).describe(command)
    assert RunInterrupted(0, 40, None, resumable=True).describe(command).endswith("nothing trained, nothing saved")
    abandoned = RunInterrupted(7, 40, None, resumable=True, abandoned=True, latest=saved)
    abandoned = abandoned.describe(command + " --resume")
    assert abandoned == (f"interrupted twice: quit at once at step 7; the newest checkpoint is {saved}: resume with: "
                         f"{command} --resume")
    assert RunInterrupted(7, 40, None, resumable=True, abandoned=True).describe(command) == (
        "interrupted twice: quit at once, the state after step 7 was not saved (no checkpoint yet)")
    assert RunInterrupted(7, 40, saved, resumable=True, cause="SIGTERM").describe(command) == (
        f"stopped by SIGTERM at step 7 of 40; saved {saved}; resume with: {command} --resume")


def test_budgets_stop_before_a_step_that_would_overshoot() -> None:
    steps = [5.0, 1.0, 1.0, 1.2]  # a slow first step: the median of recent steps predicts the next
    whole_run = TimeBudget(total=10.0)
    assert whole_run.exhausted(trained=9.0, trained_here=0.0, step_seconds=steps) is None  # >= half a step left
    assert whole_run.exhausted(trained=9.6, trained_here=0.0, step_seconds=steps) == "--max-seconds"
    assert whole_run.exhausted(trained=10.0, trained_here=0.0, step_seconds=[]) == "--max-seconds"
    assert whole_run.exhausted(trained=9.99, trained_here=0.0, step_seconds=[]) is None  # no step time yet: run it
    per_run = TimeBudget(total=100.0, per_run=3.0)
    assert per_run.exhausted(trained=50.0, trained_here=2.6, step_seconds=steps) == "--max-run-seconds"
    assert per_run.exhausted(trained=50.0, trained_here=2.0, step_seconds=steps) is None
    assert TimeBudget().exhausted(1e9, 1e9, steps) is None and TimeBudget().describe_left(0, 0, steps, 5) is None
    assert whole_run.describe_left(trained=4.0, trained_here=0.0, step_seconds=steps, steps_left=100) == \
        "00:06 of 00:10 budget"
    assert whole_run.describe_left(trained=4.0, trained_here=0.0, step_seconds=steps, steps_left=2) == \
        "00:02 to the last step"


def test_max_seconds_counts_every_invocation_and_max_run_seconds_this_one(model_dir: Path, data_file: Path,
                                                                       tmp_path: Path, caplog) -> None:
    out = str(tmp_path / "out")
    assert cli.main(finetune_args(model_dir, data_file, "--steps", "4", "--max-seconds", "1e-9", "--output-dir",
                                  out)) == 0
    first = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (first["steps"], first["stop_reason"]) == (1, "max_seconds")  # the first step always runs
    caplog.clear()
    assert cli.main(finetune_args(model_dir, data_file, "--steps", "4", "--max-seconds", "1e-9", "--output-dir",
                                  out, "--resume")) == 0
    spent = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (spent["steps"], spent["stop_reason"], spent["train_seconds_this_run"]) == (1, "max_seconds", 0.0)
    assert "--max-seconds 1e-09 was already spent before this resume" in caplog.text
    assert [e["step"] for e in spent["evals"]] == [0, 1]  # no second evaluation of the same weights
    assert cli.main(finetune_args(model_dir, data_file, "--steps", "4", "--max-run-seconds", "1e6", "--output-dir",
                                  out, "--resume")) == 0
    resumed = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (resumed["steps"], resumed["stop_reason"]) == (4, "steps")
    assert 0 < resumed["train_seconds_this_run"] < resumed["train_seconds"]


def test_the_bar_shows_the_time_left_of_the_budget(model_dir: Path, data_file: Path, capsys) -> None:
    assert cli.main(finetune_args(model_dir, data_file, "--steps", "100000", "--max-seconds", "0.3")) == 0
    err = capsys.readouterr().err
    bars = [line for line in re.split(r"[\r\n]", err) if line.startswith("zo2 finetune:")]
    assert bars and all("<" not in line for line in bars)  # no ETA computed from --steps
    assert re.search(r"left=00:00 of 00:00 budget\]", bars[-1]), bars[-1]
