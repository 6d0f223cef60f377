"""Bytes of live tensors during a piece of code: what the code allocates, not what the process keeps.

Peak RSS depends on the C allocator (glibc keeps freed blocks below its mmap threshold, which grows
with use), on transparent huge pages and on the machine, so a test that compares RSS passes on one
machine and fails on the next. torch's profiler, with ``profile_memory=True``, records every
allocation (+bytes) and free (-bytes) that torch's own CPU allocator serves, in order: their running
sum over a window is the bytes of tensors created in the window and still alive, exactly, on every
machine, thread count and kernel set. The compiled noise generator keeps running under the profiler
(a ``TorchDispatchMode`` would force it back to eager torch, ~200 ops and their temporaries per chunk).

The recorded events are read from the profiler's result object (``profile.profiler.kineto_results``),
which torch does not document: this is the only place that touches it, guarded by the torch versions
it was checked on, and ``tests/test_memory.py`` checks it on known allocations.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

#: torch releases whose profiler results were checked to expose the memory events read below.
CHECKED = ((2, 11), (2, 13))


_WINDOW = "live_memory.window"


@dataclass
class LiveBytes:
    """What ``live_tensor_bytes`` measured, filled when its block exits.

    The profiler sees the frees of tensors allocated while it runs only: to count the frees of tensors
    made earlier (a model's weights, replaced by zo2's storage), make them inside the block and mark
    the part to measure with ``window()``; without a window the whole block is measured."""

    peak: int = 0
    """Largest growth of live tensor bytes over their value when the window opened."""
    end: int = 0
    """Growth of live tensor bytes when the window closed (allocated and alive, minus freed)."""

    @staticmethod
    def window() -> contextlib.AbstractContextManager:
        """The part of the ``live_tensor_bytes`` block to measure (one per block)."""
        return record_function(_WINDOW)


def _version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def _events(prof: profile) -> tuple[list, tuple[int, int] | None]:
    """The CPU allocator's (+/-bytes) events in the order they happened, and the window's (start, end) in
    the same clock (None without a window)."""
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None or not hasattr(results, "events"):
        raise RuntimeError(f"torch {torch.__version__}: the profiler's results no longer expose kineto_results."
                           f"events(); tests/live_memory.py was checked on torch {CHECKED[0]}..{CHECKED[1]}: "
                           "update it for this release")
    events = results.events()
    memory = [e for e in events if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    windows = [(e.start_ns(), e.end_ns()) for e in events if e.name() == _WINDOW]
    if len(windows) > 1:
        raise ValueError(f"live_tensor_bytes measures one window per block, got {len(windows)}")
    return sorted(memory, key=lambda e: e.start_ns()), (windows[0] if windows else None)


@contextlib.contextmanager
def live_tensor_bytes() -> Iterator[LiveBytes]:
    """Measure the bytes of CPU tensors allocated inside the block: ``with live_tensor_bytes() as live: ...``,
    then ``live.peak`` and ``live.end``."""
    if not CHECKED[0] <= _version():
        raise RuntimeError(f"torch {torch.__version__} is older than the releases tests/live_memory.py supports "
                           f"({CHECKED[0]} and newer)")
    live = LiveBytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield live
    events, window = _events(prof)
    start, stop = window or (-1, float("inf"))
    baseline = sum(e.nbytes() for e in events if e.start_ns() < start)
    running = baseline
    for event in (e for e in events if start <= e.start_ns() <= stop):
        running += event.nbytes()
        live.peak = max(live.peak, running - baseline)
    live.end = running - baseline
