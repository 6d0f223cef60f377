"""``zo2 finetune`` and the learning rate: the method's default without --lr, --lr auto (the table in the
summary and checkpoints, the run after it equal to --lr <pick>, no second search on --resume, Ctrl-C during
the search, too little data), and --average-last."""
from __future__ import annotations

import json
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
from zo2.methods import DEFAULTS

ROOT = Path(__file__).resolve().parents[1]
AUTO = ("--lr", "auto", "--lr-search-steps", "1")


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_without_lr_the_method_default_is_used_and_reported(model_dir, data_file, tmp_path, capsys):
    args = [a for a in finetune_args(model_dir, data_file, "--method", "fzoo", "--steps", "1", "--output-dir",
                                     str(tmp_path / "out")) if a not in ("--lr", "1e-3")]
    assert cli.main(args) == 0
    summary = _summary(tmp_path / "out")
    assert summary["learning_rate"] == {"value": DEFAULTS["fzoo"].lr, "source": "default of fzoo", "search": []}
    assert summary["settings"]["lr"] == DEFAULTS["fzoo"].lr and summary["history"][0]["step"] == 1
    assert "(default of fzoo)" in capsys.readouterr().out


def test_lr_auto_trains_bitwise_as_the_picked_lr_and_records_its_table(model_dir, data_file, tmp_path):
    auto, direct = tmp_path / "auto", tmp_path / "direct"
    assert cli.main(finetune_args(model_dir, data_file, *AUTO, "--output-dir", str(auto))) == 0
    summary = _summary(auto)
    searched = summary["learning_rate"]
    stages = [row["stage"] for row in searched["search"]]
    assert searched["source"] == "auto search" and stages[:5] == ["screen"] * 5 and stages[5:] in ([], ["confirm"] * 2)
    assert searched["value"] in [row["lr"] for row in searched["search"]] and summary["settings"]["lr"] == searched["value"]
    assert summary["train_seconds"] >= sum(row["seconds"] for row in searched["search"])  # charged to the budget
    checkpoint = load_checkpoint(auto / "checkpoints" / "step-000003")
    assert checkpoint.state["learning_rate"] == searched
    assert cli.main(finetune_args(model_dir, data_file, "--lr", repr(searched["value"]), "--output-dir",
                                  str(direct))) == 0
    assert _summary(direct)["history"] == summary["history"] and _summary(direct)["evals"] == summary["evals"]
    a, b = (weights(d / "checkpoints" / "step-000003") for d in (auto, direct))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], v) for k, v in weights(model_dir).items())


def test_a_resume_after_the_search_does_not_search_again(model_dir, data_file, tmp_path, caplog):
    out = tmp_path / "out"
    assert cli.main(finetune_args(model_dir, data_file, *AUTO, "--steps", "1", "--output-dir", str(out))) == 0
    first = _summary(out)["learning_rate"]
    caplog.clear()
    assert cli.main(finetune_args(model_dir, data_file, *AUTO, "--steps", "2", "--output-dir", str(out),
                                  "--resume")) == 0
    assert "--lr auto: searching" not in caplog.text
    assert _summary(out)["learning_rate"] == first and _summary(out)["steps"] == 2


def test_averaging_a_method_it_cannot_replay_is_refused_before_training(model_dir, data_file, capsys):
    with pytest.raises(SystemExit):
        cli.main(finetune_args(model_dir, data_file, "--method", "adamezo", "--average-last", "0.5"))
    assert "ZOConfig.average_last=0.5 is invalid" in capsys.readouterr().err


def test_too_little_training_data_for_a_validation_slice_is_a_clear_error(model_dir, data_file, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(finetune_args(model_dir, data_file, *AUTO, "--train-examples", "10"))
    assert exit_info.value.code == 2
    assert "--lr auto: lr='auto' needs a validation slice" in capsys.readouterr().err


def test_ctrl_c_during_the_search_stops_cleanly_with_nothing_trained(model_dir, data_file, tmp_path):
    argv = finetune_args(model_dir, data_file, "--lr", "auto", "--lr-search-steps", "100000", "--output-dir",
                         str(tmp_path / "out"))
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "zo2", *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                                   stderr=stderr)
        try:
            deadline = time.monotonic() + 300
            while "--lr auto: screening" not in log.read_text():
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            time.sleep(0.5)  # inside the first candidate's steps
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=300) == 130
        finally:
            process.kill()
            process.wait()
    err = log.read_text()
    assert "Traceback" not in err and err.strip().splitlines()[-1].endswith("nothing trained, nothing saved")
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_average_last_evaluates_the_averaged_iterates_and_keeps_the_last_in_the_checkpoint(model_dir, data_file,
                                                                                         tmp_path):
    plain, averaged = tmp_path / "plain", tmp_path / "averaged"
    assert cli.main(finetune_args(model_dir, data_file, "--steps", "4", "--output-dir", str(plain))) == 0
    assert cli.main(finetune_args(model_dir, data_file, "--steps", "4", "--average-last", "0.5", "--output-dir",
                                  str(averaged))) == 0
    a, b = _summary(plain), _summary(averaged)
    assert b["averaged_last"] == 2 and b["evals"][-1]["averaged_last"] == 2 and b["evals"][:-1] == a["evals"]
    wa, wb = (weights(d / "checkpoints" / "step-000004") for d in (plain, averaged))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # the resumable checkpoint holds the last iterate
    assert b["outputs"]["averaged"] == "averaged" and "averaged" not in a["outputs"]
    mean = weights(averaged / "averaged")
    assert any(not torch.equal(mean[k], wb[k]) for k in wb)
