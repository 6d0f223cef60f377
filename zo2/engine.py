"""ZOEngine: MeZO-SGD over a model's units, with the dual forward and delayed, fused updates.

One step: double the batch, run the model's own forward once (every unit computes its first half
under theta + eps*z and its second under theta - eps*z), take the per-half losses, and record the
update (seed, g, lr). The update is applied to each unit the next time it is on the working device,
fused with that step's perturbation, so an offloaded block crosses the bus once up and once down.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from . import dual, losses, noise
from .config import ZOConfig
from .optim import Update, apply_updates, update_and_perturb
from .scheduler import TransferScheduler
from .storage import SlotPool, Unit, build_unit
from .models import Member, find_partition

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepResult:
    """What one ZO step measured and decided."""

    loss: float
    """Loss of the +eps pass (what ZO2's ``model(...)`` returns in training mode)."""
    loss_minus: float
    """Loss of the -eps pass."""
    projected_grad: float
    """g = (loss - loss_minus) / (2 eps): the directional derivative along z."""
    lr: float
    seed: int
    """Seed of z for this step (a pure function of the config seed and the step)."""
    step: int


@dataclass
class _Wrapped:
    member: Member
    forward: Callable
    refs: list[tuple[nn.Parameter, Unit, int]]
    units: list[Unit]


class _Walk:
    """State of one dual forward: the perturbed buffers of the units in flight."""

    def __init__(self, seed: int, half: int, specs: dict[str, dual.MemberSpec]) -> None:
        self.seed, self.half, self.specs = seed, half, specs
        self.views: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self.readers_left: dict[int, int] = {}


class ZOEngine:
    """Zeroth-order training of a Hugging Face model in place.

    ``ZOEngine(model, config)`` moves the model's parameters into flat per-unit storage (resident on
    ``config.working_device`` or offloaded to ``config.offloading_device``) and wraps its modules.
    ``step(batch)`` performs one MeZO-SGD step; ``forward(**batch)`` runs the model normally with the
    current weights; ``flush()`` applies pending updates; ``detach()`` hands back a plain model.
    """

    def __init__(self, model: nn.Module, config: ZOConfig, *,
                 lr_schedule: Callable[[int], float] | None = None) -> None:
        config.validate()
        self.model, self.config = model, config
        self.lr_schedule = lr_schedule
        """Optional ``step -> lr``; ``None`` uses ``config.lr`` at every step."""
        self.history: list[Update] = []
        """Every update so far: with the base weights, the whole training run (see ``zo2.replay``)."""
        self.step_count = 0
        self.device = torch.device(config.working_device)
        self._forward = model.forward
        self._use_cache_kw = self._accepts(self._forward, "use_cache")
        self._specs: dict[tuple, dict[str, dual.MemberSpec]] = {}
        self._walk: _Walk | None = None
        self._calibration: dual.Calibration | None = None
        partition = find_partition(model)
        self.units = self._place(partition)
        self._wrapped = self._wrap_members(partition)
        self._readers = {unit.index: sum(unit in entry.units for entry in self._wrapped) for unit in self.units}
        offloaded = [u for u in self.units if u.offloaded]
        self._scheduler = None
        if offloaded:
            pool = SlotPool(config.num_slots, max(u.numel for u in offloaded), offloaded[0].master.dtype, self.device)
            self._scheduler = TransferScheduler(offloaded, pool, self.device)
        logger.debug("zo2 units:\n%s", self.describe())

    # ----------------------------------------------------------------------------------- set-up
    @staticmethod
    def _accepts(fn: Callable, name: str) -> bool:
        params = inspect.signature(fn).parameters
        return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())

    def _place(self, partition) -> list[Unit]:
        """Build every unit's flat master, one unit at a time (never two copies of the model)."""
        cfg = self.config
        unit_members = partition.unit_members()
        offload = {i + 1 for i in cfg.offloaded_block_indices(len(partition.blocks))}
        offload_device = torch.device(cfg.offloading_device)
        pin = self.device.type == "cuda" and offload_device.type == "cpu"
        seen: set[int] = set()
        units = []
        for index, (name, members) in enumerate(unit_members):
            params = []
            for member in members:
                for param in member.module.parameters():
                    if id(param) not in seen:
                        seen.add(id(param))
                        params.append(param)
            offloaded = index in offload
            units.append(build_unit(index, name, params, device=offload_device if offloaded else self.device,
                                    dtype=cfg.torch_storage_dtype, pin=pin and offloaded, offloaded=offloaded))
        self._move_buffers()
        on_device = sum(u.numel for u in units if not u.offloaded)
        moved = sum(u.numel for u in units if u.offloaded)
        logger.info("zo2 placed %d units: %.1fM parameters resident on %s, %.1fM offloaded to %s (%d of %d blocks)",
                    len(units), on_device / 1e6, self.device, moved / 1e6, offload_device,
                    len(offload), len(partition.blocks))
        return units

    def _move_buffers(self) -> None:
        for module in self.model.modules():
            for key, buf in module._buffers.items():
                if buf is not None and buf.device != self.device:
                    module._buffers[key] = buf.to(self.device)

    def _wrap_members(self, partition) -> list[_Wrapped]:
        owner = {id(p): (unit, k) for unit in self.units for k, p in enumerate(unit.params)}
        wrapped = []
        for _, members in partition.unit_members():
            for member in members:
                refs = [(p, *owner[id(p)]) for p in member.module.parameters()]
                units = list({id(u): u for _, u, _ in refs}.values())
                entry = _Wrapped(member, member.module.forward, refs, units)
                member.module.forward = self._make_forward(entry)
                wrapped.append(entry)
        return wrapped

    def _make_forward(self, entry: _Wrapped) -> Callable:
        def forward(*args, **kwargs):
            if self._walk is not None:
                return self._dual_member(entry, args, kwargs)
            return self._plain_member(entry, args, kwargs)
        return forward

    # -------------------------------------------------------------------------------- forwards
    @contextlib.contextmanager
    def _forward_context(self):
        """Eval mode (no dropout: both halves must see the same function), no autograd, and every
        parameter pointed back at its master afterwards, even when the forward raised."""
        was_training = self.model.training
        self.model.eval()
        if self._scheduler is not None:
            self._scheduler.restart()
        try:
            with torch.no_grad():
                yield
        except BaseException:  # members re-point their parameters as they finish; an abort may skip that
            for unit in self.units:
                unit.point_params_at(unit.master)
            raise
        finally:
            self.model.train(was_training)
            if self._scheduler is not None:
                self._scheduler.reset()

    def _call_model(self, inputs: Mapping[str, Any]) -> Any:
        extra = {"use_cache": False} if self._use_cache_kw else {}
        return self._forward(**inputs, **extra)

    def _sync(self, unit: Unit) -> torch.Tensor:
        """Apply the unit's pending updates; return a working-device buffer holding its weights.

        For an offloaded unit the buffer is a slot: the caller releases it."""
        buffer = self._scheduler.acquire(unit) if unit.offloaded else unit.master
        updates = self.history[unit.applied:]
        if updates:
            apply_updates(buffer, unit, updates, noise_kind=self.config.noise, weight_decay=self.config.weight_decay)
            unit.applied = len(self.history)
            if unit.offloaded:
                self._scheduler.write_back(unit, buffer)
        return buffer

    def _plain_member(self, entry: _Wrapped, args: tuple, kwargs: dict) -> Any:
        streamed = []
        for unit in entry.units:
            buffer = self._sync(unit)
            if unit.offloaded:
                unit.point_params_at(buffer)
                streamed.append(unit)
        try:
            output = entry.forward(*args, **kwargs)
        finally:
            for unit in streamed:
                unit.point_params_at(unit.master)
                self._scheduler.release(unit)
        if self._calibration is not None:
            self._calibration.record(entry.member.name, args, kwargs, output)
        return output

    def _ready(self, unit: Unit) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The unit's parameter views under +eps and -eps for this walk; the first call of a step
        applies the pending update fused with the new perturbation."""
        walk = self._walk
        if unit.index not in walk.views:
            updates = self.history[unit.applied:]
            buffer = self._scheduler.acquire(unit) if unit.offloaded else unit.master
            plus, minus = update_and_perturb(buffer, unit, updates, walk.seed, self.config.eps,
                                             noise_kind=self.config.noise, weight_decay=self.config.weight_decay)
            unit.applied = len(self.history)
            if unit.offloaded:
                if updates:
                    self._scheduler.write_back(unit, buffer)
                self._scheduler.release(unit)
            walk.views[unit.index] = (unit.views(plus), unit.views(minus))
            walk.readers_left[unit.index] = self._readers[unit.index]
        return walk.views[unit.index]

    def _dual_member(self, entry: _Wrapped, args: tuple, kwargs: dict) -> Any:
        walk, name = self._walk, entry.member.name
        for unit in entry.units:
            self._ready(unit)
        spec = walk.specs.get(name, dual.MemberSpec())
        first, second, was_split = dual.split_inputs(spec, args, kwargs, walk.half, name)
        outputs = []
        for sign, (half_args, half_kwargs) in enumerate((first, second)):
            for param, unit, k in entry.refs:
                param.data = walk.views[unit.index][sign][k]
            outputs.append(entry.forward(*half_args, **half_kwargs))
        for unit in entry.units:
            unit.point_params_at(unit.master)
            walk.readers_left[unit.index] -= 1
            if walk.readers_left[unit.index] == 0:  # last reader done: free the perturbed buffers
                del walk.views[unit.index]
        return dual.merge_outputs(spec, outputs[0], outputs[1], walk.half, was_split, name)

    def _calibrated(self, inputs: dict[str, Any], half: int) -> dict[str, dual.MemberSpec]:
        key = dual.batch_signature(inputs)
        if key not in self._specs:
            self._calibration = dual.Calibration()
            try:
                for run, rows in enumerate(dual.calibration_rows(inputs, half)):
                    self._calibration.run = run
                    with self._forward_context():
                        self._call_model(dual.select_rows(inputs, half, rows))
                self._specs[key] = self._calibration.specs()
            finally:
                self._calibration = None
        return self._specs[key]

    def _to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    # ------------------------------------------------------------------------------ public API
    def step(self, batch: Mapping[str, Any]) -> StepResult:
        """One MeZO-SGD step on ``batch`` (a dict of model inputs plus ``labels`` or the task's targets).

        Returns the losses of both passes, the projected gradient, the learning rate and the seed.
        The update is recorded now and applied to each unit when it is next used (or by ``flush``).
        """
        inputs, targets = losses.split_targets(self.model, self._to_device(batch))
        half = losses.batch_size(inputs)
        specs = self._calibrated(inputs, half)
        step = self.step_count
        seed = noise.step_seed(self.config.seed, step)
        lr = float(self.lr_schedule(step)) if self.lr_schedule is not None else self.config.lr
        with self._forward_context():
            self._walk = _Walk(seed, half, specs)
            try:
                output = self._call_model(dual.double_batch(inputs, half))
            finally:
                self._walk = None
        loss_plus, loss_minus = losses.half_losses(self.model, output, targets, half)
        projected_grad = (loss_plus - loss_minus) / (2 * self.config.eps)
        if not torch.isfinite(torch.tensor(projected_grad)):
            raise FloatingPointError(f"step {step}: non-finite losses ({loss_plus}, {loss_minus}); no update was "
                                     "recorded. Lower ZOConfig.lr or eps, or check the batch's labels")
        self.history.append(Update(seed, projected_grad, lr))
        self.step_count += 1
        return StepResult(loss_plus, loss_minus, projected_grad, lr, seed, step)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's normal forward with the current weights (pending updates applied first),
        in eval mode and without autograd; offloaded blocks stream through the slots.

        Tensor arguments are moved to the working device; ``use_cache`` defaults to False (pass
        ``use_cache=True`` explicitly, as ``generate`` does, to build a KV cache)."""
        self.flush()
        args = dual.tree_map(lambda _, t: t.to(self.device), args)
        kwargs = dual.tree_map(lambda _, t: t.to(self.device), kwargs)
        if self._use_cache_kw:
            kwargs.setdefault("use_cache", False)
        with self._forward_context():
            return self._forward(*args, **kwargs)

    def flush(self) -> None:
        """Apply every pending update to the masters (before evaluation, saving or export)."""
        for unit in self.units:
            if unit.applied < len(self.history):
                self._sync(unit)
                if unit.offloaded:
                    self._scheduler.release(unit)
        if self._scheduler is not None:
            self._scheduler.synchronize_host()
            self._scheduler.reset()

    def detach(self) -> nn.Module:
        """Flush, remove zo2's wrappers and return the model; its parameters stay views of the masters
        (offloaded blocks on the offloading device: call ``.to(device)`` to gather them)."""
        self.flush()
        for entry in self._wrapped:
            del entry.member.module.forward
        self._wrapped = []
        return self.model

    def describe(self) -> str:
        """A table of the units: name, parameters, dtype and where the master lives."""
        rows = [f"{'unit':<14}{'params':>14}  {'dtype':<10}where"]
        for unit in self.units:
            where = f"{unit.master.device} (offloaded)" if unit.offloaded else f"{unit.master.device} (resident)"
            rows.append(f"{unit.name:<14}{unit.numel:>14,}  {str(unit.master.dtype).replace('torch.', ''):<10}{where}")
        return "\n".join(rows)


def replay(model: nn.Module, updates: list[Update], config: ZOConfig) -> ZOEngine:
    """Rebuild fine-tuned weights: ``model`` must hold the base weights and ``config`` the training
    run's storage settings; every update is applied in order, exactly as training applied it."""
    engine = ZOEngine(model, config)
    engine.history = list(updates)
    engine.step_count = len(engine.history)
    engine.flush()
    return engine
