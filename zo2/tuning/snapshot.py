"""The starting weights of a search, kept on disk so that no second copy of the model sits in memory.

An lr search trains several candidates from the same start. Undoing their updates is not exact in
floating point (``w - a + a != w``, and low-precision masters round stochastically), so the start is
kept bit for bit instead: before the first candidate each trainable unit's master is written to a
temporary folder, one file per unit (frozen units never change); :meth:`StartSnapshot.restore` reads
them back, one unit at a time, and empties the update log, so the engine is exactly the engine it was
before the search.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from types import TracebackType

import torch

from ..engine import ZOEngine


class StartSnapshot:
    """Context manager: the trainable masters of a fresh engine (step 0) in a temporary folder.

    ``directory``: where the folder is made (default: the system's temporary folder); it needs the
    trainable parameters' bytes free and is removed on exit."""

    def __init__(self, engine: ZOEngine, directory: str | Path | None = None) -> None:
        if engine.step_count:
            raise ValueError(f"the engine has trained {engine.step_count} steps: a search starts from step 0 "
                             "(search before training, or build a fresh engine)")
        if engine.store is not None:
            raise NotImplementedError("lr='auto' does not support offloading_device='disk' yet (the disk journal "
                                      "records every step): search on a CPU-offloaded or resident engine of the same "
                                      "model and pass the pick as ZOConfig.lr")
        self.engine = engine
        self._folder = tempfile.TemporaryDirectory(prefix="zo2-start-", dir=directory)
        self._method_state = engine.method.state_dict()
        for unit in engine.trainable_units:
            torch.save(engine.residency.unit_weights(unit), self._path(unit.index))

    def _path(self, index: int) -> Path:
        return Path(self._folder.name) / f"unit-{index:05d}.pt"

    def restore(self) -> None:
        """Put the engine back at its start: an empty update log and the saved masters, bit for bit."""
        engine = self.engine
        empty = {**engine.log.to_json(), "updates": []}
        engine.load_state_dict({"step_count": 0, "log": empty, "method_state": self._method_state},
                               weights_updated=True)
        for unit in engine.trainable_units:
            engine.residency.load_unit_weights(unit, torch.load(self._path(unit.index)))

    def __enter__(self) -> "StartSnapshot":
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._folder.cleanup()

