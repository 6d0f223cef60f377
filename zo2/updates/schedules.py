"""Learning-rate and perturbation-scale schedules, usable by every method.

A schedule maps a step (0-based) to a factor of the configured value: ``lr_t = lr * factor(t)`` and
``eps_t = eps * factor(t)``. ``constant`` is 1 throughout; ``linear`` and ``cosine`` go from 1 to
``final`` over ``steps`` steps (then stay at ``final``), after ``warmup`` steps of linear warm-up from
0 (the lr only: a perturbation scale of 0 would measure nothing).
"""
from __future__ import annotations

import math
from typing import Callable

SCHEDULES = ("constant", "linear", "cosine")


def _decay(kind: str, progress: float, final: float) -> float:
    if kind == "constant":
        return 1.0
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return 1.0 + (final - 1.0) * progress
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule(kind: str, *, steps: int | None, final: float = 0.0, warmup: int = 0) -> Callable[[int], float]:
    """``step -> factor`` for ``kind`` (one of :data:`SCHEDULES`); ``steps`` is required unless constant."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule {kind!r} is unknown; expected one of {list(SCHEDULES)}")
    if kind != "constant" and not steps:
        raise ValueError(f"a {kind} schedule needs its length in steps (ZOConfig.schedule_steps)")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        span = max(1, (steps or 1) - warmup)
        return _decay(kind, (step - warmup) / span, final)
    return factor
