"""MEAZO (Dbouk et al., "On Adaptivity in Zeroth-Order Optimization", arXiv 2605.03869), implemented from
the paper's description: MeZO/q-SPSA with one *scalar* second moment as a global adaptive step.

``v_t = β v_{t-1} + (1 - β) ḡ_t²`` over the mean projected gradient ḡ_t of each step, bias-corrected
``v̂_t = v_t / (1 - β^t)``, and the step's learning rate is ``lr / (sqrt(v̂_t) + ζ)``. The effective
rate is recorded in the step's updates, so the update rule (and replay) is plain SGD; v is rebuilt
from the update log after a resume, so there is no state to save.

Use it for MeZO's convergence with much less lr sensitivity (the step adapts to the gradient scale).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ..updates.log import Update
from .base import Decision, Method, options_error


@dataclass(frozen=True)
class MEAZOOptions:
    """Options of ``method="meazo"``."""

    beta: float = 0.99
    """Decay of the scalar second moment (in (0, 1))."""
    zeta: float = 1e-8
    """Added to sqrt(v̂) before dividing (> 0)."""

    def check(self) -> None:
        if not 0 < self.beta < 1:
            raise options_error("meazo", f"beta={self.beta!r} must be in (0, 1)")
        if not self.zeta > 0:
            raise options_error("meazo", f"zeta={self.zeta!r} must be > 0")


class MEAZO(Method):
    """q-SPSA with the learning rate divided by the root of a bias-corrected scalar second moment."""

    name = "meazo"
    Options = MEAZOOptions

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._v, self._counted = 0.0, 0  # v after the first ``_counted`` steps of the log

    def _moment(self) -> float:
        """v after every step in the log (a pure function of the logged projected gradients)."""
        while self._counted < self.log.steps:
            grads = [u.projected_grad for u in self.log.step_updates(self._counted)]
            self._v = self.options.beta * self._v + (1 - self.options.beta) * (sum(grads) / len(grads)) ** 2
            self._counted += 1
        return self._v

    def load_state_dict(self, state) -> None:
        """The log was replaced: v is rebuilt from it at the next step."""
        self._v, self._counted = 0.0, 0

    def decide(self, losses: Sequence[float], seeds: Sequence[int], lr: float, eps: float) -> Decision:
        plain = super().decide(losses, seeds, lr, eps)
        beta, step = self.options.beta, self.log.steps + 1
        v = beta * self._moment() + (1 - beta) * plain.projected_grad ** 2
        rate = lr / (math.sqrt(v / (1 - beta ** step)) + self.options.zeta)
        q = len(seeds)
        updates = tuple(Update(u.seed, u.projected_grad, rate / q) for u in plain.updates)
        return Decision(updates, plain.loss, plain.loss_minus, plain.projected_grad)
