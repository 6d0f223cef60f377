"""Iterate averaging from the update log, with no copy of the model.

With updates ``θ_{t+1} = θ_t - Δ_t`` (``Δ_t = lr_t g_t z_t``), the mean of the last ``k`` iterates
``θ_{T-k+1} .. θ_T`` is

    mean = θ_T + Σ_{s=T-k+1}^{T-1} ((k - T + s) / k) Δ_s,

the current weights plus the window's logged updates re-applied with their lr scaled by
``-(k - T + s) / k`` (an update with a negative lr adds its step back). Nothing but the log's scalars is
read: the z of each step is regenerated from its seed. This is exact algebra only where an update is
``lr · g · z`` whatever the weights: methods on the fused kernels (mezo-sgd, fzoo, meazo) without weight
decay. The result differs from the arithmetic mean of stored iterates by float rounding alone.

:func:`averaged` holds the average for the length of a ``with`` block (evaluate it, save it) and puts the
last iterate back on exit, for every kind of storage: on disk, where the offload folder is the run's durable
state, the last iterate's files are kept aside meanwhile and a crash inside the block leaves them to be put
back when the folder is reopened with ``resume=True`` (:class:`zo2.tuning.snapshot.KeptWeights`).
:func:`average_iterates` leaves a resident or CPU-offloaded engine averaged, while its update log stays the
training history: checkpoint (for ``--resume``) before, and do not train on afterwards.
"""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Iterator

from ..engine import ZOEngine
from ..kernels import apply_updates
from ..updates.log import Update
from .snapshot import KeptWeights

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


def _window_to_average(engine: ZOEngine, last: float | int | None) -> int:
    """k for ``last`` (default ``engine.config.average_last``), or ValueError when the replay would not be the
    mean (updates that depend on the weights) or nothing was trained."""
    last = engine.config.average_last if last is None else last
    if not engine.method.fused_kernels or engine.config.weight_decay:
        raise ValueError(f"iterate averaging replays updates of the form lr * g * z; method "
                         f"{engine.config.method!r} with weight_decay={engine.config.weight_decay:g} updates "
                         "otherwise: use mezo-sgd, fzoo or meazo without weight decay, or no averaging")
    if engine.step_count == 0:
        raise ValueError("iterate averaging needs at least one trained step")
    return window(engine.step_count, last)


def _average(engine: ZOEngine, k: int) -> None:
    """Rewrite the (flushed) trainable masters as the mean of the last ``k`` iterates."""
    updates = averaging_updates(engine, k)
    engine.flush()
    if updates:
        config = engine.config
        engine.residency.rewrite(engine.trainable_units, lambda buffer, unit: apply_updates(
            buffer, unit, updates, noise_kind=config.noise, weight_decay=0.0, backend=config.kernels))
    logger.info("averaged the last %d of %d iterates", k, engine.step_count)


def average_iterates(engine: ZOEngine, last: float | int | None = None) -> int:
    """Make ``engine``'s weights the mean of its last iterates; returns k, the iterates averaged.

    ``last``: a fraction (0, 1] of the steps, or a count; default ``engine.config.average_last``. Raises
    ValueError for a method or weight decay whose updates depend on the weights (the replay would not be
    the mean), when nothing was trained, and for a disk-offloaded engine (use :func:`averaged`)."""
    k = _window_to_average(engine, last)
    if engine.store is not None:
        raise ValueError("a disk-offloaded engine's files are its run's durable state, so they hold the average "
                         "only for a while: use `with zo2.tuning.averaged(engine, last) as k:` (the last iterate "
                         "comes back on exit)")
    _average(engine, k)
    return k


@contextlib.contextmanager
def averaged(engine: ZOEngine, last: float | int | None = None, *,
             directory: str | Path | None = None) -> Iterator[int]:
    """Within the block, ``engine``'s weights are the mean of its last iterates (``last`` and the refusals as
    :func:`average_iterates`'s; the block gets k); on exit they are the last iterate again, bit for bit,
    whatever the storage. Evaluate or save inside; do not train. The last iterate is kept on disk meanwhile
    (:class:`~zo2.tuning.snapshot.KeptWeights`; ``directory``: where units outside a disk store are kept)."""
    k = _window_to_average(engine, last)
    kept = KeptWeights(engine, "iterate averaging", directory)
    try:
        _average(engine, k)
        yield k
    finally:
        kept.put_back()
        kept.close()
