"""What a finetune run records in ``summary.json``: results, timings, outputs, and the settings that
applied to it, in a form ``--config`` reads back (docs/guides/finetune.md, "summary.json", lists every field)."""
from __future__ import annotations

import argparse
import resource
import statistics
from importlib.metadata import version
from typing import Any

import torch

from ...tasks import ColumnTask, TextTask
from .classes import label_counts
from .data import Data
from .job import Run
from .model import EMBEDDED_MODEL

_NEVER_RECORDED = {"handler", "command", "config", "log_level", "resume", "overwrite", "output_dir"}
_ZO_ONLY = {"eps", "noise", "num_directions", "offload", "offloading_blocks", "storage_dtype", "method",
            "method_options", "max_parts_per_walk", "eps_scheduler", "lr_search_steps", "average_last"}
_COLUMN_TASK_ONLY = {"template", "label_words", "label_column", "drop_unknown_labels"}


# ------------------------------------------------------------------------------------- settings
def applied_settings(args: argparse.Namespace, data: Data, resolved: dict[str, Any]) -> dict[str, Any]:
    """Every flag that shaped this run, by flag name, with its effective value (defaults resolved, e.g.
    the label words of the embedded data); flags that did not apply (``--eps`` of a first-order run,
    ``--template`` of a registry task) are left out, as are ``--output-dir``, ``--resume`` and
    ``--log-level``. Written as YAML or JSON, it is a ``--config`` file that reruns the run."""
    task = data.task
    skip = set(_NEVER_RECORDED) | (_ZO_ONLY if args.first_order else {"fo_optimizer"})
    if not isinstance(task, ColumnTask):
        skip |= _COLUMN_TASK_ONLY
    if not isinstance(task, (ColumnTask, TextTask)):
        skip.add("text_column")
    if getattr(task, "prompt_column", None) is None:
        skip.add("prompt_column")
    if task.kind != "generation":
        skip.add("max_new_tokens")
    effective = dict(vars(args), **resolved)
    if isinstance(task, ColumnTask):
        effective.update(template=task.template, label_words=dict(task.label_words), label_column=task.label_column)
    if isinstance(task, (ColumnTask, TextTask)):
        effective["text_column"] = task.text_column
    if not effective.get("offload"):
        skip.add("offloading_blocks")
    if args.peft == "none":
        skip |= {"lora_rank", "lora_alpha", "peft_targets"}
    elif args.peft != "lora":
        skip |= {"lora_rank", "lora_alpha"}
    if task.kind != "classification":
        skip.add("objective")
    return {key.replace("_", "-"): _jsonable(value) for key, value in effective.items()
            if key not in skip and value is not None}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, dict)) or value is None else str(value)


# -------------------------------------------------------------------------------------- summary
def _peak_memory_mib(device: str) -> float:
    """Peak memory of this run: allocated CUDA memory on a GPU, else the process's peak resident set."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build_summary(run: Run, total_seconds: float, resumed_from: str | None) -> dict[str, Any]:
    """Everything a run reports (docs/guides/finetune.md lists each field)."""
    args, data, metric, evals = run.args, run.data, run.metric, run.evals
    finished = run.stop_reason != "interrupted"
    trainer = {"optimizer": args.fo_optimizer} if args.first_order else {
        "optimizer": run.config.method, "zo_config": run.config.to_dict()}
    return {
        "zo2_version": version("zo2"), "model": args.model or EMBEDDED_MODEL, "task": data.task.name,
        "data": data.name, "eval_data": data.eval_name, "kind": data.task.kind, "metric": metric,
        "mode": "first-order" if args.first_order else "zeroth-order",
        "settings": applied_settings(args, data, run.resolved), **trainer,
        "stop_reason": run.stop_reason,
        "before": evals[0][metric] if evals else None,
        "after": evals[-1][metric] if evals and finished else None,
        "gain_se": evals[-1].get("gain_se") if evals and finished else None,
        "best": run.best, "train_examples": len(data.train), "eval_examples": len(data.eval),
        "eval_labels": label_counts(data.eval), "truncated": run.truncated,
        "steps": run.step, "evals": evals,
        "train_seconds": run.train_seconds, "train_seconds_this_run": run.run_seconds,
        "total_seconds": total_seconds,
        "step_seconds": statistics.median(run.seconds) if run.seconds else None,
        "first_step_seconds": run.seconds[0] if run.seconds else None,
        "peak_memory_mib": _peak_memory_mib(run.config.working_device),
        "resumed_from": resumed_from, "outputs": run.outputs(),
        "history": run.history,
        "learning_rate": run.engine.learning_rate.to_json() if run.engine is not None else {
            "value": run.resolved["lr"], "source": "given" if args.lr else "first-order default", "search": []},
        "averaged_last": run.averaged,
    }
