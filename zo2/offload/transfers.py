"""Moves offloaded units between their master (offloading device) and the slots (working device).

On CUDA three streams are ordered with events, never with host-blocking syncs in the steady state:

* upload stream: master -> slot. Waits for the slot's previous user to finish (its release event)
  and for the unit's last write-back (the host copy must be final before it is read).
* compute stream (the current stream): waits for the upload event before touching the slot.
* offload stream: slot -> master, waits for the compute event recorded right after the update, so
  the write-back overlaps the forwards that run on the working buffers.

Units are uploaded ``len(pool) - 1`` ahead of the last acquired one in the expected order (the walk
order of the blocks), so a unit may hold its slot while it computes (module-scoped perturbation reads
the slot during the forwards) and the next one still uploads meanwhile. An unexpected unit takes the
slot of a prefetched one, which is uploaded again when its turn comes. On the CPU every copy is
synchronous and the same code path runs without streams.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..units.storage import SlotPool, Unit


@dataclass
class _Upload:
    slot: int
    done: torch.cuda.Event | None


class TransferScheduler:
    """Uploads, write-backs and prefetch of offloaded units through a :class:`SlotPool`."""

    def __init__(self, order: list[Unit], pool: SlotPool, device: torch.device) -> None:
        self.order = order
        self.position = {unit.index: k for k, unit in enumerate(order)}
        self.pool = pool
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.upload_stream = torch.cuda.Stream(device)
            self.offload_stream = torch.cuda.Stream(device)
        self._inflight: dict[int, _Upload] = {}
        self._acquired: set[int] = set()  # units in use by the compute stream (the rest are prefetched)
        self._slot_free: list[list[torch.cuda.Event]] = [[] for _ in range(len(pool))]
        self._host_ready: dict[int, torch.cuda.Event] = {}
        self._next = 0  # position in ``order`` of the next unit to upload
        self.bytes_up = 0
        """Bytes made resident in slots so far (with sliced transfers each rank copies 1/N of them from the
        host and all-gathers the rest)."""
        self.bytes_down = 0
        """Bytes copied back to the offloading device so far (write-backs of updated masters)."""

    def _event(self, stream=None) -> torch.cuda.Event | None:
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(stream or torch.cuda.current_stream())
        return event

    def _free_slot(self) -> int:
        busy = {upload.slot for upload in self._inflight.values()}
        for slot in range(len(self.pool)):
            if slot not in busy:
                return slot
        raise RuntimeError("zo2 internal error: every slot holds a unit that was not released")

    def _evict_prefetched(self) -> None:
        """Free the slot of the prefetched unit needed last; it is uploaded again when its turn comes."""
        waiting = [index for index in self._inflight if index not in self._acquired]
        if not waiting:
            raise RuntimeError(f"zo2: all {len(self.pool)} slots hold units in use; raise ZOConfig.num_slots "
                               "(a module reads weights of more offloaded blocks at once than there are slots)")
        victim = max(waiting, key=lambda index: self.position[index])
        upload = self._inflight.pop(victim)
        if upload.done is not None:  # later uploads run on the same stream: ordered after this one anyway
            self._slot_free[upload.slot].append(upload.done)
        self._next = min(self._next, self.position[victim])

    def _upload(self, unit: Unit) -> None:
        slot = self._free_slot()
        buffer = self.pool.view(slot, unit)
        self.bytes_up += unit.numel * buffer.element_size()
        if not self.cuda:
            self._copy_in(unit, buffer)
            self._inflight[unit.index] = _Upload(slot, None)
            return
        with torch.cuda.stream(self.upload_stream):
            for event in self._slot_free[slot]:
                self.upload_stream.wait_event(event)
            if unit.index in self._host_ready:
                self.upload_stream.wait_event(self._host_ready.pop(unit.index))
            self._copy_in(unit, buffer)
            self._inflight[unit.index] = _Upload(slot, self._event(self.upload_stream))

    def _copy_in(self, unit: Unit, buffer: torch.Tensor) -> None:
        """Fill ``buffer`` (a slot) with the unit's master; on CUDA this runs on the upload stream."""
        buffer.copy_(unit.master, non_blocking=self.cuda)

    def _copy_out(self, unit: Unit, buffer: torch.Tensor) -> None:
        """Copy ``buffer`` back into the unit's master; on CUDA this runs on the offload stream."""
        unit.master.copy_(buffer, non_blocking=self.cuda)

    def _prefetch(self) -> None:
        while (self._next < len(self.order) and len(self._inflight) < len(self.pool)
               and len(self._inflight) - len(self._acquired) < len(self.pool) - 1):
            unit = self.order[self._next]
            if unit.index not in self._inflight:
                self._upload(unit)
            self._next += 1

    def restart(self) -> None:
        """Start a new pass over the units: prefetch from the first one in order."""
        self._next = 0
        self._prefetch()

    def acquire(self, unit: Unit) -> torch.Tensor:
        """The unit's weights in a working-device slot, ready for the compute stream."""
        if unit.index not in self._inflight:
            if len(self._inflight) == len(self.pool):
                self._evict_prefetched()
            self._upload(unit)
            self._next = self.position.get(unit.index, self._next - 1) + 1
        upload = self._inflight[unit.index]
        self._acquired.add(unit.index)
        if upload.done is not None:
            torch.cuda.current_stream().wait_event(upload.done)
        self._prefetch()
        return self.pool.view(upload.slot, unit)

    def write_back(self, unit: Unit, buffer: torch.Tensor) -> None:
        """Copy ``buffer`` (the unit's updated weights) back to its master once compute reaches here."""
        self.bytes_down += unit.numel * buffer.element_size()
        if not self.cuda:
            self._copy_out(unit, buffer)
            return
        ready = self._event()
        with torch.cuda.stream(self.offload_stream):
            self.offload_stream.wait_event(ready)
            self._copy_out(unit, buffer)
            done = self._event(self.offload_stream)
        self._host_ready[unit.index] = done
        self._slot_free[self._inflight[unit.index].slot] = [done]

    def release(self, unit: Unit) -> None:
        """The slot of ``unit`` may be reused once the compute work issued so far has finished."""
        upload = self._inflight.pop(unit.index)
        self._acquired.discard(unit.index)
        if self.cuda:
            pending = [e for e in self._slot_free[upload.slot] if not e.query()]
            self._slot_free[upload.slot] = pending + [self._event()]
        self._prefetch()

    def synchronize_host(self) -> None:
        """Block until every write-back has landed in the masters (before reading them on the host)."""
        for event in self._host_ready.values():
            event.synchronize()
        self._host_ready.clear()

    def reset(self) -> None:
        """Forget every upload (after a walk was interrupted); their slots become free for later uploads."""
        for upload in self._inflight.values():
            if self.cuda:
                self._slot_free[upload.slot].append(self._event())
        self._inflight.clear()
        self._acquired.clear()
        self._next = len(self.order)
