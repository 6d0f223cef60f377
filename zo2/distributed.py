"""Distributed zeroth-order training on torch.distributed (DistZO2): only scalars cross ranks per step.

The ranks form a grid ``direction groups x perturbation x data parallel`` (``ZOConfig.direction_parallel``,
``ZOConfig.perturbation_parallel``, and whatever is left of the world for data parallel). Every rank
computes a part of each step, described by a :class:`zo2.walk.role.Role`:

* data parallel: a shard of the batch (:func:`shard_batch`), every direction and side;
* perturbation parallel: one side (+eps or -eps) of the same batch;
* multi-direction: its group's share of the ``num_directions`` seeds.

The engine fills a [q, 4] float64 table of loss sums and counts with zeros where this rank computed
nothing; one ``all_reduce(SUM)`` over the world gives every rank the same table, hence the same
projected gradients and the same updates: the weights stay identical without ever being exchanged.

Sliced transfers (``ZOConfig.sliced_transfers``): the ranks of a node keep ONE copy of the offloaded
masters in shared host memory; each uploads 1/N of a unit and the slices are all-gathered on the
devices, and each writes back only its own slice (:class:`SlicedTransferScheduler`).
"""
from __future__ import annotations

import datetime
import logging
import os
import shutil
import socket
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist

from .checkpoint import load_checkpoint
from .checkpoint import save_checkpoint as save_whole_checkpoint
from .config import ZOConfig
from .engine import ZOEngine
from .offload.transfers import TransferScheduler
from .units.storage import SlotPool, Unit
from .walk.role import Role

logger = logging.getLogger(__name__)

#: ZOConfig fields that may differ between ranks (each rank has its own device).
_PER_RANK_FIELDS = ("working_device", "offloading_device", "offload_dir")  # each rank its own offload folder
_SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class DistributedError(RuntimeError):
    """A collective failed: a rank died, hung past the timeout, or the ranks disagree."""


@dataclass(frozen=True)
class Grid:
    """This rank's place in the ``direction groups x perturbation x data parallel`` grid.

    Ranks are numbered data-parallel index fastest: ``rank = dp_index + dp * (side + pert * group)``.
    """

    rank: int
    world_size: int
    direction_groups: int
    pert: int
    dp: int

    @classmethod
    def of(cls, config: ZOConfig, world_size: int, rank: int) -> Grid:
        """The grid of ``config`` over ``world_size`` ranks; raises naming the fields that do not fit."""
        groups, pert = config.direction_parallel, config.perturbation_parallel
        if config.num_directions % groups:
            raise DistributedError(f"ZOConfig.direction_parallel={groups} must divide ZOConfig.num_directions="
                                   f"{config.num_directions}: each direction group evaluates the same number of "
                                   "directions")
        if world_size % (groups * pert):
            raise DistributedError(f"the world size {world_size} is not a multiple of ZOConfig.direction_parallel"
                                   f" x ZOConfig.perturbation_parallel = {groups} x {pert}; launch a multiple of "
                                   f"{groups * pert} processes or change those fields")
        return cls(rank, world_size, groups, pert, world_size // (groups * pert))

    @property
    def dp_index(self) -> int:
        return self.rank % self.dp

    @property
    def side_index(self) -> int:
        return self.rank // self.dp % self.pert

    @property
    def direction_group(self) -> int:
        return self.rank // (self.dp * self.pert)

    def directions(self, num_directions: int) -> tuple[int, ...] | None:
        """The directions this rank evaluates (``None``: all)."""
        if self.direction_groups == 1:
            return None
        per_group = num_directions // self.direction_groups
        return tuple(range(self.direction_group * per_group, (self.direction_group + 1) * per_group))

    @property
    def sides(self) -> tuple[str, ...]:
        return ("plus", "minus") if self.pert == 1 else (("plus",), ("minus",))[self.side_index]


# ------------------------------------------------------------------------------------- set-up
def init_from_env(config: ZOConfig) -> bool:
    """Join the job described by the launcher's environment (torchrun / accelerate launch set
    ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``).

    NCCL when ``config.working_device`` is CUDA (each process takes ``cuda:LOCAL_RANK``), gloo otherwise;
    collectives fail after ``config.distributed_timeout`` seconds. Returns False (and does nothing) in
    a single process without those variables; True when a process group is (already) initialised.
    """
    if dist.is_initialized():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:  # not started by a distributed launcher
        return False
    backend = "gloo"
    if torch.device(config.working_device).type == "cuda":
        backend = "nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=config.distributed_timeout))
    logger.info("zo2 rank %d of %d joined (%s, timeout %ss)", dist.get_rank(), dist.get_world_size(), backend,
                config.distributed_timeout)
    return True


def _collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where tensors must live for collectives on ``group`` (NCCL: this rank's GPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _failed(what: str, err: Exception, group: dist.ProcessGroup | None) -> DistributedError:
    return DistributedError(f"zo2 rank {dist.get_rank()}: {what} over {dist.get_world_size(group)} ranks failed: "
                            "another rank died, hung past the timeout (ZOConfig.distributed_timeout or the "
                            f"launcher's), or ran a different number of steps. Cause: {err}")


def _gather_objects(value: Any, group: dist.ProcessGroup | None, what: str) -> list[Any]:
    gathered: list[Any] = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(gathered, value, group=group)
    except RuntimeError as err:
        raise _failed(what, err, group) from err
    return gathered


def check_config(config: ZOConfig, group: dist.ProcessGroup | None = None) -> None:
    """Raise :class:`DistributedError` naming the first ZOConfig field whose value differs between ranks
    (with every rank's value); devices may differ."""
    fields = {k: v for k, v in config.to_dict().items() if k not in _PER_RANK_FIELDS}
    gathered = _gather_objects(fields, group, "the start-up configuration check")
    for name in fields:
        values = [ranks_fields[name] for ranks_fields in gathered]
        if any(value != values[0] for value in values):
            listed = ", ".join(f"rank {rank}: {value!r}" for rank, value in enumerate(values))
            raise DistributedError(f"ZOConfig.{name} differs across ranks ({listed}); every rank must train "
                                   "with the same configuration")


def _all_reduce_sum(group: dist.ProcessGroup | None):
    device = _collective_device(group)

    def all_reduce(stats: torch.Tensor) -> torch.Tensor:
        summed = stats.to(device)
        try:
            dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
        except RuntimeError as err:
            raise _failed("the all-reduce of the step's losses", err, group) from err
        return summed.cpu()
    return all_reduce


def role_for(config: ZOConfig, group: dist.ProcessGroup | None = None) -> Role:
    """This process's :class:`~zo2.walk.role.Role` for ``config``; pass it as ``ZOEngine(..., role=...)``.

    Joins the launcher's process group if none exists yet (:func:`init_from_env`), checks that every
    rank runs the same configuration, and places this rank in the grid. In a single process this is
    ``Role()``. Collective: every rank of ``group`` (default: the world) must call it.
    """
    if not init_from_env(config):
        Grid.of(config, 1, 0)  # a single process must not ask for parallel modes it cannot have
        if config.sliced_transfers:
            raise DistributedError("ZOConfig.sliced_transfers=True needs several processes: launch with torchrun")
        return Role()
    check_config(config, group)
    grid = Grid.of(config, dist.get_world_size(group), dist.get_rank(group))
    logger.info("zo2 rank %d: directions %s, sides %s, data-parallel shard %d of %d", grid.rank,
                grid.directions(config.num_directions) or "all", grid.sides, grid.dp_index, grid.dp)
    return Role(directions=grid.directions(config.num_directions), sides=grid.sides,
                all_reduce=_all_reduce_sum(group),
                make_scheduler=_sliced_factory(config, group) if config.sliced_transfers else None)


def shard_batch(batch: Mapping[str, Any], config: ZOConfig, group: dist.ProcessGroup | None = None) -> dict:
    """This rank's data-parallel shard of a global ``batch``: contiguous rows of every tensor whose
    dim 0 is the batch size (others pass through). Ranks that differ only in side or direction
    group get the same shard. Outside a process group the batch is returned unchanged."""
    if not dist.is_initialized():
        return dict(batch)
    grid = Grid.of(config, dist.get_world_size(group), dist.get_rank(group))
    rows = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))
    if rows < grid.dp or (config.sliced_transfers and rows % grid.dp):
        raise ValueError(f"a batch of {rows} rows cannot be split over {grid.dp} data-parallel ranks; use a global "
                         f"batch of {'a multiple of' if config.sliced_transfers else 'at least'} {grid.dp} rows"
                         + (" (sliced transfers need equal shards)" if config.sliced_transfers else ""))
    return {k: v.tensor_split(grid.dp)[grid.dp_index] if isinstance(v, torch.Tensor) and v.dim() and
            v.shape[0] == rows else v for k, v in batch.items()}


# --------------------------------------------------------------------------- sliced transfers
def _all_gather_into(output: torch.Tensor, slice_: torch.Tensor, group: dist.ProcessGroup) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.12
    try:
        gather(output, slice_, group=group)
    except RuntimeError as err:
        raise _failed("the all-gather of a unit's slices", err, group) from err


class SlicedTransferScheduler(TransferScheduler):
    """Each of the N ranks of a node uploads 1/N of a unit from shared host memory; the device slots
    are completed by an all-gather over the node's group; each rank writes back only its slice.

    A unit of ``n`` elements is cut into N slices of ``n // N`` elements; the node's first rank also
    owns the few (< N) trailing elements and broadcasts them. So every host element is read and
    written by one rank only, and no rank ever waits for another's host copies during training.
    Every rank of the node must walk the same units in the same order (same batch shapes and number
    of walks), since each upload is a collective."""

    def __init__(self, order: list[Unit], pool: SlotPool, device: torch.device, group: dist.ProcessGroup) -> None:
        super().__init__(order, pool, device)
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self._first = dist.get_global_rank(group, 0)
        self._written = False  # slices written back since the last synchronize_host

    def _slice(self, unit: Unit) -> tuple[int, int, int]:
        """Start and end of this rank's slice, and where the first rank's tail starts."""
        length = unit.numel // self.size
        return self.rank * length, (self.rank + 1) * length, self.size * length

    def _copy_in(self, unit: Unit, buffer: torch.Tensor) -> None:
        start, end, tail = self._slice(unit)
        buffer[start:end].copy_(unit.master[start:end], non_blocking=self.cuda)
        if self.rank == 0:
            buffer[tail:].copy_(unit.master[tail:], non_blocking=self.cuda)
        if tail:  # in place: this rank's input is its own slice of the output (NCCL and gloo allow it)
            _all_gather_into(buffer[:tail], buffer[start:end], self.group)
        if tail < unit.numel:
            try:
                dist.broadcast(buffer[tail:], src=self._first, group=self.group)
            except RuntimeError as err:
                raise _failed("the broadcast of a unit's tail", err, self.group) from err

    def _copy_out(self, unit: Unit, buffer: torch.Tensor) -> None:
        self._written = True
        start, end, tail = self._slice(unit)
        unit.master[start:end].copy_(buffer[start:end], non_blocking=self.cuda)
        if self.rank == 0:
            unit.master[tail:].copy_(buffer[tail:], non_blocking=self.cuda)

    def synchronize_host(self) -> None:
        """Block until every rank of the node has written its slices back: after ``engine.flush()`` the
        shared masters are complete on every rank (to save, evaluate on the host or export)."""
        super().synchronize_host()
        if not self._written:  # every rank writes back the same units, so all of them skip or none
            return
        self._written = False
        try:
            dist.barrier(self.group)
        except RuntimeError as err:
            raise _failed("the barrier after writing slices back", err, self.group) from err


def node_group(group: dist.ProcessGroup | None = None) -> dist.ProcessGroup:
    """The ranks of ``group`` on this host, as a process group (collective over the default group)."""
    hosts = _gather_objects(socket.gethostname(), group, "the host name exchange")
    ranks = [dist.get_global_rank(group, r) if group is not None else r for r in range(len(hosts))]
    by_host: dict[str, list[int]] = {}
    for host, rank in zip(hosts, ranks):
        by_host.setdefault(host, []).append(rank)
    mine, _ = dist.new_subgroups_by_enumeration(list(by_host.values()))
    return mine


def _shm_shortfall(units: list[Unit]) -> str | None:
    """Why the shared-memory folder cannot hold the masters (a full tmpfs kills with SIGBUS), or None."""
    needed, free = sum(u.master.nbytes for u in units), shutil.disk_usage(_SHM_DIR).free
    if needed <= free:
        return None
    return (f"ZOConfig.sliced_transfers=True needs {needed / 2**30:.2f} GiB of shared memory in {_SHM_DIR} for "
            f"the offloaded blocks, but {free / 2**30:.2f} GiB are free: enlarge it (docker run --shm-size=...) "
            "or set sliced_transfers=False")


def share_masters(units: list[Unit], group: dist.ProcessGroup, pin: bool) -> None:
    """Replace each unit's private master by one copy in host memory shared by the ranks of ``group``
    (a file in /dev/shm mapped by every rank, unlinked once all have mapped it, so nothing is left
    behind). The first rank's weights are copied in; the ranks must hold identical weights."""
    first = dist.get_global_rank(group, 0)
    token = [uuid.uuid4().hex, _shm_shortfall(units)] if dist.get_rank(group) == 0 else [None, None]
    dist.broadcast_object_list(token, src=first, group=group)  # every rank raises the same error, or none
    if token[1]:
        raise DistributedError(token[1])
    paths = [os.path.join(_SHM_DIR, f"zo2-{token[0]}-{unit.index}") for unit in units]
    shared = []
    for writer in (True, False):  # the first rank creates and fills the files, then the others map them
        if (dist.get_rank(group) == 0) == writer:
            for unit, path in zip(units, paths):
                master = torch.from_file(path, shared=True, size=unit.numel, dtype=unit.master.dtype)
                if writer:
                    master.copy_(unit.master)
                shared.append(master)
        dist.barrier(group)
    if dist.get_rank(group) == 0:
        for path in paths:
            os.unlink(path)
    for unit, master in zip(units, shared):
        if pin:  # page-locked, so uploads and write-backs run asynchronously to the host
            torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(master.data_ptr(), master.nbytes, 0))
        unit.replace_master(master)
    if dist.get_rank(group) == 0:
        logger.info("zo2: %d offloaded units in host memory shared by %d ranks (%.1f MiB once, not %d times)",
                    len(units), dist.get_world_size(group), sum(m.nbytes for m in shared) / 2**20,
                    dist.get_world_size(group))


def _sliced_factory(config: ZOConfig, group: dist.ProcessGroup | None):
    if torch.device(config.offloading_device).type != "cpu":
        raise DistributedError(f"ZOConfig.sliced_transfers=True shares host memory: it needs "
                               f"offloading_device='cpu', not {config.offloading_device!r}")
    node = node_group(group)

    def make_scheduler(order: list[Unit], pool: SlotPool, device: torch.device) -> SlicedTransferScheduler:
        share_masters(order, node, pin=device.type == "cuda")
        return SlicedTransferScheduler(order, pool, device, node)
    return make_scheduler


# -------------------------------------------------------------------------------- checkpoints
def is_main_process(group: dist.ProcessGroup | None = None) -> bool:
    """True on the rank that writes files (rank 0 of ``group``), and in a single process."""
    return not dist.is_initialized() or dist.get_rank(group) == 0


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """Wait for every rank (no-op in a single process); raises :class:`DistributedError` on a dead rank."""
    if dist.is_initialized():
        try:
            dist.barrier(group)
        except RuntimeError as err:
            raise _failed("a barrier", err, group) from err


def save_checkpoint(engine: ZOEngine, directory: str | Path, *, group: dist.ProcessGroup | None = None,
                    **kwargs: Any) -> None:
    """:func:`zo2.checkpoint.save_checkpoint` for a job: every rank flushes, rank 0 alone writes
    (``kwargs``: ``tokenizer``, ``extra``), the others wait until the checkpoint is complete.
    Collective: every rank calls it. Data-parallel checkpoints resume on any number of ranks."""
    engine.flush()
    barrier(group)  # with sliced transfers every rank's slices must have landed before rank 0 reads
    if is_main_process(group):
        save_whole_checkpoint(engine, directory, **kwargs)
    barrier(group)


def restore_checkpoint(engine: ZOEngine, directory: str | Path, *, group: dist.ProcessGroup | None = None) -> None:
    """Verify and load a checkpoint into ``engine`` on every rank (or in one process), then wait for all."""
    load_checkpoint(directory).restore(engine)
    barrier(group)  # shared masters: nobody trains before every rank has finished loading
