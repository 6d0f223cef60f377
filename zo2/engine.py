"""ZOEngine: MeZO-SGD over a model's units, with the dual forward and delayed, fused updates.

One step: double the batch, run the model's own forward once (every unit computes its first half
under theta + eps*z and its second under theta - eps*z), take the per-half losses, and record the
update (seed, g, lr). The update is applied to each unit the next time it is on the working device,
fused with that step's perturbation, so an offloaded block crosses the bus once up and once down.

A step is ``accumulate`` (one walk per micro-batch and direction, adding loss sums and counts) then
``commit`` (one all-reduce of those statistics when distributed, then the updates). A ``Role`` says
which directions and sides this process computes, which is all data, perturbation and direction
parallelism need from the engine.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from . import dual, kernels, losses, noise, plan
from .config import ZOConfig
from .history import Update
from .kernels import apply_updates, update_and_perturb
from .scheduler import TransferScheduler
from .storage import SlotPool, Unit, build_unit
from .models import Member, UnsupportedModelError, find_partition

logger = logging.getLogger(__name__)

SIDES = {"plus": 1, "minus": -1}
#: Columns of the per-direction statistics: loss sum and count of the +eps side, then of the -eps side.
STATS_COLUMNS = ("loss_sum_plus", "count_plus", "loss_sum_minus", "count_minus")


@dataclass(frozen=True)
class Role:
    """What this process computes of each step, and how its statistics meet the other processes'.

    A single process computes every direction on both sides. Distributed modes give each process a
    part: data parallel (same role, a shard of the batch), perturbation parallel (one side each),
    multi-direction (some directions each); ``all_reduce`` sums the [q, 4] float64 statistics
    (see ``STATS_COLUMNS``) over all processes, zeros standing for what a process did not compute.
    """

    directions: tuple[int, ...] | None = None
    """Directions (0 .. q-1) this process evaluates; ``None``: all of them."""
    sides: tuple[str, ...] = ("plus", "minus")
    """``("plus", "minus")`` (one batch-doubled walk), ``("plus",)`` or ``("minus",)``."""
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Returns the elementwise sum over all processes of a float64 CPU tensor; ``None``: one process."""
    make_scheduler: Callable[[list[Unit], SlotPool, torch.device], TransferScheduler] | None = None
    """Builds the transfer scheduler of the offloaded units (e.g. sliced transfers); ``None``: the default."""

    def __post_init__(self) -> None:
        if not self.sides or len(set(self.sides)) != len(self.sides) or not set(self.sides) <= set(SIDES):
            raise ValueError(f"Role.sides={self.sides!r} is invalid: expected ('plus', 'minus'), ('plus',) "
                             "or ('minus',)")
        if self.directions is not None and (not self.directions or any(d < 0 for d in self.directions)):
            raise ValueError(f"Role.directions={self.directions!r} is invalid: expected None or non-empty "
                             "direction indices >= 0")


@dataclass(frozen=True)
class StepResult:
    """What one ZO step measured and decided."""

    loss: float
    """Loss of the +eps pass (what ZO2's ``model(...)`` returns in training mode); the mean over
    directions when ``num_directions > 1``."""
    loss_minus: float
    """Loss of the -eps pass."""
    projected_grad: float
    """g = (loss - loss_minus) / (2 eps): the directional derivative along z (mean over directions)."""
    lr: float
    seed: int
    """Seed of z for this step's first direction (a pure function of the config seed and the step)."""
    step: int
    updates: tuple[Update, ...] = ()
    """The updates recorded by this step, one per direction (``lr / q`` each)."""


@dataclass
class _Matrix:
    """A weight matrix perturbed by its owner module's own call (module-scoped perturbation)."""

    param: nn.Parameter
    unit: Unit
    k: int

    def master_view(self) -> torch.Tensor:
        """Its view into the unit's current master (sliced transfers may replace the master buffer)."""
        start = self.unit.offsets[self.k]
        return self.unit.master[start:start + self.param.numel()].view(self.param.shape)


@dataclass
class _Wrapped:
    member: Member
    forward: Callable
    refs: list[tuple[nn.Parameter, Unit, int]]
    units: list[Unit]
    matrices: list[_Matrix]
    """Module scope: the weight matrices the member module owns itself (perturbed per half here, as
    module hooks would fire once around both halves)."""


class _Walk:
    """State of one perturbed forward: the signs it evaluates and the perturbed buffers in flight."""

    def __init__(self, seed: int, signs: tuple[int, ...], half: int, specs: dict[str, dual.MemberSpec]) -> None:
        self.seed, self.signs, self.half, self.specs = seed, signs, half, specs
        self.side = 0
        """Index into ``signs`` of the half being computed."""
        self.views: dict[int, list[list[torch.Tensor | None]]] = {}
        """Per unit in flight, per side: each parameter's perturbed view (None: a matrix perturbed by its module)."""
        self.buffers: dict[int, torch.Tensor] = {}
        """Module scope: the updated weights of each unit in flight, which matrices are perturbed from."""
        self.readers_left: dict[int, int] = {}


class ZOEngine:
    """Zeroth-order training of a Hugging Face model in place.

    ``ZOEngine(model, config)`` moves the model's parameters into flat per-unit storage (resident on
    ``config.working_device`` or offloaded to ``config.offloading_device``) and wraps its modules.
    ``step(batch)`` performs one MeZO-SGD step (``accumulate`` + ``commit`` for gradient accumulation);
    ``forward(**batch)`` runs the model normally with the current weights; ``flush()`` applies pending
    updates; ``detach()`` hands back a plain model; ``state_dict()`` is what a checkpoint needs.
    """

    def __init__(self, model: nn.Module, config: ZOConfig, *,
                 lr_schedule: Callable[[int], float] | None = None, role: Role | None = None) -> None:
        config.validate()
        self.model, self.config = model, config
        self.role = role or Role()
        self._directions = self._check_directions(self.role, config.num_directions)
        if self.role.all_reduce is None and (len(self.role.sides) < 2 or len(self._directions) < config.num_directions):
            raise ValueError(f"{self.role} computes only part of each step: it needs Role.all_reduce to combine "
                             "its losses with the processes that compute the rest (see zo2.distributed)")
        self._signs = tuple(SIDES[side] for side in self.role.sides)
        self._stats: torch.Tensor | None = None  # [q, 4] sums of the micro-batches of the current step
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
        if config.perturbation_scope == "module" and not partition.matrices_read_by_owner:
            raise UnsupportedModelError(
                f"{type(model).__name__} reads a weight matrix outside the module that owns it, so "
                "ZOConfig.perturbation_scope='module' cannot perturb it there; use 'unit' or 'auto'")
        self.units = self._place(partition)
        self.scope = self._choose_scope(partition.matrices_read_by_owner)
        """``"unit"`` or ``"module"``: the resolved ``ZOConfig.perturbation_scope``."""
        self._hooks: list = []
        self._wrapped = self._wrap_members(partition)
        self._readers = {unit.index: sum(unit in entry.units for entry in self._wrapped) for unit in self.units}
        offloaded = [u for u in self.units if u.offloaded]
        self._scheduler = None
        if offloaded:
            pool = SlotPool(config.num_slots, max(u.numel for u in offloaded), offloaded[0].master.dtype, self.device)
            self._scheduler = (self.role.make_scheduler or TransferScheduler)(offloaded, pool, self.device)
        self._warm_up()
        logger.debug("zo2 units:\n%s", self.describe())

    # ----------------------------------------------------------------------------------- set-up
    @staticmethod
    def _check_directions(role: Role, q: int) -> tuple[int, ...]:
        directions = tuple(range(q)) if role.directions is None else tuple(role.directions)
        if any(d >= q for d in directions) or len(set(directions)) != len(directions):
            raise ValueError(f"Role.directions={role.directions!r} is invalid for ZOConfig.num_directions={q}: "
                             f"expected distinct indices in [0, {q})")
        return directions

    @staticmethod
    def _accepts(fn: Callable, name: str) -> bool:
        params = inspect.signature(fn).parameters
        return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())

    def _place(self, partition) -> list[Unit]:
        """Build every unit's flat master, one unit at a time (never two copies of the model)."""
        cfg = self.config
        unit_params = self._unit_params(partition)
        offload = {i + 1 for i in self._offloaded_blocks(partition.matrices_read_by_owner)}
        offload_device = torch.device(cfg.offloading_device)
        pin = self.device.type == "cuda" and offload_device.type == "cpu"
        units = []
        for index, (name, params) in enumerate(unit_params):
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

    @staticmethod
    def _unit_params(partition) -> list[tuple[str, list[nn.Parameter]]]:
        """Each unit's parameters; a parameter shared by several units (tied) belongs to the first."""
        seen: set[int] = set()
        units = []
        for name, members in partition.unit_members():
            params = []
            for member in members:
                for param in member.module.parameters():
                    if id(param) not in seen:
                        seen.add(id(param))
                        params.append(param)
            units.append((name, params))
        return units

    def _offloaded_blocks(self, module_scope_ok: bool) -> list[int]:
        """Block indices to offload: the config's choice, or what ``gpu_memory_budget`` cannot hold."""
        sizes = plan.model_sizes(self.model, self.config.torch_storage_dtype)
        offloaded = plan.offloaded_blocks(self.config, sizes, module_scope_ok, self.device.type == "cuda")
        if self.config.gpu_memory_budget is not None:
            logger.info("zo2 gpu_memory_budget %.2f GB: %d of %d blocks offloaded",
                        self.config.gpu_memory_budget / 1e9, len(offloaded), len(sizes.blocks))
        return offloaded

    def _choose_scope(self, module_scope_ok: bool) -> str:
        streams = any(u.offloaded for u in self.units)
        if streams and not module_scope_ok and self.config.perturbation_scope == "auto" and self.device.type == "cuda":
            logger.info("zo2: %s reads weight matrices outside their modules; perturbing whole units",
                        type(self.model).__name__)
        return plan.resolve_scope(self.config, streams, module_scope_ok, self.device.type == "cuda")

    def _warm_up(self) -> None:
        """Run the update and perturbation calls of a step once on a scratch buffer, so that compiling
        them (building the fused CPU kernel, Triton's JIT) happens at load time and not in the first step."""
        size = min(max(u.numel for u in self.units), kernels.WARM_UP_NUMEL)
        kwargs = self._kernel_args()
        pending = [Update(seed=0, projected_grad=0.0, lr=0.0)]
        for dtype in {u.master.dtype for u in self.units}:
            buffer = torch.zeros(size, dtype=dtype, device=self.device)
            scratch = Unit(index=0, name="warm-up", params=[], master=buffer, offloaded=False, n_decay=size // 2)
            apply_updates(buffer, scratch, pending, **kwargs)  # flush, and module scope's update pass
            for updates, signs in ((pending, self._signs), ((), self._signs), *(((), (s,)) for s in self._signs)):
                update_and_perturb(buffer, scratch, updates, 0, self.config.eps, signs=signs, **kwargs)

    def _kernel_args(self) -> dict[str, Any]:
        """The config's arguments of every update and perturbation pass (:mod:`zo2.kernels`)."""
        return dict(noise_kind=self.config.noise, weight_decay=self.config.weight_decay, backend=self.config.kernels)

    def _move_buffers(self) -> None:
        for module in self.model.modules():
            for key, buf in module._buffers.items():
                if buf is not None and buf.device != self.device:
                    module._buffers[key] = buf.to(self.device)

    def _wrap_members(self, partition) -> list[_Wrapped]:
        owner = {id(p): (unit, k) for unit in self.units for k, p in enumerate(unit.params)}
        wrapped, hooked = [], set()
        for _, members in partition.unit_members():
            for member in members:
                refs = [(p, *owner[id(p)]) for p in member.module.parameters()]
                units = list({id(u): u for _, u, _ in refs}.values())
                entry = _Wrapped(member, member.module.forward, refs, units, [])
                if self.scope == "module":
                    entry.matrices = self._matrices_of(member.module, owner)
                    self._hook_matrix_owners(member.module, owner, hooked)
                member.module.forward = self._make_forward(entry)
                wrapped.append(entry)
        return wrapped

    @staticmethod
    def _matrices_of(module: nn.Module, owner: dict) -> list[_Matrix]:
        """The weight matrices ``module`` owns directly (not through submodules)."""
        return [_Matrix(p, *owner[id(p)]) for p in module.parameters(recurse=False) if p.dim() >= 2]

    def _hook_matrix_owners(self, member_module: nn.Module, owner: dict, hooked: set[int]) -> None:
        """Module scope: every module below a member that owns weight matrices perturbs them for the
        half being computed when it is called, and lets the perturbed copies go when it returns."""
        for module in member_module.modules():
            matrices = self._matrices_of(module, owner)
            if module is member_module or not matrices or id(module) in hooked:
                continue
            hooked.add(id(module))
            self._hooks.append(module.register_forward_pre_hook(
                lambda m, args, matrices=matrices: self._perturb_matrices(matrices)))
            self._hooks.append(module.register_forward_hook(
                lambda m, args, out, matrices=matrices: self._release_matrices(matrices), always_call=True))

    def _perturb_matrices(self, matrices: list[_Matrix]) -> None:
        walk = self._walk
        if walk is None:
            return
        sign = walk.signs[walk.side]
        for matrix in matrices:
            start, size = matrix.unit.offsets[matrix.k], matrix.param.numel()
            weights = walk.buffers[matrix.unit.index][start:start + size]
            [perturbed] = update_and_perturb(weights, matrix.unit, (), walk.seed, self.config.eps, signs=(sign,),
                                             offset=start, **self._kernel_args())
            matrix.param.data = perturbed.view(matrix.param.shape)

    def _release_matrices(self, matrices: list[_Matrix]) -> None:
        """Point the module's matrices back at their masters, so their perturbed copies can be freed."""
        if self._walk is not None:
            for matrix in matrices:
                matrix.param.data = matrix.master_view()

    def _make_forward(self, entry: _Wrapped) -> Callable:
        def forward(*args, **kwargs):
            if self._walk is not None:
                return self._dual_member(entry, args, kwargs)
            return self._plain_member(entry, args, kwargs)
        return forward

    # -------------------------------------------------------------------------------- forwards
    @contextlib.contextmanager
    def _forward_context(self, streaming: bool = True):
        """Eval mode (no dropout: both halves must see the same function), no autograd, and every
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
        extra = {"use_cache": False} if self._use_cache_kw else {}
        return self._forward(**inputs, **extra)

    def _sync(self, unit: Unit) -> torch.Tensor:
        """Apply the unit's pending updates; return a working-device buffer holding its weights.

        For an offloaded unit the buffer is a slot: the caller releases it."""
        buffer = self._scheduler.acquire(unit) if unit.offloaded else unit.master
        updates = self.history[unit.applied:]
        if updates:
            apply_updates(buffer, unit, updates, **self._kernel_args())
            unit.applied = len(self.history)
            if unit.offloaded:
                self._scheduler.write_back(unit, buffer)
        return buffer

    def _plain_member(self, entry: _Wrapped, args: tuple, kwargs: dict) -> Any:
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
            for unit in stand_ins:
                unit.point_params_at(unit.master)
            for unit in streamed:
                unit.point_params_at(unit.master)
                self._scheduler.release(unit)
        if self._calibration is not None:
            self._calibration.record(entry.member.name, args, kwargs, output)
        return output

    def _ready(self, unit: Unit) -> None:
        """Make the unit's perturbed weights of this walk available; the first call of a step applies
        the pending update fused with the new perturbation (of the whole unit in unit scope, of its
        vectors in module scope: matrices are perturbed by their modules from ``walk.buffers``)."""
        walk = self._walk
        if unit.index in walk.views:
            return
        updates = self.history[unit.applied:]
        buffer = self._scheduler.acquire(unit) if unit.offloaded else unit.master
        kwargs = self._kernel_args()
        if self.scope == "unit":
            perturbed = update_and_perturb(buffer, unit, updates, walk.seed, self.config.eps, signs=walk.signs,
                                           **kwargs)
            walk.views[unit.index] = [unit.views(copy) for copy in perturbed]
        else:
            if updates:
                apply_updates(buffer, unit, updates, **kwargs)
            vectors = update_and_perturb(buffer[unit.n_decay:], unit, (), walk.seed, self.config.eps,
                                         signs=walk.signs, offset=unit.n_decay, **kwargs)
            walk.views[unit.index] = [[None if start < unit.n_decay else copy[start - unit.n_decay:][:p.numel()]
                                       .view(p.shape) for p, start in zip(unit.params, unit.offsets)]
                                      for copy in vectors]
            walk.buffers[unit.index] = buffer
        if not unit.offloaded:
            unit.applied = len(self.history)
        else:
            # the host master may lag: its pending updates are replayed on every upload until due
            if len(updates) >= self.config.write_back_every * self.config.num_directions:
                self._scheduler.write_back(unit, buffer)
                unit.applied = len(self.history)
            if self.scope == "unit":  # module scope reads the slot until the unit's last reader is done
                self._scheduler.release(unit)
        walk.readers_left[unit.index] = self._readers[unit.index]

    def _dual_member(self, entry: _Wrapped, args: tuple, kwargs: dict) -> Any:
        walk, name = self._walk, entry.member.name
        for unit in entry.units:
            self._ready(unit)
        if len(walk.signs) == 1:  # one side: the plain forward under that side's weights
            halves, was_split, spec = [(args, kwargs)], False, None
        else:
            spec = walk.specs.get(name, dual.MemberSpec())
            first, second, was_split = dual.split_inputs(spec, args, kwargs, walk.half, name)
            halves = [first, second]
        outputs = []
        for side, (half_args, half_kwargs) in enumerate(halves):
            walk.side = side
            for param, unit, k in entry.refs:
                view = walk.views[unit.index][side][k]
                if view is not None:
                    param.data = view
            self._perturb_matrices(entry.matrices)
            outputs.append(entry.forward(*half_args, **half_kwargs))
        for unit in entry.units:
            unit.point_params_at(unit.master)
            walk.readers_left[unit.index] -= 1
            if walk.readers_left[unit.index] == 0:  # last reader done: free the perturbed buffers
                del walk.views[unit.index]
                if walk.buffers.pop(unit.index, None) is not None and unit.offloaded:
                    self._scheduler.release(unit)
        if len(outputs) == 1:
            return outputs[0]
        return dual.merge_outputs(spec, outputs[0], outputs[1], walk.half, was_split, name)

    def _calibrated(self, inputs: dict[str, Any], half: int) -> dict[str, dual.MemberSpec]:
        key = dual.batch_signature(inputs)
        if key not in self._specs:
            self._calibration = dual.Calibration()
            try:
                for run, rows in enumerate(dual.calibration_rows(inputs, half)):
                    self._calibration.run = run
                    with self._forward_context(streaming=False):
                        self._call_model(dual.calibration_inputs(inputs, half, rows))
                self._specs[key] = self._calibration.specs()
            finally:
                self._calibration = None
        return self._specs[key]

    def _to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    # ------------------------------------------------------------------------------ public API
    def seeds(self, step: int) -> list[int]:
        """The seeds of z for each of the ``num_directions`` directions of ``step``."""
        q = self.config.num_directions
        return [noise.step_seed(self.config.seed, step * q + d) for d in range(q)]

    def _walk_stats(self, inputs: dict[str, Any], targets: dict[str, Any], seed: int,
                    specs: dict[str, dual.MemberSpec] | None, half: int) -> torch.Tensor:
        """Run one perturbed walk; return its (loss sum, count) per side in ``STATS_COLUMNS`` order."""
        with self._forward_context():
            self._walk = _Walk(seed, self._signs, half, specs or {})
            try:
                output = self._call_model(dual.double_batch(inputs, half) if specs is not None else inputs)
            finally:
                self._walk = None
        outputs = losses.split_output(output, half) if specs is not None else (output,)
        terms = [losses.loss_terms(self.model, out, targets) for out in outputs]
        row = torch.zeros(4, dtype=torch.float64)
        for sign, pair in zip(self._signs, torch.stack(terms).cpu()):  # one device sync per walk
            start = 0 if sign > 0 else 2
            row[start:start + 2] = pair
        return row

    def accumulate(self, batch: Mapping[str, Any]) -> None:
        """Evaluate this process's directions and sides of the current step on one (micro-)batch.

        ``batch`` is a dict of model inputs plus ``labels`` (or the task's targets). Every micro-batch of
        a step sees the same weights and seeds; ``commit`` turns their summed losses into the update."""
        inputs, targets = losses.split_targets(self.model, self._to_device(batch))
        half = losses.batch_size(inputs)
        specs = self._calibrated(inputs, half) if len(self._signs) == 2 else None
        seeds = self.seeds(self.step_count)
        stats = torch.zeros(self.config.num_directions, len(STATS_COLUMNS), dtype=torch.float64)
        for direction in self._directions:
            stats[direction] = self._walk_stats(inputs, targets, seeds[direction], specs, half)
        self._stats = stats if self._stats is None else self._stats + stats

    def commit(self, lr: float | None = None) -> StepResult:
        """Finish the step: combine the accumulated losses (across processes when distributed) and
        record one update per direction, applied to each unit when it is next used (or by ``flush``).

        ``lr`` overrides the schedule for this step (a Trainer's scheduler passes it here)."""
        if self._stats is None:
            raise RuntimeError("commit() without accumulate(): evaluate at least one batch in this step")
        stats, self._stats = self._stats, None
        if self.role.all_reduce is not None:
            stats = self.role.all_reduce(stats)
        step, seeds = self.step_count, self.seeds(self.step_count)
        if lr is None:
            lr = float(self.lr_schedule(step)) if self.lr_schedule is not None else self.config.lr
        loss_plus, loss_minus = (stats[:, 0] / stats[:, 1]).tolist(), (stats[:, 2] / stats[:, 3]).tolist()
        grads = [(p - m) / (2 * self.config.eps) for p, m in zip(loss_plus, loss_minus)]
        if not all(torch.isfinite(torch.tensor(grads)).tolist()):
            raise FloatingPointError(f"step {step}: non-finite losses (+eps {loss_plus}, -eps {loss_minus}); no "
                                     "update was recorded. Lower ZOConfig.lr or eps, or check the batch's labels")
        q = self.config.num_directions
        updates = tuple(Update(seed, grad, lr / q) for seed, grad in zip(seeds, grads))
        self.history.extend(updates)
        self.step_count += 1
        return StepResult(sum(loss_plus) / q, sum(loss_minus) / q, sum(grads) / q, lr, seeds[0], step, updates)

    def step(self, batch: Mapping[str, Any] | Sequence[Mapping[str, Any]], lr: float | None = None) -> StepResult:
        """One MeZO-SGD step on ``batch``, or on a list of micro-batches (gradient accumulation).

        Returns the losses of both passes, the projected gradient, the learning rate and the seed.
        The update is recorded now and applied to each unit when it is next used (or by ``flush``).
        """
        for micro_batch in ([batch] if isinstance(batch, Mapping) else batch):
            self.accumulate(micro_batch)
        return self.commit(lr)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable training state: the step count, every update and the config."""
        return {"step_count": self.step_count, "config": self.config.to_dict(),
                "generator_version": noise.GENERATOR_VERSION,
                "history": [[u.seed, u.projected_grad, u.lr] for u in self.history]}

    def load_state_dict(self, state: Mapping[str, Any], *, weights_updated: bool = True) -> None:
        """Restore ``state_dict()``'s state. ``weights_updated=True``: the model's weights already hold
        every update (a flushed checkpoint); False: they are the base weights and the history is applied
        when each unit is next used (as ``replay`` does)."""
        noise.check_generator_version(state.get("generator_version", 1), "the engine state")  # none: before versions
        saved_noise = state.get("config", {}).get("noise", self.config.noise)
        if saved_noise != self.config.noise:
            raise ValueError(f"the state was trained with ZOConfig.noise={saved_noise!r}, this engine has "
                             f"{self.config.noise!r}: the updates' z would differ")
        self.flush()
        self.history = [Update(int(seed), float(grad), float(lr)) for seed, grad, lr in state["history"]]
        self.step_count = int(state["step_count"])
        self._stats = None
        for unit in self.units:
            unit.applied = len(self.history) if weights_updated else 0

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
        for handle in self._hooks:
            handle.remove()
        self._wrapped, self._hooks = [], []
        return self.model

    def bytes_moved(self) -> tuple[int, int]:
        """(bytes uploaded to, bytes written back from) the working device since construction."""
        if self._scheduler is None:
            return 0, 0
        return self._scheduler.bytes_up, self._scheduler.bytes_down

    def describe(self) -> str:
        """A table of the units: name, parameters, dtype and where the master lives."""
        rows = [f"perturbation scope: {self.scope}", f"{'unit':<14}{'params':>14}  {'dtype':<10}where"]
        for unit in self.units:
            where = f"{unit.master.device} (offloaded)" if unit.offloaded else f"{unit.master.device} (resident)"
            rows.append(f"{unit.name:<14}{unit.numel:>14,}  {str(unit.master.dtype).replace('torch.', ''):<10}{where}")
        return "\n".join(rows)


def replay(model: nn.Module, updates: list[Update], config: ZOConfig) -> ZOEngine:
    """Rebuild fine-tuned weights: ``model`` must hold the base weights and ``config`` the training
    run's storage settings; every update is applied in order, exactly as training applied it."""
    engine = ZOEngine(model, config)
    engine.load_state_dict({"step_count": len(updates) // config.num_directions, "generator_version": noise.GENERATOR_VERSION,
                            "history": [[u.seed, u.projected_grad, u.lr] for u in updates]},
                           weights_updated=False)
    engine.flush()
    return engine
