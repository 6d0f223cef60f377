"""``zo2 finetune`` (alias ``train``) end to end on a tiny LLaMA with a word-level tokenizer built here
(offline, seconds): summary, loss curve, checkpoints, best checkpoint, exact resume, the first-order
baseline, YAML configs, registry/LM tasks from local files, and clear errors."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from finetune_setup import TASK, finetune_args, rows, weights
from transformers import AutoModelForCausalLM, AutoTokenizer

from zo2 import cli, tasks
from zo2.checkpoint import load_checkpoint
from zo2.cli import finetune


# ------------------------------------------------------------------------------------- outputs
def test_finetune_end_to_end(model_dir: Path, data_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    argv = finetune_args(model_dir, data_file, "--eval-every", "2", "--output-dir", str(out))
    assert cli.main(["finetune", *argv]) == 0
    printed = capsys.readouterr().out
    assert "accuracy before:" in printed and "steps: 3 x batch 4, lr 0.001" in printed and "peak memory" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["steps"], summary["train_examples"], summary["eval_examples"]) == (3, 24, 10)
    assert (summary["metric"], summary["mode"], summary["kind"]) == ("accuracy", "zeroth-order", "classification")
    assert [e["step"] for e in summary["evals"]] == [0, 2, 3]
    assert summary["before"] == summary["evals"][0]["accuracy"] and summary["after"] == summary["evals"][-1]["accuracy"]
    assert summary["best"]["value"] == max(e["accuracy"] for e in summary["evals"])
    assert [h["step"] for h in summary["history"]] == [1, 2, 3] and summary["peak_memory_mib"] > 0
    assert summary["zo_config"]["lr"] == 1e-3 and summary["zo_config"]["zo2"] is False
    assert (summary["optimizer"], summary["stop_reason"]) == ("mezo-sgd", "steps")
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for record in summary["evals"]:  # per-class prediction counts, keyed by label word
        assert list(record["predicted"]) == ["negative", "positive"] and sum(record["predicted"].values()) == 10
    assert summary["eval_labels"] == {"negative": 5, "positive": 5}
    assert "predicted before: negative" in printed and "(true labels: negative 5, positive 5)" in printed

    final = out / "checkpoints" / "step-000003"
    assert [p.name for p in (out / "checkpoints").iterdir()] == [final.name]
    checkpoint = load_checkpoint(final)
    assert checkpoint.step == 3 and checkpoint.extra["history"] == summary["history"]
    beaten = any(e["accuracy"] > summary["before"] for e in summary["evals"][1:])
    assert (out / "best").is_dir() == beaten and (summary["outputs"]["best"] == "best") == beaten

    trained = AutoModelForCausalLM.from_pretrained(final).eval()
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not torch.equal(trained.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    examples = tasks.make_examples(tasks.read_records(data_file), TASK)
    _, eval_set = tasks.split_examples(examples, 10, 24, seed=0)
    with torch.no_grad():
        result = tasks.evaluate("classification", lambda b: trained(**b), tasks.PromptEncoder(
            AutoTokenizer.from_pretrained(final), 64), eval_set, 32)
    assert result["accuracy"] == summary["after"]
    assert result["loss"] == pytest.approx(summary["evals"][-1]["loss"], rel=1e-5)


def test_resume_equals_a_straight_run(model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    common = finetune_args(model_dir, data_file, "--save-every", "2", "--batch-size", "3", "--eval-every", "3")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert cli.main([*common, "--steps", "5", "--output-dir", str(straight)]) == 0
    assert cli.main([*common, "--steps", "2", "--output-dir", str(stopped)]) == 0
    assert cli.main([*common, "--steps", "5", "--output-dir", str(stopped), "--resume"]) == 0
    a, b = (json.loads((d / "summary.json").read_text()) for d in (straight, stopped))
    assert b["resumed_from"].endswith("step-000002") and a["resumed_from"] is None
    assert a["history"] == b["history"] and len(a["history"]) == 5
    wa, wb = weights(straight / "checkpoints" / "step-000005"), weights(stopped / "checkpoints" / "step-000005")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [e["accuracy"] for e in a["evals"] if e["step"] in (3, 5)] == \
        [e["accuracy"] for e in b["evals"] if e["step"] in (3, 5)]


def test_resume_refuses_other_settings(model_dir: Path, data_file: Path, tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "out")
    assert cli.main(finetune_args(model_dir, data_file, "--steps", "1", "--output-dir", out)) == 0
    with pytest.raises(SystemExit) as exit_info:
        cli.main(finetune_args(model_dir, data_file, "--steps", "2", "--output-dir", out, "--resume", "--seed", "7"))
    assert exit_info.value.code == 2 and "seed=0 (now 7)" in capsys.readouterr().err


def test_first_order_baseline_within_a_time_budget(model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "fo"
    assert cli.main(finetune_args(model_dir, data_file, "--first-order", "--steps", "50", "--max-seconds", "1e-9",
                          "--output-dir", str(out))) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["mode"], summary["optimizer"], summary["steps"]) == ("first-order", "adamw", 1)
    assert summary["stop_reason"] == "max_seconds" and "zo_config" not in summary
    assert not {"eps", "noise", "num-directions", "offload"} & set(summary["settings"])
    assert [e["step"] for e in summary["evals"]] == [0, 1] and "projected_grad" not in summary["history"][0]
    trained, base = weights(out / "final"), weights(model_dir)
    assert any(not torch.equal(trained[k], base[k]) for k in base)


def test_train_is_an_alias_and_the_default_command(model_dir: Path, data_file: Path, capsys) -> None:
    assert cli.main(finetune_args(model_dir, data_file, "--offload", "--steps", "1")) == 0
    assert cli.main(["train", *finetune_args(model_dir, data_file, "--steps", "1", "--num-directions", "2")]) == 0
    assert capsys.readouterr().out.count("steps: 1 x batch 4") == 2


# ------------------------------------------------------------------------------------ task kinds
def test_registry_and_lm_tasks_from_local_files(model_dir: Path, tmp_path: Path) -> None:
    sst2 = [{"sentence": r["text"], "label": int(r["label"] == "pos"), "idx": r["id"]} for r in rows(30)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sst2[:20]))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sst2[20:]))
    base = ["--model", str(model_dir), "--steps", "2", "--batch-size", "2", "--working-device", "cpu"]
    out = tmp_path / "sst2"
    assert cli.main([*base, "--task", "sst2", "--train-file", str(tmp_path / "train.jsonl"), "--eval-file",
                     str(tmp_path / "val.jsonl"), "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["task"], summary["train_examples"], summary["eval_examples"]) == ("sst2", 20, 10)

    out = tmp_path / "lm"
    assert cli.main([*base, "--task", "lm", "--train-file", str(tmp_path / "train.jsonl"), "--text-column",
                     "sentence", "--eval-examples", "5", "--output-dir", str(out), "--lr", "1e-2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["metric"], summary["kind"]) == ("loss", "lm")
    assert summary["best"]["value"] == min(e["loss"] for e in summary["evals"])
    assert all(e["perplexity"] == pytest.approx(2.718281828459045 ** e["loss"]) for e in summary["evals"])


def test_generation_task_from_a_local_file(model_dir: Path, tmp_path: Path) -> None:
    squad = [{"id": str(r["id"]), "title": "film", "context": r["text"], "question": "what was it ?",
             "answers": {"text": [r["text"].split()[-2]], "answer_start": [0]}} for r in rows(12)]
    path = tmp_path / "squad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in squad))
    out = tmp_path / "out"
    assert cli.main(["--model", str(model_dir), "--task", "squad", "--train-file", str(path), "--eval-examples", "4",
                     "--max-new-tokens", "2", "--steps", "1", "--batch-size", "2", "--working-device", "cpu",
                     "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["metric"], summary["kind"], summary["eval_examples"]) == ("f1", "generation", 4)
    assert [e["step"] for e in summary["evals"]] == [0, 1]
    assert all(set(e) - {"gain", "gain_se"} == {"step", "exact_match", "f1"} and 0 <= e["exact_match"] <= e["f1"] <= 1
               for e in summary["evals"])
    # the second evaluation's gain is paired with the first over the same examples (per-example F1)
    assert "gain" not in summary["evals"][0] and summary["evals"][1]["gain"] == pytest.approx(
        summary["evals"][1]["f1"] - summary["evals"][0]["f1"], abs=1e-12) and summary["evals"][1]["gain_se"] >= 0


def test_label_values_are_the_default_words(model_dir: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / "data.csv"
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, ["review", "sentiment"])
        writer.writeheader()
        writer.writerows({"review": r["text"], "sentiment": {"pos": "positive", "neg": "negative"}[r["label"]]}
                         for r in rows(30))
    args = ["--model", str(model_dir), "--data", str(path), "--text-column", "review", "--label-column",
            "sentiment", "--steps", "1", "--batch-size", "2", "--eval-examples", "6", "--template", "{text}\\nIt is"]
    assert cli.main(args) == 0
    assert "accuracy before" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- YAML config
def test_yaml_config_with_overrides(tmp_path: Path, capsys) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("lr: 1e-5\nsteps: 7\nlabel-words: {neg: negative, pos: positive}\noffload: false\n"
                      "first_order: true\noffloading_blocks: [0, -1]\ntemplate: '{text} It was'\n")
    args = cli.parse_args(["finetune", "--config", str(config), "--steps", "9"])
    assert (args.lr, args.steps, args.offload, args.first_order) == (1e-5, 9, False, True)
    assert args.label_words == [("neg", "negative"), ("pos", "positive")] and args.offloading_blocks == [0, -1]
    assert args.template == "{text} It was" and args.command == "finetune"
    config.write_text("lr: 1e-5\nlearning_rate: 3\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["--config", str(config)])
    assert exit_info.value.code == 2 and "unknown key 'learning_rate'" in capsys.readouterr().err
    config.write_text("steps: 0\n")
    with pytest.raises(SystemExit):
        cli.parse_args(["--config", str(config)])
    assert "--steps: must be an integer > 0" in capsys.readouterr().err
    config.write_text("- lr\n")
    with pytest.raises(SystemExit):
        cli.parse_args(["--config", str(config)])
    assert "expected a mapping" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("extra, message", [
    (["--data", "missing.csv"], "data file missing.csv does not exist"),
    (["--text-column", "body"], "'body' is not in the data"),
    (["--label-words", "neg=negative", "pos=negative"], "distinct"),
    (["--eval-examples", "60"], "leave none"),
    (["--task", "instruction"], "needs --prompt-column"),
    (["--resume"], "--resume needs --output-dir"),
    (["--max-length", "3"], "--max-length 3 is too short: a prompt without its text still takes"),
])
def test_reports_bad_inputs(model_dir: Path, data_file: Path, capsys, extra, message) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*finetune_args(model_dir, data_file), *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "must be an integer > 0"),
    (["--lr", "-1"], "must be a finite number > 0"),
    (["--label-words", "positive"], "expected LABEL=WORD"),
    (["--template", "no slot"], "placeholder"),
    (["--template", "{text} or {text}"], "needs exactly one {text} placeholder"),
    (["--truncate", "middle"], "argument --truncate: invalid choice: 'middle'"),
    (["--task", "sst5"], "unknown task 'sst5'; choose one of sst2, rte"),
])
def test_rejects_bad_flags(capsys, extra, message) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["finetune", *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_missing_model_folder(tmp_path: Path, data_file: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(finetune_args(tmp_path / "nowhere", data_file))
    assert exit_info.value.code == 2 and "no such folder" in capsys.readouterr().err


@pytest.mark.parametrize("contents, missing", [
    ({"config.json": None}, "missing weights (model.safetensors, sharded *.safetensors or pytorch_model.bin); "
                            "tokenizer files (tokenizer.json, tokenizer.model or vocab.json + merges.txt) "
                            "(it holds config.json)"),
    ({"notes.txt": "hello"}, "missing config.json; weights"),
    ({"config.json": "{}", "model.safetensors": None, "tokenizer.json": None}, "is not a model config"),
])
def test_incomplete_model_folders_name_what_is_missing(model_dir: Path, tmp_path: Path, capsys, contents,
                                                       missing) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    for name, text in contents.items():
        (folder / name).write_bytes((model_dir / name).read_bytes() if text is None else text.encode())
    with pytest.raises(SystemExit) as exit_info:  # checked before the data: this file does not exist
        cli.main(finetune_args(folder, tmp_path / "missing.csv"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and missing in err and len(err.strip().splitlines()) == 1, err


def test_a_model_file_is_not_a_folder(model_dir: Path, data_file: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(finetune_args(model_dir / "model.safetensors", data_file))
    assert exit_info.value.code == 2 and "model.safetensors is a file, not a folder" in capsys.readouterr().err


def test_unknown_label_values_stop_the_run_unless_dropped(model_dir: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / "tweets.csv"
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, ["text", "label"])
        writer.writeheader()
        writer.writerows({"text": r["text"], "label": ["positive", "negative", "neutral"][i % 3]}
                         for i, r in enumerate(rows(30)))
    args = ["--model", str(model_dir), "--train-file", str(path), "--label-words", "Positive=positive",
            "negative=negative", "neutral=neutral", "--steps", "1", "--batch-size", "2", "--eval-examples", "6",
            "--working-device", "cpu"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "label column 'label' has values without a label word: 'positive' (10 rows)" in err
    assert "Positive=positive negative=negative neutral=neutral" in err and "--drop-unknown-labels" in err
    assert cli.main([*args, "--drop-unknown-labels"]) == 0
    assert "(14 train / 6 eval examples)" in capsys.readouterr().out


def test_python_dash_m_help() -> None:
    result = subprocess.run([sys.executable, "-m", "zo2", "finetune", "--help"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert result.returncode == 0
    assert all(flag in result.stdout for flag in ("--config", "--task", "--resume", "--first-order", "--offload"))


def test_embedded_model_is_loaded_from_the_cache(model_dir: Path, tmp_path: Path, monkeypatch, tokenizer) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    target = finetune.cache_dir() / finetune.EMBEDDED_MODEL
    assert target == tmp_path / "zo2" / finetune.EMBEDDED_MODEL
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    finetune.save_atomically(model, tokenizer, target)
    finetune.save_atomically(model, tokenizer, target)  # a second writer loses the race quietly
    assert [p.name for p in target.parent.iterdir()] == [finetune.EMBEDDED_MODEL]
    loaded_tokenizer, loaded = finetune.load_embedded_model(torch.float32)
    assert loaded.config.hidden_size == 32 and loaded_tokenizer.get_vocab() == tokenizer.get_vocab()


def test_a_registered_task_loads_through_datasets(model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """Adding a task is one registry entry; a local folder laid out like a Hub dataset repository stands
    in for the Hub (``datasets.load_dataset`` reads it the same way, offline)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    repo = tmp_path / "hub-repo" / "data"
    repo.mkdir(parents=True)
    stars = [{"review": r["text"], "stars": 5 if r["label"] == "pos" else 1} for r in rows(30)]
    pq.write_table(pa.Table.from_pylist(stars[:20]), repo / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(stars[20:]), repo / "validation-00000-of-00001.parquet")
    render = tasks.ColumnTask({"1": "negative", "5": "positive"}, text_column="review", label_column="stars").render
    monkeypatch.setitem(tasks.TASKS, "stars", tasks.TaskSpec("stars", "classification", render, str(repo.parent)))
    out = tmp_path / "out"
    assert cli.main(["--task", "stars", "--model", str(model_dir), "--steps", "1", "--batch-size", "2",
                     "--working-device", "cpu", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["task"], summary["train_examples"], summary["eval_examples"]) == ("stars", 20, 10)
    assert summary["data"] == str(repo.parent)
