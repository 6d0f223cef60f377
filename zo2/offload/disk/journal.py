"""The update log of a disk-offloaded run, on disk beside the masters: one JSON line per step.

Written ahead: a step's line is appended and fsynced before any master file that holds the step is
renamed into place (:meth:`zo2.offload.disk.store.DiskStore.write`), so after a crash the journal covers every file
and the steps a file lacks are replayed from it. A line a crash cut short is the last one; it is
dropped (and the file truncated there) when the journal is opened again; any other line that does not
parse is damage, and opening the journal fails naming it (never a fresh start over trained steps).
"""
from __future__ import annotations

import json
import logging
import os
import weakref
from pathlib import Path
from typing import Sequence

from ...persist.durable import write_bytes
from ...updates.log import HistoryError, Update, UpdateLog

logger = logging.getLogger(__name__)

_FORMAT = "zo2-offload-journal"


class Journal:
    """Append-only steps ``[[seed, g, lr], ...]`` (one list per step), the first line a header."""

    def __init__(self, path: Path, updates_per_step: int, generator: int, *, resume: bool) -> None:
        self.path = path
        self.updates_per_step, self.generator = updates_per_step, generator
        self._updates: list[Update] = []
        if not (resume and path.exists() and self._read()):
            write_bytes(path, json.dumps({"format": _FORMAT, "updates_per_step": updates_per_step,
                                          "generator": generator}).encode() + b"\n")
        self._open_for_append()

    def _open_for_append(self) -> None:
        self._handle = open(self.path, "a")
        self._closer = weakref.finalize(self, self._handle.close)

    @property
    def steps(self) -> int:
        """Steps recorded."""
        return len(self._updates) // self.updates_per_step

    def _read(self) -> bool:
        """Load the steps of an existing journal; False if it is empty. Only a last line without its newline
        (a crash cut it short) is dropped; any other line that does not parse is damage: an error."""
        with open(self.path, "rb") as handle:
            data = handle.read()
        lines = data.split(b"\n")
        for number, line in enumerate(lines[:-1]):  # the part after the last newline is incomplete
            try:
                item = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                raise HistoryError(f"{self.path} is damaged: line {number + 1} is not valid JSON; the steps after "
                                   "it cannot be replayed") from None
            if number == 0:
                self._check_header(item)
            elif item.get("step") != self.steps or len(item.get("updates", ())) != self.updates_per_step:
                raise HistoryError(f"{self.path} is damaged: line {number + 1} is not step {self.steps} with "
                                   f"{self.updates_per_step} updates")
            else:
                self._updates.extend(Update.from_json(u) for u in item["updates"])
        good = len(data) - len(lines[-1])  # bytes of complete lines
        if good < len(data):
            logger.info("zo2 journal %s: dropping an incomplete last line (the run stopped while writing it)", self.path)
            os.truncate(self.path, good)
        return good > 0

    def _check_header(self, header: dict) -> None:
        if header.get("format") != _FORMAT:
            raise HistoryError(f"{self.path} is damaged: its first line is not a zo2 offload journal header")
        if header.get("updates_per_step") != self.updates_per_step or header.get("generator") != self.generator:
            raise HistoryError(f"{self.path} was written with {header.get('updates_per_step')} updates per step and "
                               f"noise generator {header.get('generator')}; this run has {self.updates_per_step} and "
                               f"{self.generator}")

    def extend(self, steps: Sequence[Sequence[Update]]) -> None:
        """Append whole steps (continuing at ``self.steps``) and fsync."""
        if not steps:
            return
        for updates in steps:
            line = {"step": self.steps, "updates": [u.to_json() for u in updates]}
            self._handle.write(json.dumps(line) + "\n")
            self._updates.extend(updates)
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def rewind(self, steps: int) -> None:
        """Keep the first ``steps`` steps and drop the rest, durably: the file is rewritten (header and those
        lines) through a temporary file and renamed, so a crash leaves the old journal or the new one."""
        if steps == self.steps:
            return
        if not 0 <= steps < self.steps:
            raise HistoryError(f"{self.path} holds {self.steps} steps: it cannot be rewound to step {steps}")
        with open(self.path, "rb") as handle:
            kept = handle.read().split(b"\n")[:steps + 1]  # the header and the first ``steps`` lines
        self._closer()
        write_bytes(self.path, b"\n".join(kept) + b"\n")
        self._updates = self._updates[:steps * self.updates_per_step]
        self._open_for_append()

    def log(self) -> UpdateLog:
        """The journal as an :class:`~zo2.updates.log.UpdateLog` (no applied positions)."""
        return UpdateLog(self.updates_per_step, self._updates, generator=self.generator)

    def close(self) -> None:
        self._closer()
