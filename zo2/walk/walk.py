"""One walk over the model: the model's own forward on the batch replicated once per part, every
wrapped member computing part k of its inputs under part k's weights (theta + s_k*eps*z_k).

A unit's weights for the walk are prepared when its first reader runs (:meth:`Walk.ready`): the
pending updates of the update log are applied (fused with the perturbation), an offloaded master is
written back when due, and the scope strategy (:mod:`zo2.scope`) writes the perturbed weights. They
are let go when the unit's last reader is done, so an offloaded block holds a slot only while needed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..methods import Method, Part
from ..offload.transfers import TransferScheduler
from ..units.storage import BufferPool, Unit
from ..updates.log import UpdateLog
from .batching import MemberSpec, linear_part_into, merge_outputs, split_inputs, writes_parts_in_place
from .scope import ModuleScope, UnitScope, aliases
from .wrapping import Wrapped


@dataclass
class WalkContext:
    """What every walk of an engine shares."""

    method: Method
    log: UpdateLog
    scope: UnitScope | ModuleScope
    scheduler: TransferScheduler | None
    pool: BufferPool
    readers: dict[int, int]
    """Per unit index, how many wrapped members read the unit."""
    write_back_every: int


class Walk:
    """State of one walk: the parts it evaluates and the perturbed weights in flight."""

    def __init__(self, ctx: WalkContext, parts: list[Part], eps: float, part_batch: int,
                 specs: dict[str, MemberSpec]) -> None:
        self.ctx, self.parts, self.eps, self.part_batch, self.specs = ctx, parts, eps, part_batch, specs
        self.part = 0
        """Index into ``parts`` of the part being computed."""
        self.views: dict[int, list[list[torch.Tensor | None]]] = {}
        """Per unit in flight, per part: each parameter's perturbed view (None: perturbed by its module)."""
        self.buffers: dict[int, torch.Tensor] = {}
        """Module scope: the updated weights of each unit in flight, which matrices are perturbed from."""
        self.lent: dict[int, list[torch.Tensor]] = {}
        """Per unit in flight, the pool buffers holding its perturbed copies."""
        self.readers_left: dict[int, int] = {}
        self.slots_held: set[int] = set()

    def ready(self, unit: Unit) -> None:
        """Make the unit's weights of every part available (first reader of the walk only)."""
        if unit.index in self.views:
            return
        ctx = self.ctx
        buffer = ctx.scheduler.acquire(unit) if unit.offloaded else unit.master
        self.readers_left[unit.index] = ctx.readers[unit.index]
        if not unit.trainable:  # frozen: every part reads the weights themselves; nothing to write back
            self.views[unit.index] = [unit.views(buffer)] * len(self.parts)
            if unit.offloaded:
                self.slots_held.add(unit.index)
            return
        steps = ctx.log.pending(unit.index)
        reads_buffer = ctx.scope.ready(self, unit, buffer, steps)
        if not unit.offloaded:
            ctx.log.mark_applied(unit.index)
        else:
            # the host master may lag: its pending updates are replayed on every upload until due
            if len(steps) >= ctx.write_back_every:
                ctx.scheduler.write_back(unit, buffer)
                ctx.log.mark_applied(unit.index)
            if reads_buffer:
                self.slots_held.add(unit.index)
            else:
                ctx.scheduler.release(unit)

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

    def _run_parts(self, entry: Wrapped, pieces: list, merged: torch.Tensor | None) -> list:
        """Each part's output of ``entry``, under that part's weights; with ``merged``, the parts write
        their rows of it (a plain Linear) and the outputs are those rows."""
        outputs, row = [], 0
        for part, (part_args, part_kwargs) in enumerate(pieces):
            self.part = part
            for param, unit, k in entry.refs:
                view = self.views[unit.index][part][k]
                if view is not None:
                    param.data = view
            self.ctx.scope.enter_part(self, entry.matrices)
            if merged is None:
                output = entry.forward(*part_args, **part_kwargs)
            else:
                output = merged[row:row + part_args[0].shape[0]]
                linear_part_into(entry.member.module, part_args[0], output)
                row += output.shape[0]
            self.ctx.scope.leave_part(self, entry.matrices, output)
            outputs.append(output)
        return outputs

    def _keep_aliased(self, entry: Wrapped, output: Any) -> None:
        """An unmerged output that is a view of a perturbed copy keeps that copy out of the pool."""
        for unit in entry.units:
            for copy in list(self.lent.get(unit.index, ())):
                if aliases(output, copy):
                    self.ctx.pool.forget(copy)
                    self.lent[unit.index].remove(copy)

    def _done(self, entry: Wrapped) -> None:
        for unit in entry.units:
            unit.point_params_at(unit.master)
            self.readers_left[unit.index] -= 1
            if self.readers_left[unit.index] == 0:  # last reader done: free the perturbed weights
                self._let_go(unit)

    def _let_go(self, unit: Unit) -> None:
        del self.views[unit.index]
        self.buffers.pop(unit.index, None)
        for copy in self.lent.pop(unit.index, ()):
            self.ctx.pool.give(copy)
        if unit.index in self.slots_held:
            self.slots_held.discard(unit.index)
            self.ctx.scheduler.release(unit)

    def abandon(self) -> None:
        """After an interrupted forward: return every perturbed copy to the pool."""
        for copies in self.lent.values():
            for copy in copies:
                self.ctx.pool.give(copy)
        self.lent.clear()
        self.views.clear()
        self.buffers.clear()
