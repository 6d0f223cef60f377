"""MeZO-SGD (Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", arXiv 2305.17333).

Two-sided SPSA along a seed-regenerated direction z per step: g = (L(θ+εz) - L(θ-εz)) / 2ε, then
SGD on it, ``θ ← θ - lr (g z + λ θ)``. With ``num_directions = q`` (q-SPSA / n-SPSA) a step evaluates q
directions (2q parts, one walk) and applies the mean of their q estimates (each update uses lr / q).
No state beyond the update log; the update rule runs on the fused kernels.

Use it as the baseline, and whenever nothing else is known about the task.
"""
from __future__ import annotations

from .base import Method


class MeZOSGD(Method):
    """MeZO-SGD / q-SPSA: the base method's estimator and rule, unchanged."""

    name = "mezo-sgd"
