"""The ``--output-dir`` of a finetune run: claimed before anything is loaded, owned by one run at a time.

zo2 writes only inside a folder it owns and deletes only what it wrote there. A claimed folder holds
a marker (``.zo2-run.json``, naming the run) and a lock file (``.zo2-run.lock``) held with
``fcntl.flock`` while the run lives: the kernel releases it when the process ends, however it ends, so a
crashed or killed run never leaves the folder stuck. A folder holding files zo2 did not write is
refused; a folder holding a run's outputs is refused unless ``--resume`` (continue it) or
``--overwrite`` (remove what zo2 wrote there, then start afresh) says what to do with them.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import IO

from ...persist.durable import write_json
from ...tasks import TaskError

MARKER = ".zo2-run.json"
"""The marker file: format, run id, creation time and command line of the run that made the folder."""
LOCK = ".zo2-run.lock"
"""The lock file; a live run holds an exclusive ``flock`` on it (and writes its pid into it)."""
WRITTEN = ("checkpoints", "best", "final", "summary.json", "loss_curve.png")
"""What a finetune run writes in its output folder; ``--overwrite`` removes these (and their staging
leftovers) and nothing else."""
MARKER_FORMAT = "zo2-finetune-output"
PROBE = ".zo2-probe-"
"""Prefix of the empty file written and removed to test that the folder is writable."""


def _zo2_name(name: str) -> bool:
    """Whether a name in the output folder is zo2's: an output, the marker or lock, or a staging or
    set-aside copy of an output that an interrupted write left (``.best.tmp-*``, ``.best.old-*``)."""
    return (name in (*WRITTEN, MARKER, LOCK) or name.startswith(PROBE)
            or any(name.startswith(f".{w}.") for w in WRITTEN))


def _foreign(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if not _zo2_name(p.name))


def _make_folder(path: Path) -> None:
    """``path`` as an existing folder, or TaskError naming why it cannot be one."""
    if path.exists() and not path.is_dir():
        raise TaskError(f"--output-dir {path} is a file, not a folder: pass a new or empty folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TaskError(f"--output-dir {path} cannot be created ({err.strerror}): pass a folder you can "
                        "write to") from None


def _check_writable(path: Path) -> None:
    """Write and remove a probe file: ``os.access`` says yes to root on a read-only mount."""
    probe = path / f"{PROBE}{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise TaskError(f"--output-dir {path} is not writable ({err.strerror}): pass a folder you can write "
                        "to") from None


class OutputFolder:
    """A claimed ``--output-dir``: made, checked, marked and locked; :meth:`release` (or the process
    ending) frees it. Use :meth:`claim` to make one."""

    def __init__(self, path: Path, lock: IO[str]) -> None:
        self.path = path
        self._lock: IO[str] | None = lock

    @classmethod
    def claim(cls, folder: str | Path, *, resume: bool, overwrite: bool) -> OutputFolder:
        """Make ``folder`` if needed and take it for this run, or raise TaskError with the way forward: a
        file, an unwritable folder, files zo2 did not write, another live run, or a previous run's outputs
        without ``--resume``/``--overwrite``."""
        path = Path(folder)
        _make_folder(path)
        _check_writable(path)
        foreign = _foreign(path)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise TaskError(f"--output-dir {path} holds files zo2 did not write ({shown}); zo2 writes only into a "
                            f"new or empty folder or one of its own: pass e.g. --output-dir {path / 'zo2-run'}")
        lock = open(path / LOCK, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            lock.close()
            raise TaskError(f"--output-dir {path} is in use by another zo2 run (pid {holder}); wait for it to end "
                            "or pass another --output-dir") from None
        claimed = cls(path, lock)
        try:
            claimed._take(resume, overwrite)
        except BaseException:
            claimed.release()
            raise
        return claimed

    def _take(self, resume: bool, overwrite: bool) -> None:
        """With the lock held: refuse or clear a previous run's outputs, then mark the folder."""
        assert self._lock is not None
        used = [name for name in WRITTEN if (self.path / name).exists()]
        if used and not resume and not overwrite:
            raise TaskError(f"--output-dir {self.path} holds a previous run ({', '.join(used)}): pass --resume to "
                            "continue it, or --overwrite to delete its outputs and start afresh")
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"{os.getpid()}\n")
        self._lock.flush()
        if overwrite and not resume:
            for name in (n for n in os.listdir(self.path) if _zo2_name(n) and n not in (MARKER, LOCK)):
                target = self.path / name
                shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
        if resume and (self.path / MARKER).is_file():
            return  # the run goes on: its marker stays
        write_json(self.path / MARKER, {"format": MARKER_FORMAT, "run": uuid.uuid4().hex,
                                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                        "command": ["zo2", *sys.argv[1:]]})

    def check_room(self, needed: int) -> None:
        """TaskError unless the folder's filesystem has ``needed`` bytes free (what the run will write)."""
        free = shutil.disk_usage(self.path).free
        if free < needed:
            raise TaskError(f"--output-dir {self.path} has {free / 2**20:.1f} MiB free but the run will write about "
                            f"{needed / 2**20:.1f} MiB (checkpoints of the model's weights): free space, lower "
                            "--save-total-limit, or pass a folder on a larger disk")

    def release(self) -> None:
        """Free the folder for other runs (closing the lock file drops the flock)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def needed_bytes(weight_bytes: int, save_total_limit: int, first_order: bool) -> int:
    """What a run may hold in its output folder at once: ``--save-total-limit`` checkpoints, the one being
    written, and ``best/`` once the checkpoint it links to is pruned; a first-order run's ``best/`` and
    ``final/`` are copies, one more. 16 MiB cover the tokenizer, state, summary and plot."""
    copies = save_total_limit + 2 + (1 if first_order else 0)
    return copies * weight_bytes + 16 * 2**20

