"""What a ``zo2 finetune`` run leaves behind: ``best/`` only when a step beats the start, weights never
written twice (hard links between best/, final/ and checkpoints), a summary whose ``settings`` rerun the
run, truncation logged once, and the per-class prediction counts."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from finetune_setup import finetune_args, rows

from zo2 import cli
from zo2.checkpoint import load_checkpoint
from zo2.cli.finetune.classes import collapsed_class


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _inodes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in folder.iterdir() if p.is_file()}


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "text.jsonl"
    path.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows(8)))
    return path


def _lm_args(model_dir: Path, text_file: Path, *extra: str) -> list[str]:
    """An lm run evaluated on its whole training set, taken as one batch each step: the eval loss is the
    loss each step descends (first-order: AdamW's first steps lower it by far more than rounding)."""
    return ["--model", str(model_dir), "--task", "lm", "--train-file", str(text_file), "--eval-file", str(text_file),
            "--train-examples", "8", "--eval-examples", "8", "--batch-size", "8", "--steps", "3", "--eval-every", "1",
            "--working-device", "cpu", *extra]


def test_best_is_links_to_its_checkpoint(model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert cli.main(_lm_args(model_dir, text_file, "--lr", "1e-4", "--save-total-limit", "5", "--output-dir",
                             str(out))) == 0
    summary = _summary(out)
    step = summary["best"]["step"]
    assert step > 0 and summary["best"]["value"] < summary["before"]
    assert summary["outputs"] == {"checkpoint": "checkpoints/step-000003", "best": "best", "final": None}
    best = _inodes(out / "best")
    assert best == _inodes(out / "checkpoints" / f"step-{step:06d}")  # the same files, stored once
    assert load_checkpoint(out / "best").extra["best"] == summary["best"]
    improved, best_so_far = [], summary["before"]  # a checkpoint for each new best, and the last step's
    for record in summary["evals"][1:]:
        if record["loss"] < best_so_far:
            improved.append(record["step"])
            best_so_far = record["loss"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{s:06d}" for s in sorted({*improved, 3})]


def test_first_order_final_is_links_to_best(model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert cli.main(_lm_args(model_dir, text_file, "--first-order", "--lr", "1e-3", "--output-dir", str(out))) == 0
    summary = _summary(out)
    losses = [e["loss"] for e in summary["evals"]]
    assert losses == sorted(losses, reverse=True) and len(set(losses)) == 4, losses
    assert summary["best"]["step"] == 3 and "zo_config" not in summary
    assert summary["outputs"] == {"checkpoint": None, "best": "best", "final": "final"}
    best = _inodes(out / "best")
    assert best == _inodes(out / "final") and not (out / "checkpoints").exists()
    assert all((out / "best" / name).stat().st_nlink == 2 for name in best)


def test_no_best_folder_when_no_step_beats_the_start(model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert cli.main(finetune_args(model_dir, data_file, "--lr", "1e-12", "--eval-every", "1", "--output-dir",
                                  str(out))) == 0
    summary = _summary(out)
    assert len({e["accuracy"] for e in summary["evals"]}) == 1  # too small a step to change a prediction
    assert summary["best"] == {"step": 0, "value": summary["before"]} and summary["outputs"]["best"] is None
    assert sorted(p.name for p in out.iterdir()) == [".zo2-run.json", ".zo2-run.lock", "checkpoints", "loss_curve.png",
                                                      "summary.json"]


def test_summary_settings_rerun_the_run(model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    first, again = tmp_path / "first", tmp_path / "again"
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in rows(12, seed=1)))
    assert cli.main(finetune_args(model_dir, data_file, "--eval-file", str(eval_file), "--template",
                                  "Review: {text}\\nIt is", "--max-length", "12", "--truncate", "left",
                                  "--output-dir", str(first))) == 0
    summary = _summary(first)
    settings = summary["settings"]
    assert settings["template"] == "Review: {text}\nIt is" and settings["label-words"] == {"neg": "negative",
                                                                                          "pos": "positive"}
    assert (settings["max-length"], settings["truncate"], settings["eval-file"]) == (12, "left", str(eval_file))
    assert (settings["text-column"], settings["label-column"], settings["offload"]) == ("text", "label", False)
    assert not {"output-dir", "resume", "fo-optimizer", "prompt-column", "max-new-tokens"} & set(settings)
    assert summary["eval_data"] == str(eval_file) and summary["truncated"]["train"]["examples"] == 24
    config = tmp_path / "settings.json"  # JSON is YAML: the settings are a --config file
    config.write_text(json.dumps(settings))
    assert cli.main(["--config", str(config), "--output-dir", str(again)]) == 0
    rerun = _summary(again)
    assert rerun["settings"] == settings
    assert rerun["history"] == summary["history"] and rerun["evals"] == summary["evals"]


def test_truncation_is_logged_once_per_split(model_dir: Path, tmp_path: Path, caplog) -> None:
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(dict(r, text=" ".join([r["text"]] * (1 + i % 4)))) + "\n"
                            for i, r in enumerate(rows(40))))
    with caplog.at_level(logging.WARNING, logger="zo2"):
        assert cli.main(["--model", str(model_dir), "--train-file", str(path), "--label-words", "neg=negative",
                         "pos=positive", "--max-length", "14", "--steps", "1",
                         "--batch-size", "2", "--eval-examples", "10", "--working-device", "cpu",
                         "--output-dir", str(tmp_path / "out")]) == 0
    cut = [r.getMessage() for r in caplog.records if "do not fit --max-length 14" in r.getMessage()]
    summary = _summary(tmp_path / "out")
    train, held_out = summary["truncated"]["train"], summary["truncated"]["eval"]
    assert 0 < train["cut"] < train["examples"] == 30 and 0 < held_out["cut"] < held_out["examples"] == 10
    assert cut == [f"{train['cut']} of 30 train examples do not fit --max-length 14: their text was cut from the "
                   f"right (--truncate), by {train['tokens_cut_mean']:.0f} tokens on average (at most "
                   f"{train['tokens_cut_max']}); templates and answers are whole",
                   f"{held_out['cut']} of 10 eval examples do not fit --max-length 14: their text was cut from the "
                   f"right (--truncate), by {held_out['tokens_cut_mean']:.0f} tokens on average (at most "
                   f"{held_out['tokens_cut_max']}); templates and answers are whole"]


def test_a_collapse_onto_one_class_is_warned_of(model_dir: Path, data_file: Path, tmp_path: Path, caplog) -> None:
    assert collapsed_class({"positive": 287, "neutral": 4, "negative": 9}, {"positive": 100, "neutral": 100,
                                                                            "negative": 100}) == "positive"
    assert collapsed_class({"positive": 224, "neutral": 0, "negative": 76}, {"positive": 100, "neutral": 100,
                                                                             "negative": 100}) is None  # 75%
    assert collapsed_class({"positive": 90, "negative": 10}, {"positive": 85, "negative": 15}) is None  # as labelled
    with caplog.at_level(logging.WARNING, logger="zo2"):
        assert cli.main(finetune_args(model_dir, data_file, "--eval-every", "1", "--output-dir",
                                      str(tmp_path / "out"))) == 0
    summary = _summary(tmp_path / "out")
    warned = {r.getMessage().split(":")[0] for r in caplog.records if "answers one class" in r.getMessage()}
    expected = {f"step {e['step']}" for e in summary["evals"]
                if collapsed_class(e["predicted"], summary["eval_labels"]) is not None}
    assert warned == expected and expected  # this tiny model answers one class at some steps (step 0: 10 of 10)


def test_the_gain_carries_its_paired_standard_error(model_dir: Path, data_file: Path, tmp_path: Path,
                                                    capsys) -> None:
    """Each evaluation after the first records its gain over the first, paired over the same examples; the
    summary and the printed lines carry the last one's SE. With 0/1 scores the paired differences are
    -1, 0 or 1, so SE^2 = (changed - n gain^2) / ((n - 1) n) for the number of examples whose result changed."""
    out = tmp_path / "out"
    assert cli.main(finetune_args(model_dir, data_file, "--lr", "3e-2", "--eval-every", "1", "--output-dir",
                                  str(out))) == 0
    summary, n = _summary(out), 10
    first, last = summary["evals"][0], summary["evals"][-1]
    assert "gain_se" not in first and summary["gain_se"] == last["gain_se"]
    assert last["gain"] == pytest.approx(summary["after"] - summary["before"], abs=1e-12)
    assert last["accuracy"] != first["accuracy"]  # the step was large enough to change predictions
    changed = (last["gain_se"] ** 2 * (n - 1) * n + n * last["gain"] ** 2)
    assert changed == pytest.approx(round(changed), abs=1e-9) and round(changed) >= round(abs(last["gain"]) * n)
    assert f"± {100 * summary['gain_se']:.2f} paired SE, {n} examples)" in capsys.readouterr().out
