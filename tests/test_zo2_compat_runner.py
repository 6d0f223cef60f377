"""ZO2's MeZO runner on zo2: run.py's flag names are aliases of ``zo2 finetune``'s (or stop with what to use),
and ``examples/mezo_runner/mezo.sh`` runs ``zo2 finetune`` from ZO2's environment variables."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from zo2 import cli
from zo2.cli.main import build_parser

MEZO_SH = Path(__file__).parent.parent / "examples" / "mezo_runner" / "mezo.sh"

RUN_PY = ["--model_name", "m", "--task_name", "SST2", "--num_train", "1000", "--num_eval", "500", "--max_steps", "7",
          "--learning_rate", "1e-7", "--zo_eps", "1e-3", "--per_device_train_batch_size", "16", "--load_float16",
          "--zo_mode", "zo2", "--trainer", "zo", "--train_as_classification", "--lr_scheduler_type", "constant",
          "--eval_steps", "4", "--save_steps", "4", "--save_total_limit", "1", "--output_dir", "out",
          "--train_set_seed", "3", "--weight_decay", "0.1", "--zo_method", "mezo-sgd", "--lora", "--lora_r", "4",
          "--lora_alpha", "8", "--load_best_model_at_end", "--working_device", "cpu", "--max_length", "128"]
NATIVE = ["--model", "m", "--task", "sst2", "--train-examples", "1000", "--eval-examples", "500", "--steps", "7",
          "--lr", "1e-7", "--eps", "1e-3", "--batch-size", "16", "--dtype", "float16", "--offload",
          "--objective", "classification", "--lr-scheduler", "constant", "--eval-every", "4", "--save-every", "4",
          "--save-total-limit", "1", "--output-dir", "out", "--seed", "3", "--weight-decay", "0.1",
          "--method", "mezo-sgd", "--peft", "lora", "--lora-rank", "4", "--lora-alpha", "8", "--save-best",
          "--working-device", "cpu", "--max-length", "128"]


def test_run_py_flags_parse_to_the_native_flags():
    parser = build_parser()
    assert vars(parser.parse_args(["finetune", *RUN_PY])) == vars(parser.parse_args(["finetune", *NATIVE]))


@pytest.mark.parametrize("flags, native", [
    (["--train_as_classification", "False"], ["--objective", "lm"]),
    (["--train_as_classification", "True"], ["--objective", "classification"]),
    (["--zo_mode", "zo"], ["--no-offload"]),
    (["--trainer", "regular"], ["--first-order"]),
    (["--load_bfloat16"], ["--dtype", "bfloat16"]),
])
def test_run_py_switches_select_the_native_settings(flags, native):
    parser = build_parser()
    assert vars(parser.parse_args(["finetune", *flags])) == vars(parser.parse_args(["finetune", *native]))


@pytest.mark.parametrize("flags, fix", [
    (["--tag", "x"], "--output_dir"),
    (["--prefix_tuning"], "--lora"),
    (["--num_dev", "500"], "--num_eval"),
    (["--load_int8"], "--load_float16"),
    (["--trainer", "none"], "invalid choice"),
])
def test_run_py_flags_without_an_equivalent_stop_with_what_to_use(flags, fix, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", *flags])
    assert fix in capsys.readouterr().err


def test_mezo_sh_trains_through_zo2_finetune(model_dir: Path, data_file: Path, tmp_path: Path, monkeypatch):
    """ZO2's first documented usage, ``MODEL=... TASK=SST2 MODE=ft LR=... EPS=... STEPS=... EVAL_STEPS=... bash
    mezo.sh``: the script's command line (recorded by a stand-in for ``zo2``) trains through zo2 finetune, with
    the tiny model and local data (extra arguments replace the Hub task and fp16 on CPU)."""
    subprocess.run(["bash", "-n", str(MEZO_SH)], check=True)
    record = tmp_path / "argv.sh"
    record.write_text('for a in "$@"; do printf "%s\\n" "$a"; done\n')
    env = {**os.environ, "MODEL": str(model_dir), "TASK": "SST2", "MODE": "ft", "LR": "1e-3", "EPS": "1e-3",
           "STEPS": "2", "EVAL_STEPS": "1", "BS": "4", "TRAIN": "24", "EVAL": "10", "SEED": "1",
           "ZO2": f"sh {record}"}
    local = ["--task", "text-classification", "--train-file", str(data_file), "--label-words", "neg=negative",
             "pos=positive", "--dtype", "float32", "--working_device", "cpu", "--zo_mode", "zo"]
    printed = subprocess.run(["bash", str(MEZO_SH), *local], check=True, env=env, cwd=tmp_path, timeout=60,
                             capture_output=True, text=True).stdout.splitlines()
    argv = printed[printed.index("finetune"):]
    assert "--train_as_classification" in argv and "--learning_rate" in argv  # ZO2 run.py's names
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 0
    summaries = list((tmp_path / "result").glob("*/summary.json"))
    assert [p.parent.name for p in summaries] == ["SST2-" + model_dir.name + "-mezo-ft-2-4-1e-3-1e-3-1"]
    summary = json.loads(summaries[0].read_text())
    assert summary["steps"] == 2 and summary["zo_config"]["lr"] == 1e-3 and summary["zo_config"]["eps"] == 1e-3
    assert summary["settings"]["objective"] == "classification"  # --train_as_classification: MeZO's loss
    assert [e["step"] for e in summary["evals"]] == [0, 1, 2]


def test_mezo_sh_refuses_prefix_tuning(tmp_path):
    run = subprocess.run(["bash", str(MEZO_SH)], env={**os.environ, "MODE": "prefix", "ZO2": "false"},
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "use ft or lora" in run.stderr
