"""The update history of a run: what each step decided, in the form every other module reads.

An :class:`Update` is all that is needed to redo one step's change to the weights: the seed of z,
the projected gradient g and the learning rate. With the base weights, the list of updates *is* the
fine-tuned model (``zo2.replay``). This module imports nothing of zo2, so every other module
(kernels, engine, checkpoints, distributed) can depend on it without cycles.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Update:
    """One step of MeZO-SGD, all that is needed to redo it: the seed of z, g and the learning rate."""

    seed: int
    projected_grad: float
    lr: float
