"""Flat storage: each unit's parameters live in one contiguous 1-D master buffer.

The module's parameters are views into that buffer (``param.data`` is re-pointed, never copied back),
so a transfer is one copy of one buffer and noise is indexed by (unit, element offset). Within a
unit, parameters with two or more dimensions (weight matrices, embeddings) come first, so the
weight-decay mask is the prefix ``[0, n_decay)``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(eq=False)  # units compare by identity
class Unit:
    """One unit of the model: its parameters, their layout and the master buffer holding them."""

    index: int
    """Position in execution order; also the noise unit id, so z is the same wherever the unit lives."""
    name: str
    params: list[nn.Parameter]
    """Parameters owned by this unit, in layout order (decayed first)."""
    master: torch.Tensor
    """The exact weights, 1-D, in the storage dtype, on the working device (resident) or offloading device."""
    offloaded: bool
    n_decay: int
    """Elements [0, n_decay) receive weight decay; the rest (biases, norms) never do."""
    offsets: list[int] = field(default_factory=list)
    trainable: bool = True
    """False for a unit of frozen parameters (``requires_grad=False``): never perturbed, never updated,
    and, when offloaded, uploaded but never written back."""

    @property
    def numel(self) -> int:
        return self.master.numel()

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter's view into ``buffer`` (a tensor laid out like ``master``)."""
        return [buffer[start:start + p.numel()].view(p.shape) for p, start in zip(self.params, self.offsets)]

    def point_params_at(self, buffer: torch.Tensor) -> None:
        """Make this unit's parameters read from ``buffer`` (no copy)."""
        for param, view in zip(self.params, self.views(buffer)):
            param.data = view

    def replace_master(self, buffer: torch.Tensor) -> None:
        """Hold the master in ``buffer`` instead (e.g. memory shared between processes), which must already
        hold the same weights; the parameters are pointed at it."""
        if buffer.shape != self.master.shape or buffer.dtype != self.master.dtype:
            raise ValueError(f"unit {self.name}: a new master must be a {tuple(self.master.shape)} "
                             f"{self.master.dtype} tensor, got {tuple(buffer.shape)} {buffer.dtype}")
        self.master = buffer
        self.point_params_at(buffer)


def _layout(params: list[nn.Parameter]) -> tuple[list[nn.Parameter], int]:
    decayed = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return decayed + rest, sum(p.numel() for p in decayed)


def build_unit(index: int, name: str, params: list[nn.Parameter], *, device: torch.device,
               dtype: torch.dtype | None, pin: bool, offloaded: bool, trainable: bool = True,
               allocate: Callable[[int, torch.dtype], torch.Tensor] | None = None,
               fill: Callable[[nn.Parameter, torch.Tensor], None] | None = None) -> Unit:
    """Move ``params`` into one flat master buffer on ``device`` and point them at it.

    Each old tensor is released as soon as it is copied, so building units one by one never holds
    two full copies of the model. ``allocate(numel, dtype)`` supplies the master instead of a new
    tensor (e.g. an aligned staging buffer); ``fill(param, view)`` writes a parameter's weights into its
    view of the master instead of copying ``param.data`` (e.g. straight from a checkpoint's files).
    """
    ordered, n_decay = _layout(params)
    dtypes = {p.dtype for p in ordered}
    if dtype is None and len(dtypes) > 1:
        raise ValueError(f"unit {name} mixes parameter dtypes {sorted(map(str, dtypes))}; "
                         "set ZOConfig.storage_dtype to store them in one dtype")
    dtype = dtype or (ordered[0].dtype if ordered else torch.float32)
    total = sum(p.numel() for p in ordered)
    if allocate is None:
        master = torch.empty(total, dtype=dtype, device=device, pin_memory=pin and device.type == "cpu")
    else:
        master = allocate(total, dtype)
    unit = Unit(index=index, name=name, params=ordered, master=master, offloaded=offloaded, n_decay=n_decay,
                trainable=trainable)
    start = 0
    for param in ordered:
        unit.offsets.append(start)
        view = master[start:start + param.numel()].view(param.shape)
        if fill is None:
            view.copy_(param.data)
        else:
            fill(param, view)
        param.data = view
        start += param.numel()
    return unit


class SlotPool:
    """Reusable working-device buffers, each as large as the largest offloaded unit (ZO2's slots).

    Slots are raw bytes viewed as each unit's dtype, so units stored in different dtypes (a bf16 frozen
    part beside float32 adapters) share them."""

    _ALIGN = 64

    def __init__(self, num_slots: int, nbytes: int, device: torch.device) -> None:
        nbytes = -(-nbytes // self._ALIGN) * self._ALIGN
        self.buffers = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(num_slots)]
        logger.info("slot pool: %d x %.1f MiB on %s", num_slots, nbytes / 2**20, device)

    @classmethod
    def for_units(cls, num_slots: int, units: list[Unit], device: torch.device) -> "SlotPool":
        """Slots that can hold any of ``units``."""
        return cls(num_slots, max(u.master.nbytes for u in units), device)

    def view(self, slot: int, unit: Unit) -> torch.Tensor:
        """Slot ``slot`` as a buffer laid out like ``unit.master``."""
        return self.buffers[slot][:unit.master.nbytes].view(unit.master.dtype)

    def __len__(self) -> int:
        return len(self.buffers)


class BufferPool:
    """Working buffers reused from step to step (perturbed copies of units and matrices).

    ``take(numel)`` hands out the first ``numel`` elements of the smallest free buffer that holds them
    (allocating one when none does), ``give`` returns it. Steps ask for the same sizes in the same
    order, so after the first step nothing is allocated: no page faults on the CPU, no allocator work
    on the GPU. The pool holds at most what one step held at its peak."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._free: dict[torch.dtype, list[torch.Tensor]] = {}
        self._lent: dict[int, torch.Tensor] = {}  # data_ptr of a lent view -> its whole buffer

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A 1-D tensor of ``numel`` elements (contents undefined) until it is given back."""
        if numel == 0:
            return torch.empty(0, dtype=dtype, device=self.device)
        free = self._free.setdefault(dtype, [])
        fitting = [i for i, b in enumerate(free) if b.numel() >= numel]
        if fitting:
            buffer = free.pop(min(fitting, key=lambda i: free[i].numel()))
        else:
            buffer = torch.empty(numel, dtype=dtype, device=self.device)
        view = buffer[:numel]
        self._lent[view.data_ptr()] = buffer
        return view

    def give(self, view: torch.Tensor) -> None:
        """Return a tensor from :meth:`take`; it may be handed out again."""
        if view.numel() == 0:
            return
        buffer = self._lent.pop(view.data_ptr(), None)
        if buffer is not None:
            self._free.setdefault(buffer.dtype, []).append(buffer)

    def forget(self, view: torch.Tensor) -> None:
        """Never reuse this tensor's buffer (something outside zo2 still reads it)."""
        self._lent.pop(view.data_ptr(), None)

    def clear(self) -> None:
        """Drop every free buffer (lent ones are dropped when given back)."""
        self._free.clear()
