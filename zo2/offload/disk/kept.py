"""Files of an offload folder kept aside while the folder holds weights that are not the run's.

An lr search trains candidates from the run's start and returns to it; iterate averaging writes the mean of
the last iterates into the files. Both need the run's own files back afterwards, and the folder is the run's
durable state, so what they change must never be taken for training after a crash. Before they change
anything, the files are kept in ``kept/`` (hard links: the store only ever replaces a file by renaming a new
one over it, so a link keeps the old bytes; a copy where the filesystem has no hard links) and then the
marker ``kept.json`` is written, durably, naming the files, the journal's length at that instant and why.

While the marker exists, the run's state is the kept files and the journal's first ``steps`` lines. Putting
them back links each kept file over its current one (a temporary name, then a rename); releasing them removes
the marker first and the folder after. So a crash at any instant leaves the marker with every kept file (the
store puts them back when the folder is reopened with ``resume=True``), or no marker and the run's own files
(a ``kept/`` left without its marker is a leftover, deleted).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from ...persist.durable import fsync_path, write_json
from .folder import KEPT_MARKER as MARKER
from .folder import KEPT_NAME as FOLDER

_NO_LINKS = (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP)


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` holds ``source``'s bytes: a hard link, or a fsynced copy where the filesystem has none."""
    target.unlink(missing_ok=True)  # a leftover of a crash: never write through an old link
    try:
        os.link(source, target)
    except OSError as err:
        if err.errno not in _NO_LINKS:
            raise
        shutil.copyfile(source, target)
        fsync_path(target)


def keep(directory: Path, names: Sequence[str], marker: dict[str, Any]) -> None:
    """Keep the files ``names`` of ``directory`` as they are now in ``kept/``, then write ``marker`` (with the
    names added) as ``kept.json``, durably."""
    folder = directory / FOLDER
    shutil.rmtree(folder, ignore_errors=True)  # a leftover without its marker
    folder.mkdir()
    for name in names:
        _link_or_copy(directory / name, folder / name)
    fsync_path(folder)
    fsync_path(directory)  # kept/ itself is durable before the marker that points at it
    write_json(directory / MARKER, {**marker, "files": list(names)})


def read_marker(directory: Path) -> dict[str, Any] | None:
    """The marker of kept files (None when nothing is kept); ValueError when it does not parse."""
    try:
        marker = json.loads((directory / MARKER).read_text())
    except FileNotFoundError:
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), list) or "steps" not in marker:
        raise ValueError("not a zo2 marker of kept files")
    return marker


def put_back(directory: Path, names: Sequence[str]) -> None:
    """Make every kept file current again (each linked to a temporary name and renamed over its current
    copy), then fsync the folder; the kept copies stay. Raises FileNotFoundError naming a lost kept file."""
    for name in names:
        kept = directory / FOLDER / name
        if not kept.is_file():
            raise FileNotFoundError(f"{kept} is missing")
        temporary = (directory / name).with_suffix(".tmp")
        try:
            _link_or_copy(kept, temporary)
            os.replace(temporary, directory / name)
        except BaseException:
            temporary.unlink(missing_ok=True)  # a later write of the store must not truncate the kept copy
            raise
    fsync_path(directory)


def release(directory: Path) -> None:
    """Forget the kept files: the marker is removed (and the removal made durable) before the folder."""
    (directory / MARKER).unlink(missing_ok=True)
    fsync_path(directory)
    shutil.rmtree(directory / FOLDER, ignore_errors=True)


def remove_leftover(directory: Path) -> None:
    """Delete a ``kept/`` whose marker was never written (a crash while keeping): nothing relies on it."""
    if not (directory / MARKER).exists():
        shutil.rmtree(directory / FOLDER, ignore_errors=True)
