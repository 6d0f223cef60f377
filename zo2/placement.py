"""Placement: which unit lives where, in which dtype, and which perturbation scope the engine uses.

Units are built one at a time into flat masters (:func:`zo2.storage.build_unit`), resident on the
working device or offloaded, so building them never holds two copies of the model. The blocks to
offload come from ``ZOConfig.offloading_blocks`` or, with ``gpu_memory_budget``, from the one rule
of :func:`zo2.plan.offloaded_blocks` that ``zo2 plan`` also applies.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from . import plan
from .config import ZOConfig
from .models import Partition
from .storage import Unit, build_unit

logger = logging.getLogger(__name__)


@dataclass
class Placement:
    """The built units (execution order) and the resolved perturbation scope."""

    units: list[Unit]
    scope: str
    """``"unit"`` or ``"module"``: ``ZOConfig.perturbation_scope`` resolved for this model and device."""


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


def _offloaded_blocks(model: nn.Module, config: ZOConfig, module_scope_ok: bool, device: torch.device) -> list[int]:
    sizes = plan.model_sizes(model, config.torch_storage_dtype, config.torch_frozen_dtype)
    offloaded = plan.offloaded_blocks(config, sizes, module_scope_ok, device.type == "cuda")
    if config.gpu_memory_budget is not None:
        logger.info("zo2 gpu_memory_budget %.2f GB: %d of %d blocks offloaded",
                    config.gpu_memory_budget / 1e9, len(offloaded), len(sizes.blocks))
    return offloaded


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


def place(model: nn.Module, partition: Partition, config: ZOConfig, device: torch.device) -> Placement:
    """Build every unit's flat master, one unit at a time (never two copies of the model).

    A partition unit holding frozen parameters becomes two units, the trainable one first (a model
    without frozen parameters keeps one unit per partition unit, and so the noise ids of every unit)."""
    offload = {i + 1 for i in _offloaded_blocks(model, config, partition.matrices_read_by_owner, device)}
    offload_device = torch.device(config.offloading_device)
    pin = device.type == "cuda" and offload_device.type == "cpu"
    units: list[Unit] = []
    for position, (name, params) in enumerate(unit_params(partition)):
        parts = _split_frozen(name, params)
        mixed = len(parts) > 1
        for part_name, part_params, trainable in parts:
            offloaded = position in offload and (not trainable or not mixed or bool(config.offload_trainable))
            dtype = config.torch_storage_dtype if trainable else config.torch_frozen_dtype
            units.append(build_unit(len(units), part_name, part_params, device=offload_device if offloaded else device,
                                    dtype=dtype, pin=pin and offloaded, offloaded=offloaded, trainable=trainable))
    _move_buffers(model, device)
    on_device = sum(u.numel for u in units if not u.offloaded)
    moved = sum(u.numel for u in units if u.offloaded)
    frozen = sum(u.numel for u in units if not u.trainable)
    logger.info("zo2 placed %d units: %.1fM parameters resident on %s, %.1fM offloaded to %s (%d of %d blocks); "
                "%.1fM trainable, %.1fM frozen", len(units), on_device / 1e6, device, moved / 1e6, offload_device,
                len(offload), len(partition.blocks), (on_device + moved - frozen) / 1e6, frozen / 1e6)
    streams = bool(offload)
    module_ok = partition.matrices_read_by_owner
    if streams and not module_ok and config.perturbation_scope == "auto" and device.type == "cuda":
        logger.info("zo2: %s reads weight matrices outside their modules; perturbing whole units",
                    type(model).__name__)
    return Placement(units, plan.resolve_scope(config, streams, module_ok, device.type == "cuda"))
