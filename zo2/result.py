"""What one ZO step returns."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .updates.log import Update


@dataclass(frozen=True)
class StepResult:
    """What one ZO step measured and decided."""

    loss: float
    """The method's training loss: the +eps pass for two-sided methods (what ZO2's ``model(...)`` returns
    in training mode; the mean over directions when ``num_directions > 1``), theta's own for fzoo."""
    loss_minus: float
    """The -eps pass (two-sided methods), or the mean perturbed loss (one-sided)."""
    projected_grad: float
    """g = (loss - loss_minus) / (2 eps) for MeZO: the directional derivative along z (mean over directions)."""
    lr: float
    seed: int
    """Seed of z for this step's first direction (a pure function of the config seed and the step)."""
    step: int
    updates: tuple[Update, ...] = ()
    """The updates recorded by this step (one per direction)."""
    losses: tuple[float, ...] = ()
    """The mean loss of every part of the step, in the method's part order."""
    eps: float = math.nan
    """The perturbation scale of this step (``ZOConfig.eps`` under ``eps_scheduler``)."""
