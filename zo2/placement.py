"""Placement: which unit lives where, in which dtype, and which perturbation scope the engine uses.

Units are built one at a time into flat masters (:func:`zo2.storage.build_unit`), resident on the
working device or offloaded (to host memory, or to files with ``offloading_device="disk"``), so
building them never holds two copies of the model. Where each block goes comes from
``ZOConfig.offloading_blocks`` or the memory budgets, by the one rule of
:func:`zo2.plan.block_locations` that ``zo2 plan`` also applies. A :class:`WeightSource` lets the
units be filled from elsewhere than the parameters (``zo2.loading`` streams them from a checkpoint).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import disk, plan
from .config import ZOConfig
from .disk import DiskStore
from .history import UpdateLog
from .models import Partition
from .storage import Unit, build_unit

logger = logging.getLogger(__name__)


@dataclass
class Placement:
    """The built units (execution order) and the resolved perturbation scope."""

    units: list[Unit]
    scope: str
    """``"unit"`` or ``"module"``: ``ZOConfig.perturbation_scope`` resolved for this model and device."""
    store: DiskStore | None = None
    """The files of the disk-offloaded units (``offloading_device="disk"``), if any."""


@dataclass(frozen=True)
class WeightSource:
    """Where the units' weights come from when the parameters do not hold them (a streaming load)."""

    fill: Callable[[nn.Parameter, torch.Tensor], None]
    """Writes a parameter's weights into its view of a unit's master."""
    resume: bool = False
    """Disk offload: keep the masters already in ``offload_dir`` (a restart) instead of filling them."""
    base: UpdateLog | None = None
    """The updates these weights already hold (a checkpoint saved after training), so that disk files
    built from them are labelled with their steps (:mod:`zo2.disk`)."""


def unit_params(partition: Partition) -> list[tuple[str, list[nn.Parameter]]]:
    """Each unit's parameters; a parameter shared by several units (tied) belongs to the first."""
    seen: set[int] = set()
    units = []
    for name, members in partition.unit_members():
        params = []
        for member in members:
            for param in member.module.parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    params.append(param)
        units.append((name, params))
    return units


def _block_locations(model: nn.Module, config: ZOConfig, module_scope_ok: bool, device: torch.device) -> list[str]:
    sizes = plan.model_sizes(model, config.torch_storage_dtype)
    locations = plan.block_locations(config, sizes, module_scope_ok, device.type == "cuda")
    if config.gpu_memory_budget is not None or config.host_memory_budget is not None:
        logger.info("zo2 memory budgets (gpu %s, host %s): %d blocks on %s, %d in host memory, %d on disk",
                    config.gpu_memory_budget, config.host_memory_budget, locations.count("device"), device,
                    locations.count("host"), locations.count("disk"))
    return locations


def _move_buffers(model: nn.Module, device: torch.device) -> None:
    """Module buffers (rotary tables, masks, ...) go to the working device; they are never offloaded."""
    for module in model.modules():
        for key, buf in module.named_buffers(recurse=False):
            if buf is not None and buf.device != device:
                setattr(module, key, buf.to(device))


def place(model: nn.Module, partition: Partition, config: ZOConfig, device: torch.device,
          source: WeightSource | None = None) -> Placement:
    """Build every unit's flat master, one unit at a time (never two copies of the model); disk units
    are assembled in one staging buffer and written to their files (:mod:`zo2.disk`)."""
    blocks = _block_locations(model, config, partition.matrices_read_by_owner, device)
    where = ["device", *blocks, "device"]  # [embedding, blocks..., head]
    offload = {i for i, w in enumerate(where) if w != "device"}
    offload_device = torch.device("cpu" if config.offloads_to_disk else config.offloading_device)
    pin = device.type == "cuda" and offload_device.type == "cpu"
    named = unit_params(partition)
    store = disk.open_store(config, named, where, resume=source is not None and source.resume,
                            base=source.base if source is not None else None)
    staging = disk.build_buffer(store)
    fill = source.fill if source is not None else None
    units = []
    for index, (name, params) in enumerate(tqdm(named, desc="zo2: placing units", disable=source is None)):
        if where[index] == "disk":
            units.append(store.build_unit(index, name, params, dtype=config.torch_storage_dtype, fill=fill,
                                          staging=staging))
            continue
        offloaded = index in offload
        units.append(build_unit(index, name, params, device=offload_device if offloaded else device,
                                dtype=config.torch_storage_dtype, pin=pin and offloaded, offloaded=offloaded,
                                fill=fill))
    del staging
    _move_buffers(model, device)
    on_device = sum(u.numel for u in units if not u.offloaded)
    moved = sum(u.numel for u in units if u.offloaded)
    logger.info("zo2 placed %d units: %.1fM parameters resident on %s, %.1fM offloaded to %s (%d of %d blocks%s)",
                len(units), on_device / 1e6, device, moved / 1e6, offload_device, len(offload), len(partition.blocks),
                f", {where.count('disk')} on disk" if store is not None else "")
    streams = bool(offload)
    module_ok = partition.matrices_read_by_owner
    if streams and not module_ok and config.perturbation_scope == "auto" and device.type == "cuda":
        logger.info("zo2: %s reads weight matrices outside their modules; perturbing whole units",
                    type(model).__name__)
    return Placement(units, plan.resolve_scope(config, streams, module_ok, device.type == "cuda"), store)
