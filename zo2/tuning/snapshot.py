"""Trainable weights kept on disk and put back bit for bit: the start of an lr search, the last iterate
under averaged weights. No second copy of the model sits in memory.

Undoing updates is not exact in floating point (``w - a + a != w``, and low-precision masters round
stochastically), so the weights are kept instead. :class:`KeptWeights` keeps every trainable unit's master,
one unit at a time: a disk unit's file in the offload folder itself (:meth:`zo2.offload.residency.Residency.
keep_disk_files`: hard links and a marker, so that a crash never leaves the folder holding weights it would
take for training), any other unit's master as a file in a temporary folder (frozen units never change).
:class:`StartSnapshot` adds an empty update log and the method's starting state: the engine before a search.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from types import TracebackType

import torch

from ..engine import ZOEngine


class KeptWeights:
    """The trainable masters of ``engine`` as they are now (flushed here), kept until :meth:`close`.

    ``purpose`` names the keeper in the offload folder's marker and logs. ``directory``: where the temporary
    folder for units outside a disk store is made (default: the system's); it needs their bytes free."""

    def __init__(self, engine: ZOEngine, purpose: str, directory: str | Path | None = None) -> None:
        self.engine = engine
        engine.flush()
        residency = engine.residency
        self._elsewhere = [unit for unit in engine.trainable_units if not residency.on_disk(unit)]
        self._folder = tempfile.TemporaryDirectory(prefix="zo2-kept-", dir=directory)
        for unit in self._elsewhere:
            torch.save(residency.unit_weights(unit), self._path(unit.index))
        residency.keep_disk_files(purpose)

    def _path(self, index: int) -> Path:
        return Path(self._folder.name) / f"unit-{index:05d}.pt"

    def put_back(self) -> None:
        """Make every trainable master hold the kept weights again, bit for bit. The update log must hold
        the kept steps and no pending update (drop or flush them first)."""
        residency = self.engine.residency
        residency.restore_disk_files()
        for unit in self._elsewhere:
            residency.load_unit_weights(unit, torch.load(self._path(unit.index)))

    def close(self) -> None:
        """Forget the kept weights (the engine keeps what it holds now)."""
        self.engine.residency.release_disk_files()
        self._folder.cleanup()


class StartSnapshot:
    """Context manager: a fresh engine (step 0) that :meth:`restore` returns to exactly, and that leaving the
    block returns to as well when it has trained since (an error mid-candidate).

    ``directory``: where the temporary folder for the masters outside a disk store is made (default: the
    system's temporary folder); it needs their bytes free and is removed on exit. Disk-offloaded masters
    are kept in the offload folder (hard links: no extra space where the filesystem has them); a crash
    meanwhile leaves it at the start once reopened with ``resume=True`` (docs/guides/disk-offload.md)."""

    def __init__(self, engine: ZOEngine, directory: str | Path | None = None) -> None:
        if engine.step_count:
            raise ValueError(f"the engine has trained {engine.step_count} steps: a search starts from step 0 "
                             "(search before training, or build a fresh engine)")
        self.engine = engine
        self._method_state = engine.method.state_dict()
        self._kept = KeptWeights(engine, "an lr search", directory)

    def restore(self) -> None:
        """Put the engine back at its start: an empty update log and the saved masters, bit for bit."""
        engine = self.engine
        empty = {**engine.log.to_json(), "updates": []}
        engine.load_state_dict({"step_count": 0, "log": empty, "method_state": self._method_state},
                               weights_updated=True)
        self._kept.put_back()

    def __enter__(self) -> "StartSnapshot":
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self.engine.step_count:  # left mid-candidate: the start comes back before it is forgotten
            self.restore()
        self._kept.close()
