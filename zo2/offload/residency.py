"""Unit residency: the one owner of where each unit's weights are and of keeping its master up to date.

A resident unit's master lives on the working device; an offloaded one lives on the offloading device (host
memory, or a file of the disk store) and reaches the working device through a slot of the transfer scheduler
(:mod:`.transfers`, :mod:`.disk.staging`). Everything else in zo2 asks :class:`Residency`: a unit's weights
on the working device, whether an updated master is written back now (the write-back rule, here only),
flushing every pending update, the prefetch of a new pass, the bytes moved, and the table of the units.

How far each master has applied the update log is the log's own record (:class:`~zo2.updates.log.UpdateLog`);
residency tells the log when a master has taken more steps.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..units.storage import SlotPool, Unit
from ..updates.log import UpdateLog
from .disk.staging import DiskTransferScheduler
from .disk.store import MASTER, DiskStore
from .transfers import TransferScheduler

#: ``apply(buffer, unit, steps)``: writes the updates of ``steps`` into ``buffer`` (the method's update rule).
ApplyUpdates = Callable[[torch.Tensor, Unit, range], None]
#: Builds the transfer scheduler of the offloaded units (a distributed role may supply its own).
SchedulerFactory = Callable[[list[Unit], SlotPool, torch.device], TransferScheduler]


class Residency:
    """Where every unit's weights are, and the moves that keep masters current."""

    def __init__(self, units: Sequence[Unit], log: UpdateLog, device: torch.device, *, store: DiskStore | None,
                 num_slots: int, write_back_every: int, make_scheduler: SchedulerFactory | None = None) -> None:
        self.units, self.log, self.store = list(units), log, store
        self.write_back_every = write_back_every
        offloaded = [u for u in self.units if u.offloaded]
        self.scheduler: TransferScheduler | None = None
        """Moves the offloaded units through the working device's slots (None: every unit is resident)."""
        if offloaded and store is not None:  # disk-offloaded units stream through staging buffers
            self.scheduler = DiskTransferScheduler(offloaded, store, log, num_slots, device)
        elif offloaded:
            pool = SlotPool.for_units(num_slots, offloaded, device)
            self.scheduler = (make_scheduler or TransferScheduler)(offloaded, pool, device)

    # ------------------------------------------------------------------------------ one unit
    def acquire(self, unit: Unit) -> torch.Tensor:
        """The unit's weights as its master holds them, on the working device: the master itself, or for
        an offloaded unit a slot, held until :meth:`release`."""
        return self.scheduler.acquire(unit) if unit.offloaded else unit.master

    def release(self, unit: Unit) -> None:
        """Give the slot of an offloaded unit back (nothing to do for a resident one)."""
        if unit.offloaded:
            self.scheduler.release(unit)

    def applied(self, unit: Unit, buffer: torch.Tensor, steps: range, *, write_back: bool = False) -> None:
        """``buffer`` (from :meth:`acquire`) now holds the updates of ``steps``: record it.

        The write-back rule: a resident master *is* its buffer, so it holds them at once. An offloaded
        master is written back once ``ZOConfig.write_back_every`` steps are pending, or when ``write_back``
        (a flush); until then it lags, and its pending updates are replayed on every upload."""
        if not unit.offloaded:
            self.log.mark_applied(unit.index)
        elif write_back or len(steps) >= self.write_back_every:
            self.scheduler.write_back(unit, buffer)
            self.log.mark_applied(unit.index)

    def current(self, unit: Unit, apply: ApplyUpdates) -> torch.Tensor:
        """The unit's weights with every pending update applied (written back when offloaded), on the
        working device; release it afterwards."""
        buffer = self.acquire(unit)
        steps = self.log.pending(unit.index) if unit.trainable else range(0)
        if steps:
            apply(buffer, unit, steps)
            self.applied(unit, buffer, steps, write_back=True)
        return buffer

    # ---------------------------------------------------------------------------- all units
    def flush(self, apply: ApplyUpdates) -> None:
        """Apply every pending update to the masters and wait until they are on the offloading device
        (before evaluation, saving or export)."""
        for unit in self.units:
            if unit.trainable and self.log.pending(unit.index):
                self.current(unit, apply)
                self.release(unit)
        if self.scheduler is not None:
            self.scheduler.synchronize_host()
            self.scheduler.reset()

    def start_pass(self) -> None:
        """A forward over the units begins: prefetch the first offloaded ones."""
        if self.scheduler is not None:
            self.scheduler.restart()

    def end_pass(self) -> None:
        """A forward over the units ended (or was interrupted): forget its uploads."""
        if self.scheduler is not None:
            self.scheduler.reset()

    def point_at_masters(self) -> None:
        """Point every parameter back at its master (after a forward that stopped halfway)."""
        for unit in self.units:
            unit.point_params_at(unit.master)

    def on_disk(self, unit: Unit) -> bool:
        """Whether the unit's master lives in a file of the disk store."""
        return self.store is not None and self.store.holds(unit, MASTER)

    def unit_weights(self, unit: Unit) -> torch.Tensor:
        """The unit's master on the CPU (read from its file for a disk unit); flush first for current weights."""
        if self.on_disk(unit):
            return self.store.read_tensor(unit.index)
        return unit.master.detach().cpu()

    def load_unit_weights(self, unit: Unit, weights: torch.Tensor) -> None:
        """Make the unit's master hold ``weights`` (as :meth:`unit_weights` returned them), bit for bit; every
        pending update must have been applied or dropped first. Disk units are not supported (their files
        carry the journal's step count): :meth:`keep_disk_files` keeps and puts back theirs."""
        if self.on_disk(unit):
            raise NotImplementedError(f"unit {unit.name} lives on disk: its weights are replaced by streaming a "
                                      "checkpoint (zo2.loading.from_checkpoint)")
        unit.master.copy_(weights.to(unit.master.device))

    # ------------------------------------------------------------------- kept disk files
    def _trainable_on_disk(self) -> list[Unit]:
        return [unit for unit in self.units if unit.trainable and self.on_disk(unit)]

    def keep_disk_files(self, purpose: str) -> None:
        """Keep the files of the trainable disk units and the journal as they are now, crash-safely, until
        :meth:`release_disk_files` (:meth:`zo2.offload.disk.store.DiskStore.keep`); flush first. Nothing to
        do without a disk store."""
        if self.store is not None:
            self.store.keep([unit.index for unit in self._trainable_on_disk()], purpose)

    def restore_disk_files(self) -> None:
        """Put the kept files back (bit for bit, as many steps as they held) and rewind the journal to them;
        the update log must already hold no more steps than they do (the caller drops the others)."""
        if self.store is None:
            return
        self.scheduler.synchronize_host()  # every write issued has landed before files are replaced
        self.scheduler.reset()
        steps = self.store.restore_kept()
        self.scheduler.journal_rewound()
        for unit in self._trainable_on_disk():
            self.log.mark_applied(unit.index, steps)

    def release_disk_files(self) -> None:
        """Forget the kept files: the folder's files are the run's state again (restore first to undo)."""
        if self.store is not None:
            self.store.release_kept()

    def rewrite(self, units: Sequence[Unit], change: Callable[[torch.Tensor, Unit], None]) -> None:
        """Apply ``change(buffer, unit)`` to each unit's (flushed) weights on the working device, write them
        back and wait until every master holds them (an edit outside the update log, e.g. averaging)."""
        for unit in units:
            buffer = self.acquire(unit)
            change(buffer, unit)
            if unit.offloaded:
                self.scheduler.write_back(unit, buffer)
            self.release(unit)
        if self.scheduler is not None:
            self.scheduler.synchronize_host()
            self.scheduler.reset()

    def bytes_moved(self) -> tuple[int, int]:
        """(bytes uploaded to, bytes written back from) the working device so far."""
        if self.scheduler is None:
            return 0, 0
        return self.scheduler.bytes_up, self.scheduler.bytes_down

    def describe(self) -> str:
        """A table of the units: name, parameters, dtype and where the master lives."""
        rows = [f"{'unit':<14}{'params':>14}  {'dtype':<10}where"]
        for unit in self.units:
            where = f"{unit.master.device} ({'offloaded' if unit.offloaded else 'resident'}"
            if self.store is not None and self.store.holds(unit):
                where = f"disk ({self.store.path(unit.index).name}"
            where += ")" if unit.trainable else ", frozen)"
            dtype = str(unit.master.dtype).replace("torch.", "")
            rows.append(f"{unit.name:<14}{unit.numel:>14,}  {dtype:<10}{where}")
        return "\n".join(rows)
