"""Bad or surprising inputs to ``zo2 finetune`` give one clear line (an error naming the cause and the
fix) or a warning, never a traceback or a silent wrong run: label values that differ in case, empty
label cells, ragged CSV rows, eval rows that are training rows, a batch or eval set larger than the
data, an empty or malformed data file, a model that is not a causal LM, adapters without targets, and
a --max-length beyond the model's positions."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import torch
from finetune_setup import finetune_args, rows
from transformers import BertConfig, BertForSequenceClassification, Olmo2Config, Olmo2ForCausalLM

from zo2 import cli


def _fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err  # progress bars, then the one line
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    return err.strip().splitlines()[-1].removeprefix("zo2 finetune: error: ")


def _csv(path: Path, records: list[dict]) -> Path:
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, ["text", "label"])
        writer.writeheader()
        writer.writerows({"text": r["text"], "label": r["label"]} for r in records)
    return path


def _plain_args(model_dir: Path, path: Path, *extra: str) -> list[str]:
    """Flags without --label-words: each label value is its own word."""
    return ["--model", str(model_dir), "--train-file", str(path), "--steps", "1", "--batch-size", "2",
            "--eval-examples", "6", "--working-device", "cpu", *extra]


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# ---------------------------------------------------------------------------------------- labels
def test_label_values_differing_only_in_case_are_an_error(model_dir: Path, tmp_path: Path, capsys) -> None:
    records = [dict(r, label={"neg": "negative", "pos": "positive"}[r["label"]]) for r in rows(30)]
    records[3]["label"] = "Positive"
    err = _fails(_plain_args(model_dir, _csv(tmp_path / "data.csv", records)), capsys)
    assert err == ("label column 'label' has values that differ only in case or spaces ('Positive' and 'positive'), "
                   "which would train as separate classes: write each class one way in the data (e.g. all lower "
                   "case), or pass --label-words with one value per class and --drop-unknown-labels to leave out the "
                   "other spellings")


def test_empty_label_cells_are_named_and_dropped_on_request(model_dir: Path, tmp_path: Path, capsys,
                                                            caplog) -> None:
    records = [dict(r, label={"neg": "negative", "pos": "positive"}[r["label"]]) for r in rows(30)]
    for i in (4, 9):
        records[i]["label"] = ""
    path = _csv(tmp_path / "data.csv", records)
    expected = (f"{path}: label column 'label' is empty in 2 rows (rows 5, 10, counting data rows from 1): fill them in, or "
                "pass --drop-unknown-labels to leave them out")
    assert _fails(_plain_args(model_dir, path), capsys) == expected
    assert _fails(_plain_args(model_dir, path, "--label-words", "negative=negative", "positive=positive"), capsys) == expected
    assert cli.main(_plain_args(model_dir, path, "--drop-unknown-labels")) == 0
    assert "(22 train / 6 eval examples)" in capsys.readouterr().out  # 28 labelled rows, 6 held out
    assert "leaving out 2 rows with an empty label" in _warnings(caplog)


# ------------------------------------------------------------------------------------ data files
def test_a_csv_row_with_extra_fields_is_an_error_naming_its_line(model_dir: Path, tmp_path: Path, capsys) -> None:
    path = _csv(tmp_path / "data.csv", rows(30))
    lines = path.read_text().splitlines()
    lines[6] += ",surplus"
    path.write_text("\n".join(lines) + "\n")
    assert _fails(_plain_args(model_dir, path), capsys) == (
        f"{path}: line 7 has 3 fields, the header 2; quote fields that hold the delimiter ','")


def test_an_empty_train_file_is_named(model_dir: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    assert _fails(_plain_args(model_dir, path), capsys) == f"{path}: the file holds no rows; pass a file with examples"


def test_a_malformed_jsonl_line_is_reported_with_its_line_number(model_dir: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(r) for r in rows(30)]
    lines[4] = lines[4][:-3]
    path.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")  # a blank line 3 counts too
    assert _fails(_plain_args(model_dir, path), capsys).startswith(f"{path}: line 6 is not valid JSON (")


# ------------------------------------------------------------------------------- sizes, overlap
def test_eval_rows_that_are_training_rows_are_warned_of(model_dir: Path, data_file: Path, tmp_path: Path,
                                                        caplog) -> None:
    assert cli.main(finetune_args(model_dir, data_file, "--eval-file", str(data_file), "--train-examples", "60",
                                  "--eval-examples", "10")) == 0
    assert (f"--eval-file is --train-file ({data_file}): 10 of the 10 eval examples are also trained on; the eval "
            "metric then flatters the run. Drop --eval-file to hold out a split of it") in _warnings(caplog)
    caplog.clear()
    other = tmp_path / "eval.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in rows(60)[:4] + rows(8, seed=1)))
    assert cli.main(finetune_args(model_dir, data_file, "--eval-file", str(other), "--train-examples", "60",
                                  "--eval-examples", "12")) == 0
    assert ("4 of the 12 eval examples are also in the training pool; the eval metric then flatters the run. "
            "Remove them from one of the files") in _warnings(caplog)


def test_a_batch_or_eval_set_larger_than_the_data_is_warned_of(model_dir: Path, data_file: Path, tmp_path: Path,
                                                               caplog) -> None:
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in rows(8, seed=1)))
    argv = finetune_args(model_dir, data_file, "--eval-file", str(eval_file), "--steps", "1")
    assert cli.main([*argv, "--batch-size", "500", "--eval-examples", "5000"]) == 0
    warned = _warnings(caplog)
    assert (f"--eval-examples 5000: {eval_file} holds only 8 examples; evaluating on those") in warned
    assert ("--batch-size 500 is larger than the training pool of 24 examples: every step repeats examples; lower "
            "--batch-size or add data") in warned


# ---------------------------------------------------------------------------------------- models
def test_a_model_that_is_not_a_causal_lm_is_refused(tokenizer, data_file: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "bert"
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert _fails(finetune_args(folder, data_file), capsys) == (
        f"--model {folder} holds a BertForSequenceClassification (config.json architectures), not a causal language "
        "model: zo2 finetune trains a causal-LM head (*ForCausalLM or *LMHeadModel, e.g. LlamaForCausalLM, "
        "GPT2LMHeadModel); pass such a model's folder")


def test_adapters_without_target_modules_name_the_linear_layers(tokenizer, model_dir: Path, data_file: Path,
                                                                tmp_path: Path, capsys) -> None:
    pytest.importorskip("peft")
    folder = tmp_path / "olmo2"
    torch.manual_seed(0)
    Olmo2ForCausalLM(Olmo2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=128,
                                 pad_token_id=tokenizer.pad_token_id)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    layers = "down_proj gate_proj k_proj lm_head o_proj q_proj up_proj v_proj"
    assert _fails(finetune_args(folder, data_file, "--peft", "lora"), capsys) == (
        f"--peft lora: peft has no default target modules for model type 'olmo2'; pass --peft-targets with some of "
        f"its linear layers: {layers}")
    assert _fails(finetune_args(model_dir, data_file, "--peft", "lora", "--peft-targets", "attention"), capsys) == (
        f"--peft lora: --peft-targets attention names no module of this model; pass --peft-targets with some of its "
        f"linear layers: {layers}")


def test_a_max_length_beyond_the_model_positions_is_refused(model_dir: Path, data_file: Path, capsys) -> None:
    assert _fails(finetune_args(model_dir, data_file, "--max-length", "500"), capsys) == (
        "--max-length 500 is beyond the model's 128 positions (max_position_embeddings): pass --max-length 128 or "
        "less")
