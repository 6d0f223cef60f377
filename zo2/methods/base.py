"""What a zeroth-order method is to the engine: the evaluations a step needs, how their losses become
the step's updates, and how those updates change the weights.

A step of any method is a list of :class:`Part` s (θ + s·ε·z(seed) with s in {+1, -1, 0}) evaluated on
the same batch, usually in one walk over the model (the batch replicated once per part). The losses
measured for the parts become scalars only (:class:`Decision`): nothing of model size crosses ranks
or is stored per step. The update rule (``apply`` / ``update_and_perturb``) regenerates z from the
update log; the default is MeZO-SGD's ``θ ← θ - lr (g z + λ θ)`` on the fused kernels of
:mod:`zo2.kernels`.

Adding a method is one module in :mod:`zo2.methods` with a subclass of :class:`Method` (and an
``Options`` dataclass for its documented options), registered in ``zo2.methods.METHODS``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Protocol, Sequence

import torch

from ..kernels import apply_updates, generate, stochastic_round, update_and_perturb, warm_up
from ..units.storage import Unit
from ..updates import noise
from ..updates.log import Update, UpdateLog

SIDES = ("plus", "minus", "clean")
LOW_PRECISION = (torch.float16, torch.bfloat16)


class MethodSettings(Protocol):
    """The settings a method reads: :class:`zo2.ZOConfig` provides them (the config imports the methods'
    registry to validate its fields, so methods name only what they read, not the config class)."""

    method_options: Mapping[str, Any]
    num_directions: int
    noise: str
    eps: float
    weight_decay: float
    kernels: str


@dataclass(frozen=True)
class Part:
    """One evaluation of a step: the loss at θ + sign·ε·z(seed); sign 0 is θ itself (``seed`` None)."""

    seed: int | None
    sign: int
    direction: int
    """The direction this part belongs to (``Role.directions`` selects by it)."""
    side: str
    """``"plus"``, ``"minus"`` or ``"clean"`` (``Role.sides`` selects plus/minus parts)."""


@dataclass(frozen=True)
class Decision:
    """What a step decided from its parts' mean losses."""

    updates: tuple[Update, ...]
    loss: float
    """The training loss the method reports (the +ε pass for two-sided methods, θ's own for FZOO)."""
    loss_minus: float
    """The -ε pass (two-sided), or the mean perturbed loss (one-sided)."""
    projected_grad: float
    """Mean over directions of the directional-derivative estimate g."""


@dataclass(frozen=True)
class NoOptions:
    """This method takes no options."""


def options_error(method: str, message: str) -> ValueError:
    return ValueError(f"ZOConfig.method_options for {method!r}: {message}")


def build_options(method: type["Method"], values: Mapping[str, Any]) -> Any:
    """The method's ``Options`` dataclass from a plain mapping, with every field checked."""
    fields = {f.name: f for f in dataclasses.fields(method.Options)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        known = ", ".join(fields) or "none"
        raise options_error(method.name, f"unknown option(s) {unknown}; {method.name} takes: {known}")
    for name, value in values.items():
        expected = fields[name].type
        if expected in ("float", float) and (isinstance(value, bool) or not isinstance(value, (int, float))
                                             or not math.isfinite(value)):
            raise options_error(method.name, f"{name}={value!r} is not a finite number")
        if expected in ("int", int) and (isinstance(value, bool) or not isinstance(value, int)):
            raise options_error(method.name, f"{name}={value!r} is not an integer")
    options = method.Options(**values)
    check = getattr(options, "check", None)
    if check is not None:
        check()
    return options


class Method:
    """Base of every method; the default rule is MeZO-SGD's (linear in z, fused kernels)."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    two_sided: ClassVar[bool] = True
    """Whether parts come in ±ε pairs per direction (what perturbation parallelism splits)."""
    default_noise: ClassVar[str] = "gaussian"
    default_directions: ClassVar[int] = 1
    min_directions: ClassVar[int] = 1
    fused_kernels: ClassVar[bool] = True
    """Whether the update rule runs on :mod:`zo2.kernels` (fused on CUDA); others run plain torch."""

    def __init__(self, config: MethodSettings, log: UpdateLog) -> None:
        self.config = config
        self.options = build_options(type(self), config.method_options)
        self.log = log

    # ------------------------------------------------------------------------------ estimator
    @property
    def directions(self) -> int:
        return self.config.num_directions

    @property
    def updates_per_step(self) -> int:
        return self.directions

    def parts(self, seeds: Sequence[int]) -> list[Part]:
        """The evaluations of a step whose directions have ``seeds``: ±ε per direction by default."""
        return [Part(seed, sign, d, side) for d, seed in enumerate(seeds)
                for sign, side in ((1, "plus"), (-1, "minus"))]

    def decide(self, losses: Sequence[float], seeds: Sequence[int], lr: float, eps: float) -> Decision:
        """MeZO/q-SPSA: g_d = (L+ - L-) / 2ε per direction, each updating with lr / q."""
        plus, minus = losses[0::2], losses[1::2]
        grads = [(p - m) / (2 * eps) for p, m in zip(plus, minus)]
        q = len(seeds)
        updates = tuple(Update(seed, grad, lr / q) for seed, grad in zip(seeds, grads))
        return Decision(updates, sum(plus) / q, sum(minus) / q, sum(grads) / q)

    # ---------------------------------------------------------------------------- update rule
    def _kernel_args(self) -> dict[str, Any]:
        cfg = self.config
        return dict(noise_kind=cfg.noise, weight_decay=cfg.weight_decay, backend=cfg.kernels)

    def _flat(self, steps: range) -> list[Update]:
        return [u for step in steps for u in self.log.step_updates(step)]

    def apply(self, buffer: torch.Tensor, unit: Unit, steps: range, *, offset: int = 0) -> None:
        """Apply the updates of ``steps`` in order, in place (``buffer``: elements from ``offset``)."""
        if steps:
            apply_updates(buffer, unit, self._flat(steps), offset=offset, **self._kernel_args())

    def update_and_perturb(self, buffer: torch.Tensor, unit: Unit, steps: range, seed: int, eps: float,
                           signs: Sequence[int], *, offset: int = 0,
                           out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Apply ``steps``, then return ``buffer + s·ε·z(seed)`` for each sign s (into ``out`` if given)."""
        return update_and_perturb(buffer, unit, self._flat(steps), seed, eps, signs=signs, offset=offset,
                                          out=out, **self._kernel_args())

    # ------------------------------------------------------------------------------ set-up, state
    def prepare(self, units: Sequence[Unit]) -> None:
        """Called once the units are built, before any step (e.g. to read the initial weights)."""

    def warm_up(self, units: Sequence[Unit], device: torch.device) -> None:
        """Build or compile the update rule's kernels now (:func:`zo2.kernels.warm_up`), for the dtypes of
        ``units`` and the signs of this method's parts, so that the first step does not pay for it."""
        signs = [p.sign for p in self.parts([0] * self.directions) if p.sign]
        warm_up({u.master.dtype for u in units}, device, max((u.numel for u in units), default=1), signs,
                self.config.eps, **self._kernel_args())

    def state_dict(self) -> dict[str, Any]:
        """The method's own JSON-able state beyond the update log (most methods: none)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``'s state."""


def chunks_of(buffer: torch.Tensor, offset: int) -> list[tuple[int, torch.Tensor]]:
    """(absolute start, view) of ``buffer``'s chunks, aligned like every backend's (for plain-torch rules)."""
    size = noise.chunk_size(buffer.device)
    return [(start, buffer[start - offset:start - offset + length])
            for start, length in noise.chunks(offset, buffer.numel(), size)]


def working_copy(chunk: torch.Tensor) -> torch.Tensor:
    """The chunk in the precision updates are computed in: float32 for bf16/fp16, itself otherwise."""
    return chunk.float() if chunk.dtype in LOW_PRECISION else chunk


def store(chunk: torch.Tensor, work: torch.Tensor, unit: Unit, start: int, seed: int, backend: str) -> None:
    """Write ``work`` (from :func:`working_copy`) back into ``chunk``; low-precision masters round
    stochastically with the draws of ``seed``'s rounding stream (as the kernels do), generated under
    ``backend`` (``ZOConfig.kernels``)."""
    if work is chunk:
        return
    uniform = generate("uniform", seed, unit.index, start, chunk.numel(), stream=noise.ROUNDING_STREAM,
                               device=chunk.device, backend=backend)
    chunk.copy_(stochastic_round(work, chunk.dtype, uniform))


def decay(work: torch.Tensor, unit: Unit, start: int, factor: float) -> None:
    """Multiply the decayed prefix [0, n_decay) of the unit, where this chunk overlaps it, by ``factor``."""
    decayed = max(0, min(work.numel(), unit.n_decay - start))
    if decayed and factor != 1.0:
        work[:decayed].mul_(factor)
