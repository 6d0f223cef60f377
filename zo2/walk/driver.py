"""The walk driver: runs a batch's walks over the model and returns each part's loss statistics.

A batch's path: its objective's targets are split off (:func:`zo2.objectives.split_batch`), the batch
layout is calibrated once per signature (:mod:`.batching`), the batch is replicated once per part and the
model's own forward runs on it (one :class:`~.walk.Walk`), the output is split per part and the objective
turns each part's output into a (loss sum, count) pair. The driver also owns what surrounds every forward
of a wrapped model: the routing of member calls (inside a walk to the walk, outside to a plain call on the
current weights), eval mode without autograd, and putting every parameter back on its master however the
forward ends.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from ..methods import Method, Part
from ..objectives import Objective, split_batch
from ..offload.residency import Residency
from ..units.partition import Partition, no_cache_kwargs
from ..units.storage import BufferPool, Unit
from ..updates.log import UpdateLog
from .batching import (
    Calibration,
    MemberSpec,
    batch_signature,
    batch_size,
    calibration_inputs,
    calibration_rows,
    replicate_batch,
    split_output,
    tree_map,
)
from .role import STATS_COLUMNS
from .scope import SCOPES, Matrix
from .walk import Walk, WalkContext
from .wrapping import Wrapped, unwrap, wrap


class WalkDriver:
    """Runs walks over ``model``'s wrapped members and plain forwards on its current weights."""

    def __init__(self, model: nn.Module, partition: Partition, units: list[Unit], residency: Residency,
                 method: Method, log: UpdateLog, scope: str, device: torch.device) -> None:
        self.model, self.device, self.residency = model, device, residency
        self._forward = model.forward
        self._no_cache = no_cache_kwargs(model)
        strategy = SCOPES[scope]()
        hooks = (self._enter_matrices, self._leave_matrices) if strategy.hooks_matrices else None
        self._wrapped, self._hooks = wrap(partition, units, self._member_call, matrix_hooks=hooks)
        readers = {unit.index: sum(unit in entry.units for entry in self._wrapped) for unit in units}
        self._ctx = WalkContext(method, log, strategy, residency, BufferPool(device), readers)
        self._apply = method.apply
        self._specs: dict[tuple, dict[str, MemberSpec]] = {}
        self._walk: Walk | None = None
        self._calibration: Calibration | None = None

    # ------------------------------------------------------------------------------- walks
    def evaluate(self, batch: Mapping[str, Any], objective: Objective | None, parts: list[Part], eps: float,
                 max_parts_per_walk: int | None = None) -> torch.Tensor:
        """Each of ``parts``' (loss sum, count) on ``batch`` under ``objective`` (None: the task loss), as a
        [parts, 2] float64 CPU tensor; at most ``max_parts_per_walk`` parts run in one walk."""
        inputs, terms_of = split_batch(self.model, self._to_device(batch), objective)
        rows = batch_size(inputs)
        cap = max_parts_per_walk or len(parts) or 1
        stats = torch.zeros(len(parts), len(STATS_COLUMNS), dtype=torch.float64)
        for first in range(0, len(parts), cap):
            stats[first:first + cap] = self._walk_stats(inputs, terms_of, parts[first:first + cap], eps, rows)
        return stats

    def _walk_stats(self, inputs: dict[str, Any], terms_of, parts: list[Part], eps: float, rows: int) -> torch.Tensor:
        """One walk over ``parts``: each part's (loss sum, count) as a [parts, 2] float64 tensor."""
        count = len(parts)
        specs = self._calibrated(inputs, rows) if count > 1 else {}
        with self._forward_context():
            self._walk = Walk(self._ctx, parts, eps, rows, specs)
            try:
                output = self._call_model(replicate_batch(inputs, rows, count) if count > 1 else inputs)
            except BaseException:
                self._walk.abandon()
                raise
            finally:
                self._walk = None
        outputs = split_output(output, rows, count) if count > 1 else [output]
        with torch.no_grad():
            terms = [terms_of(out).to(torch.float64) for out in outputs]
        return torch.stack([t.to(terms[0].device) for t in terms]).cpu()  # one device sync per walk

    def _calibrated(self, inputs: dict[str, Any], rows: int) -> dict[str, MemberSpec]:
        """The batch layout of every member's inputs and outputs, from two small plain forwards (cached per
        batch signature)."""
        key = batch_signature(inputs)
        if key not in self._specs:
            self._calibration = Calibration()
            try:
                for run, chosen in enumerate(calibration_rows(inputs, rows)):
                    self._calibration.run = run
                    with self._forward_context(streaming=False):
                        self._call_model(calibration_inputs(inputs, rows, chosen))
                self._specs[key] = self._calibration.specs()
            finally:
                self._calibration = None
        return self._specs[key]

    # ------------------------------------------------------------------------------ forwards
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's own forward on its current weights (the caller flushed pending updates), in eval
        mode without autograd; tensors go to the working device, ``use_cache`` defaults to off."""
        args = tree_map(lambda _, t: t.to(self.device), args)
        kwargs = tree_map(lambda _, t: t.to(self.device), kwargs)
        for key, value in self._no_cache.items():
            kwargs.setdefault(key, value)
        with self._forward_context():
            return self._forward(*args, **kwargs)

    def _call_model(self, inputs: Mapping[str, Any]) -> Any:
        return self._forward(**inputs, **self._no_cache)

    def _to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    @contextlib.contextmanager
    def _forward_context(self, streaming: bool = True) -> Iterator[None]:
        """Eval mode (no dropout: every part must see the same function), no autograd, and every parameter
        pointed back at its master afterwards, even when the forward raised. ``streaming`` starts the
        prefetch of offloaded units (calibration streams nothing)."""
        was_training = self.model.training
        self.model.eval()
        if streaming:
            self.residency.start_pass()
        try:
            with torch.no_grad():
                yield
        except BaseException:  # members re-point their parameters as they finish; an abort may skip that
            self.residency.point_at_masters()
            raise
        finally:
            self.model.train(was_training)
            self.residency.end_pass()

    # -------------------------------------------------------------------------- member calls
    def _member_call(self, entry: Wrapped, args: tuple, kwargs: dict) -> Any:
        if self._walk is not None:
            return self._walk.member(entry, args, kwargs)
        return self._plain_member(entry, args, kwargs)

    def _enter_matrices(self, matrices: list[Matrix]) -> None:
        if self._walk is not None:
            self._walk.enter_matrices(matrices)

    def _leave_matrices(self, matrices: list[Matrix], output: Any) -> None:
        if self._walk is not None:
            self._walk.leave_matrices(matrices, output)

    def _plain_member(self, entry: Wrapped, args: tuple, kwargs: dict) -> Any:
        """A member's call outside a walk, on its units' current weights (calibration: on zeros of the right
        shape for offloaded units, which records shapes without uploading anything)."""
        streamed, stand_ins = [], []
        for unit in entry.units:
            if unit.offloaded and self._calibration is not None:
                stand_ins.append(unit)
                unit.point_params_at(torch.zeros(unit.numel, dtype=unit.master.dtype, device=self.device))
                continue
            buffer = self.residency.current(unit, self._apply)
            if unit.offloaded:
                unit.point_params_at(buffer)
                streamed.append(unit)
        try:
            output = entry.forward(*args, **kwargs)
        finally:
            for unit in stand_ins + streamed:
                unit.point_params_at(unit.master)
            for unit in streamed:
                self.residency.release(unit)
        if self._calibration is not None:
            self._calibration.record(entry.member.name, args, kwargs, output)
        return output

    def unwrap(self) -> None:
        """Give every member its own forward back and drop the working buffers (the model is plain again)."""
        unwrap(self._wrapped, self._hooks)
        self._wrapped, self._hooks = [], []
        self._ctx.pool.clear()
