"""The convergence benchmark's rows: row name -> what it trains. Rows are data; adding one is adding an entry.

A row is a dict with:

* ``config``: ``ZOConfig`` keyword arguments (``method``, ``lr``, ``eps``, ``num_directions``,
  ``method_options``, ``average_last``...). ``lr=None`` is the method's default lr, ``lr="auto"`` the lr
  search before training: its forward passes and seconds are counted in the row's, as they happen.
* ``grid`` (optional): lrs to try; each trains seed 0 for ``--search-fraction`` of the steps and is scored
  on the validation split; the best (accuracy, then loss) trains every seed (the hand-grid reference).
* ``first_order`` (instead of ``config``): AdamW with this ``lr`` on the same objective, trained for the
  same wall-clock as the row named by ``reference`` (see :func:`equal_wall_clock_seconds`); with
  ``average_last``, its last point evaluates the mean of the iterates of that last share of the time.

:func:`check_row` refuses, before anything runs, a row whose settings the installed zo2 does not have.
"""
from __future__ import annotations

import dataclasses
import statistics
from typing import Any

from zo2.config import ZOConfig, ZOConfigError
from zo2.methods import method_class

#: Per-method settings that keep a CPU step affordable (the methods' own defaults are N = 8 for fzoo and
#: a horizon of 10 for adamezo: 9 and ~11 noise passes a step).
METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    "mezo-sgd": {},
    "fzoo": {"num_directions": 4},
    "sparse-mezo": {"method_options": {"sparsity": 0.75}},
    "adamezo": {"method_options": {"horizon": 4}},
    "meazo": {},
}

#: The hand lr grid of each method (the sweep rows ``"<method> @ <lr>"``), centred on the best lrs of the
#: earlier 160-forward-pass benchmark on the embedded task; AdaMeZO's (never run there) on the size of a
#: normalised step, lr per coordinate, like MeZO-SGD's lr x |g| (|g| ~ 6-36 on real tasks).
LR_GRID: dict[str, tuple[float, ...]] = {
    "mezo-sgd": (1e-5, 3e-5, 1e-4),
    "fzoo": (3e-8, 1e-7, 3e-7),
    "sparse-mezo": (1e-5, 3e-5, 1e-4),
    "adamezo": (3e-6, 3e-5, 3e-4),
    "meazo": (1e-4, 3e-4, 1e-3),
}

EPS = 1e-3
REFERENCE = "mezo-sgd @ grid"
"""The row other rows are compared with (paired), and whose wall-clock the first-order row gets."""


def _rows() -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for method, settings in METHOD_SETTINGS.items():
        base = {"method": method, "eps": EPS, **settings}
        rows[f"{method} @ default lr"] = {"config": {**base, "lr": None}}
        rows[f"{method} @ lr auto"] = {"config": {**base, "lr": "auto"}}
        if method_class(method).fused_kernels:  # averaging replays lr * g * z updates only (zo2.tuning.averaging)
            rows[f"{method} @ default lr, averaged"] = {"config": {**base, "lr": None, "average_last": 0.5}}
    rows[REFERENCE] = {"config": {"method": "mezo-sgd", "eps": EPS, "lr": 1e-5}, "grid": (3e-6, 1e-5, 3e-5, 1e-4)}
    rows[f"{REFERENCE}, averaged"] = {"config": {"method": "mezo-sgd", "eps": EPS, "lr": 1e-5, "average_last": 0.5},
                                      "grid": (3e-6, 1e-5, 3e-5, 1e-4)}
    rows["first-order AdamW @ equal wall-clock"] = {"first_order": {"lr": 1e-5}, "reference": REFERENCE}
    rows["first-order AdamW @ equal wall-clock, averaged"] = {"first_order": {"lr": 1e-5, "average_last": 0.5},
                                                              "reference": REFERENCE}
    for method, lrs in LR_GRID.items():
        for lr in lrs:
            rows[f"{method} @ {lr:g}"] = {"config": {"method": method, "eps": EPS, **METHOD_SETTINGS[method], "lr": lr}}
    return rows


ROWS: dict[str, dict[str, Any]] = _rows()
"""Every row the benchmark knows, by name."""

DEFAULT_ROWS = [name for name in ROWS if "@ default lr" in name or "@ lr auto" in name] + [
    REFERENCE, f"{REFERENCE}, averaged", "first-order AdamW @ equal wall-clock",
    "first-order AdamW @ equal wall-clock, averaged"]
"""The full benchmark: each method at its defaults, with lr auto and with averaging; the hand grid; AdamW."""

SWEEP_ROWS = [f"{method} @ {lr:g}" for method, lrs in LR_GRID.items() for lr in lrs]
"""The lr sweep that chose the defaults: every method at every lr of its hand grid."""

#: What a row's setting needs from zo2, for the message when the installed version lacks it.
FEATURES = {"lr=None": "per-method default lrs (ZOConfig(lr=None))",
            "lr='auto'": "the lr search before training (ZOConfig(lr='auto'))",
            "average_last": "iterate averaging (ZOConfig(average_last=...))"}


def _features(config: dict[str, Any]) -> list[str]:
    needed = [key for key in config if key in FEATURES]
    if "lr" in config and config["lr"] is None:
        needed.append("lr=None")
    if config.get("lr") == "auto":
        needed.append("lr='auto'")
    return needed


def check_row(name: str, row: dict[str, Any]) -> None:
    """SystemExit naming the missing feature when the installed zo2 cannot build ``row``'s config."""
    if "first_order" in row:
        return
    config = row["config"]
    known = {f.name for f in dataclasses.fields(ZOConfig)}
    unknown = [key for key in config if key not in known]
    needs = ", ".join(FEATURES.get(key, key) for key in _features(config)) or "nothing new"
    if unknown:
        raise SystemExit(f"row {name!r} needs {', '.join(FEATURES.get(k, f'ZOConfig({k}=...)') for k in unknown)}, "
                         "which the installed zo2 does not have; leave the row out (--rows) or install a zo2 with it")
    try:
        ZOConfig(**config, seed=0, zo2=False, working_device="cpu")
    except (ZOConfigError, TypeError, ValueError) as err:
        raise SystemExit(f"row {name!r} needs {needs}; the installed zo2 refuses its config ({err}); leave the row "
                         "out (--rows) or install a zo2 with it") from None


def select_rows(names: list[str]) -> dict[str, dict[str, Any]]:
    """The rows named (in order), each checked with :func:`check_row`; a first-order row needs its
    reference among them, before it."""
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; the rows are: {', '.join(ROWS)}")
    for position, name in enumerate(names):
        check_row(name, ROWS[name])
        reference = ROWS[name].get("reference")
        if reference is not None and reference not in names[:position]:
            raise SystemExit(f"row {name!r} trains for the wall-clock of {reference!r}: list that row before it")
    return {name: ROWS[name] for name in names}


def equal_wall_clock_seconds(reference_runs: list[dict[str, Any]]) -> float:
    """The training time a first-order row gets: the median over the reference row's seeds of their
    training seconds (the sum of their measured step times; evaluation, loading and lr choice left out)."""
    if not reference_runs:
        raise ValueError("no reference runs to take the wall-clock from")
    return statistics.median(sum(run["step_seconds"]) for run in reference_runs)
