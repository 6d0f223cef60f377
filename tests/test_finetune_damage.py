"""Damaged or diverged state in ``zo2 finetune`` is never a silent fresh start nor saved weights: a
checkpoint whose manifest does not parse is skipped for the newest intact one (or stops the resume),
a resume with other training settings is refused with the list, and diverged weights never reach a
checkpoint, best/ or final/."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from finetune_setup import finetune_args, weights

from zo2 import cli
from zo2.checkpoint import load_checkpoint


def _fails(argv: list[str], capsys, code: int = 2) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err  # progress bars, then the one line
    assert exit_info.value.code == code and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


@pytest.fixture
def two_checkpoints(model_dir: Path, data_file: Path, tmp_path: Path) -> Path:
    """A 4-step run that kept the checkpoints of steps 3 and 4."""
    out = tmp_path / "out"
    assert cli.main(finetune_args(model_dir, data_file, "--steps", "4", "--save-every", "1", "--save-total-limit",
                                  "2", "--output-dir", str(out))) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003", "step-000004"]
    return out


def test_a_damaged_newest_checkpoint_falls_back_to_the_intact_one(model_dir: Path, data_file: Path,
                                                                  two_checkpoints: Path, tmp_path: Path,
                                                                  caplog) -> None:
    out = two_checkpoints
    manifest = out / "checkpoints" / "step-000004" / "zo2_manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:40])  # cut in half, as a crash or full disk leaves it
    common = finetune_args(model_dir, data_file, "--steps", "5", "--save-every", "1", "--save-total-limit", "2")
    assert cli.main([*common, "--output-dir", str(out), "--resume"]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "damaged" in r.getMessage()]
    assert len(warned) == 1 and str(manifest) in warned[0] and warned[0].endswith(
        f"falling back to the newest intact one, {out / 'checkpoints' / 'step-000003'}")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == str(out / "checkpoints" / "step-000003") and summary["steps"] == 5
    assert load_checkpoint(out / "checkpoints" / "step-000004").step == 4  # redone and whole again
    straight = tmp_path / "straight"
    assert cli.main([*common, "--output-dir", str(straight)]) == 0
    a, b = weights(out / "checkpoints" / "step-000005"), weights(straight / "checkpoints" / "step-000005")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_every_checkpoint_damaged_stops_the_resume(model_dir: Path, data_file: Path, two_checkpoints: Path,
                                                   capsys) -> None:
    out = two_checkpoints
    for folder in (out / "checkpoints").iterdir():
        (folder / "zo2_manifest.json").write_text("{")
    err = _fails([*finetune_args(model_dir, data_file, "--steps", "5", "--output-dir", str(out)), "--resume"], capsys)
    assert err.startswith(f"zo2 finetune: error: --resume: no intact checkpoint in {out / 'checkpoints'}: ")
    assert err.endswith("Restore the files from a copy, or pass --overwrite to start afresh")
    assert "step-000003/zo2_manifest.json" in err and "step-000004/zo2_manifest.json" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003", "step-000004"]


@pytest.mark.parametrize("extra, listed", [
    (["--lr", "1e-2"], "lr=0.001 (now 0.01)"),
    (["--eps", "1e-2"], "eps=0.001 (now 0.01)"),
    (["--method", "fzoo"], "method='mezo-sgd' (now 'fzoo'), noise='gaussian' (now 'rademacher'), num_directions=1 "
                           "(now 8)"),
])
def test_a_resume_with_other_training_settings_is_refused(model_dir: Path, data_file: Path, two_checkpoints: Path,
                                                          capsys, extra, listed) -> None:
    argv = [*finetune_args(model_dir, data_file, "--steps", "6", "--output-dir", str(two_checkpoints)), "--resume"]
    assert _fails([*argv, *extra], capsys) == (
        f"zo2 finetune: error: --resume: {two_checkpoints / 'checkpoints' / 'step-000004'} was trained with other "
        f"settings {listed}; use the same values or another --output-dir")


def test_diverged_weights_are_never_saved(model_dir: Path, data_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    argv = finetune_args(model_dir, data_file, "--steps", "6", "--save-every", "1", "--eval-every", "1",
                         "--lr", "1e30", "--output-dir", str(out))
    err = _fails(argv, capsys, code=1)  # the weights reach ~4e29: squared in a norm they overflow to inf
    assert err.startswith("zo2 finetune: training failed: after step 1 weight ") and err.endswith(
        "training has diverged, nothing of this step is saved (no checkpoint was saved); lower --lr (now 1e+30)")
    assert sorted(p.name for p in out.iterdir()) == [".zo2-run.json", ".zo2-run.lock"]  # no best/, no checkpoint
