"""Durable writes: what a crash (power loss, kill -9) can never leave half-written.

One rule, used by checkpoints, the disk-offload folder and the CLI's output folders: new content goes to a
temporary sibling, is fsynced, is renamed over the target, and the folder holding the rename is fsynced.
A reader therefore sees the old content or the new content, never a mix, and after the folder's fsync the
rename itself survives a power loss.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["fsync_path", "replace_file", "write_bytes", "write_json", "staging_folder", "replace_folder",
           "clear_leftovers"]


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a folder (a folder's entry list holds the renames made in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(written: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename the complete, fsynced file ``written`` over ``target`` and fsync the folder."""
    os.replace(written, target)
    fsync_path(Path(target).parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Make ``path`` hold ``data``, durably: a temporary sibling, fsync, rename, fsync of the folder."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        replace_file(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Make ``path`` hold ``data`` as JSON, durably (:func:`write_bytes`)."""
    write_bytes(path, json.dumps(data).encode())


def staging_folder(target: str | os.PathLike) -> Path:
    """A new empty folder beside ``target`` (same filesystem, so it can be renamed onto it), named
    ``.<target>.tmp-*`` so that :func:`clear_leftovers` finds it after a crash."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))


def replace_folder(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename the complete folder ``staging`` to ``target`` and fsync the parent; an old ``target`` is
    renamed aside first (``.<target>.old-<pid>``) and removed after. At every instant a complete folder
    exists under ``target`` or the aside name."""
    staging, target = Path(staging), Path(target)
    aside = None
    if target.exists():
        aside = target.parent / f".{target.name}.old-{os.getpid()}"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(target, aside)
    os.replace(staging, target)
    fsync_path(target.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def clear_leftovers(target: str | os.PathLike) -> None:
    """Remove the staging and set-aside folders an interrupted write of ``target`` left beside it."""
    target = Path(target)
    for leftover in target.parent.glob(f".{target.name}.*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
