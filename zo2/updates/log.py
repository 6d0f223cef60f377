"""The update history of a run: what each step decided, and how far each unit's weights have taken it.

An :class:`Update` is all that is needed to redo one direction's change to the weights: the seed of z,
the scalar the method derived from the measured losses (the projected gradient g for MeZO) and the
learning rate. A step records a fixed number of updates (one per direction). With the base weights, the
log *is* the fine-tuned model (``zo2.replay``).

:class:`UpdateLog` is the one owner of the history: the updates, each unit's applied position (how many
steps its master holds), and their JSON form. The engine asks it what a unit still has to apply;
checkpoints, seed logs, replay and distributed training read and write it through ``to_json`` /
``from_json``. This module imports nothing of zo2, so every other module can depend on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence


@dataclass(frozen=True)
class Update:
    """One direction of one step, all that is needed to redo it: the seed of z, g and the learning rate."""

    seed: int
    projected_grad: float
    lr: float

    def to_json(self) -> list:
        """``[seed, projected_grad, lr]``; floats keep ``repr`` precision through JSON, so they replay exactly."""
        return [self.seed, self.projected_grad, self.lr]

    @classmethod
    def from_json(cls, item: Sequence) -> "Update":
        seed, grad, lr = item
        return cls(int(seed), float(grad), float(lr))


class HistoryError(ValueError):
    """An update history cannot be used as asked (wrong shape, another noise generator, ...)."""


class UpdateLog:
    """Every update of a run, ``updates_per_step`` per step, and each unit's applied position.

    A unit's applied position counts the steps its master holds; the steps after it are pending and are
    applied (fused with the next perturbation, or by a flush) the next time the unit is on the device.
    ``generator`` is the version of the noise generator that produced the run's z
    (:data:`zo2.updates.noise.GENERATOR_VERSION`; a log older than the field was made by version 1):
    a history made by another generator is refused rather than replayed to silently different weights.
    """

    def __init__(self, updates_per_step: int, updates: Iterable[Update] = (), *, generator: int = 0) -> None:
        if updates_per_step < 1:
            raise HistoryError(f"updates_per_step={updates_per_step} is invalid: expected an integer >= 1")
        self.updates_per_step = updates_per_step
        self.generator = generator
        self._updates: list[Update] = []
        self._applied: dict[int, int] = {}
        self.extend(updates)

    # ------------------------------------------------------------------------------- the updates
    def __len__(self) -> int:
        return len(self._updates)

    def __iter__(self) -> Iterator[Update]:
        return iter(self._updates)

    @property
    def steps(self) -> int:
        """Number of steps recorded."""
        return len(self._updates) // self.updates_per_step

    def updates(self) -> list[Update]:
        """A copy of every update, in order."""
        return list(self._updates)

    def step_updates(self, step: int) -> tuple[Update, ...]:
        """The updates of ``step`` (0-based)."""
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} is not in the log (it holds {self.steps} steps)")
        n = self.updates_per_step
        return tuple(self._updates[step * n:(step + 1) * n])

    def append_step(self, updates: Sequence[Update]) -> None:
        """Record one step's updates (exactly ``updates_per_step`` of them)."""
        if len(updates) != self.updates_per_step:
            raise HistoryError(f"a step records {self.updates_per_step} updates, got {len(updates)}")
        self._updates.extend(updates)

    def extend(self, updates: Iterable[Update]) -> None:
        """Record whole steps from a flat list of updates (a seed log's form)."""
        updates = list(updates)
        if len(updates) % self.updates_per_step:
            raise HistoryError(f"{len(updates)} updates are not whole steps of {self.updates_per_step}")
        self._updates.extend(updates)

    def replace(self, updates: Iterable[Update]) -> None:
        """Hold ``updates`` (whole steps) instead of the current history; every applied position resets."""
        self._updates = []
        self._applied.clear()
        self.extend(updates)

    # ------------------------------------------------------------------------ applied positions
    def applied(self, unit: int) -> int:
        """How many steps the master of unit ``unit`` (its index) holds."""
        return self._applied.get(unit, 0)

    def pending(self, unit: int) -> range:
        """The steps unit ``unit`` still has to apply, in order."""
        return range(self.applied(unit), self.steps)

    def mark_applied(self, unit: int, steps: int | None = None) -> None:
        """Record that the master of ``unit`` now holds the first ``steps`` steps (default: all)."""
        steps = self.steps if steps is None else steps
        if not 0 <= steps <= self.steps:
            raise HistoryError(f"unit {unit} cannot hold {steps} steps of a log of {self.steps}")
        self._applied[unit] = steps

    def set_applied_everywhere(self, units: Iterable[int], steps: int) -> None:
        """Every listed unit holds the first ``steps`` steps (after loading weights or a state)."""
        for unit in units:
            self.mark_applied(unit, steps)

    # -------------------------------------------------------------------------------- JSON form
    def to_json(self) -> dict[str, Any]:
        """``{"updates_per_step", "generator_version", "updates": [[seed, g, lr], ...]}``: the seed log's form."""
        return {"updates_per_step": self.updates_per_step, "generator_version": self.generator,
                "updates": [u.to_json() for u in self._updates]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, updates_per_step: int | None = None,
                  generator: int | None = None) -> "UpdateLog":
        """Read ``to_json()``'s form (or an older one: ``{"history": [...]}`` / ``{"updates": [...]}``).

        ``updates_per_step`` and ``generator``, when given, are what the reader expects: a history that
        says otherwise raises :class:`HistoryError`, whose message continues a subject naming the source
        ("<file> " + message). A log without a generator version was made by version 1."""
        raw = data.get("updates", data.get("history"))
        if not isinstance(raw, list):
            raise HistoryError("has no update list (expected an 'updates' list of [seed, g, lr])")
        try:
            updates = [Update.from_json(item) for item in raw]
        except (TypeError, ValueError) as err:
            raise HistoryError(f"has a malformed update list ({err})") from None
        saved_per_step = int(data.get("updates_per_step") or updates_per_step or 1)
        if updates_per_step is not None and saved_per_step != updates_per_step:
            raise HistoryError(f"records {saved_per_step} updates per step, this run makes "
                               f"{updates_per_step}: it was trained with another method or num_directions")
        saved_generator = int(data.get("generator_version", 1))
        if generator is not None and saved_generator != generator:
            raise HistoryError(f"was made with noise generator version {saved_generator}, this zo2 generates z with "
                               f"version {generator}: its updates would be replayed with other noise, giving other "
                               "weights. Replay it with the zo2 release that wrote it (or load its saved weights, "
                               "not its update history)")
        return cls(saved_per_step, updates, generator=generator or saved_generator)
