"""Flat storage: each unit's parameters live in one contiguous 1-D master buffer.

The module's parameters are views into that buffer (``param.data`` is re-pointed, never copied back),
so a transfer is one copy of one buffer and noise is indexed by (unit, element offset). Within a
unit, parameters with two or more dimensions (weight matrices, embeddings) come first, so the
weight-decay mask is the prefix ``[0, n_decay)``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

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
    applied: int = 0
    """How many entries of the engine's update history have been applied to ``master``."""

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


def _layout(params: list[nn.Parameter]) -> tuple[list[nn.Parameter], int]:
    decayed = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return decayed + rest, sum(p.numel() for p in decayed)


def build_unit(index: int, name: str, params: list[nn.Parameter], *, device: torch.device,
               dtype: torch.dtype | None, pin: bool, offloaded: bool) -> Unit:
    """Move ``params`` into one flat master buffer on ``device`` and point them at it.

    Each old tensor is released as soon as it is copied, so building units one by one never holds
    two full copies of the model.
    """
    ordered, n_decay = _layout(params)
    dtypes = {p.dtype for p in ordered}
    if dtype is None and len(dtypes) > 1:
        raise ValueError(f"unit {name} mixes parameter dtypes {sorted(map(str, dtypes))}; "
                         "set ZOConfig.storage_dtype to store them in one dtype")
    dtype = dtype or (ordered[0].dtype if ordered else torch.float32)
    total = sum(p.numel() for p in ordered)
    master = torch.empty(total, dtype=dtype, device=device, pin_memory=pin and device.type == "cpu")
    unit = Unit(index=index, name=name, params=ordered, master=master, offloaded=offloaded, n_decay=n_decay)
    start = 0
    for param in ordered:
        unit.offsets.append(start)
        master[start:start + param.numel()].view(param.shape).copy_(param.data)
        param.data = master[start:start + param.numel()].view(param.shape)
        start += param.numel()
    return unit


class SlotPool:
    """Reusable working-device buffers, each as large as the largest offloaded unit (ZO2's slots)."""

    def __init__(self, num_slots: int, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        self.buffers = [torch.empty(numel, dtype=dtype, device=device) for _ in range(num_slots)]
        logger.info("slot pool: %d x %.1f MiB on %s", num_slots,
                    numel * torch.finfo(dtype).bits / 8 / 2**20, device)

    def __len__(self) -> int:
        return len(self.buffers)
