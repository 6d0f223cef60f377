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

A scope is told what to perturb with (:class:`Perturbation`) and hands back what it made
(:class:`UnitWeights`); the walk keeps that until the unit's last reader is done. Perturbed copies come
from the driver's :class:`~zo2.units.storage.BufferPool`, so steps after the first allocate nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from ..methods import Method, Part
from ..units.storage import BufferPool, Unit
from .batching import leaves


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


@dataclass(frozen=True)
class Perturbation:
    """What a walk perturbs with: its parts, eps, the method's update rule and the pool of copies."""

    parts: list[Part]
    eps: float
    method: Method
    pool: BufferPool

    def by_seed(self) -> dict[int, list[int]]:
        """The perturbed parts' indices grouped by seed (one z per direction, several signs)."""
        groups: dict[int, list[int]] = {}
        for index, part in enumerate(self.parts):
            if part.sign:
                groups.setdefault(part.seed, []).append(index)
        return groups


@dataclass
class UnitWeights:
    """A unit's weights for one walk, as its scope prepared them."""

    views: list[list[torch.Tensor | None]]
    """Per part, each parameter's perturbed view (None: perturbed by its own module, module scope)."""
    lent: list[torch.Tensor] = field(default_factory=list)
    """The pool buffers holding the unit's perturbed copies (given back when the walk lets the unit go)."""
    buffer: torch.Tensor | None = None
    """Module scope: the unit's updated weights, which its matrices are perturbed from."""
    reads_buffer: bool = False
    """Whether the walk reads the unit's own buffer (a slot stays held until the unit is let go)."""


def aliases(output: Any, buffer: torch.Tensor) -> bool:
    """Whether any tensor in ``output`` shares memory with ``buffer`` (a module returned a view of its weights)."""
    pointer = buffer.untyped_storage().data_ptr()
    return any(t.untyped_storage().data_ptr() == pointer for _, t in leaves(output))


def _perturb(p: Perturbation, buffer: torch.Tensor, unit: Unit, steps: range, offset: int = 0
             ) -> dict[int, torch.Tensor]:
    """Apply ``steps`` to ``buffer`` and return part index -> perturbed copy (pool buffers); clean parts
    read ``buffer`` itself. The updates are fused into the first direction's pass."""
    copies: dict[int, torch.Tensor] = {}
    for seed, indices in p.by_seed().items():
        out = [p.pool.take(buffer.numel(), buffer.dtype) for _ in indices]
        perturbed = p.method.update_and_perturb(buffer, unit, steps, seed, p.eps,
                                                [p.parts[i].sign for i in indices], offset=offset, out=out)
        copies.update(zip(indices, perturbed))
        steps = range(0)
    p.method.apply(buffer, unit, steps, offset=offset)  # no perturbed part: the updates alone
    for index, part in enumerate(p.parts):
        if not part.sign:
            copies[index] = buffer
    return copies


class UnitScope:
    """Whole perturbed copies of a unit, one per part, written when the unit first comes on the device."""

    name = "unit"
    hooks_matrices = False

    def ready(self, p: Perturbation, unit: Unit, buffer: torch.Tensor, steps: range) -> UnitWeights:
        """Apply ``steps`` to ``buffer`` and make the unit's weights of every part."""
        copies = _perturb(p, buffer, unit, steps)
        return UnitWeights(views=[unit.views(copies[k]) for k in range(len(p.parts))],
                           lent=[c for c in copies.values() if c is not buffer],
                           reads_buffer=any(not part.sign for part in p.parts))

    def enter_part(self, p: Perturbation, part: int, matrices: list[Matrix], weights: Mapping[int, UnitWeights]
                   ) -> None:
        """Nothing to do: the unit's copies hold every parameter."""

    def leave_part(self, p: Perturbation, part: int, matrices: list[Matrix], output: Any) -> None:
        """Nothing to do."""


class ModuleScope:
    """Vectors perturbed per unit, each weight matrix perturbed by its own module per part."""

    name = "module"
    hooks_matrices = True

    def ready(self, p: Perturbation, unit: Unit, buffer: torch.Tensor, steps: range) -> UnitWeights:
        """Apply ``steps`` to ``buffer``, perturb the unit's vectors per part; matrices wait for their modules."""
        p.method.apply(buffer, unit, steps)
        vectors = buffer[unit.n_decay:]
        copies = _perturb(p, vectors, unit, range(0), offset=unit.n_decay)
        views = [[None if start < unit.n_decay else copies[k][start - unit.n_decay:][:param.numel()].view(param.shape)
                  for param, start in zip(unit.params, unit.offsets)] for k in range(len(p.parts))]
        # matrices are perturbed from the buffer until the unit's last reader is done
        return UnitWeights(views=views, lent=[c for c in copies.values() if c is not vectors], buffer=buffer,
                           reads_buffer=True)

    def enter_part(self, p: Perturbation, part: int, matrices: list[Matrix], weights: Mapping[int, UnitWeights]
                   ) -> None:
        """Perturb ``matrices`` for ``part`` from their units' updated buffers (``weights``: the walk's
        :class:`UnitWeights` by unit index)."""
        sign, seed = p.parts[part].sign, p.parts[part].seed
        for matrix in matrices:
            size = matrix.param.numel()
            updated = weights[matrix.unit.index].buffer[matrix.start:matrix.start + size]
            if not sign:
                matrix.param.data = updated.view(matrix.param.shape)
                continue
            out = p.pool.take(size, updated.dtype)
            [perturbed] = p.method.update_and_perturb(updated, matrix.unit, range(0), seed, p.eps, [sign],
                                                      offset=matrix.start, out=[out])
            matrix.param.data = perturbed.view(matrix.param.shape)

    def leave_part(self, p: Perturbation, part: int, matrices: list[Matrix], output: Any) -> None:
        """Point the matrices back at their masters; their perturbed copies go back to the pool (unless
        the module's output is a view of one, which must then stay as it is)."""
        clean = not p.parts[part].sign
        for matrix in matrices:
            perturbed = matrix.param.data.view(-1)
            matrix.param.data = matrix.master_view()
            if clean:
                continue
            if aliases(output, perturbed):
                p.pool.forget(perturbed)
            else:
                p.pool.give(perturbed)


SCOPES = {"unit": UnitScope, "module": ModuleScope}
"""Perturbation scope strategies by ``ZOConfig.perturbation_scope`` (resolved)."""
