"""Handing back a disk-offloaded model (``ZOEngine.detach``): its units' weights read from their files into
host memory when they fit there, else a refusal that names the streaming save."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ...units.storage import Unit
from .folder import DiskOffloadError
from .store import DiskStore


def _cgroup_room() -> int | None:
    """Bytes this process's cgroup (v2) may still allocate, or None without a limit (containers, Slurm)."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else int(limit) - used


def available_host_bytes() -> int:
    """Host memory available to this process now: ``MemAvailable`` of /proc/meminfo (free memory and page
    cache the kernel can reclaim; else free pages from ``os.sysconf``), capped by a cgroup limit."""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    room = _cgroup_room()
    return available if room is None else min(available, room)


def materialise(store: DiskStore, units: Sequence[Unit]) -> None:
    """Read the flushed weights of every unit held in ``store`` into host memory and point its parameters at
    them (they held NaN placeholders), or raise :class:`DiskOffloadError` when they do not fit."""
    on_disk = [unit for unit in units if store.holds(unit)]
    needed = sum(unit.master.numel() * unit.master.element_size() for unit in on_disk)
    available = available_host_bytes()
    if needed > available:
        raise DiskOffloadError(f"detach() would read the {needed / 1e9:.2f} GB of disk-offloaded weights into host "
                               f"memory, which has {available / 1e9:.2f} GB available: save the trained model with "
                               "zo2.loading.save_pretrained(engine, folder) instead (it streams one unit at a time)")
    for unit in on_disk:
        unit.replace_master(store.read_tensor(unit.index))
