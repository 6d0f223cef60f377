"""What one process computes of each step: the parts it evaluates and how its statistics meet the other
processes'. The engine asks a ``Role``; the distributed modes (:mod:`zo2.distributed`) build one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..methods import Part
from ..offload.transfers import TransferScheduler
from ..units.storage import SlotPool, Unit

PERTURBED_SIDES = ("plus", "minus")
#: Columns of the per-part statistics: loss sum and count (target tokens, or rows).
STATS_COLUMNS = ("loss_sum", "count")


@dataclass(frozen=True)
class Role:
    """What this process computes of each step, and how its statistics meet the other processes'.

    A single process computes every part. Distributed modes give each process some: data parallel
    (same role, a shard of the batch), perturbation parallel (the +eps or the -eps parts), multi-
    direction (the parts of some directions); ``all_reduce`` sums the [parts, 2] float64 statistics
    (see ``STATS_COLUMNS``) over all processes, zeros standing for what a process did not compute.
    """

    directions: tuple[int, ...] | None = None
    """Directions (0 .. q-1) this process evaluates; ``None``: all of them."""
    sides: tuple[str, ...] = ("plus", "minus")
    """``("plus", "minus")``, ``("plus",)`` or ``("minus",)``; unperturbed (clean) parts go with any side."""
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Returns the elementwise sum over all processes of a float64 CPU tensor; ``None``: one process."""
    make_scheduler: Callable[[list[Unit], SlotPool, torch.device], TransferScheduler] | None = None
    """Builds the transfer scheduler of the offloaded units (e.g. sliced transfers); ``None``: the default."""

    def __post_init__(self) -> None:
        if not self.sides or len(set(self.sides)) != len(self.sides) or not set(self.sides) <= set(PERTURBED_SIDES):
            raise ValueError(f"Role.sides={self.sides!r} is invalid: expected ('plus', 'minus'), ('plus',) "
                             "or ('minus',)")
        if self.directions is not None and (not self.directions or any(d < 0 for d in self.directions)):
            raise ValueError(f"Role.directions={self.directions!r} is invalid: expected None or non-empty "
                             "direction indices >= 0")

    def check(self, parts: Sequence[Part], num_directions: int) -> None:
        """Raise ValueError when this role cannot compute steps made of ``parts`` (a step of
        ``num_directions`` directions): unknown directions, or only part of a step without an all-reduce
        to combine it with the processes that compute the rest."""
        if self.directions is not None and (any(d >= num_directions for d in self.directions)
                                            or len(set(self.directions)) != len(self.directions)):
            raise ValueError(f"Role.directions={self.directions!r} is invalid for ZOConfig.num_directions="
                             f"{num_directions}: expected distinct indices in [0, {num_directions})")
        if self.all_reduce is None and not all(self.selects(p) for p in parts):
            raise ValueError(f"{self} computes only part of each step: it needs Role.all_reduce to combine "
                             "its losses with the processes that compute the rest (see zo2.distributed)")

    def selects(self, part: Part) -> bool:
        """Whether this process computes ``part``."""
        return ((self.directions is None or part.direction in self.directions)
                and (part.side == "clean" or part.side in self.sides))
