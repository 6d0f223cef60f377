"""Checkpoint manifests: every file of a folder with its size and sha256, written last.

A folder whose manifest parses and matches its files is complete and intact; anything else (no manifest:
the save did not finish; a missing, short or changed file) is refused with a :class:`CheckpointError`
naming the file and the fault.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .durable import fsync_path, write_json

MANIFEST_NAME = "zo2_manifest.json"


FORMAT_VERSION = 2
"""Version of zo2's checkpoint and seed-log formats."""  # 2: the update log lives in the seed log only, with its generator version


class CheckpointError(RuntimeError):
    """A checkpoint or seed log is missing, partial or corrupt; the message names the file and the fault."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: str | Path, *, step: int | None = None) -> Path:
    """fsync every file under ``directory`` and record its size and sha256 in the manifest, written
    last: a folder with a valid manifest is complete."""
    directory = Path(directory)
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        fsync_path(path)
        files[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    for folder in sorted({p.parent for p in directory.rglob("*")} | {directory}):
        fsync_path(folder)
    write_json(directory / MANIFEST_NAME, {"format": "zo2-checkpoint", "version": FORMAT_VERSION,
                                                  "step": step, "files": files})
    return directory / MANIFEST_NAME


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({err})") from None


def verify_manifest(directory: str | Path) -> dict[str, Any]:
    """Check every file the manifest lists (present, same size, same sha256); return the manifest.

    Raises :class:`CheckpointError` for a missing folder or manifest (a partial checkpoint: the save
    did not finish), a missing file, or a size or hash mismatch (a corrupt file)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint folder")
    manifest = read_json(directory / MANIFEST_NAME, f"manifest {MANIFEST_NAME} (the save did not finish, or "
                                                     "this is not a zo2 checkpoint)")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{directory / MANIFEST_NAME}: not a zo2 manifest")
    for name, entry in manifest["files"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or "sha256" not in entry:
            raise CheckpointError(f"{directory / MANIFEST_NAME}: damaged (the entry of {name} has no size or sha256)")
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{directory}: file {name} listed in the manifest is missing")
        if path.stat().st_size != entry["size"]:
            raise CheckpointError(f"{path}: size {path.stat().st_size} != {entry['size']} bytes in the manifest "
                                  "(truncated or overwritten)")
        if _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{path}: sha256 differs from the manifest (the file is corrupt)")
    return manifest
