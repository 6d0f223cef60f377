"""What a finetune run reports: the printed summary, ``summary.json`` and the loss-curve PNG."""
from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def plot_loss_curve(summary: dict, path: Path) -> None:
    """A PNG of the training loss per step, with the eval metric on a second axis."""
    import matplotlib
    matplotlib.use("Agg")  # no display: render to a file
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [h["step"] for h in summary["history"]]
    axis.plot(steps, [h["loss"] for h in summary["history"]], color="tab:blue", linewidth=1, label="train loss")
    axis.set_xlabel("step")
    axis.set_ylabel("train loss", color="tab:blue")
    metric = summary["metric"]
    evals = summary["evals"]
    other = axis.twinx()
    other.plot([e["step"] for e in evals], [e[metric] for e in evals], "o-", color="tab:orange", label=f"eval {metric}")
    other.set_ylabel(f"eval {metric}", color="tab:orange")
    axis.set_title(f"{summary['mode']} fine-tuning: {Path(summary['model']).name} on {summary['task']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_outputs(summary: dict, output: Path) -> None:
    """Write ``summary.json`` and ``loss_curve.png`` (skipped with a warning without matplotlib)."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    try:
        plot_loss_curve(summary, output / "loss_curve.png")
    except ImportError:
        logger.warning("matplotlib is not installed: no loss_curve.png (pip install matplotlib)")
    logger.info("wrote summary.json and loss_curve.png to %s", output)


def _counts(predicted: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in predicted.items())


def _uncertainty(summary: dict) -> str:
    """`` ± SE`` of the gain (paired over the eval examples), in the metric's printed unit; empty when the
    metric has no per-example values (``lm``) or a run resumed from a checkpoint that predates them."""
    se = summary.get("gain_se")
    if se is None:
        return ""
    scale = 100 if summary["metric"] in ("accuracy", "f1", "exact_match") else 1
    return f" ± {scale * se:.2f} paired SE, {summary['eval_examples']} examples"


def format_summary(summary: dict) -> str:
    """The few lines printed at the end of a run."""
    metric, settings = summary["metric"], summary["settings"]
    scale, unit = (100, "%") if metric in ("accuracy", "f1", "exact_match") else (1, "")
    before, after = scale * summary["before"], scale * summary["after"]
    minutes, secs = divmod(round(summary["total_seconds"]), 60)
    best = summary["best"]
    stopped = {"max_seconds": " (stopped by --max-seconds)",
               "max_run_seconds": " (stopped by --max-run-seconds)"}.get(summary["stop_reason"], "")
    timing = (f": {summary['step_seconds']:.2f} s/step (median; first step {summary['first_step_seconds']:.1f} s), "
              f"{summary['train_seconds']:.0f} s of training" if summary["step_seconds"] is not None else "")
    lines = [
        f"zo2 finetune ({summary['mode']}): {summary['model']} on {summary['task']} [{summary['data']}] "
        f"({summary['train_examples']} train / {summary['eval_examples']} eval examples)",
        f"  {metric} before: {before:.2f}{unit}   after: {after:.2f}{unit}   ({after - before:+.2f}{_uncertainty(summary)})"
        f"   best: {scale * best['value']:.2f}{unit} at step {best['step']}",
        f"  steps: {summary['steps']} x batch {settings['batch-size']}, lr {settings['lr']:g} ({summary['learning_rate']['source']})"
        + ("" if summary["mode"] == "first-order" else f", eps {settings['eps']:g}") + timing + stopped,
    ]
    first, last = summary["evals"][0], summary["evals"][-1]
    if "predicted" in first:
        lines.append(f"  predicted before: {_counts(first['predicted'])}   after: {_counts(last['predicted'])}   "
                     f"(true labels: {_counts(summary['eval_labels'])})")
    lines.append(f"  peak memory: {summary['peak_memory_mib']:.0f} MiB   total time: {minutes} min {secs:02d} s")
    return "\n".join(lines)
