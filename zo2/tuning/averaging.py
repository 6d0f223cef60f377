"""Iterate averaging from the update log, with no copy of the model.

With updates ``θ_{t+1} = θ_t - Δ_t`` (``Δ_t = lr_t g_t z_t``), the mean of the last ``k`` iterates
``θ_{T-k+1} .. θ_T`` is

    mean = θ_T + Σ_{s=T-k+1}^{T-1} ((k - T + s) / k) Δ_s,

the current weights plus the window's logged updates re-applied with their lr scaled by
``-(k - T + s) / k`` (an update with a negative lr adds its step back). Nothing but the log's scalars is
read: the z of each step is regenerated from its seed. This is exact algebra only where an update is
``lr · g · z`` whatever the weights: methods on the fused kernels (mezo-sgd, fzoo, meazo) without weight
decay. The result differs from the arithmetic mean of stored iterates by float rounding alone.

The engine's weights become the average, while its update log stays the training history: checkpoint
(for ``--resume``) before averaging, and do not train on afterwards.
"""
from __future__ import annotations

import logging
import math

from ..engine import ZOEngine
from ..kernels import apply_updates
from ..updates.log import Update

logger = logging.getLogger(__name__)


def window(steps: int, last: float | int) -> int:
    """k, the number of iterates averaged: ``last`` as a fraction (0, 1] of ``steps``, or a count >= 1."""
    if isinstance(last, float) and 0 < last <= 1:
        return max(1, min(steps, math.ceil(last * steps)))
    if isinstance(last, int) and not isinstance(last, bool) and last >= 1:
        return min(steps, last)
    raise ValueError(f"average_last={last!r} is invalid: expected a fraction in (0, 1] or a count of steps >= 1")


def averaging_updates(engine: ZOEngine, k: int) -> list[Update]:
    """The updates that turn the last iterate into the mean of the last ``k`` (in log order)."""
    steps = engine.step_count
    return [Update(u.seed, u.projected_grad, -u.lr * (k - steps + s) / k)
            for s in range(steps - k + 1, steps) for u in engine.log.step_updates(s)]


def average_iterates(engine: ZOEngine, last: float | int | None = None) -> int:
    """Make ``engine``'s weights the mean of its last iterates; returns k, the iterates averaged.

    ``last``: a fraction (0, 1] of the steps, or a count; default ``engine.config.average_last``. Raises
    ValueError for a method or weight decay whose updates depend on the weights (the replay would not be
    the mean), and when nothing was trained."""
    last = engine.config.average_last if last is None else last
    if not engine.method.fused_kernels or engine.config.weight_decay:
        raise ValueError(f"iterate averaging replays updates of the form lr * g * z; method "
                         f"{engine.config.method!r} with weight_decay={engine.config.weight_decay:g} updates "
                         "otherwise: use mezo-sgd, fzoo or meazo without weight decay, or no averaging")
    if engine.store is not None:
        raise ValueError("iterate averaging does not support offloading_device='disk' yet (the files' journal "
                         "records the training steps): average on a CPU-offloaded or resident engine")
    if engine.step_count == 0:
        raise ValueError("iterate averaging needs at least one trained step")
    k = window(engine.step_count, last)
    updates = averaging_updates(engine, k)
    engine.flush()
    if updates:
        config = engine.config
        engine.residency.rewrite(engine.trainable_units, lambda buffer, unit: apply_updates(
            buffer, unit, updates, noise_kind=config.noise, weight_decay=0.0, backend=config.kernels))
    logger.info("averaged the last %d of %d iterates", k, engine.step_count)
    return k
