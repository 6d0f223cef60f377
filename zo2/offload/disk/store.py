"""Disk offload: offloaded units' buffers live in files, read and written in large aligned blocks.

``ZOConfig(offloading_device="disk", offload_dir=...)``. The folder holds::

    store.json               what it holds: every stored unit (name, dtype, size) and the run's noise settings
    journal.jsonl            the update log, one step per line (:class:`zo2.offload.disk.journal.Journal`)
    unit-00003-master.zo2    one file per stored buffer: a 4 KiB header (JSON: unit, buffer, dtype, numel,
                             applied steps, the crc32 of each 16 MiB piece of the data), then the data, padded
                             to a multiple of 4 KiB
    base.json                digests of the units kept outside the folder (:mod:`zo2.loading`)
    lock                     held (``flock``) by the one process using the folder
    kept.json, kept/         only during an lr search or iterate averaging: the run's own unit files, kept
                             while the unit files hold other weights (:mod:`zo2.offload.disk.kept`)

Ownership: ``store.json`` is written first and is the folder's marker (it names the run: a random id, the
host and process that created it). zo2 refuses a folder holding files it did not write, refuses to start
over in a folder whose journal holds trained steps unless told to resume, and deletes only the names above
(:func:`zo2.offload.disk.folder.clear_folder`). The lock is an OS lock (``flock``): the kernel releases it when the process dies,
so a crashed run never leaves the folder locked.

Integrity: every unit file's header holds the crc32 of each piece of its data, computed by the threads
that read or write the pieces (so it overlaps the I/O) and checked on every read; a damaged
``store.json`` or journal, a unit whose checksum does not match or a unit file that disappeared stops
the run with a :class:`DiskOffloadError` naming the file (docs/guides/disk-offload.md#damage-and-recovery).

A file is keyed by (unit index, buffer name): a unit's trainable master is ``"master"``; a unit may
store other buffers beside it (e.g. an upload-only frozen part, written once and never written back).

Crash safety: a buffer is rewritten to a temporary file, fsynced and renamed over the old one, so every
file is a complete copy holding the number of steps its header says. The journal is appended (and
fsynced) before a file holding a step is renamed into place, so after a crash every file's steps are in
the journal and the rest are replayed from it (``zo2.loading.from_pretrained(..., resume=True)``). While
``kept.json`` exists, the run's state is the kept files and the journal's first steps the marker names (an lr
search's start, the last iterate under averaged weights): reopening with ``resume=True`` puts them back first.

Page cache: files are opened with ``O_DIRECT`` where the filesystem allows it (buffers and lengths
4 KiB aligned; see :func:`aligned_empty`); elsewhere (tmpfs, some network filesystems) every read and
write is followed by ``posix_fadvise(DONTNEED)``, so the kernel drops the pages. Either way host memory
holds zo2's own buffers only: the staging buffers (or slots) and the resident units.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import uuid
import weakref
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ...config import ZOConfig
from ...persist.durable import replace_file, write_json
from ...units.storage import Unit, build_unit
from ...updates import noise
from ...updates.log import HistoryError, UpdateLog
from . import kept
from .aligned import ALIGN, aligned_empty, padded, typed
from .folder import JOURNAL_NAME, STORE_NAME, DiskOffloadError, check_folder, delete_owned, lock_folder, refuse_foreign
from .journal import Journal

logger = logging.getLogger(__name__)

HEADER_BYTES = ALIGN
_MAGIC = b"ZO2UNIT1"
_FORMAT = "zo2-offload"
_VERSION = 2  # 2: unit headers carry the crc32 of their data
MASTER = "master"
"""Buffer name of a unit's trainable master weights."""
_SPACE_ERRORS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_RECOVERY = "see docs/guides/disk-offload.md#damage-and-recovery"


def placeholder(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """What a disk unit's parameters point at between uses: ``numel`` NaNs held in one element, so that
    code reading them outside zo2's walks gets NaN rather than plausible weights (docs/guides/disk-offload.md)."""
    return torch.full((1,), float("nan"), dtype=dtype).expand(numel)


def _raw(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.numpy()).cast("B")


@dataclass(frozen=True)
class StoredBuffer:
    """One file of the store: which unit and buffer it holds, in which dtype and size."""

    unit: int
    name: str
    unit_name: str
    dtype: torch.dtype
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def describe(self) -> list:
        return [self.unit, self.name, self.unit_name, str(self.dtype).replace("torch.", ""), self.numel]


def _direct_io_works(directory: Path) -> bool:
    """Whether files in ``directory`` accept O_DIRECT writes of aligned 4 KiB blocks."""
    if not hasattr(os, "O_DIRECT"):
        return False
    probe, block = directory / f".zo2-direct-{os.getpid()}", aligned_empty(ALIGN)
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
        try:
            os.pwritev(fd, [_raw(block)], 0)
        finally:
            os.close(fd)
        return True
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)


class DiskStore:
    """The files of one offload folder: reads into and writes from aligned host buffers.

    ``read`` and ``write`` run on the engine's I/O thread (:mod:`zo2.offload.disk.staging`), and on the main thread
    only while that one is idle (building units, ``read_tensor`` after a flush); a lock keeps them
    apart regardless. ``bytes_read`` / ``bytes_written`` / ``writes`` count the traffic."""

    def __init__(self, directory: str | os.PathLike, buffers: Sequence[StoredBuffer], run: dict[str, Any], *,
                 updates_per_step: int, resume: bool = False, direct: bool | None = None,
                 base: UpdateLog | None = None) -> None:
        self.buffers = {(b.unit, b.name): b for b in buffers}
        largest = max((padded(b.nbytes) for b in buffers), default=0)
        needed = sum(HEADER_BYTES + padded(b.nbytes) for b in buffers) + HEADER_BYTES + largest
        self.directory = check_folder(directory, needed - (self._existing_bytes(directory) if resume else 0))
        self._lock = lock_folder(self.directory)
        self._closer = weakref.finalize(self, os.close, self._lock)  # a collected store frees its folder
        refuse_foreign(self.directory)
        self._io_lock = threading.Lock()  # the I/O thread and the main thread (read_tensor) share the header
        self.direct = _direct_io_works(self.directory) if direct is None else direct
        if direct and not _direct_io_works(self.directory):
            raise DiskOffloadError(f"the filesystem of {self.directory} does not accept O_DIRECT: use "
                                   "ZOConfig.offload_io='buffered' (or 'auto')")
        self.run = run
        description = {"format": _FORMAT, "version": _VERSION, "run": run, "base_steps": base.steps if base else 0,
                       "buffers": [b.describe() for b in buffers]}
        self.base_steps = description["base_steps"]
        """Steps the weights the units were built from already held (a checkpoint saved after training)."""
        self.resumed = self._open_run(description, resume, base)
        try:
            self.journal = Journal(self.directory / JOURNAL_NAME, updates_per_step, run.get("generator", 0),
                                   resume=self.resumed)
        except HistoryError as err:
            raise DiskOffloadError(f"{err}; {_RECOVERY}") from None
        self._header = aligned_empty(HEADER_BYTES)
        self._applied: dict[tuple[int, str], int] = {}
        """Steps each file holds, for the files that exist."""
        if self.resumed:
            self._recover_kept()
            self._load_headers()
        elif base is not None:  # written ahead: the files built from these weights hold the base's steps
            self.journal.extend([base.step_updates(step) for step in range(base.steps)])
        self.bytes_read = self.bytes_written = self.writes = 0
        logger.info("zo2 disk offload: %d files in %s (%s)", len(buffers), self.directory,
                    "O_DIRECT" if self.direct else "buffered I/O, page cache dropped after each access")

    # --------------------------------------------------------------------------------- folder
    def _existing_bytes(self, directory: str | os.PathLike) -> int:
        path = Path(directory)
        return sum(f.stat().st_size for f in path.glob("unit-*.zo2")) if path.is_dir() else 0

    def _open_run(self, description: dict, resume: bool, base: UpdateLog | None) -> bool:
        """Whether the folder's run is continued (``resume`` and it is this run); else start afresh, which is
        refused when the folder holds trained steps or a damaged store.json (nothing is deleted then)."""
        saved = self._saved()
        if saved is not None and resume:
            self._check_same_run(saved, description)
            return True
        lost = self._trained_steps(saved, base) if saved is not None else 0
        if lost:
            raise DiskOffloadError(f"ZOConfig.offload_dir={str(self.directory)!r} holds a run with "
                                   f"{lost} trained steps: pass resume=True to continue it "
                                   "(zo2.loading.from_pretrained(..., resume=True)), or start over in another folder "
                                   "or after zo2.offload.disk.folder.clear_folder(offload_dir) deletes its files")
        delete_owned(self.directory)
        owner = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self.write_json(STORE_NAME, {**description, "owner": owner})
        return False

    def _saved(self) -> dict | None:
        """The folder's store.json (None when the folder holds no run); a damaged one is an error."""
        path = self.directory / STORE_NAME
        try:
            saved = json.loads(path.read_text())
            if not isinstance(saved, dict) or saved.get("format") != _FORMAT:
                raise ValueError("not a zo2 offload description")
            return saved
        except FileNotFoundError:
            leftovers = [p.name for p in self.directory.glob("unit-*.zo2")] + \
                [JOURNAL_NAME] * (self.directory / JOURNAL_NAME).exists()
            if not leftovers:
                return None
            raise DiskOffloadError(f"{path} is missing but the folder holds {', '.join(sorted(leftovers)[:3])}: "
                                   f"the run's description was deleted; {_RECOVERY}") from None
        except (ValueError, UnicodeDecodeError) as err:  # json.JSONDecodeError is a ValueError
            raise DiskOffloadError(f"{path} is damaged ({err}): the folder's unit files cannot be trusted without "
                                   "it, and zo2 will not start over on top of them. Resume from your newest checkpoint "
                                   "with a fresh offload_dir, or delete the folder's files with "
                                   f"zo2.offload.disk.folder.clear_folder; {_RECOVERY}") from None

    def _check_same_run(self, saved: dict, description: dict) -> None:
        if saved.get("version") != _VERSION:
            raise DiskOffloadError(f"{self.directory / STORE_NAME} was written by another zo2 version (offload format "
                                   f"{saved.get('version')}, this one reads {_VERSION}): resume from a checkpoint "
                                   "with a fresh offload_dir")
        if {k: v for k, v in saved.items() if k != "owner"} != json.loads(json.dumps(description)):
            raise DiskOffloadError(f"{self.directory} holds another run's masters (store.json differs: other units, "
                                   "dtype or noise settings); resume with the run's own config, or use another "
                                   "folder to start over")

    def _trained_steps(self, saved: dict, base: UpdateLog | None) -> int:
        """Steps the journal holds beyond its run's base that starting over from ``base`` would lose (none
        when ``base`` begins with every step of the journal: a restart from a later checkpoint of the run)."""
        try:
            lines = (self.directory / JOURNAL_NAME).read_bytes().split(b"\n")[1:-1]
        except FileNotFoundError:
            return 0
        marker = self._kept_marker()
        if marker is not None:  # the run's steps are the kept ones; the rest are an lr search's candidates
            lines = lines[:marker["steps"]]
        try:
            if base is not None and len(lines) <= base.steps and all(
                    json.loads(line)["updates"] == [u.to_json() for u in base.step_updates(step)]
                    for step, line in enumerate(lines)):
                return 0
        except (ValueError, KeyError, TypeError):
            pass  # a damaged line: its steps count as trained
        return max(0, len(lines) - int(saved.get("base_steps", 0)))

    def read_json(self, name: str) -> Any:
        """A JSON file of the folder (None if missing)."""
        try:
            return json.loads((self.directory / name).read_text())
        except FileNotFoundError:
            return None

    def write_json(self, name: str, data: Any) -> None:
        """Write a small JSON file into the folder atomically (temporary file, fsync, rename)."""
        write_json(self.directory / name, data)

    def path(self, unit: int, name: str = MASTER) -> Path:
        """The file of buffer ``name`` of unit ``unit``."""
        return self.directory / f"unit-{unit:05d}-{name}.zo2"

    def holds(self, unit: Unit, name: str = MASTER) -> bool:
        """Whether buffer ``name`` of ``unit`` lives in this store."""
        return (unit.index, name) in self.buffers

    def applied(self, unit: int, name: str = MASTER) -> int:
        """How many steps the file of ``unit``'s buffer holds."""
        return self._applied[(unit, name)]

    # ----------------------------------------------------------------------------- kept files
    def keep(self, units: Sequence[int], purpose: str) -> None:
        """Keep the master files of ``units`` as they are now (every write landed) and the journal's length,
        until :meth:`release_kept`: the run's state, which :meth:`restore_kept` (or reopening the folder with
        ``resume=True`` after a crash) puts back. ``purpose`` says why, in the logs (e.g. "an lr search")."""
        marker = {"purpose": purpose, "steps": self.journal.steps, "units": list(units)}
        kept.keep(self.directory, [self.path(unit).name for unit in units], marker)

    def _kept_marker(self) -> dict | None:
        try:
            return kept.read_marker(self.directory)
        except (ValueError, UnicodeDecodeError) as err:
            raise DiskOffloadError(f"{self.directory / kept.MARKER} is damaged ({err}): the unit files may hold an "
                                   f"lr search's candidates or averaged weights, not the run's; {_RECOVERY}") from None

    def restore_kept(self) -> int:
        """Make the kept files the current ones and rewind the journal to the steps they hold (the kept copies
        stay, for the next restore); returns those steps."""
        marker = self._kept_marker()
        self.journal.rewind(marker["steps"])
        try:
            kept.put_back(self.directory, marker["files"])
        except FileNotFoundError as err:
            raise DiskOffloadError(f"{err}: {marker['purpose']} kept the run's files there and they are lost, so "
                                   f"the unit files cannot be trusted; {_RECOVERY}") from None
        for unit in marker["units"]:
            self._applied[(unit, MASTER)] = marker["steps"]
        return marker["steps"]

    def release_kept(self) -> None:
        """Forget the kept files (after the last :meth:`restore_kept`, or to keep what the files hold now)."""
        kept.release(self.directory)

    def _recover_kept(self) -> None:
        """On reopening: put back the files a search or averaging kept when a crash stopped it."""
        kept.remove_leftover(self.directory)
        marker = self._kept_marker()
        if marker is None:
            return
        steps = self.restore_kept()
        self.release_kept()
        logger.warning("zo2 disk offload: %s in %s did not finish; its files are back at step %d", marker["purpose"],
                       self.directory, steps)

    # ------------------------------------------------------------------------------- file I/O
    def _open(self, path: Path, flags: int) -> int:
        return os.open(path, flags | (os.O_DIRECT if self.direct else 0), 0o644)

    def _drop_cache(self, fd: int) -> None:
        if not self.direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def _header_for(self, key: tuple[int, str], applied: int, crc32: list[int] | None) -> dict:
        stored = self.buffers[key]
        return {"unit": stored.unit, "buffer": stored.name, "name": stored.unit_name,
                "dtype": str(stored.dtype).replace("torch.", ""), "numel": stored.numel, "applied": applied,
                "crc32": crc32}

    def _parse_header(self, path: Path, raw: memoryview) -> dict:
        if bytes(raw[:len(_MAGIC)]) != _MAGIC:
            raise DiskOffloadError(f"{path}: not a zo2 offload file (bad magic): the file is damaged or was modified "
                                   f"outside zo2; {_RECOVERY}")
        text = bytes(raw[len(_MAGIC):]).rstrip(b"\0")
        try:
            return json.loads(text)
        except (ValueError, UnicodeDecodeError):
            raise DiskOffloadError(f"{path}: its header is damaged (not valid JSON); {_RECOVERY}") from None

    def read(self, unit: int, buffer: torch.Tensor, expected: int | None = None, name: str = MASTER) -> None:
        """Fill ``buffer`` (uint8, aligned, at least ``padded`` bytes) with the stored data; check that the
        file holds ``expected`` steps when given (the engine's view of it)."""
        with self._io_lock:
            self._read(unit, buffer, expected, name)

    def _read(self, unit: int, buffer: torch.Tensor, expected: int | None, name: str) -> None:
        key, path = (unit, name), self.path(unit, name)
        stored = self.buffers[key]
        size = padded(stored.nbytes)
        try:
            fd = self._open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise DiskOffloadError(f"{path} (unit {stored.unit_name}) is missing: it was deleted while the run used "
                                   f"the folder, and the unit's weights exist nowhere else; {_RECOVERY}") from None
        try:
            if not self.direct and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger read-ahead window
            _pread_whole(fd, [_raw(self._header)], 0, path)
            # O_DIRECT has no kernel read-ahead: several requests in flight, each piece's crc32 computed by the
            # thread that read it; through the page cache: one sequential reader, the crc32s computed behind it
            read = _pread_concurrently if self.direct else _pread_sequentially
            crcs = read(fd, _raw(buffer[:size]), HEADER_BYTES, path)
            self._drop_cache(fd)
        finally:
            os.close(fd)
        header = self._parse_header(path, _raw(self._header))
        if expected is not None and header["applied"] != expected:
            raise DiskOffloadError(f"{path} holds {header['applied']} steps, the engine's update log says {expected}: "
                                   "the folder was modified outside this engine, or a state was loaded with "
                                   "weights_updated=True into an engine whose weights do not hold it (build it with "
                                   "zo2.loading.from_checkpoint instead)")
        if crcs != header.get("crc32"):
            raise DiskOffloadError(f"{path} (unit {stored.unit_name}) is damaged: its data does not match the crc32 "
                                   "in its header (a disk error, or the file was changed outside zo2): its weights "
                                   f"cannot be trusted; {_RECOVERY}")
        self.bytes_read += stored.nbytes

    def write(self, unit: int, buffer: torch.Tensor, applied: int, steps: Sequence[Sequence] = (),
              name: str = MASTER) -> None:
        """Make the file hold ``buffer`` (uint8, aligned, padded) as ``applied`` steps, atomically:
        ``steps`` (the journal's missing lines) are appended first, then a temporary file is written,
        fsynced and renamed over the old one."""
        with self._io_lock:
            self._write(unit, buffer, applied, steps, name)

    def _write(self, unit: int, buffer: torch.Tensor, applied: int, steps: Sequence[Sequence], name: str) -> None:
        key, path = (unit, name), self.path(unit, name)
        stored = self.buffers[key]
        self.journal.extend(steps)
        data = _raw(buffer[:padded(stored.nbytes)])
        tmp = path.with_suffix(".tmp")
        try:
            fd = self._open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                crcs = _pwrite_with_crcs(fd, data, HEADER_BYTES)
                header = json.dumps(self._header_for(key, applied, crcs)).encode()
                self._header.zero_()
                _raw(self._header)[:len(_MAGIC) + len(header)] = _MAGIC + header
                _pwrite_whole(fd, [_raw(self._header)], 0)
                os.fdatasync(fd)
                self._drop_cache(fd)
            finally:
                os.close(fd)
            replace_file(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise self._write_error(stored, path, err) from None
        self._applied[key] = applied
        self.bytes_written += stored.nbytes
        self.writes += 1

    def _write_error(self, stored: StoredBuffer, path: Path, err: OSError) -> DiskOffloadError:
        kept = "the previous copy of the file is intact" if path.exists() else "no earlier copy exists"
        if err.errno in _SPACE_ERRORS:
            return DiskOffloadError(f"writing {stored.unit_name} ({stored.nbytes / 1e6:.1f} MB) to {path} failed: {err} "
                                    f"(the disk is full, or a quota or file-size limit was hit; {kept}). Free space "
                                    f"on {self.directory} (needs {stored.nbytes / 1e6:.1f} MB more), then resume")
        return DiskOffloadError(f"writing {stored.unit_name} to {path} failed: {err} ({kept})")

    def _load_headers(self) -> None:
        """Read every file's header (after a restart): which steps each holds. A file a crash left unwritten
        (during the first load) is missing: its unit is filled from the checkpoint again."""
        for key in self.buffers:
            path = self.path(*key)
            try:
                with open(path, "rb") as handle:
                    raw = handle.read(HEADER_BYTES)
            except FileNotFoundError:
                continue
            header = self._parse_header(path, memoryview(raw))
            if header != self._header_for(key, header.get("applied", -1), header.get("crc32")):
                raise DiskOffloadError(f"{path}: its header {header} does not match store.json")
            if header["applied"] > self.journal.steps:
                raise DiskOffloadError(f"{path} holds {header['applied']} steps but the journal only "
                                       f"{self.journal.steps}: the journal was truncated outside zo2")
            self._applied[key] = int(header["applied"])

    def read_tensor(self, unit: int, name: str = MASTER) -> torch.Tensor:
        """A fresh CPU tensor holding the stored buffer (for saving and inspection; call after
        ``engine.flush()`` so that every write has landed)."""
        stored = self.buffers[(unit, name)]
        buffer = aligned_empty(stored.nbytes)
        self.read(unit, buffer, name=name)
        return typed(buffer, stored.dtype, stored.numel).clone()

    def build_unit(self, index: int, name: str, params: list[nn.Parameter], *, dtype: torch.dtype | None,
                   fill: Callable[[nn.Parameter, torch.Tensor], None] | None, staging: torch.Tensor,
                   trainable: bool = True) -> Unit:
        """Build a disk unit: its master is assembled in ``staging`` (aligned, large enough) and written to
        its file, unless a resumed store already holds it; the parameters then point at a placeholder."""
        stored = self.buffers[(index, MASTER)]
        if (index, MASTER) in self._applied:  # resumed: the file holds the weights already
            return build_unit(index, name, params, device=torch.device("cpu"), dtype=dtype, pin=False,
                              offloaded=True, trainable=trainable, allocate=placeholder, fill=_keep)
        unit = build_unit(index, name, params, device=torch.device("cpu"), dtype=dtype, pin=False, offloaded=True,
                          trainable=trainable, allocate=lambda numel, dt: typed(staging, dt, numel), fill=fill)
        self.write(index, staging, applied=self.base_steps)
        unit.master = placeholder(stored.numel, stored.dtype)
        unit.point_params_at(unit.master)
        return unit

    def close(self) -> None:
        """Release the folder's lock (the files stay); also done when the store is garbage-collected."""
        self._closer()
        self.journal.close()


def run_description(config: ZOConfig) -> dict[str, Any]:
    """What must not change between a run and its restart from the same folder (else the files' steps
    and the journal's would not replay to the same weights)."""
    return {"method": config.method, "method_options": dict(config.method_options), "noise": config.noise,
            "seed": config.seed, "num_directions": config.num_directions, "weight_decay": config.weight_decay,
            "storage_dtype": config.storage_dtype, "kernels": config.kernels,
            "working_device": torch.device(config.working_device).type, "generator": noise.GENERATOR_VERSION}


def open_store(config: ZOConfig, named: Sequence[tuple[str, list[nn.Parameter], torch.dtype | None]],
               where: Sequence[str], *, resume: bool = False, base: UpdateLog | None = None) -> DiskStore | None:
    """The store of the units placed on ``"disk"`` (``named``: each unit's name, parameters and master
    dtype (None: the parameters') in unit order), or None when no unit is. ``resume``: keep a matching
    folder's files and journal; ``base``: the updates the weights being placed already hold."""
    buffers = [StoredBuffer(index, MASTER, name, dtype or params[0].dtype, sum(p.numel() for p in params))
               for index, ((name, params, dtype), w) in enumerate(zip(named, where)) if w == "disk"]
    if not buffers:
        return None
    direct = {"auto": None, "direct": True, "buffered": False}[config.offload_io]
    return DiskStore(config.offload_dir, buffers, run_description(config), updates_per_step=config.num_directions,
                     resume=resume, base=base, direct=direct)


def build_buffer(store: DiskStore | None) -> torch.Tensor | None:
    """The aligned host buffer disk units are assembled in while they are built (freed afterwards)."""
    if store is None:
        return None
    return aligned_empty(max(b.nbytes for b in store.buffers.values()))


def _keep(param: nn.Parameter, view: torch.Tensor) -> None:
    """A resumed unit's weights are in its file: nothing to copy."""


#: O_DIRECT reads are split into pieces of this size, ``_READ_DEPTH`` in flight at once: one synchronous
#: request at a time leaves the device idle between requests (measured on a virtio disk: 0.74 GB/s with
#: one 256 MiB request, against 1.9 GB/s through the page cache, whose read-ahead overlaps requests).
_READ_PIECE = 16 << 20
_READ_DEPTH = 4
_MAX_PIECES = 256  # crc32s a unit header holds (a 4 KiB header: about 11 bytes each)


def _pread_whole(fd: int, views: list[memoryview], offset: int, path: Path) -> None:
    """Fill ``views`` from ``fd`` at ``offset``, looping over short reads; a file that ends early raises."""
    total, done = sum(len(v) for v in views), 0
    while done < total:  # reads of regular files are whole in practice; loop to be sure
        count = os.preadv(fd, views, offset + done)
        if count == 0:
            raise DiskOffloadError(f"{path}: truncated ({offset + done} of {offset + total} bytes)")
        done += count
        views = _remaining(views, count)


def _pieces(view: memoryview) -> list[tuple[int, memoryview]]:
    """``view`` cut into the pieces read concurrently and checksummed one by one: :data:`_READ_PIECE` bytes,
    more for a unit over 4 GiB, so that its list of crc32s (at most :data:`_MAX_PIECES`) fits the header."""
    size = max(_READ_PIECE, padded(-(-len(view) // _MAX_PIECES)))
    return [(start, view[start:start + size]) for start in range(0, len(view), size)]


def _pread_concurrently(fd: int, view: memoryview, offset: int, path: Path) -> list[int]:
    """Fill ``view`` from ``fd`` at ``offset`` in aligned pieces read by a few threads (``os.preadv`` and
    ``zlib.crc32`` release the GIL), so the device sees a queue of requests; returns each piece's crc32."""
    def read(start: int, piece: memoryview) -> int:
        _pread_whole(fd, [piece], offset + start, path)
        return zlib.crc32(piece)

    pieces = _pieces(view)
    if len(pieces) == 1:
        return [read(*pieces[0])]
    with ThreadPoolExecutor(max_workers=_READ_DEPTH, thread_name_prefix="zo2-read") as pool:
        return [future.result() for future in [pool.submit(read, start, piece) for start, piece in pieces]]


def _pread_sequentially(fd: int, view: memoryview, offset: int, path: Path) -> list[int]:
    """Fill ``view`` from ``fd`` at ``offset`` piece after piece (the kernel's read-ahead keeps the device
    busy), another thread computing the crc32 of each piece read while the next one is read; the crcs."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="zo2-crc") as pool:
        futures = []
        for start, piece in _pieces(view):
            _pread_whole(fd, [piece], offset + start, path)
            futures.append(pool.submit(zlib.crc32, piece))
        return [future.result() for future in futures]


def _pwrite_whole(fd: int, views: list[memoryview], offset: int) -> None:
    """Write ``views`` to ``fd`` at ``offset``, looping over short writes."""
    done, total = 0, sum(len(v) for v in views)
    while done < total:
        count = os.pwritev(fd, views, offset + done)
        done += count
        views = _remaining(views, count)


def _pwrite_with_crcs(fd: int, view: memoryview, offset: int) -> list[int]:
    """Write ``view`` at ``offset`` while other threads compute the crc32 of each of its pieces; the crcs."""
    pieces = _pieces(view)
    if len(pieces) == 1:
        _pwrite_whole(fd, [view], offset)
        return [zlib.crc32(view)]
    with ThreadPoolExecutor(max_workers=_READ_DEPTH, thread_name_prefix="zo2-crc") as pool:
        futures = [pool.submit(zlib.crc32, piece) for _, piece in pieces]
        _pwrite_whole(fd, [view], offset)
        return [future.result() for future in futures]


def _remaining(views: list[memoryview], count: int) -> list[memoryview]:
    """``views`` without their first ``count`` bytes (after a short read or write)."""
    out = []
    for view in views:
        if count >= len(view):
            count -= len(view)
            continue
        out.append(view[count:])
        count = 0
    return out
