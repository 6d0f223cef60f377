"""`zo2 finetune` with the method registry, the train-as-classification objective and PEFT adapters."""
import json
from pathlib import Path

import pytest
import torch
from finetune_setup import finetune_args
from safetensors.torch import load_file

from zo2 import cli


def _summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


@pytest.mark.parametrize("method", ["fzoo", "sparse-mezo", "adamezo", "meazo"])
def test_every_method_runs_from_the_command_line(method, model_dir, data_file, tmp_path):
    out = tmp_path / method
    extra = ["--num-directions", "2"] if method == "fzoo" else []
    assert cli.main(finetune_args(model_dir, data_file, "--method", method, *extra, "--output-dir", str(out))) == 0
    summary = _summary(out)
    assert summary["optimizer"] == method and summary["zo_config"]["method"] == method
    assert summary["settings"]["method"] == method and len(summary["history"]) == 3
    if method == "fzoo":
        assert summary["zo_config"]["noise"] == "rademacher" and summary["settings"]["noise"] == "rademacher"


def test_classification_tasks_train_as_classification_unless_asked_otherwise(model_dir, data_file, tmp_path):
    runs = {}
    for objective in ("auto", "lm"):
        out = tmp_path / objective
        assert cli.main(finetune_args(model_dir, data_file, "--objective", objective, "--output-dir", str(out))) == 0
        runs[objective] = _summary(out)
    assert runs["auto"]["settings"]["objective"] == "classification" and runs["lm"]["settings"]["objective"] == "lm"
    # cross-entropy over 2 label words starts near log 2; the LM loss over the whole vocabulary far above it
    assert runs["auto"]["history"][0]["loss"] < 1.5 < runs["lm"]["history"][0]["loss"]


def test_method_options_and_objectives_are_checked(model_dir, data_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(finetune_args(model_dir, data_file, "--method", "sparse-mezo", "--method-options", "sparsty=0.5"))
    assert exit_info.value.code == 2 and "unknown option(s) ['sparsty']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(finetune_args(model_dir, data_file, "--task", "lm", "--objective", "classification"))
    assert exit_info.value.code == 2 and "needs a classification task" in capsys.readouterr().err


def test_a_lora_run_trains_the_adapter_saves_it_and_resumes_exactly(model_dir, data_file, tmp_path):
    pytest.importorskip("peft")
    common = finetune_args(model_dir, data_file, "--peft", "lora", "--lora-rank", "2", "--lr", "1e-2",
                           "--save-every", "2", "--batch-size", "3")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert cli.main([*common, "--steps", "4", "--output-dir", str(straight)]) == 0
    assert cli.main([*common, "--steps", "2", "--output-dir", str(stopped)]) == 0
    assert cli.main([*common, "--steps", "4", "--output-dir", str(stopped), "--resume"]) == 0
    a, b = _summary(straight), _summary(stopped)
    assert a["history"] == b["history"] and a["settings"]["peft"] == "lora" and a["settings"]["lora-rank"] == 2
    final = straight / "checkpoints" / "step-000004"
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    wa, wb = (load_file(d / "checkpoints" / "step-000004" / "adapter_model.safetensors") for d in (straight, stopped))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all("lora_" in k for k in wa) and any(bool(v.abs().sum()) for k, v in wa.items() if "lora_B" in k)
