"""Objectives: what a zeroth-order step minimises, computed per part of a walk from that part's outputs.

:mod:`.base` defines :class:`Objective` and :func:`objective`; :mod:`.task_loss` is the Hugging Face
head's own loss per part (the default); :mod:`.classification` is MeZO's train-as-classification loss."""
from .base import IGNORE_INDEX, Objective, as_objective, objective, split_batch, terms
from .classification import candidate_cross_entropy
from .task_loss import TASK_LOSS, TaskLoss

__all__ = ["IGNORE_INDEX", "Objective", "as_objective", "objective", "split_batch", "terms",
           "candidate_cross_entropy", "TASK_LOSS", "TaskLoss"]
