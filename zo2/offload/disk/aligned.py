"""Host buffers that O_DIRECT can read into and write from: 4 KiB aligned, lengths padded to 4 KiB.

Every such buffer zo2 allocates (disk offload's slots, staging buffers, headers, the buffer disk units
are assembled in) comes from :func:`aligned_empty`, which keeps a weak reference to it, so
:func:`live_buffer_bytes` measures what the disk backend holds in host memory at any instant.
"""
from __future__ import annotations

import weakref

import torch

ALIGN = 4096
"""Alignment of file offsets, lengths and buffer addresses (O_DIRECT's requirement on common disks)."""


def padded(nbytes: int) -> int:
    """``nbytes`` rounded up to a multiple of :data:`ALIGN`."""
    return -(-nbytes // ALIGN) * ALIGN


_LIVE: "weakref.WeakSet[torch.Tensor]" = weakref.WeakSet()  # every aligned buffer still referenced


def aligned_empty(nbytes: int, *, pin: bool = False) -> torch.Tensor:
    """A uint8 CPU tensor of ``padded(nbytes)`` bytes starting on an :data:`ALIGN` boundary (pinned if
    asked): what O_DIRECT reads and writes need. Its contents are undefined."""
    size = padded(nbytes)
    raw = torch.empty(size + ALIGN, dtype=torch.uint8, pin_memory=pin)
    _LIVE.add(raw)
    start = (-raw.data_ptr()) % ALIGN
    return raw[start:start + size]


def live_buffer_bytes() -> int:
    """Host bytes of every aligned buffer alive now (slots, staging buffers, headers, the build buffer):
    all the memory the disk backend allocates."""
    return sum(raw.numel() for raw in _LIVE)


def typed(buffer: torch.Tensor, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """The first ``numel`` elements of a uint8 buffer, viewed as ``dtype``."""
    return buffer[:numel * dtype.itemsize].view(dtype)
