"""The convergence benchmark's table and plot, made from ``results.json`` alone.

Every gain is paired over the same test examples: each example's score (1 correct, 0 wrong) is first
averaged over the row's seeds, then :func:`zo2.tasks.scoring.paired_gain` gives the mean difference and its
standard error over the examples (a 95% interval is about +- 2 SE).
"""
from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import Any

from convergence_rows import REFERENCE

from zo2.tasks.scoring import PairedGain, paired_gain

logger = logging.getLogger("convergence")


def seed_mean(runs: list[dict[str, Any]]) -> list[float]:
    """Each test example's final score averaged over the runs (seeds) of a row."""
    return [statistics.fmean(values) for values in zip(*(run["per_example"] for run in runs))]


def _gain(gain: PairedGain) -> str:
    return f"{100 * gain.gain:+.2f} ± {100 * gain.se:.2f}"


def _lr(entry: dict[str, Any]) -> str:
    lrs = sorted({run["lr"] for run in entry["runs"]})
    text = ", ".join(lrs)
    return f"{text} (grid)" if "grid" in entry else text


def dataset_table(dataset: dict[str, Any]) -> list[str]:
    """One markdown table: a line per row of ``dataset["rows"]``."""
    zero = dataset["zero_shot"]["per_example"]
    reference = dataset["rows"].get(REFERENCE)
    ref_scores = seed_mean(reference["runs"]) if reference else None
    lines = ["| row | lr | steps | forward passes | s/step | train s | test accuracy (seeds: mean, min-max) | "
             "gain over zero-shot (points ± paired SE) | vs " + REFERENCE + " |", "|---" * 9 + "|"]
    for name, entry in dataset["rows"].items():
        runs = entry["runs"]
        finals = [run["points"][-1]["accuracy"] for run in runs]
        passes = [run["forward_passes"] for run in runs if run["forward_passes"] is not None]
        step_s = statistics.median(s for run in runs for s in run["step_seconds"]) if runs[0]["step_seconds"] else 0.0
        scores = seed_mean(runs)
        versus = ("—" if ref_scores is None or name == REFERENCE else _gain(paired_gain(ref_scores, scores)))
        passes_text = f"{statistics.fmean(passes):.0f}" if passes else "n/a"
        lines.append(
            f"| {name} | {_lr(entry)} | {statistics.median(run['steps'] for run in runs):g} | {passes_text} | "
            f"{step_s:.2f} | {statistics.fmean(run['train_seconds'] for run in runs):.0f} | "
            f"{100 * statistics.fmean(finals):.2f}% ({100 * min(finals):.1f}-{100 * max(finals):.1f}) | "
            f"{_gain(paired_gain(zero, scores))} | {versus} |")
    return lines


def table(results: dict[str, Any]) -> str:
    """Every dataset's table, each under a heading with its zero-shot accuracy and test size."""
    parts = []
    for name, dataset in results["datasets"].items():
        zero = dataset["zero_shot"]
        parts.append(f"**{name}**: zero-shot {100 * zero['accuracy']:.2f}% on {len(zero['per_example'])} test examples")
        parts.append("")
        parts.extend(dataset_table(dataset) if dataset["rows"] else ["(no rows run)"])
        parts.append("")
    return "\n".join(parts).rstrip()


def plot(results: dict[str, Any], path: Path) -> None:
    """Test accuracy against training seconds (mean of the seeds), one panel per dataset."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot")
        return
    datasets = [(n, d) for n, d in results["datasets"].items() if d["rows"]]
    if not datasets:
        return
    figure, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4.5), squeeze=False)
    for axis, (name, dataset) in zip(axes[0], datasets):
        for row, entry in dataset["rows"].items():
            points = list(zip(*(run["points"] for run in entry["runs"])))
            axis.plot([statistics.fmean(p["train_seconds"] for p in group) for group in points],
                      [statistics.fmean(p["accuracy"] for p in group) for group in points], marker="o", label=row)
        axis.axhline(dataset["zero_shot"]["accuracy"], color="grey", linestyle=":", label="zero-shot")
        axis.set_title(name)
        axis.set_xlabel("training seconds (1 thread)")
        axis.set_ylabel("held-out accuracy")
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
