"""ZOEngine: zeroth-order training of a model's units, a façade over the packages that do the work.

One step: the method (:mod:`zo2.methods`) names the evaluations it needs (parts: theta + s*eps*z_k); the
walk driver (:mod:`zo2.walk`) runs them in as few walks over the model as ``max_parts_per_walk`` allows,
each the model's own forward on the batch replicated once per part, and returns every part's loss; the
method turns those into the step's updates (scalars only), recorded in the update log
(:mod:`zo2.updates`). Each unit applies its pending updates the next time it is on the working device,
fused with that walk's perturbation, so an offloaded block crosses the bus once up and once down per walk.
Where units live and when masters are written back is :mod:`zo2.offload`'s job.

A step is ``accumulate`` (every walk of a micro-batch, adding per-part loss sums and counts) then
``commit`` (one all-reduce of those statistics when distributed, then the method's decision). A ``Role``
(:mod:`zo2.walk.role`) says which parts this process computes, which is all data, perturbation and
direction parallelism need from the engine.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .config import ZOConfig
from .methods import Part, method_class
from .methods.defaults import LearningRate, out_of_scale
from .objectives import Objective, as_objective
from .offload.disk.materialise import materialise
from .offload.disk.store import DiskStore
from .offload.placement import WeightSource, place
from .offload.residency import Residency
from .persist.fingerprint import model_fingerprint
from .result import StepResult
from .units.partition import UnsupportedModelError, find_partition
from .units.storage import Unit
from .updates import noise
from .updates.log import HistoryError, Update, UpdateLog
from .walk.driver import WalkDriver
from .walk.role import STATS_COLUMNS, Role

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
    transformers models). ``weights``: where the units' weights come from when the parameters do not hold
    them (:mod:`zo2.loading` streams them from a checkpoint).
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
        """Optional ``step -> lr``; ``None`` uses :attr:`lr` under ``config.lr_scheduler``."""
        self.learning_rate = LearningRate.requested(config.method, config.lr)
        """The lr steps use and where it came from (``ZOConfig.lr`` resolved; a search sets it for "auto")."""
        if self.learning_rate.source == "given" and (warning := out_of_scale(config.method, config.lr)):
            logger.warning("ZOConfig.%s", warning)
        self.log = UpdateLog(config.num_directions, generator=noise.GENERATOR_VERSION)
        """The update history: every update, and how far each unit's master has applied it."""
        self.method = method_class(config.method)(config, self.log)
        self.role.check(self.method.parts(self.seeds(0)), config.num_directions)
        self._stats: torch.Tensor | None = None  # [parts, 2] sums of the micro-batches of the current step
        self.base_fingerprint = weights.fingerprint if weights is not None else \
            model_fingerprint(model, config.torch_storage_dtype)
        """The fingerprint of the weights the run started from (:mod:`zo2.persist.fingerprint`; None: unknown),
        written into seed logs so that ``zo2 replay`` can check its base."""
        partition = find_partition(model, dict(probe_inputs) if probe_inputs is not None else None)
        if config.perturbation_scope == "module" and not partition.matrices_read_by_owner:
            raise UnsupportedModelError(
                f"{type(model).__name__} reads a weight matrix outside the module that owns it, so "
                "ZOConfig.perturbation_scope='module' cannot perturb it there; use 'unit' or 'auto'")
        placement = place(model, partition, config, self.device, weights)
        self.units, self.scope = placement.units, placement.scope
        """``scope``: ``"unit"`` or ``"module"``, the resolved ``ZOConfig.perturbation_scope``."""
        self.residency = Residency(self.units, self.log, self.device, store=placement.store,
                                   num_slots=config.num_slots, write_back_every=config.write_back_every,
                                   make_scheduler=self.role.make_scheduler)
        """Where every unit's weights are (:class:`zo2.offload.residency.Residency`)."""
        self._driver = WalkDriver(model, partition, self.units, self.residency, self.method, self.log, self.scope,
                                  self.device)
        self.method.prepare(self.trainable_units)
        self.method.warm_up(self.trainable_units, self.device)
        logger.debug("zo2 units:\n%s", self.describe())

    # ------------------------------------------------------------------------------ what it holds
    @property
    def store(self) -> DiskStore | None:
        """The files of the disk-offloaded units (:class:`zo2.offload.disk.store.DiskStore`), or None."""
        return self.residency.store

    @property
    def trainable_units(self) -> list[Unit]:
        """The units holding trainable parameters (the ones perturbed and updated)."""
        return [u for u in self.units if u.trainable]

    @property
    def history(self) -> list[Update]:
        """Every update so far (a copy): with the base weights, the whole training run (``zo2.replay``)."""
        return self.log.updates()

    @property
    def lr(self) -> float | None:
        """The learning rate of steps before their schedule factor (None: ``lr="auto"`` not searched yet)."""
        return self.learning_rate.value

    @lr.setter
    def lr(self, value: float | str | None) -> None:
        """Ask for another lr for the next steps (as ``ZOConfig.lr`` takes it: a number, None for the method's
        default, "auto" to search again); steps already recorded keep theirs."""
        self.config.lr = value  # validated on assignment
        self.learning_rate = LearningRate.requested(self.config.method, value)

    @property
    def lr_source(self) -> str:
        """Where :attr:`lr` came from: ``"given"``, ``"default of <method>"`` or ``"auto search"``."""
        return self.learning_rate.source

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

    # ---------------------------------------------------------------------------- the step protocol
    def accumulate(self, batch: Mapping[str, Any], objective: Objective | Callable | None = None) -> None:
        """Evaluate this process's parts of the current step on one (micro-)batch.

        ``batch`` is a dict of model inputs plus ``labels`` (or the objective's targets). Every micro-batch
        of a step sees the same weights and seeds; ``commit`` turns their summed losses into the update.
        ``objective`` overrides the engine's for this batch."""
        parts = self.parts()
        chosen = [i for i, part in enumerate(parts) if self.role.selects(part)]
        stats = torch.zeros(len(parts), len(STATS_COLUMNS), dtype=torch.float64)
        stats[chosen] = self._driver.evaluate(batch, as_objective(objective) or self.objective,
                                              [parts[i] for i in chosen], self.config.eps_at(self.step_count),
                                              self.config.max_parts_per_walk)
        self._stats = stats if self._stats is None else self._stats + stats

    def loss(self, batch: Mapping[str, Any], objective: Objective | Callable | None = None) -> float:
        """The mean loss of ``objective`` (default: the engine's) on ``batch`` at the current weights, without
        perturbation, combined over processes when distributed (a validation score)."""
        stats = self._driver.evaluate(batch, as_objective(objective) or self.objective, [Part(None, 0, 0, "clean")],
                                      self.config.eps_at(self.step_count))
        if self.role.all_reduce is not None:
            stats = self.role.all_reduce(stats)
        return float(stats[0, 0] / stats[0, 1])

    def _lr(self, step: int, lr: float | None) -> float:
        if lr is not None:
            return float(lr)
        if self.lr_schedule is not None:
            return float(self.lr_schedule(step))
        if self.lr is None:
            raise RuntimeError("ZOConfig.lr='auto' has not been searched yet: call zo2.tuning.search_lr(engine, "
                               "batches, validation) before the first step, or pass lr to step()")
        return self.lr * self.config.lr_factor(step)

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

    # ------------------------------------------------------------------------------------ state
    def state_dict(self, *, include_log: bool = True) -> dict[str, Any]:
        """JSON-serialisable training state: the step count, the config, the method's own state and
        (unless ``include_log=False``, for checkpoints that keep the log in their seed log) the update log."""
        state = {"step_count": self.step_count, "config": self.config.to_dict(),
                 "method_state": self.method.state_dict(), "learning_rate": self.learning_rate.to_json(),
                 "base_fingerprint": self.base_fingerprint}
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
        try:
            loaded = UpdateLog.from_json(state.get("log", state), updates_per_step=self.method.updates_per_step,
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
        if "learning_rate" in state:  # a searched lr is not searched again
            self.learning_rate = LearningRate.from_json(state["learning_rate"])
        if "base_fingerprint" in state or (weights_updated and loaded.steps):  # else the weights are the base
            self.base_fingerprint = state.get("base_fingerprint")
        self._stats = None

    # --------------------------------------------------------------------------- the plain model
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's normal forward with the current weights (pending updates applied first),
        in eval mode and without autograd; offloaded blocks stream through the slots.

        Tensor arguments are moved to the working device; ``use_cache`` defaults to False (pass
        ``use_cache=True`` explicitly, as ``generate`` does, to build a KV cache)."""
        self.flush()
        return self._driver.forward(*args, **kwargs)

    def flush(self) -> None:
        """Apply every pending update to the masters (before evaluation, saving or export)."""
        self.residency.flush(self.method.apply)

    def detach(self) -> nn.Module:
        """Flush, remove zo2's wrappers and return the model; its parameters stay views of the masters
        (offloaded blocks on the offloading device: call ``.to(device)`` to gather them). Disk-offloaded
        weights are read into host memory when they fit there, else this raises, naming
        ``zo2.loading.save_pretrained`` (:func:`zo2.offload.disk.materialise.materialise`). The engine is
        not stepped afterwards."""
        self.flush()
        if self.store is not None:
            materialise(self.store, self.units)
        self._driver.unwrap()
        return self.model

    def bytes_moved(self) -> tuple[int, int]:
        """(bytes uploaded to, bytes written back from) the working device since construction."""
        return self.residency.bytes_moved()

    def describe(self) -> str:
        """A table of the units: name, parameters, dtype and where the master lives."""
        return f"method: {self.config.method}\nperturbation scope: {self.scope}\n{self.residency.describe()}"


def replay(model: nn.Module, updates: Sequence[Update], config: ZOConfig) -> ZOEngine:
    """Rebuild fine-tuned weights: ``model`` must hold the base weights and ``config`` the training
    run's settings; every update is applied in order, exactly as training applied it."""
    engine = ZOEngine(model, config)
    log = UpdateLog(engine.method.updates_per_step, updates, generator=noise.GENERATOR_VERSION)
    engine.load_state_dict({"log": log.to_json()}, weights_updated=False)
    engine.flush()
    return engine
