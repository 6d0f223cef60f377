"""Streams disk-offloaded units through staging buffers, ahead of use and beside the walk.

:class:`DiskTransferScheduler` is the :class:`~zo2.offload.transfers.TransferScheduler` of an engine whose
offloaded units live on disk (or, under ``host_memory_budget``, partly in host memory). One I/O thread
runs every transfer that fills a slot, in the order they were asked for, so these ordering rules hold
without locks:

* a unit's read comes after its last write-back (the file is final before it is read);
* a slot is filled only after the write-back that reads it has copied it out;
* reads run while the main thread computes (``os.preadv`` releases the GIL), prefetched
  ``num_slots - 1`` units ahead as the base scheduler does.

On a CPU working device the slots themselves are the staging buffers (aligned for O_DIRECT): a read
lands where the walk computes, with no copy. On CUDA, ``num_slots`` pinned, aligned host buffers take
turns: the thread reads a file into one and issues its copy to the slot on the upload stream (after the
slot's release events and the last copy out of it), then may reuse it once that copy's event has
completed; a write-back copies the slot to a staging buffer on the offload stream (after the compute
event that follows the update), waits for that copy, and writes the file. The compute stream waits for
the upload event only, never the host.

Host memory held: ``num_slots`` buffers of the largest disk unit, padded to 4 KiB (``held_bytes``).
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ...units.storage import SlotPool, Unit
from ...updates.log import UpdateLog
from ..transfers import TransferScheduler, _Upload
from .aligned import ALIGN, aligned_empty, padded, typed
from .store import DiskStore

logger = logging.getLogger(__name__)


class AlignedSlotPool(SlotPool):
    """Slots in host memory that O_DIRECT can read into (a CPU working device)."""

    def __init__(self, num_slots: int, nbytes: int) -> None:  # no super().__init__(): it allocates unaligned slots
        self.buffers = [aligned_empty(nbytes) for _ in range(num_slots)]
        logger.info("slot pool: %d x %.1f MiB in host memory, 4 KiB aligned (disk reads land here)", num_slots,
                    nbytes / 2**20)


class _Staging:
    """Pinned, aligned host buffers used in turn by the I/O thread (CUDA working device only)."""

    def __init__(self, count: int, nbytes: int) -> None:
        self.buffers = [aligned_empty(nbytes, pin=True) for _ in range(count)]
        self._busy: list[torch.cuda.Event | None] = [None] * count
        self._next = 0

    def take(self) -> tuple[int, torch.Tensor]:
        """The next buffer, once the device copy that last read it has completed."""
        index, self._next = self._next, (self._next + 1) % len(self.buffers)
        if self._busy[index] is not None:
            self._busy[index].synchronize()
            self._busy[index] = None
        return index, self.buffers[index]

    def busy_until(self, index: int, event: torch.cuda.Event) -> None:
        self._busy[index] = event


class DiskTransferScheduler(TransferScheduler):
    """Uploads and write-backs of offloaded units, some or all of which live in a :class:`DiskStore`."""

    def __init__(self, order: list[Unit], store: DiskStore, log: UpdateLog, num_slots: int,
                 device: torch.device) -> None:
        cuda = device.type == "cuda"
        pool = (SlotPool.for_units(num_slots, order, device) if cuda else
                AlignedSlotPool(num_slots, max(u.master.nbytes for u in order)))
        super().__init__(order, pool, device)
        self.store, self.log = store, log
        largest = max(b.nbytes for b in store.buffers.values())
        self._staging = _Staging(num_slots, largest) if cuda else None
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zo2-disk",
                                      initializer=(lambda: torch.cuda.set_device(device)) if cuda else None)
        self._reads: dict[int, Future] = {}
        self._writes: list[Future] = []
        self._copied_out: dict[int, torch.cuda.Event] = {}  # I/O thread only: last copy out of each slot
        self._journaled = store.journal.steps

    @property
    def held_bytes(self) -> int:
        """Host bytes of the buffers disk reads land in: the slots on a CPU working device, the pinned
        staging buffers on CUDA (each padded to 4 KiB, plus up to 4 KiB of alignment)."""
        buffers = self._staging.buffers if self._staging is not None else self.pool.buffers
        return sum(b.numel() + ALIGN for b in buffers)

    # ----------------------------------------------------------------------------- uploads
    def _upload(self, unit: Unit) -> None:
        slot = self._free_slot()
        buffer = self.pool.view(slot, unit)
        self.bytes_up += unit.numel * buffer.element_size()
        waits = list(self._slot_free[slot])
        if unit.index in self._host_ready:
            waits.append(self._host_ready.pop(unit.index))
        expected = self.log.applied(unit.index) if self.store.holds(unit) else None
        self._reads[unit.index] = self._io.submit(self._fill_slot, unit, slot, waits, expected)
        self._inflight[unit.index] = _Upload(slot, None)  # the compute stream waits in acquire()

    def _fill_slot(self, unit: Unit, slot: int, waits: list, expected: int | None) -> torch.cuda.Event | None:
        """I/O thread: the unit's weights into ``slot``; returns the upload event on CUDA."""
        buffer = self.pool.view(slot, unit)
        if not self.cuda:
            if expected is None:
                buffer.copy_(unit.master)
            else:
                self.store.read(unit.index, self.pool.buffers[slot], expected)
            return None
        index, staging = (None, None)
        source = unit.master
        if expected is not None:
            index, staging = self._staging.take()
            self.store.read(unit.index, staging, expected)
            source = typed(staging, buffer.dtype, unit.numel)
        with torch.cuda.stream(self.upload_stream):
            for event in waits + [self._copied_out.get(slot)]:
                if event is not None:
                    self.upload_stream.wait_event(event)
            buffer.copy_(source, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.upload_stream)
        if staging is not None:
            self._staging.busy_until(index, done)
        return done

    def acquire(self, unit: Unit) -> torch.Tensor:
        self._raise_failed_writes()
        buffer = super().acquire(unit)
        done = self._reads.pop(unit.index).result()  # a failed read raises here
        if done is not None:
            torch.cuda.current_stream().wait_event(done)
        return buffer

    # -------------------------------------------------------------------------- write-backs
    def write_back(self, unit: Unit, buffer: torch.Tensor) -> None:
        if not self.store.holds(unit):
            super().write_back(unit, buffer)
            return
        self._raise_failed_writes()
        self.bytes_down += unit.numel * buffer.element_size()
        applied = self.log.steps  # the walk applied every pending step before writing back
        steps = [self.log.step_updates(s) for s in range(self._journaled, applied)]
        self._journaled = max(self._journaled, applied)
        slot = self._inflight[unit.index].slot
        ready = self._event()
        self._writes.append(self._io.submit(self._write_slot, unit, slot, ready, applied, steps))

    def _write_slot(self, unit: Unit, slot: int, ready: torch.cuda.Event | None, applied: int, steps: list) -> None:
        """I/O thread: the slot's weights into the unit's file, as holding ``applied`` steps."""
        if not self.cuda:
            self.store.write(unit.index, self.pool.buffers[slot], applied, steps)
            return
        index, staging = self._staging.take()
        with torch.cuda.stream(self.offload_stream):
            self.offload_stream.wait_event(ready)
            typed(staging, unit.master.dtype, unit.numel).copy_(self.pool.view(slot, unit),
                                                                non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.offload_stream)
        self._copied_out[slot] = copied
        copied.synchronize()
        self.store.write(unit.index, staging, applied, steps)

    def _raise_failed_writes(self) -> None:
        pending = []
        for future in self._writes:
            if future.done():
                future.result()  # re-raises the write's DiskOffloadError
            else:
                pending.append(future)
        self._writes = pending

    def synchronize_host(self) -> None:
        """Wait until every write has landed in its file (and the journal holds every step)."""
        if self._journaled < self.log.steps:
            steps = [self.log.step_updates(s) for s in range(self._journaled, self.log.steps)]
            self._journaled = self.log.steps
            self._writes.append(self._io.submit(self.store.journal.extend, steps))
        for future in self._writes:
            future.result()
        self._writes = []
        super().synchronize_host()

    def journal_rewound(self) -> None:
        """The store's journal was rewound (kept files put back): steps are journaled again from its end."""
        self._journaled = self.store.journal.steps

    def reset(self) -> None:
        super().reset()
        self._reads.clear()  # reads still running land in slots that later transfers wait behind

    def close(self) -> None:
        """Finish every transfer and stop the I/O thread (the store stays open)."""
        self.synchronize_host()
        self._io.shutdown(wait=True)


def staging_bytes(store: DiskStore, num_slots: int) -> int:
    """What :attr:`DiskTransferScheduler.held_bytes` will be for ``store`` and ``num_slots``."""
    return num_slots * (padded(max(b.nbytes for b in store.buffers.values())) + ALIGN)
