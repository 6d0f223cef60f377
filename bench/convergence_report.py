"""The convergence benchmark's table and plot, made from ``results.json`` alone.

Every gain is paired over the same test examples: each example's score (1 correct, 0 wrong) is first
averaged over the row's seeds, then :func:`zo2.tasks.scoring.paired_gain` gives the mean difference and its
standard error over the examples (a 95% interval is about +- 2 SE).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path
from typing import Any

from convergence_rows import LR_GRID, REFERENCE

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
    versus_head = f" vs {REFERENCE} |" if reference else ""
    lines = ["| row | lr | steps | forward passes | s/step | train s | test accuracy (seeds: mean, min-max) | "
             "gain over zero-shot (points ± paired SE) |" + versus_head, "|---" * (9 if reference else 8) + "|"]
    for name, entry in dataset["rows"].items():
        runs = entry["runs"]
        finals = [run["points"][-1]["accuracy"] for run in runs]
        passes = [run["forward_passes"] for run in runs if run["forward_passes"] is not None]
        step_s = statistics.median(s for run in runs for s in run["step_seconds"]) if runs[0]["step_seconds"] else 0.0
        scores = seed_mean(runs)
        versus = "" if ref_scores is None else " — |" if name == REFERENCE else f" {_gain(paired_gain(ref_scores, scores))} |"
        passes_text = f"{statistics.fmean(passes):.0f}" if passes else "n/a"
        lines.append(
            f"| {name} | {_lr(entry)} | {statistics.median(run['steps'] for run in runs):g} | {passes_text} | "
            f"{step_s:.2f} | {statistics.fmean(run['train_seconds'] for run in runs):.0f} | "
            f"{100 * statistics.fmean(finals):.2f}% ({100 * min(finals):.1f}-{100 * max(finals):.1f}) | "
            f"{_gain(paired_gain(zero, scores))} |{versus}")
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


def lr_table(results: dict[str, Any]) -> str:
    """The lr sweep as one table: a line per (method, lr), a gain column per dataset (points ± paired SE
    over zero-shot, seed 0 alone when the sweep ran one seed)."""
    names = list(results["datasets"])
    cells: dict[tuple[str, float], dict[str, str]] = {}
    for dataset_name, dataset in results["datasets"].items():
        for method, found in _sweep_points(dataset).items():
            for lr, gain in found:
                cells.setdefault((method, lr), {})[dataset_name] = _gain(gain)
    lines = ["| method | lr | " + " | ".join(f"{n} gain (points ± paired SE)" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for (method, lr), gains in sorted(cells.items()):
        lines.append(f"| {method} | {lr:g} | " + " | ".join(gains.get(n, "not run") for n in names) + " |")
    return "\n".join(lines)


def _sweep_points(dataset: dict[str, Any]) -> dict[str, list[tuple[float, PairedGain]]]:
    """Per method, (lr, gain over zero-shot) of each fixed-lr row of the sweep, by lr."""
    zero, points = dataset["zero_shot"]["per_example"], {}
    for entry in dataset["rows"].values():
        config = entry["row"].get("config")
        if config and "grid" not in entry["row"] and isinstance(config.get("lr"), float):
            points.setdefault(config["method"], []).append((config["lr"], paired_gain(zero, seed_mean(entry["runs"]))))
    return {method: sorted(found) for method, found in points.items()}


def lr_plot(results: dict[str, Any], path: Path) -> None:
    """Gain over zero-shot (± 2 paired SE) against lr / the centre of the method's grid, one panel per dataset."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["datasets"])
    figure, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2), squeeze=False, sharey=True)
    for axis, name in zip(axes[0], names):
        for offset, (method, found) in enumerate(sorted(_sweep_points(results["datasets"][name]).items())):
            centre = LR_GRID[method][len(LR_GRID[method]) // 2]
            xs = [lr / centre * (1 + 0.04 * (offset - 2)) for lr, _ in found]  # nudged apart to show each bar
            axis.errorbar(xs, [100 * g.gain for _, g in found], yerr=[200 * g.se for _, g in found], marker="o",
                          capsize=3, label=f"{method} (centre {centre:g})")
        axis.axhline(0, color="grey", linestyle=":")
        axis.set_xscale("log")
        axis.set_title(name)
        axis.set_xlabel("lr / centre of the method's grid")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("gain over zero-shot, points (± 2 paired SE)")
    axes[0][-1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def merge(paths: list[Path]) -> dict[str, Any]:
    """One results dict holding the rows of several ``results.json`` files made with the same settings (e.g.
    runs side by side, one per dataset or per group of rows); a dataset's zero-shot scores must agree."""
    merged: dict[str, Any] = {"datasets": {}}
    for path in paths:
        for name, dataset in json.loads(path.read_text())["datasets"].items():
            known = merged["datasets"].setdefault(name, {**dataset, "rows": {}})
            if known["zero_shot"] != dataset["zero_shot"]:
                raise SystemExit(f"{path}: its {name} zero-shot scores differ from an earlier file's: other settings?")
            known["rows"].update(dataset["rows"])
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description="Tables and plot of one or more convergence results.json files "
                                                 "(e.g. one run per dataset, run side by side).")
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--plot", type=Path, default=None, help="write the curves here")
    parser.add_argument("--lr-plot", type=Path, default=None, help="write the lr sweep's gains here")
    args = parser.parse_args()
    results = merge(args.results)
    print(table(results), "", lr_table(results), sep="\n")
    if args.plot is not None:
        plot(results, args.plot)
    if args.lr_plot is not None:
        lr_plot(results, args.lr_plot)


if __name__ == "__main__":
    main()
