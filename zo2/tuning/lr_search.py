"""``lr="auto"``: pick the learning rate by a short search before training.

Each candidate of a log grid around the method's default (:data:`GRID` times
:data:`zo2.methods.DEFAULTS`' lr) trains ``steps`` steps from the starting weights on the training
batches, then is scored by the mean loss of the run's objective on validation batches carved from the
training data (:func:`carve_validation`; never the eval set). The lowest score wins; if no candidate
beats the start, the smallest lr is kept (a step that cannot hurt much) and a warning says so. Between
candidates, and after the last, the engine goes back to its start exactly (:class:`StartSnapshot`), so
the training that follows is bit for bit the run that ``lr=<pick>`` would have made.

Under ``torchrun`` every rank runs the same search on its shard; the validation losses are combined
over the ranks (``ZOEngine.loss``) and rank 0's pick is broadcast, so every rank trains with one lr.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, TypeVar

import torch
import torch.distributed as dist

from ..engine import ZOEngine
from ..methods.defaults import LearningRate, defaults_for
from ..objectives import Objective
from .snapshot import StartSnapshot

logger = logging.getLogger(__name__)

GRID = (0.1, 10 ** -0.5, 1.0, 10 ** 0.5, 10.0)
"""Factors of the method's default lr tried by default: a half-decade log grid over two decades."""
MIN_VALIDATION = 8
"""Fewest examples a validation slice may hold (fewer cannot rank candidates)."""

Batch = Mapping[str, Any]
T = TypeVar("T")


class LRSearchError(ValueError):
    """The search cannot work as asked (too little data, too small a budget); the message says what to change."""


class LRSearchInterrupted(Exception):
    """The search was stopped (``should_stop``); the engine is back at its start, nothing was trained."""


@dataclass(frozen=True)
class LRSearch:
    """What a search did: the pick, the start's validation score and one row per candidate tried."""

    lr: float
    start_score: float
    table: tuple[dict, ...]
    """Per candidate: ``lr``, ``steps``, ``score`` (validation loss; inf if it diverged), ``seconds``,
    ``forward_passes`` (evaluations of a batch, validation included)."""
    seconds: float
    """The whole search: the candidates, the start's validation and the returns to the start."""
    forward_passes: int
    """The candidates' and the start's validation forward passes (batch evaluations)."""

    def describe(self) -> str:
        """The table as text (printed and logged)."""
        lines = [f"lr search (validation loss at the start: {self.start_score:.4f})",
                 f"{'lr':>10} {'steps':>6} {'val loss':>10} {'seconds':>8}"]
        lines += [f"{row['lr']:>10.3g} {row['steps']:>6} {row['score']:>10.4f} {row['seconds']:>8.1f}"
                  + ("  <- picked" if row["lr"] == self.lr else "") for row in self.table]
        return "\n".join(lines)


def carve_validation(examples: Sequence[T], size: int, seed: int, *, keep: int = 1) -> tuple[list[T], list[T]]:
    """(search training pool, validation slice): ``size`` seeded examples of ``examples`` set aside.
    Raises :class:`LRSearchError` when the slice would hold fewer than :data:`MIN_VALIDATION` examples or
    leave fewer than ``keep`` (a batch) to train the candidates on."""
    if size < MIN_VALIDATION or len(examples) - size < keep:
        raise LRSearchError(f"lr='auto' needs a validation slice of at least {MIN_VALIDATION} training examples "
                            f"and {keep} more to train on; there are {len(examples)} (slice {size}). Use more "
                            "training data (--train-examples), or give the lr (--lr)")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    chosen = set(order[:size])
    return ([e for i, e in enumerate(examples) if i not in chosen], [examples[i] for i in sorted(chosen)])


def _validation_loss(engine: ZOEngine, validation: Sequence[Batch], objective: Objective | None) -> float:
    losses = [engine.loss(batch, objective) for batch in validation]
    return sum(losses) / len(losses)


def _train_candidate(engine: ZOEngine, lr: float, batches: Callable[[int], Batch], steps: int,
                     objective: Objective | None, should_stop: Callable[[], bool]) -> bool:
    """Train ``steps`` steps at ``lr``; False when the steps diverged (non-finite losses)."""
    for step in range(steps):
        if should_stop():
            raise LRSearchInterrupted
        try:
            engine.step(batches(step), lr, objective=objective)
        except FloatingPointError:
            return False
    return True


def _agreed(index: int) -> int:
    """Rank 0's choice on every rank (the scores agree already; this makes it certain)."""
    if not (dist.is_available() and dist.is_initialized()):
        return index
    choice = torch.tensor([index], dtype=torch.int64)
    dist.broadcast(choice, src=0)
    return int(choice.item())


def _pick(table: list[dict], start: float) -> int:
    finite = [i for i, row in enumerate(table) if math.isfinite(row["score"])]
    if not finite:
        raise LRSearchError(f"every candidate lr diverged ({[row['lr'] for row in table]}): lower the grid "
                            "(factors) or eps, or check the training data")
    best = min(finite, key=lambda i: (table[i]["score"], table[i]["lr"]))
    if table[best]["score"] >= start:
        smallest = min(finite, key=lambda i: table[i]["lr"])
        logger.warning("lr search: no candidate beat the start's validation loss %.4f; keeping the smallest lr %g",
                       start, table[smallest]["lr"])
        return smallest
    return best


def search_lr(engine: ZOEngine, batches: Callable[[int], Batch], validation: Sequence[Batch], *,
              steps: int = 10, factors: Sequence[float] = GRID, objective: Objective | None = None,
              max_seconds: float | None = None, should_stop: Callable[[], bool] = lambda: False,
              snapshot_dir: str | None = None) -> LRSearch:
    """Pick ``engine``'s learning rate and set it (``engine.lr``, ``engine.lr_source == "auto search"``).

    ``batches(step)``: the training batch of search step ``step`` (from the training data less the
    validation slice); ``validation``: the validation batches; ``steps`` per candidate; ``factors``
    times the method's default lr are the candidates; ``objective``: what steps and scores use (default
    the engine's). ``max_seconds``: the search stops before a candidate that the time left cannot fit
    (:class:`LRSearchError` if not even the first fits). ``should_stop`` is polled before every step
    (Ctrl-C): the engine is restored and :class:`LRSearchInterrupted` raised. The engine must be at step
    0; it is left there, at its starting weights, with the picked lr."""
    if steps < 1 or not factors or not validation:
        raise LRSearchError("search_lr needs steps >= 1, at least one factor and at least one validation batch")
    default = defaults_for(engine.config.method).lr
    candidates = sorted(default * f for f in factors)
    table: list[dict] = []
    begun = time.perf_counter()
    with StartSnapshot(engine, snapshot_dir) as start:
        start_score = _validation_loss(engine, validation, objective)
        for lr in candidates:
            spent = time.perf_counter() - begun
            if table and max_seconds is not None and spent + table[0]["seconds"] > max_seconds:
                logger.warning("lr search: the time budget fits %d of %d candidates", len(table), len(candidates))
                break
            clock = time.perf_counter()
            try:
                trained = _train_candidate(engine, lr, batches, steps, objective, should_stop)
            except LRSearchInterrupted:
                start.restore()
                raise
            score = _validation_loss(engine, validation, objective) if trained else math.inf
            passes = steps * len(engine.parts()) + len(validation)
            table.append({"lr": lr, "steps": steps, "score": score, "seconds": time.perf_counter() - clock,
                          "forward_passes": passes})
            start.restore()
            if max_seconds is not None and len(table) == 1 and time.perf_counter() - begun > max_seconds:
                raise LRSearchError(f"the time budget ({max_seconds:g} s) cannot fit one search candidate "
                                    f"({table[0]['seconds']:.1f} s for {steps} steps): raise it, lower the search "
                                    "steps, or give the lr")
        choice = table[_agreed(_pick(table, start_score))]["lr"]
    passes = sum(row["forward_passes"] for row in table) + len(validation)
    result = LRSearch(choice, start_score, tuple(table), time.perf_counter() - begun, passes)
    engine.learning_rate = LearningRate(choice, "auto search", result.table)
    return result
