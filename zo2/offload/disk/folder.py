"""An offload folder and what zo2 owns in it: the checks made before anything is written (it exists or can
be made, is writable, has room), the names zo2 writes there (all it ever deletes: :func:`clear_folder`), and
the OS lock (``flock``, released by the kernel when the process dies) that gives a folder to one engine."""
from __future__ import annotations

import fcntl
import fnmatch
import os
import shutil
from pathlib import Path

STORE_NAME = "store.json"
"""The folder's marker and description of its run, written first."""
JOURNAL_NAME = "journal.jsonl"
KEPT_NAME = "kept"
"""The folder of unit files kept aside during an lr search or iterate averaging (:mod:`.kept`)."""
KEPT_MARKER = "kept.json"
"""Says that ``kept/`` holds the run's files (:mod:`.kept`)."""
#: Every name zo2 writes in an offload folder (temporary files of durable writes included): all it deletes.
_OWNED = (STORE_NAME, JOURNAL_NAME, "base.json", "lock", "unit-*.zo2", "unit-*.tmp", f".{STORE_NAME}.*.tmp",
          f".{JOURNAL_NAME}.*.tmp", ".base.json.*.tmp", ".zo2-probe-*", ".zo2-direct-*", KEPT_NAME, KEPT_MARKER,
          f".{KEPT_MARKER}.*.tmp")


class DiskOffloadError(RuntimeError):
    """The offload folder cannot be used (missing, read-only, full, locked, or not this run's)."""


def check_folder(directory: str | os.PathLike, needed_bytes: int) -> Path:
    """Check, before anything is written, that ``directory`` exists (it is made when missing), is
    writable and has room for ``needed_bytes``; raise :class:`DiskOffloadError` saying what to fix otherwise."""
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DiskOffloadError(f"ZOConfig.offload_dir={str(directory)!r} does not exist and cannot be created "
                               f"({err}): create it (mkdir -p) on a fast local disk with at least "
                               f"{needed_bytes / 1e9:.2f} GB free, or point offload_dir at an existing folder") from None
    if not path.is_dir():
        raise DiskOffloadError(f"ZOConfig.offload_dir={str(directory)!r} is not a folder")
    probe = path / f".zo2-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as handle:
            handle.write(b"\0")
    except OSError as err:
        raise DiskOffloadError(f"cannot write to ZOConfig.offload_dir={str(directory)!r} ({err}): disk offload "
                               "writes every offloaded block there; choose a writable folder") from None
    probe.unlink()
    free = shutil.disk_usage(path).free
    if free < needed_bytes:
        raise DiskOffloadError(f"ZOConfig.offload_dir={str(directory)!r} has {free / 1e9:.2f} GB free, disk offload "
                               f"needs {needed_bytes / 1e9:.2f} GB (every offloaded block, plus room to rewrite the "
                               "largest one): free some space or choose another folder")
    return path


def _owned(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in _OWNED)


def foreign_files(directory: str | os.PathLike) -> list[str]:
    """The names in ``directory`` that zo2's disk offload did not write (sorted)."""
    path = Path(directory)
    return sorted(entry.name for entry in path.iterdir() if not _owned(entry.name)) if path.is_dir() else []


def refuse_foreign(directory: Path) -> None:
    foreign = foreign_files(directory)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise DiskOffloadError(f"ZOConfig.offload_dir={str(directory)!r} holds files zo2 did not write ({shown}): "
                               "disk offload needs a folder of its own and never touches other files; point "
                               f"offload_dir at an empty or new folder (e.g. {str(directory / 'zo2-offload')!r})")


def clear_folder(directory: str | os.PathLike) -> None:
    """Delete what zo2's disk offload wrote in ``directory`` (its unit files, store.json, journal, lock, kept/),
    and nothing else: the way to start over in a folder that holds a run. Refused while an engine uses it."""
    path = Path(directory)
    lock = lock_folder(path)
    try:
        delete_owned(path)
    finally:
        os.close(lock)


def delete_owned(directory: Path) -> None:
    """Delete the files zo2 wrote in ``directory`` except the lock, and its ``kept/`` folder (never a file it did
    not write). The marker of kept files goes first: a crash halfway never leaves it without its folder."""
    (directory / KEPT_MARKER).unlink(missing_ok=True)
    for entry in directory.iterdir():
        if entry.name == KEPT_NAME and entry.is_dir():
            shutil.rmtree(entry)
        elif _owned(entry.name) and entry.name != "lock" and entry.is_file():
            entry.unlink()


def lock_folder(directory: Path) -> int:
    """Take the folder's OS lock (``flock``; the kernel drops it when the process dies); its descriptor."""
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DiskOffloadError(f"ZOConfig.offload_dir={str(directory)!r} is in use by another zo2 engine: "
                               "give every engine (and every process) its own offload folder") from None
    return fd
