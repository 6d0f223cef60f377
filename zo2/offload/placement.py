"""Placement: which unit lives where, in which dtype, and which perturbation scope the engine uses.

Units are built one at a time into flat masters (:func:`zo2.units.storage.build_unit`), resident on the
working device or offloaded (to host memory, or to files with ``offloading_device="disk"``), so
building them never holds two copies of the model. Where each block goes comes from
``ZOConfig.offloading_blocks`` or the memory budgets, by the one rule of
:func:`zo2.offload.budget.block_locations` that ``zo2 plan`` also applies. A :class:`WeightSource` lets the
units be filled from elsewhere than the parameters (``zo2.loading`` streams them from a checkpoint).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import ZOConfig
from ..units.partition import Partition
from ..units.storage import Unit, build_unit
from ..updates.log import UpdateLog
from .budget import block_locations, model_sizes, resolve_scope
from .disk.store import DiskStore, build_buffer, open_store

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
    built from them are labelled with their steps (:mod:`zo2.offload.disk.store`)."""
    fingerprint: dict[str, Any] | None = None
    """The fingerprint of the weights the run started from (:mod:`zo2.persist.fingerprint`), read from the
    checkpoint (the parameters hold stand-ins)."""


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
    sizes = model_sizes(model, config.torch_storage_dtype, config.torch_frozen_dtype)
    locations = block_locations(config, sizes, module_scope_ok, device.type == "cuda")
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


def _split_frozen(name: str, params: list[nn.Parameter]) -> list[tuple[str, list[nn.Parameter], bool]]:
    """(name, params, trainable) of the units a partition unit becomes: its trainable parameters, and its
    frozen ones (``requires_grad=False``) under ``name + ".frozen"``; empty parts are left out."""
    trainable = [p for p in params if p.requires_grad]
    frozen = [p for p in params if not p.requires_grad]
    parts = [(name, trainable, True), (f"{name}.frozen", frozen, False)]
    return [part for part in parts if part[1] or (part[2] and not params)]


@dataclass(frozen=True)
class _UnitSpec:
    """One unit to build: its name, parameters, whether it trains, its master dtype and where it lives."""

    name: str
    params: list[nn.Parameter]
    trainable: bool
    dtype: torch.dtype | None
    where: str  # one of LOCATIONS


def _unit_specs(partition: Partition, config: ZOConfig, locations: list[str]) -> list[_UnitSpec]:
    """Every unit in order. A partition unit holding frozen parameters becomes two units, the trainable
    one first (a model without frozen parameters keeps one unit per partition unit, and so the noise ids
    of every unit); of a mixed unit only the frozen part is offloaded unless ``offload_trainable``."""
    specs = []
    for (name, params), where in zip(unit_params(partition), locations):
        parts = _split_frozen(name, params)
        mixed = len(parts) > 1
        for part_name, part_params, trainable in parts:
            stays = where != "device" and trainable and mixed and not config.offload_trainable
            specs.append(_UnitSpec(part_name, part_params, trainable,
                                   config.torch_storage_dtype if trainable else config.torch_frozen_dtype,
                                   "device" if stays else where))
    return specs


def place(model: nn.Module, partition: Partition, config: ZOConfig, device: torch.device,
          source: WeightSource | None = None) -> Placement:
    """Build every unit's flat master, one unit at a time (never two copies of the model); disk units
    are assembled in one staging buffer and written to their files (:mod:`zo2.offload.disk.store`)."""
    blocks = _block_locations(model, config, partition.matrices_read_by_owner, device)
    specs = _unit_specs(partition, config, ["device", *blocks, "device"])  # [embedding, blocks..., head]
    offload_device = torch.device("cpu" if config.offloads_to_disk else config.offloading_device)
    pin = device.type == "cuda" and offload_device.type == "cpu"
    store = open_store(config, [(s.name, s.params, s.dtype) for s in specs], [s.where for s in specs],
                            resume=source is not None and source.resume,
                            base=source.base if source is not None else None)
    staging = build_buffer(store)
    fill = source.fill if source is not None else None
    units = []
    for index, spec in enumerate(tqdm(specs, desc="zo2: placing units", disable=source is None)):
        if spec.where == "disk":
            units.append(store.build_unit(index, spec.name, spec.params, dtype=spec.dtype, fill=fill,
                                          staging=staging, trainable=spec.trainable))
            continue
        offloaded = spec.where != "device"
        units.append(build_unit(index, spec.name, spec.params, device=offload_device if offloaded else device,
                                dtype=spec.dtype, pin=pin and offloaded, offloaded=offloaded,
                                trainable=spec.trainable, fill=fill))
    del staging
    _move_buffers(model, device)
    on_device = sum(u.numel for u in units if not u.offloaded)
    moved = sum(u.numel for u in units if u.offloaded)
    frozen = sum(u.numel for u in units if not u.trainable)
    logger.info("zo2 placed %d units: %.1fM parameters resident on %s, %.1fM offloaded to %s (%d of %d blocks%s); "
                "%.1fM trainable, %.1fM frozen", len(units), on_device / 1e6, device, moved / 1e6, offload_device,
                len(partition.blocks) - blocks.count("device"), len(partition.blocks),
                f", {blocks.count('disk')} on disk" if store is not None else "",
                (on_device + moved - frozen) / 1e6, frozen / 1e6)
    streams = any(u.offloaded for u in units)
    module_ok = partition.matrices_read_by_owner
    if streams and not module_ok and config.perturbation_scope == "auto" and device.type == "cuda":
        logger.info("zo2: %s reads weight matrices outside their modules; perturbing whole units",
                    type(model).__name__)
    return Placement(units, resolve_scope(config, streams, module_ok, device.type == "cuda"), store)
