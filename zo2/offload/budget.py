"""The placement policy: where each block lives under the memory budgets, and the bytes that decide it.

Everything here works from parameter shapes alone (a meta-device model is enough), so the engine's
placement (:mod:`.placement`) and ``zo2 plan`` (:mod:`zo2.plan`) apply the same rule before a byte of
weights is allocated. The working device holds the resident units, ``num_slots`` slots for streamed
blocks, and the perturbed copies in flight (:func:`perturbed_bytes`: whole units in unit scope, one
module's matrices in module scope); :func:`block_locations` keeps as many leading blocks resident as
``ZOConfig.gpu_memory_budget`` allows, and with disk offload as many offloaded blocks in host memory as
``ZOConfig.host_memory_budget`` allows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Sequence

import torch
from torch import nn

from ..config import ZOConfig, ZOConfigError
from ..methods import method_class
from ..units.partition import find_blocks
from ..updates.log import UpdateLog
from .disk.aligned import padded


class BudgetError(ZOConfigError):
    """The memory budget cannot hold even a fully offloaded model's working set."""


def param_bytes(params: Sequence[nn.Parameter], dtype: torch.dtype | None,
                frozen_dtype: torch.dtype | None = None) -> int:
    """Bytes of ``params`` stored in ``dtype`` (frozen ones in ``frozen_dtype``; None: their own dtypes)."""
    return sum(p.numel() * ((dtype if p.requires_grad else frozen_dtype or dtype) or p.dtype).itemsize
               for p in params)


@dataclass(frozen=True)
class ModelSizes:
    """Bytes of a model's weights as zo2 places and perturbs them, in the storage dtype."""

    fixed: int
    """Everything outside the blocks (embedding and head units): always resident."""
    blocks: tuple[int, ...]
    """Each block."""
    fixed_vectors: int
    """The part of ``fixed`` in parameters of fewer than two dims (biases, norms)."""
    block_vectors: int
    """The most bytes of such parameters one block holds."""
    module_matrices: int
    """The most bytes of weight matrices one module owns directly: module scope's perturbed copy."""


def model_sizes(model: nn.Module, dtype: torch.dtype | None = None,
                frozen_dtype: torch.dtype | None = None) -> ModelSizes:
    """The :class:`ModelSizes` of ``model`` (a meta-device model is enough); frozen parameters counted in
    ``frozen_dtype`` when given."""
    def size(params: Sequence[nn.Parameter]) -> int:
        return param_bytes(params, dtype, frozen_dtype)

    _, blocks = find_blocks(model)
    seen: set[int] = set()
    per_block, block_vectors = [], 0
    for block in blocks:
        params = [p for p in block.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        per_block.append(size(params))
        block_vectors = max(block_vectors, size([p for p in params if p.dim() < 2]))
    rest = [p for p in {id(p): p for p in model.parameters()}.values() if id(p) not in seen]
    module_matrices = max((size([p for p in m.parameters(recurse=False) if p.dim() >= 2 and p.requires_grad])
                           for m in model.modules()), default=0)
    return ModelSizes(fixed=size(rest), blocks=tuple(per_block), fixed_vectors=size([p for p in rest if p.dim() < 2]),
                      block_vectors=block_vectors, module_matrices=module_matrices)


def human_bytes(size: float) -> str:
    """``1.5e9`` -> ``"1.50 GB"`` (decimal units, as GPU memory is usually quoted)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(size) >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{int(size)} B"


def resolve_scope(config: ZOConfig, streams: bool, module_scope_ok: bool = True, accelerator: bool = True) -> str:
    """``config.perturbation_scope`` resolved: "auto" is "module" when any block ``streams`` to an
    ``accelerator`` (device memory is what is short there); on a CPU working device, where generating
    z dominates the step, "unit" (z once per walk). Plans assume an accelerator."""
    scope = config.perturbation_scope
    if scope == "auto":
        scope = "module" if streams and accelerator else "unit"
    return "unit" if scope == "module" and not module_scope_ok else scope


@dataclass(frozen=True)
class WalkShape:
    """How a step of a config runs: its parts (evaluations) and the walks they take."""

    parts: int
    """Evaluations per step (2q for q-SPSA, N + 1 for fzoo)."""
    per_walk: int
    """Parts computed in one walk (``max_parts_per_walk`` caps it): the batch is replicated this often."""
    walks: int
    """Walks per (micro-)batch: each uploads every offloaded block once."""
    perturbed_per_walk: int
    """Perturbed copies a walk makes of each unit at most (clean parts read the weights themselves)."""


def walk_shape(config: ZOConfig) -> WalkShape:
    """The :class:`WalkShape` of ``config``'s method, directions and ``max_parts_per_walk``."""
    method = method_class(config.method)(config, UpdateLog(config.num_directions))
    parts = method.parts(list(range(config.num_directions)))
    per_walk = min(config.max_parts_per_walk or len(parts), len(parts))
    perturbed = sum(1 for part in parts if part.sign)
    return WalkShape(len(parts), per_walk, -(-len(parts) // per_walk), min(per_walk, perturbed))


def perturbed_bytes(sizes: ModelSizes, scope: str, copies: int = 2) -> int:
    """Bytes of perturbed copies in flight with ``copies`` perturbed parts per walk. Unit scope: the copies
    of every non-block unit (a tied embedding is read again by the head, so its copies live for the whole
    walk) and of one block. Module scope: the copies of those units' vectors, and one module's matrices."""
    if scope == "unit":
        return copies * (sizes.fixed + max(sizes.blocks, default=0))
    return sizes.module_matrices + copies * (sizes.fixed_vectors + sizes.block_vectors)


def working_bytes(sizes: ModelSizes, offloaded: Collection[int], num_slots: int, scope: str, copies: int = 2) -> int:
    """Working-device bytes of weights and zo2's buffers with the ``offloaded`` blocks streaming: the
    non-block units and resident blocks, the slots (if any block streams) and the perturbed copies."""
    streamed = [size for i, size in enumerate(sizes.blocks) if i in offloaded]
    slots = num_slots * max(streamed) if streamed else 0
    return sizes.fixed + sum(sizes.blocks) - sum(streamed) + slots + perturbed_bytes(sizes, scope, copies)


def resident_block_count(sizes: ModelSizes, budget: int, config: ZOConfig, module_scope_ok: bool = True,
                         accelerator: bool = True) -> int:
    """The most leading blocks that can stay resident within ``budget`` bytes (the rest stream).

    Raises :class:`BudgetError` when even streaming every block does not fit."""
    count, copies = len(sizes.blocks), walk_shape(config).perturbed_per_walk
    for resident in range(count, -1, -1):
        scope = resolve_scope(config, resident < count, module_scope_ok, accelerator)
        if working_bytes(sizes, range(resident, count), config.num_slots, scope, copies) <= budget:
            return resident
    minimum = working_bytes(sizes, range(count), config.num_slots, resolve_scope(config, count > 0, module_scope_ok,
                                                                                 accelerator), copies)
    raise BudgetError(f"ZOConfig.gpu_memory_budget={human_bytes(budget)} is below the {human_bytes(minimum)} this "
                      f"model needs with every block offloaded (non-block units {human_bytes(sizes.fixed)} "
                      f"resident, {config.num_slots} slots, perturbed copies in flight); raise the budget or "
                      "lower num_slots")


def offloaded_blocks(config: ZOConfig, sizes: ModelSizes, module_scope_ok: bool = True,
                     accelerator: bool = True) -> list[int]:
    """Block indices to offload: ``config.offloading_blocks``, or with ``gpu_memory_budget`` set (and
    no explicit choice) every block after the leading ones the budget holds."""
    count = len(sizes.blocks)
    if not config.zo2 or config.offloading_blocks is not None or config.gpu_memory_budget is None:
        return config.offloaded_block_indices(count)
    resident = resident_block_count(sizes, config.gpu_memory_budget, config, module_scope_ok, accelerator)
    return list(range(resident, count))


#: Where a block lives: resident on the working device, offloaded to host memory, or offloaded to disk.
LOCATIONS = ("device", "host", "disk")


def host_bytes(sizes: ModelSizes, locations: Sequence[str], config: ZOConfig, scope: str, copies: int = 2,
               accelerator: bool = True) -> int:
    """Host bytes zo2 holds with blocks at ``locations``: the masters of blocks offloaded to host memory,
    the ``num_slots`` staging buffers that disk reads land in (aligned, each the largest disk block),
    and on a CPU working device everything the working device holds (there it is host memory; its slots
    are the staging buffers)."""
    held = sum(size for size, where in zip(sizes.blocks, locations) if where == "host")
    on_disk = [size for size, where in zip(sizes.blocks, locations) if where == "disk"]
    if not accelerator:
        offloaded = [i for i, where in enumerate(locations) if where != "device"]
        return held + working_bytes(sizes, offloaded, config.num_slots, scope, copies)
    return held + (config.num_slots * padded(max(on_disk)) if on_disk else 0)


def block_locations(config: ZOConfig, sizes: ModelSizes, module_scope_ok: bool = True,
                    accelerator: bool = True) -> list[str]:
    """Where each block lives (one of :data:`LOCATIONS`): the working device holds the leading blocks
    ``gpu_memory_budget`` allows (:func:`offloaded_blocks`); with ``offloading_device="disk"`` the leading
    offloaded blocks that ``host_memory_budget`` holds stay in host memory and the rest live on disk
    (every offloaded block without a host budget). Raises :class:`BudgetError` when the host budget
    cannot hold even the staging buffers (and, on a CPU working device, the working set)."""
    offloaded = offloaded_blocks(config, sizes, module_scope_ok, accelerator)
    spill = "disk" if config.offloads_to_disk else "host"
    locations = ["device" if i not in offloaded else spill for i in range(len(sizes.blocks))]
    budget = config.host_memory_budget
    if budget is None:
        return locations
    scope = resolve_scope(config, bool(offloaded), module_scope_ok, accelerator)
    copies = walk_shape(config).perturbed_per_walk
    for kept in range(len(offloaded) if spill == "disk" else 0, -1, -1):
        trial = [("host" if i in offloaded[:kept] else where) for i, where in enumerate(locations)]
        if host_bytes(sizes, trial, config, scope, copies, accelerator) <= budget:
            return trial
    needed = host_bytes(sizes, locations, config, scope, copies, accelerator)
    fix = ("raise it or lower num_slots" if spill == "disk" else
           "raise it, or set offloading_device='disk' (and offload_dir) to keep blocks on disk")
    raise BudgetError(f"ZOConfig.host_memory_budget={human_bytes(budget)} is below the {human_bytes(needed)} zo2 needs "
                      f"in host memory with {'every offloaded block on disk' if spill == 'disk' else 'these blocks'} "
                      f"({config.num_slots} staging buffers{', and the working set on a CPU working device' if not accelerator else ''}); {fix}")
