"""Tuning a run without touching its model code: the learning-rate search (``lr="auto"``), the exact
return to the starting weights it relies on, and iterate averaging replayed from the update log.

:func:`search_lr` picks a learning rate from a log grid around the method's default
(:data:`zo2.methods.DEFAULTS`): it screens every candidate for a few steps from the same starting weights,
scored on a validation slice, then confirms the best against the next smaller lr over longer trials.
:func:`average_iterates` turns the last iterate into the mean of the last iterates (:func:`averaged`: for
the length of a ``with`` block, on any storage). Both use the update log instead of a second copy of the
model.
"""
from __future__ import annotations

from .averaging import average_iterates, averaged, averaging_updates
from .lr_search import (
    CONFIRM,
    GRID,
    LRSearch,
    LRSearchError,
    LRSearchInterrupted,
    carve_validation,
    search_lr,
    search_steps,
    steps_per_candidate,
)
from .snapshot import KeptWeights, StartSnapshot

__all__ = ["CONFIRM", "GRID", "KeptWeights", "LRSearch", "LRSearchError", "LRSearchInterrupted", "StartSnapshot",
           "average_iterates", "averaged", "averaging_updates", "carve_validation", "search_lr", "search_steps",
           "steps_per_candidate"]
