"""Perturbation scopes: how much of the model exists perturbed at once during a walk.

Both strategies give the same bits (z, the decay mask and the rounding draws follow the absolute element
index); they trade memory for noise work:

* :class:`UnitScope`: when a unit first comes on the device in a walk, its pending updates are applied
  and one perturbed copy per part is written (z generated once per direction). A unit's copies live
  until its last reader is done: K copies of a block, and of a tied embedding for the whole walk.
* :class:`ModuleScope`: the pending updates are applied to the unit's buffer (its slot, or its master),
  the vectors (biases, norms) are perturbed per part, and every weight matrix is perturbed by the module
  that owns it, for the part being computed, right before that module runs; the copy is let go when it
  returns. One matrix exists perturbed at a time; z is generated once per part.

Perturbed copies come from the engine's :class:`~zo2.units.storage.BufferPool`, so steps after the first
allocate nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..units.storage import Unit
from .batching import leaves

if TYPE_CHECKING:
    from .walk import Walk


@dataclass
class Matrix:
    """A weight matrix perturbed by its owner module's own call (module scope)."""

    param: nn.Parameter
    unit: Unit
    k: int
    """Index of the parameter in ``unit.params``."""

    @property
    def start(self) -> int:
        return self.unit.offsets[self.k]

    def master_view(self) -> torch.Tensor:
        """Its view into the unit's current master (sliced transfers may replace the master buffer)."""
        return self.unit.master[self.start:self.start + self.param.numel()].view(self.param.shape)


def aliases(output: Any, buffer: torch.Tensor) -> bool:
    """Whether any tensor in ``output`` shares memory with ``buffer`` (a module returned a view of its weights)."""
    pointer = buffer.untyped_storage().data_ptr()
    return any(t.untyped_storage().data_ptr() == pointer for _, t in leaves(output))


def _by_seed(walk: "Walk") -> dict[int, list[int]]:
    """The walk's perturbed parts grouped by seed (one z per direction, several signs)."""
    groups: dict[int, list[int]] = {}
    for index, part in enumerate(walk.parts):
        if part.sign:
            groups.setdefault(part.seed, []).append(index)
    return groups


def _perturb(walk: "Walk", buffer: torch.Tensor, unit: Unit, steps: range, offset: int = 0) -> dict[int, torch.Tensor]:
    """Apply ``steps`` to ``buffer`` and return part index -> perturbed copy (pool buffers); clean parts
    read ``buffer`` itself. The updates are fused into the first direction's pass."""
    copies: dict[int, torch.Tensor] = {}
    method, pool = walk.ctx.method, walk.ctx.pool
    for seed, indices in _by_seed(walk).items():
        out = [pool.take(buffer.numel(), buffer.dtype) for _ in indices]
        perturbed = method.update_and_perturb(buffer, unit, steps, seed, walk.eps,
                                              [walk.parts[i].sign for i in indices], offset=offset, out=out)
        copies.update(zip(indices, perturbed))
        steps = range(0)
    method.apply(buffer, unit, steps, offset=offset)  # no perturbed part: the updates alone
    for index, part in enumerate(walk.parts):
        if not part.sign:
            copies[index] = buffer
    return copies


class UnitScope:
    """Whole perturbed copies of a unit, one per part, written when the unit first comes on the device."""

    name = "unit"
    hooks_matrices = False

    def ready(self, walk: "Walk", unit: Unit, buffer: torch.Tensor, steps: range) -> bool:
        """Prepare the unit's per-part weights; True if the walk reads ``buffer`` itself afterwards."""
        copies = _perturb(walk, buffer, unit, steps)
        walk.views[unit.index] = [unit.views(copies[k]) for k in range(len(walk.parts))]
        walk.lent[unit.index] = [c for c in copies.values() if c is not buffer]
        return any(not part.sign for part in walk.parts)

    def enter_part(self, walk: "Walk", matrices: list[Matrix]) -> None:
        """Nothing to do: the unit's copies hold every parameter."""

    def leave_part(self, walk: "Walk", matrices: list[Matrix], output: Any) -> None:
        """Nothing to do."""


class ModuleScope:
    """Vectors perturbed per unit, each weight matrix perturbed by its own module per part."""

    name = "module"
    hooks_matrices = True

    def ready(self, walk: "Walk", unit: Unit, buffer: torch.Tensor, steps: range) -> bool:
        walk.ctx.method.apply(buffer, unit, steps)
        vectors = buffer[unit.n_decay:]
        copies = _perturb(walk, vectors, unit, range(0), offset=unit.n_decay)
        walk.views[unit.index] = [
            [None if start < unit.n_decay else copies[k][start - unit.n_decay:][:p.numel()].view(p.shape)
             for p, start in zip(unit.params, unit.offsets)] for k in range(len(walk.parts))]
        walk.lent[unit.index] = [c for c in copies.values() if c is not vectors]
        walk.buffers[unit.index] = buffer
        return True  # matrices are perturbed from the buffer until the unit's last reader is done

    def enter_part(self, walk: "Walk", matrices: list[Matrix]) -> None:
        """Perturb ``matrices`` for the walk's current part (from their unit's updated buffer)."""
        part = walk.parts[walk.part]
        for matrix in matrices:
            size = matrix.param.numel()
            weights = walk.buffers[matrix.unit.index][matrix.start:matrix.start + size]
            if not part.sign:
                matrix.param.data = weights.view(matrix.param.shape)
                continue
            out = walk.ctx.pool.take(size, weights.dtype)
            [perturbed] = walk.ctx.method.update_and_perturb(weights, matrix.unit, range(0), part.seed, walk.eps,
                                                             [part.sign], offset=matrix.start, out=[out])
            matrix.param.data = perturbed.view(matrix.param.shape)

    def leave_part(self, walk: "Walk", matrices: list[Matrix], output: Any) -> None:
        """Point the matrices back at their masters; their perturbed copies go back to the pool (unless
        the module's output is a view of one, which must then stay as it is)."""
        pool, clean = walk.ctx.pool, not walk.parts[walk.part].sign
        for matrix in matrices:
            perturbed = matrix.param.data.view(-1)
            matrix.param.data = matrix.master_view()
            if clean:
                continue
            if aliases(output, perturbed):
                pool.forget(perturbed)
            else:
                pool.give(perturbed)


SCOPES = {"unit": UnitScope, "module": ModuleScope}
"""Perturbation scope strategies by ``ZOConfig.perturbation_scope`` (resolved)."""
