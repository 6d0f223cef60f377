"""One walk over the model: the model's own forward on the batch replicated once per part, every
wrapped member computing part k of its inputs under part k's weights (theta + s_k*eps*z_k).

A unit's weights for the walk are prepared when its first reader runs (:meth:`Walk.ready`): the unit
comes on the working device (:mod:`zo2.offload.residency`), its pending updates are applied fused with
the perturbation by the scope strategy (:mod:`.scope`), and residency decides whether the updated master
is written back now. They are let go when the unit's last reader is done, so an offloaded block holds a
slot only while needed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..methods import Method, Part
from ..offload.residency import Residency
from ..units.storage import BufferPool, Unit
from ..updates.log import UpdateLog
from .batching import MemberSpec, linear_part_into, merge_outputs, split_inputs, writes_parts_in_place
from .scope import Matrix, ModuleScope, Perturbation, UnitScope, UnitWeights, aliases
from .wrapping import Wrapped


@dataclass
class WalkContext:
    """What every walk of a model shares."""

    method: Method
    log: UpdateLog
    scope: UnitScope | ModuleScope
    residency: Residency
    pool: BufferPool
    readers: dict[int, int]
    """Per unit index, how many wrapped members read the unit."""


class Walk:
    """State of one walk: the parts it evaluates and the perturbed weights in flight."""

    def __init__(self, ctx: WalkContext, parts: list[Part], eps: float, part_batch: int,
                 specs: dict[str, MemberSpec]) -> None:
        self.ctx, self.parts, self.part_batch, self.specs = ctx, parts, part_batch, specs
        self.perturbation = Perturbation(parts, eps, ctx.method, ctx.pool)
        self.part = 0
        """Index into ``parts`` of the part being computed."""
        self.weights: dict[int, UnitWeights] = {}
        """Per unit in flight (by index), its weights for every part."""
        self.readers_left: dict[int, int] = {}
        self.slots_held: set[int] = set()

    def ready(self, unit: Unit) -> None:
        """Make the unit's weights of every part available (first reader of the walk only)."""
        if unit.index in self.weights:
            return
        residency = self.ctx.residency
        buffer = residency.acquire(unit)
        self.readers_left[unit.index] = self.ctx.readers[unit.index]
        if not unit.trainable:  # frozen: every part reads the weights themselves; nothing to write back
            self.weights[unit.index] = UnitWeights(views=[unit.views(buffer)] * len(self.parts), reads_buffer=True)
        else:
            steps = self.ctx.log.pending(unit.index)
            self.weights[unit.index] = self.ctx.scope.ready(self.perturbation, unit, buffer, steps)
            residency.applied(unit, buffer, steps)
        if unit.offloaded:
            if self.weights[unit.index].reads_buffer:
                self.slots_held.add(unit.index)
            else:
                residency.release(unit)

    def member(self, entry: Wrapped, args: tuple, kwargs: dict) -> Any:
        """Run ``entry`` on each part of its inputs under that part's weights; merge the outputs."""
        for unit in entry.units:
            self.ready(unit)
        name, count = entry.member.name, len(self.parts)
        if count == 1:  # one part: the plain forward under its weights, no replicated batch
            pieces, was_split, spec = [(args, kwargs)], False, None
        else:
            spec = self.specs.get(name, MemberSpec())
            pieces, was_split = split_inputs(spec, args, kwargs, self.part_batch, count, name)
        module = entry.member.module
        merged = None  # parts that write into one output need no merge
        if was_split and writes_parts_in_place(module, entry.forward, args, kwargs):
            merged = args[0].new_empty(*args[0].shape[:-1], module.out_features)
        outputs = self._run_parts(entry, pieces, merged)
        if count == 1:
            self._keep_aliased(entry, outputs[0])
        self._done(entry)
        if count == 1:
            return outputs[0]
        if merged is not None:
            return merged
        return merge_outputs(spec, outputs, self.part_batch, was_split, name)

    def enter_matrices(self, matrices: list[Matrix]) -> None:
        """A module owning weight matrices is about to run: its scope perturbs them for the current part."""
        self.ctx.scope.enter_part(self.perturbation, self.part, matrices, self.weights)

    def leave_matrices(self, matrices: list[Matrix], output: Any) -> None:
        """That module returned ``output``: its matrices go back to their masters."""
        self.ctx.scope.leave_part(self.perturbation, self.part, matrices, output)

    def _run_parts(self, entry: Wrapped, pieces: list, merged: torch.Tensor | None) -> list:
        """Each part's output of ``entry``, under that part's weights; with ``merged``, the parts write
        their rows of it (a plain Linear) and the outputs are those rows."""
        outputs, row = [], 0
        for part, (part_args, part_kwargs) in enumerate(pieces):
            self.part = part
            for param, unit, k in entry.refs:
                view = self.weights[unit.index].views[part][k]
                if view is not None:
                    param.data = view
            self.enter_matrices(entry.matrices)
            if merged is None:
                output = entry.forward(*part_args, **part_kwargs)
            else:
                output = merged[row:row + part_args[0].shape[0]]
                linear_part_into(entry.member.module, part_args[0], output)
                row += output.shape[0]
            self.leave_matrices(entry.matrices, output)
            outputs.append(output)
        return outputs

    def _keep_aliased(self, entry: Wrapped, output: Any) -> None:
        """An unmerged output that is a view of a perturbed copy keeps that copy out of the pool."""
        for unit in entry.units:
            lent = self.weights[unit.index].lent
            for copy in list(lent):
                if aliases(output, copy):
                    self.ctx.pool.forget(copy)
                    lent.remove(copy)

    def _done(self, entry: Wrapped) -> None:
        for unit in entry.units:
            unit.point_params_at(unit.master)
            self.readers_left[unit.index] -= 1
            if self.readers_left[unit.index] == 0:  # last reader done: free the perturbed weights
                self._let_go(unit)

    def _let_go(self, unit: Unit) -> None:
        for copy in self.weights.pop(unit.index).lent:
            self.ctx.pool.give(copy)
        if unit.index in self.slots_held:
            self.slots_held.discard(unit.index)
            self.ctx.residency.release(unit)

    def abandon(self) -> None:
        """After an interrupted forward: return every perturbed copy to the pool."""
        for weights in self.weights.values():
            for copy in weights.lent:
                self.ctx.pool.give(copy)
        self.weights.clear()
