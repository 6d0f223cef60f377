"""ZOEngine: zeroth-order training of a model's units, a thin façade over the pieces that do the work.

One step: the method (:mod:`zo2.methods`) names the evaluations it needs (parts: theta + s*eps*z_k);
they run in as few walks over the model as ``max_parts_per_walk`` allows, each walk being the model's
own forward on the batch replicated once per part (:mod:`zo2.walk`); the per-part losses become the
step's updates (scalars only), recorded in the update log (:mod:`zo2.history`). Each unit applies its
pending updates the next time it is on the working device, fused with that walk's perturbation, so an
offloaded block crosses the bus once up and once down per walk.

A step is ``accumulate`` (every walk of a micro-batch, adding per-part loss sums and counts) then
``commit`` (one all-reduce of those statistics when distributed, then the method's decision). A
``Role`` (:mod:`zo2.role`) says which parts this process computes, which is all data, perturbation
and direction parallelism need from the engine. Placement is :mod:`zo2.placement`, perturbation scopes
:mod:`zo2.scope`, member wrapping :mod:`zo2.wrapping`, transfers :mod:`zo2.scheduler`.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from . import kernels
from .config import ZOConfig
from .kernels import apply_updates, update_and_perturb
from .methods import Part, method_class
from .objectives import task_loss
from .objectives.base import Objective, as_objective, terms
from .objectives.task_loss import TASK_LOSS
from .offload.disk.staging import DiskTransferScheduler
from .offload.placement import WeightSource, place
from .offload.transfers import TransferScheduler
from .result import StepResult
from .units.partition import UnsupportedModelError, find_partition, no_cache_kwargs
from .units.storage import BufferPool, SlotPool, Unit
from .updates import noise
from .updates.log import HistoryError, Update, UpdateLog
from .walk import batching
from .walk.role import STATS_COLUMNS, Role
from .walk.scope import SCOPES, Matrix
from .walk.walk import Walk, WalkContext
from .walk.wrapping import Wrapped, unwrap, wrap

logger = logging.getLogger(__name__)


class ZOEngine:
    """Zeroth-order training of a Hugging Face (or plain PyTorch) model in place.

    ``ZOEngine(model, config)`` moves the model's parameters into flat per-unit storage (resident on
    ``config.working_device`` or offloaded to ``config.offloading_device``) and wraps its modules.
    ``step(batch)`` performs one step of ``config.method`` (``accumulate`` + ``commit`` for gradient
    accumulation); ``forward(**batch)`` runs the model normally with the current weights; ``flush()``
    applies pending updates; ``detach()`` hands back a plain model; ``state_dict()`` is what a
    checkpoint needs; ``log`` is the update history.

    ``objective``: what steps minimise (:mod:`zo2.objectives`; default: the model's task loss), e.g. a
    metric or a reward; ``step(batch, objective=...)`` overrides it for one step. ``probe_inputs``: a tiny
    batch of keyword arguments for the probe forward that finds the units (needed for models that are not
    transformers models).
    """

    def __init__(self, model: nn.Module, config: ZOConfig, *,
                 lr_schedule: Callable[[int], float] | None = None, role: Role | None = None,
                 objective: Objective | Callable | None = None, probe_inputs: Mapping[str, Any] | None = None,
                 weights: WeightSource | None = None) -> None:
        config.validate()
        self.model, self.config = model, config
        self.role = role or Role()
        self.objective = as_objective(objective)
        """The default objective of steps (``None``: the model's task loss)."""
        self.device = torch.device(config.working_device)
        self.lr_schedule = lr_schedule
        """Optional ``step -> lr``; ``None`` uses ``config.lr`` under ``config.lr_scheduler``."""
        method_type = method_class(config.method)
        self.log = UpdateLog(config.num_directions, generator=noise.GENERATOR_VERSION)
        """The update history: every update, and how far each unit's master has applied it."""
        self.method = method_type(config, self.log)
        self._check_role()
        self._stats: torch.Tensor | None = None  # [parts, 2] sums of the micro-batches of the current step
        self._forward = model.forward
        self._no_cache = no_cache_kwargs(model)
        self._specs: dict[tuple, dict[str, batching.MemberSpec]] = {}
        self._walk: Walk | None = None
        self._calibration: batching.Calibration | None = None
        partition = find_partition(model, dict(probe_inputs) if probe_inputs is not None else None)
        if config.perturbation_scope == "module" and not partition.matrices_read_by_owner:
            raise UnsupportedModelError(
                f"{type(model).__name__} reads a weight matrix outside the module that owns it, so "
                "ZOConfig.perturbation_scope='module' cannot perturb it there; use 'unit' or 'auto'")
        placement = place(model, partition, config, self.device, weights)
        self.units, self.scope = placement.units, placement.scope
        """``scope``: ``"unit"`` or ``"module"``, the resolved ``ZOConfig.perturbation_scope``."""
        self.store = placement.store
        """The files of the disk-offloaded units (:class:`zo2.offload.disk.store.DiskStore`), or None."""
        strategy = SCOPES[self.scope]()
        hooks = (self._enter_matrices, self._leave_matrices) if strategy.hooks_matrices else None
        self._wrapped, self._hooks = wrap(partition, self.units, self._member_call, matrix_hooks=hooks)
        self._scheduler = self._make_scheduler()
        readers = {unit.index: sum(unit in entry.units for entry in self._wrapped) for unit in self.units}
        self._ctx = WalkContext(self.method, self.log, strategy, self._scheduler, BufferPool(self.device), readers,
                                config.write_back_every)
        self.method.prepare(self.trainable_units)
        self._warm_up()
        logger.debug("zo2 units:\n%s", self.describe())

    # ----------------------------------------------------------------------------------- set-up
    def _check_role(self) -> None:
        q = self.config.num_directions
        if self.role.directions is not None and (any(d >= q for d in self.role.directions)
                                                 or len(set(self.role.directions)) != len(self.role.directions)):
            raise ValueError(f"Role.directions={self.role.directions!r} is invalid for ZOConfig.num_directions={q}: "
                             f"expected distinct indices in [0, {q})")
        parts = self.method.parts(self.seeds(0))
        if self.role.all_reduce is None and not all(self.role.selects(p) for p in parts):
            raise ValueError(f"{self.role} computes only part of each step: it needs Role.all_reduce to combine "
                             "its losses with the processes that compute the rest (see zo2.distributed)")

    def _make_scheduler(self) -> TransferScheduler | None:
        offloaded = [u for u in self.units if u.offloaded]
        if not offloaded:
            return None
        if self.store is not None:  # disk-offloaded units stream through staging buffers (zo2.staging)
            return DiskTransferScheduler(offloaded, self.store, self.log, self.config.num_slots, self.device)
        pool = SlotPool.for_units(self.config.num_slots, offloaded, self.device)
        return (self.role.make_scheduler or TransferScheduler)(offloaded, pool, self.device)

    def _kernel_args(self) -> dict[str, Any]:
        cfg = self.config
        return dict(noise_kind=cfg.noise, weight_decay=cfg.weight_decay, backend=cfg.kernels)

    def _warm_up(self) -> None:
        """Run the update and perturbation calls of a step once on a scratch buffer, so that compiling
        them (building the fused CPU kernel, Triton's JIT) happens at load time and not in the first step."""
        size = min(max((u.numel for u in self.trainable_units), default=1), kernels.WARM_UP_NUMEL)
        kwargs = self._kernel_args()
        pending = [Update(seed=0, projected_grad=0.0, lr=0.0)]
        signs = sorted({p.sign for p in self.method.parts(self.seeds(0)) if p.sign}, reverse=True)
        for dtype in {u.master.dtype for u in self.trainable_units}:
            buffer = torch.zeros(size, dtype=dtype, device=self.device)
            scratch = Unit(index=0, name="warm-up", params=[], master=buffer, offloaded=False, n_decay=size // 2)
            apply_updates(buffer, scratch, pending, **kwargs)  # flush, and module scope's update pass
            for updates, chosen in ((pending, signs), ((), signs), *(((), [s]) for s in signs)):
                update_and_perturb(buffer, scratch, updates, 0, self.config.eps, signs=chosen, **kwargs)

    # ---------------------------------------------------------------------------- member calls
    def _member_call(self, entry: Wrapped, args: tuple, kwargs: dict) -> Any:
        if self._walk is not None:
            return self._walk.member(entry, args, kwargs)
        return self._plain_member(entry, args, kwargs)

    def _enter_matrices(self, matrices: list[Matrix]) -> None:
        if self._walk is not None:
            self._ctx.scope.enter_part(self._walk, matrices)

    def _leave_matrices(self, matrices: list[Matrix], output: Any) -> None:
        if self._walk is not None:
            self._ctx.scope.leave_part(self._walk, matrices, output)

    def _sync(self, unit: Unit) -> torch.Tensor:
        """Apply the unit's pending updates; return a working-device buffer holding its weights.

        For an offloaded unit the buffer is a slot: the caller releases it."""
        buffer = self._scheduler.acquire(unit) if unit.offloaded else unit.master
        steps = self.log.pending(unit.index) if unit.trainable else range(0)
        if steps:
            self.method.apply(buffer, unit, steps)
            self.log.mark_applied(unit.index)
            if unit.offloaded:
                self._scheduler.write_back(unit, buffer)
        return buffer

    def _plain_member(self, entry: Wrapped, args: tuple, kwargs: dict) -> Any:
        streamed, stand_ins = [], []
        for unit in entry.units:
            if unit.offloaded and self._calibration is not None:
                # calibration records shapes only: zero weights of the right size, and no upload
                stand_ins.append(unit)
                unit.point_params_at(torch.zeros(unit.numel, dtype=unit.master.dtype, device=self.device))
                continue
            buffer = self._sync(unit)
            if unit.offloaded:
                unit.point_params_at(buffer)
                streamed.append(unit)
        try:
            output = entry.forward(*args, **kwargs)
        finally:
            for unit in stand_ins + streamed:
                unit.point_params_at(unit.master)
            for unit in streamed:
                self._scheduler.release(unit)
        if self._calibration is not None:
            self._calibration.record(entry.member.name, args, kwargs, output)
        return output

    # -------------------------------------------------------------------------------- forwards
    @contextlib.contextmanager
    def _forward_context(self, streaming: bool = True):
        """Eval mode (no dropout: every part must see the same function), no autograd, and every
        parameter pointed back at its master afterwards, even when the forward raised. ``streaming``
        starts the prefetch of offloaded units (calibration streams nothing)."""
        was_training = self.model.training
        self.model.eval()
        if self._scheduler is not None and streaming:
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
        return self._forward(**inputs, **self._no_cache)

    def _calibrated(self, inputs: dict[str, Any], batch: int) -> dict[str, batching.MemberSpec]:
        key = batching.batch_signature(inputs)
        if key not in self._specs:
            self._calibration = batching.Calibration()
            try:
                for run, rows in enumerate(batching.calibration_rows(inputs, batch)):
                    self._calibration.run = run
                    with self._forward_context(streaming=False):
                        self._call_model(batching.calibration_inputs(inputs, batch, rows))
                self._specs[key] = self._calibration.specs()
            finally:
                self._calibration = None
        return self._specs[key]

    def _to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _split(self, batch: dict[str, Any], objective: Objective | None) -> tuple[dict[str, Any], Callable]:
        """(model inputs, per-part terms function) of a batch under ``objective``."""
        if objective is None:
            inputs, targets = task_loss.split_targets(self.model, batch)
            return inputs, lambda out: TASK_LOSS(self.model, out, targets)
        inputs = {k: v for k, v in batch.items() if k not in objective.targets}
        return inputs, lambda out: terms(objective(out, batch), f"objective {objective.name!r}")

    def _walk_stats(self, inputs: dict[str, Any], terms_of: Callable, parts: list[Part], eps: float,
                    batch: int) -> torch.Tensor:
        """Run one walk over ``parts``; return each part's (loss sum, count) as a [parts, 2] float64 tensor."""
        count = len(parts)
        specs = self._calibrated(inputs, batch) if count > 1 else {}
        with self._forward_context():
            self._walk = Walk(self._ctx, parts, eps, batch, specs)
            try:
                output = self._call_model(batching.replicate_batch(inputs, batch, count) if count > 1 else inputs)
            except BaseException:
                self._walk.abandon()
                raise
            finally:
                self._walk = None
        outputs = batching.split_output(output, batch, count) if count > 1 else [output]
        with torch.no_grad():
            terms = [terms_of(out).to(torch.float64) for out in outputs]
        return torch.stack([t.to(terms[0].device) for t in terms]).cpu()  # one device sync per walk

    # ------------------------------------------------------------------------------ public API
    @property
    def trainable_units(self) -> list[Unit]:
        """The units holding trainable parameters (the ones perturbed and updated)."""
        return [u for u in self.units if u.trainable]

    @property
    def history(self) -> list[Update]:
        """Every update so far (a copy): with the base weights, the whole training run (``zo2.replay``)."""
        return self.log.updates()

    @property
    def step_count(self) -> int:
        """Steps committed so far."""
        return self.log.steps

    def seeds(self, step: int) -> list[int]:
        """The seeds of z for each of the ``num_directions`` directions of ``step``."""
        q = self.config.num_directions
        return [noise.step_seed(self.config.seed, step * q + d) for d in range(q)]

    def parts(self, step: int | None = None) -> list[Part]:
        """The evaluations of ``step`` (default: the current one), in the method's order."""
        return self.method.parts(self.seeds(self.step_count if step is None else step))

    def accumulate(self, batch: Mapping[str, Any], objective: Objective | Callable | None = None) -> None:
        """Evaluate this process's parts of the current step on one (micro-)batch.

        ``batch`` is a dict of model inputs plus ``labels`` (or the objective's targets). Every micro-batch
        of a step sees the same weights and seeds; ``commit`` turns their summed losses into the update.
        ``objective`` overrides the engine's for this batch."""
        chosen_objective = as_objective(objective) or self.objective
        inputs, terms_of = self._split(self._to_device(batch), chosen_objective)
        batch_rows = batching.batch_size(inputs)
        parts = self.parts()
        chosen = [i for i, part in enumerate(parts) if self.role.selects(part)]
        cap = self.config.max_parts_per_walk or len(chosen)
        eps = self.config.eps_at(self.step_count)
        stats = torch.zeros(len(parts), len(STATS_COLUMNS), dtype=torch.float64)
        for first in range(0, len(chosen), cap):
            group = chosen[first:first + cap]
            stats[group] = self._walk_stats(inputs, terms_of, [parts[i] for i in group], eps, batch_rows)
        self._stats = stats if self._stats is None else self._stats + stats

    def _lr(self, step: int, lr: float | None) -> float:
        if lr is not None:
            return float(lr)
        if self.lr_schedule is not None:
            return float(self.lr_schedule(step))
        return self.config.lr * self.config.lr_factor(step)

    def commit(self, lr: float | None = None) -> StepResult:
        """Finish the step: combine the accumulated losses (across processes when distributed) and
        record the method's updates, applied to each unit when it is next used (or by ``flush``).

        ``lr`` overrides the schedule for this step (a Trainer's scheduler passes it here)."""
        if self._stats is None:
            raise RuntimeError("commit() without accumulate(): evaluate at least one batch in this step")
        stats, self._stats = self._stats, None
        if self.role.all_reduce is not None:
            stats = self.role.all_reduce(stats)
        step, seeds = self.step_count, self.seeds(self.step_count)
        lr, eps = self._lr(step, lr), self.config.eps_at(step)
        part_losses = (stats[:, 0] / stats[:, 1]).tolist()
        decision = self.method.decide(part_losses, seeds, lr, eps)
        if not all(math.isfinite(x) for u in decision.updates for x in (u.projected_grad, u.lr)):
            raise FloatingPointError(f"step {step}: non-finite losses or updates (part losses {part_losses}); no "
                                     "update was recorded. Lower ZOConfig.lr or eps, or check the batch's labels")
        self.log.append_step(decision.updates)
        return StepResult(decision.loss, decision.loss_minus, decision.projected_grad, lr, seeds[0], step,
                          decision.updates, tuple(part_losses), eps)

    def step(self, batch: Mapping[str, Any] | Sequence[Mapping[str, Any]], lr: float | None = None, *,
             objective: Objective | Callable | None = None) -> StepResult:
        """One step of ``config.method`` on ``batch``, or on a list of micro-batches (gradient accumulation).

        Returns the losses, the projected gradient, the learning rate and the seed. The updates are
        recorded now and applied to each unit when it is next used (or by ``flush``). ``objective``
        overrides the engine's for this step."""
        for micro_batch in ([batch] if isinstance(batch, Mapping) else batch):
            self.accumulate(micro_batch, objective)
        return self.commit(lr)

    def state_dict(self, *, include_log: bool = True) -> dict[str, Any]:
        """JSON-serialisable training state: the step count, the config, the method's own state and
        (unless ``include_log=False``, for checkpoints that keep the log in their seed log) the update log."""
        state = {"step_count": self.step_count, "config": self.config.to_dict(),
                 "method_state": self.method.state_dict()}
        if include_log:
            state["log"] = self.log.to_json()
        return state

    def load_state_dict(self, state: Mapping[str, Any], *, weights_updated: bool = True) -> None:
        """Restore ``state_dict()``'s state. ``weights_updated=True``: the model's weights already hold
        every update (a flushed checkpoint); False: they are the base weights and the log is applied
        when each unit is next used (as ``replay`` does). A state trained with another noise kind, method
        shape or noise generator is refused (its z would differ)."""
        saved = state.get("config", {})
        for name in ("noise", "method"):
            if saved.get(name, getattr(self.config, name)) != getattr(self.config, name):
                raise ValueError(f"the state was trained with ZOConfig.{name}={saved[name]!r}, this engine has "
                                 f"{getattr(self.config, name)!r}: the updates' z would differ")
        log = state.get("log", state)
        try:
            loaded = UpdateLog.from_json(log, updates_per_step=self.method.updates_per_step,
                                         generator=noise.GENERATOR_VERSION)
        except HistoryError as err:
            raise ValueError(f"the training state {err}") from None
        if loaded.steps != int(state.get("step_count", loaded.steps)):
            raise ValueError(f"the state says {state['step_count']} steps but its log holds {loaded.steps}")
        self.flush()
        self.log.replace(loaded.updates())
        self.log.set_applied_everywhere([u.index for u in self.trainable_units],
                                        self.log.steps if weights_updated else 0)
        self.method.load_state_dict(state.get("method_state", {}))
        self._stats = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's normal forward with the current weights (pending updates applied first),
        in eval mode and without autograd; offloaded blocks stream through the slots.

        Tensor arguments are moved to the working device; ``use_cache`` defaults to False (pass
        ``use_cache=True`` explicitly, as ``generate`` does, to build a KV cache)."""
        self.flush()
        args = batching.tree_map(lambda _, t: t.to(self.device), args)
        kwargs = batching.tree_map(lambda _, t: t.to(self.device), kwargs)
        for key, value in self._no_cache.items():
            kwargs.setdefault(key, value)
        with self._forward_context():
            return self._forward(*args, **kwargs)

    def flush(self) -> None:
        """Apply every pending update to the masters (before evaluation, saving or export)."""
        for unit in self.trainable_units:
            if self.log.pending(unit.index):
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
        unwrap(self._wrapped, self._hooks)
        self._wrapped, self._hooks = [], []
        self._ctx.pool.clear()
        return self.model

    def bytes_moved(self) -> tuple[int, int]:
        """(bytes uploaded to, bytes written back from) the working device since construction."""
        if self._scheduler is None:
            return 0, 0
        return self._scheduler.bytes_up, self._scheduler.bytes_down

    def describe(self) -> str:
        """A table of the units: name, parameters, dtype and where the master lives."""
        rows = [f"method: {self.config.method}", f"perturbation scope: {self.scope}",
                f"{'unit':<14}{'params':>14}  {'dtype':<10}where"]
        for unit in self.units:
            where = f"{unit.master.device} ({'offloaded' if unit.offloaded else 'resident'}"
            if self.store is not None and self.store.holds(unit):
                where = f"disk ({self.store.path(unit.index).name}"
            where += ")" if unit.trainable else ", frozen)"
            rows.append(f"{unit.name:<14}{unit.numel:>14,}  {str(unit.master.dtype).replace('torch.', ''):<10}{where}")
        return "\n".join(rows)


def replay(model: nn.Module, updates: Sequence[Update], config: ZOConfig) -> ZOEngine:
    """Rebuild fine-tuned weights: ``model`` must hold the base weights and ``config`` the training
    run's settings; every update is applied in order, exactly as training applied it."""
    engine = ZOEngine(model, config)
    log = UpdateLog(engine.method.updates_per_step, updates, generator=noise.GENERATOR_VERSION)
    engine.load_state_dict({"log": log.to_json()}, weights_updated=False)
    engine.flush()
    return engine
