"""``lr="auto"``: pick the learning rate by a short search before training.

The search runs in two stages, every trial from the same starting weights on the training batches, scored
by the mean loss of the run's objective on validation batches carved from the training data
(:func:`carve_validation`; never the eval set):

1. **Screen.** Each candidate of a log grid around the method's default (:data:`GRID` times
   :data:`zo2.methods.DEFAULTS`' lr) trains ``steps`` steps.
2. **Confirm.** A short trial favours large learning rates: their early progress shows, the instability
   that undoes it later does not (the short-horizon bias of Wu, Ren, Liao and Grosse, "Understanding
   Short-Horizon Bias in Stochastic Meta-Optimization", ICLR 2018, arXiv 1803.02021). So the screen's
   best and the candidate just below it on the grid train again, :data:`CONFIRM` times longer, and the
   longer trial decides between them (a tie goes to the smaller lr). When the best is already the
   smallest candidate, or the time left cannot fit the confirmation, the screen's best is kept.

If no candidate beats the start in the screen, the smallest lr is kept (a step that cannot hurt much) and
a warning says so. Trials train at a constant lr, the schedule's peak: warm-up and decay only lower the
lr, so a peak that trains in the search trains under the schedule too (a conservative pick where a long
warm-up would have tamed a larger lr). Between trials, and after the last, the engine goes back to its
start exactly (:class:`StartSnapshot`), so the training that follows is bit for bit the run that
``lr=<pick>`` would have made.

Under ``torchrun`` every rank runs the same search on its shard; the validation losses are combined
over the ranks (``ZOEngine.loss``) and rank 0's choices are broadcast, so every rank trains with one lr.
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
CONFIRM = 3
"""How many times longer than a screening trial the confirmation trials train."""
MIN_VALIDATION = 8
"""Fewest examples a validation slice may hold (fewer cannot rank candidates)."""

Batch = Mapping[str, Any]
T = TypeVar("T")


def search_steps(steps: int, candidates: int = len(GRID), confirm: int = CONFIRM) -> int:
    """Training steps of a whole search: every candidate's screen, then two confirmation trials."""
    return steps * (candidates + (2 * confirm if candidates > 1 else 0))


def steps_per_candidate(budget: int, candidates: int = len(GRID), confirm: int = CONFIRM) -> int:
    """The screening steps (at least 1) of a search whose training steps should fit ``budget``."""
    return max(1, budget // search_steps(1, candidates, confirm))


class LRSearchError(ValueError):
    """The search cannot work as asked (too little data, too small a budget); the message says what to change."""


class LRSearchInterrupted(Exception):
    """The search was stopped (``should_stop``); the engine is back at its start, nothing was trained."""


@dataclass(frozen=True)
class LRSearch:
    """What a search did: the pick, the start's validation score and one row per trial."""

    lr: float
    start_score: float
    table: tuple[dict, ...]
    """Per trial: ``stage`` ("screen" or "confirm"), ``lr``, ``steps``, ``score`` (validation loss; inf if
    it diverged), ``seconds``, ``forward_passes`` (evaluations of a batch, validation included)."""
    seconds: float
    """The whole search: the trials, the start's validation and the returns to the start."""
    forward_passes: int
    """The trials' and the start's validation forward passes (batch evaluations)."""

    def describe(self) -> str:
        """The table as text (printed and logged)."""
        picked = max(i for i, row in enumerate(self.table) if row["lr"] == self.lr)
        lines = [f"lr search (validation loss at the start: {self.start_score:.4f})",
                 f"{'stage':<8} {'lr':>10} {'steps':>6} {'val loss':>10} {'seconds':>8}"]
        lines += [f"{row['stage']:<8} {row['lr']:>10.3g} {row['steps']:>6} {row['score']:>10.4f} "
                  f"{row['seconds']:>8.1f}" + ("  <- picked" if i == picked else "")
                  for i, row in enumerate(self.table)]
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


class _Trials:
    """Runs trials from the start and keeps the table; the engine is back at the start after each."""

    def __init__(self, engine: ZOEngine, start: StartSnapshot, batches: Callable[[int], Batch],
                 validation: Sequence[Batch], objective: Objective | None, should_stop: Callable[[], bool]) -> None:
        self.engine, self.start, self.batches = engine, start, batches
        self.validation, self.objective, self.should_stop = validation, objective, should_stop
        self.table: list[dict] = []

    def run(self, stage: str, lr: float, steps: int) -> dict:
        """Train ``steps`` steps at ``lr``, score, go back to the start; the row is added to the table."""
        clock = time.perf_counter()
        try:
            trained = self._train(lr, steps)
        except LRSearchInterrupted:
            self.start.restore()
            raise
        score = _validation_loss(self.engine, self.validation, self.objective) if trained else math.inf
        row = {"stage": stage, "lr": lr, "steps": steps, "score": score, "seconds": time.perf_counter() - clock,
               "forward_passes": steps * len(self.engine.parts()) + len(self.validation)}
        self.table.append(row)
        self.start.restore()
        return row

    def _train(self, lr: float, steps: int) -> bool:
        """False when the steps diverged (non-finite losses)."""
        for step in range(steps):
            if self.should_stop():
                raise LRSearchInterrupted
            try:
                self.engine.step(self.batches(step), lr, objective=self.objective)
            except FloatingPointError:
                return False
        return True


def _agreed(index: int) -> int:
    """Rank 0's choice on every rank: the scores agree already, but clocks do not, and every rank must
    take the same branch (the trials' steps are collectives)."""
    if not (dist.is_available() and dist.is_initialized()):
        return index
    choice = torch.tensor([index], dtype=torch.int64)
    dist.broadcast(choice, src=0)
    return int(choice.item())


def _screen_pick(screen: list[dict], start: float) -> int:
    """The screen's best (index), or the smallest lr when no candidate beat the start."""
    finite = [i for i, row in enumerate(screen) if math.isfinite(row["score"])]
    if not finite:
        raise LRSearchError(f"every candidate lr diverged ({[row['lr'] for row in screen]}): lower the grid "
                            "(factors) or eps, or check the training data")
    best = min(finite, key=lambda i: (screen[i]["score"], screen[i]["lr"]))
    if screen[best]["score"] >= start:
        smallest = min(finite, key=lambda i: screen[i]["lr"])
        logger.warning("lr search: no candidate beat the start's validation loss %.4f; keeping the smallest lr %g",
                       start, screen[smallest]["lr"])
        return smallest
    return best


def _confirmed(trials: _Trials, candidates: list[float], best: float, steps: int, seconds_left: float) -> float:
    """The screen's best against the grid's next smaller lr over longer trials: the lower loss wins, a
    tie the smaller lr. Without a smaller lr, or without the time for both trials, the best stands."""
    below = [lr for lr in candidates if lr < best]
    if not below:
        return best
    screened = next(row for row in trials.table if row["lr"] == best)
    if _agreed(2 * CONFIRM * screened["seconds"] > seconds_left):
        logger.warning("lr search: the time budget cannot fit the confirmation trials; keeping the screen's best %g",
                       best)
        return best
    lower, upper = (trials.run("confirm", lr, CONFIRM * steps) for lr in (below[-1], best))
    return upper["lr"] if upper["score"] < lower["score"] else lower["lr"]


def search_lr(engine: ZOEngine, batches: Callable[[int], Batch], validation: Sequence[Batch], *,
              steps: int = 10, factors: Sequence[float] = GRID, objective: Objective | None = None,
              max_seconds: float | None = None, should_stop: Callable[[], bool] = lambda: False,
              snapshot_dir: str | None = None) -> LRSearch:
    """Pick ``engine``'s learning rate and set it (``engine.lr``, ``engine.lr_source == "auto search"``).

    ``batches(step)``: the training batch of trial step ``step`` (from the training data less the
    validation slice); ``validation``: the validation batches; ``steps`` per screening trial (the two
    confirmation trials take :data:`CONFIRM` times as many; :func:`search_steps` is the total);
    ``factors`` times the method's default lr are the candidates; ``objective``: what steps and scores use
    (default the engine's). ``max_seconds``: the search stops before a trial that the time left cannot fit
    (:class:`LRSearchError` if not even the first fits). ``should_stop`` is polled before every step
    (Ctrl-C): the engine is restored and :class:`LRSearchInterrupted` raised. The engine must be at step
    0; it is left there, at its starting weights, with the picked lr."""
    if steps < 1 or not factors or not validation:
        raise LRSearchError("search_lr needs steps >= 1, at least one factor and at least one validation batch")
    default = defaults_for(engine.config.method).lr
    candidates = sorted(default * f for f in factors)
    begun = time.perf_counter()
    budget = math.inf if max_seconds is None else max_seconds
    with StartSnapshot(engine, snapshot_dir) as start:
        start_score = _validation_loss(engine, validation, objective)
        trials = _Trials(engine, start, batches, validation, objective, should_stop)
        for lr in candidates:
            if trials.table and _agreed(time.perf_counter() - begun + trials.table[0]["seconds"] > budget):
                logger.warning("lr search: the time budget fits %d of %d candidates", len(trials.table),
                               len(candidates))
                break
            trials.run("screen", lr, steps)
            if len(trials.table) == 1 and _agreed(time.perf_counter() - begun > budget):
                raise LRSearchError(f"the time budget ({max_seconds:g} s) cannot fit one search candidate "
                                    f"({trials.table[0]['seconds']:.1f} s for {steps} steps): raise it, lower the "
                                    "search steps, or give the lr")
        screen = list(trials.table)
        best = screen[_agreed(_screen_pick(screen, start_score))]["lr"]
        finite = [row["lr"] for row in screen if math.isfinite(row["score"])]
        best = _confirmed(trials, finite, best, steps, budget - (time.perf_counter() - begun))
        choice = candidates[_agreed(candidates.index(best))]
    table = tuple(trials.table)
    passes = sum(row["forward_passes"] for row in table) + len(validation)
    result = LRSearch(choice, start_score, table, time.perf_counter() - begun, passes)
    engine.learning_rate = LearningRate(choice, "auto search", result.table)
    return result
