"""Checkpoints that a crash cannot corrupt, and seed logs that rebuild a fine-tuned model from its base.

Two kinds:

* a full checkpoint (``save_checkpoint``): the model in Hugging Face layout (safetensors + config.json,
  the tokenizer if given), ``zo2_state.json`` (the engine's state without its update log, plus the
  caller's ``extra``: data position, trainer state, ...), the seed log (the update log, stored once),
  and ``zo2_manifest.json`` (every file's size and sha256), written last. Everything goes to a temporary sibling folder first, is fsynced, and is renamed into
  place: a crash leaves either the old checkpoint or the new one, never a mix.
* a seed log (``save_seed_log``): the ZO config, the noise generator version and one
  ``[seed, projected_grad, lr]`` per update (:class:`zo2.updates.log.UpdateLog`'s JSON form), a few dozen
  bytes a step. With the base weights it rebuilds the fine-tuned weights bit for bit
  (``replay_seed_log``, ``zo2 replay``).

``load_checkpoint`` verifies the manifest and refuses a missing, partial or corrupt checkpoint with a
:class:`CheckpointError`; ``latest_checkpoint`` finds the newest one under an output folder,
``find_intact_checkpoint`` the newest that verifies (falling back past damaged ones, with a warning), and
``prune_checkpoints`` deletes old ones without ever counting a damaged one.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from .adapters import is_peft_model, load_weights
from .config import ZOConfig
from .engine import ZOEngine, replay
from .persist.durable import clear_leftovers, replace_folder, staging_folder, write_json
from .persist.fingerprint import mismatch, model_fingerprint
from .persist.manifest import FORMAT_VERSION, MANIFEST_NAME, CheckpointError, read_json, verify_manifest, write_manifest
from .persist.shards import save_sharded
from .updates import noise
from .updates.log import HistoryError, UpdateLog

logger = logging.getLogger(__name__)

STATE_NAME = "zo2_state.json"
SEED_LOG_NAME = "zo2_seed_log.json"
SEED_LOG_FORMAT = "zo2-seed-log"


@dataclass
class Checkpoint:
    """A verified checkpoint: its folder, the engine state and the caller's ``extra`` dict."""

    path: Path
    state: dict[str, Any]
    """``ZOEngine.state_dict()`` at save time (step count, config, method state, update log)."""
    extra: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step_count"])

    def restore(self, engine: ZOEngine) -> None:
        """Load the saved weights into ``engine``'s model and its state into ``engine``.

        The model must have the architecture of the saved one; afterwards training continues exactly
        where the saved run stood."""
        if engine.store is not None:
            raise CheckpointError(f"{self.path}: restore() loads every weight into host memory; an engine with "
                                  "disk-offloaded units is restored by streaming instead: "
                                  "zo2.loading.from_checkpoint(path, config)")
        engine.flush()
        tensors: dict[str, torch.Tensor] = {}
        for file in sorted(self.path.glob("*.safetensors")):
            tensors.update(load_file(file))
        if not tensors:
            raise CheckpointError(f"{self.path}: no *.safetensors weights")
        if is_peft_model(engine.model):  # the checkpoint holds the adapter only (peft's layout)
            missing = load_weights(engine.model, tensors)
            if missing:
                raise CheckpointError(f"{self.path}: the adapter does not match the model (missing {missing[:5]})")
            engine.load_state_dict(self.state, weights_updated=True)
            return
        result = engine.model.load_state_dict(tensors, strict=False)
        params = dict(engine.model.named_parameters(remove_duplicate=False))
        loaded = {id(params[name]) for name in tensors if name in params}  # a tied weight is saved once
        missing = [name for name in result.missing_keys if name in params and id(params[name]) not in loaded]
        if missing or result.unexpected_keys:
            raise CheckpointError(f"{self.path}: the weights do not match the model (missing {missing[:5]}, "
                                  f"unexpected {result.unexpected_keys[:5]})")
        engine.load_state_dict(self.state, weights_updated=True)


# ----------------------------------------------------------------------------------- seed logs
def seed_log(engine: ZOEngine) -> dict[str, Any]:
    """The seed log of ``engine`` as a JSON-serialisable dict: a header and the update log's JSON form."""
    return {"format": SEED_LOG_FORMAT, "version": FORMAT_VERSION, "model_class": type(engine.model).__name__,
            "dtype": str(engine.units[0].master.dtype).replace("torch.", ""), "config": engine.config.to_dict(),
            "step_count": engine.step_count, "base": engine.base_fingerprint, **engine.log.to_json()}


def save_seed_log(engine: ZOEngine, path: str | Path) -> Path:
    """Write the engine's seed log (config and ``[seed, projected_grad, lr]`` per update) atomically.

    Floats are written with ``repr`` precision, so the log replays to the same bits."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, seed_log(engine))
    return path


def read_seed_log(path: str | Path) -> dict[str, Any]:
    """Read and check a seed log; ``["updates"]`` holds :class:`~zo2.updates.log.Update` s.

    Raises :class:`CheckpointError` if it is not one, or if it was made by another noise generator
    (replaying it would give other weights)."""
    path = Path(path)
    log = read_json(path, "seed log")
    if not isinstance(log, dict) or log.get("format") != SEED_LOG_FORMAT:
        raise CheckpointError(f"{path}: not a zo2 seed log (format field != {SEED_LOG_FORMAT!r})")
    try:
        history = UpdateLog.from_json(log, generator=noise.GENERATOR_VERSION)
    except HistoryError as err:
        raise CheckpointError(f"{path} {err}") from None
    return {**log, "updates": history.updates(), "updates_per_step": history.updates_per_step}


def seed_log_config(log: dict[str, Any], working_device: str | None = None) -> ZOConfig:
    """The ZOConfig a seed log was trained with; ``working_device`` overrides where to replay (default:
    the training device if this machine has it, else the CPU)."""
    fields = {f.name for f in dataclasses.fields(ZOConfig)}
    values = {k: v for k, v in log["config"].items() if k in fields}
    if working_device is None:
        working_device = values.get("working_device", "cpu")
        if working_device.startswith("cuda") and not torch.cuda.is_available():
            logger.warning("the seed log was trained on %s; replaying on the CPU (the bits may differ)", working_device)
            working_device = "cpu"
    return ZOConfig(**{**values, "working_device": working_device})


def replay_seed_log(model: nn.Module, path: str | Path, *, working_device: str | None = None) -> nn.Module:
    """Apply a seed log's updates to ``model``, which must hold the base weights the run started from;
    returns the model with the fine-tuned weights (a plain model: zo2's wrappers are removed).

    Replayed with the training run's config on the same kind of device, the weights equal the saved
    ones bit for bit."""
    log = read_seed_log(path)
    config = seed_log_config(log, working_device)
    check_base(model, log, path)
    return replay(model, log["updates"], config).detach()


def check_base(model: nn.Module, log: dict[str, Any], path: str | Path) -> None:
    """Check that ``model`` holds the base the seed log ``log`` (read from ``path``) was trained from: the same
    parameter names and shapes and the same fingerprint (:mod:`zo2.persist.fingerprint`); raise
    :class:`CheckpointError` saying how it differs. A log written before zo2 recorded fingerprints is
    replayed with a warning that it cannot be checked."""
    recorded = log.get("base")
    if recorded is None:
        logger.warning("%s records no fingerprint of its base (written by an older zo2): cannot check that the "
                       "base model is the one the run started from", path)
        return
    why = mismatch(recorded, model_fingerprint(model, seed_log_config(log, "cpu").torch_storage_dtype))
    if why is not None:
        raise CheckpointError(f"the base model is not the one {path} was trained from: {why}; pass the model the "
                              "run started from (replaying onto another would give other weights)")


def save_checkpoint(engine: ZOEngine, directory: str | Path, *, tokenizer: Any = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Save a complete, verifiable checkpoint of ``engine`` to ``directory`` atomically; returns it.

    ``extra`` (JSON-serialisable) is stored beside the engine state, e.g. the data position. An
    existing ``directory`` is replaced only once the new checkpoint is complete on disk."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    clear_leftovers(target)
    engine.flush()
    staging = staging_folder(target)
    try:
        if engine.store is not None:  # disk-offloaded units exist only in their files: stream them out
            save_sharded(engine.model, engine.units, engine.residency.unit_weights, staging)
        else:
            engine.model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        write_json(staging / STATE_NAME, {"engine": engine.state_dict(include_log=False), "extra": extra or {}})
        save_seed_log(engine, staging / SEED_LOG_NAME)
        write_manifest(staging, step=engine.step_count)
        replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("saved checkpoint of step %d to %s", engine.step_count, target)
    return target


def load_checkpoint(directory: str | Path) -> Checkpoint:
    """Verify and read a checkpoint written by :func:`save_checkpoint`.

    Raises :class:`CheckpointError` for a missing, partial or corrupt checkpoint."""
    directory = Path(directory)
    verify_manifest(directory)
    data = read_json(directory / STATE_NAME, STATE_NAME)
    if not isinstance(data, dict) or not isinstance(data.get("engine"), dict) or "step_count" not in data["engine"]:
        raise CheckpointError(f"{directory / STATE_NAME}: no engine state "
                              "(expected {'engine': {'step_count': ...}, 'extra': {...}})")
    state = dict(data["engine"])
    if "log" not in state and "history" not in state:  # the update log is stored once, in the seed log
        log = read_seed_log(directory / SEED_LOG_NAME)
        state["log"] = {"updates_per_step": log["updates_per_step"], "generator_version": log["generator_version"],
                        "updates": [u.to_json() for u in log["updates"]]}
    return Checkpoint(directory, state, data.get("extra") or {})


def _candidates(output_dir: Path) -> list[Path]:
    """The checkpoint folders directly under ``output_dir`` (a manifest in them, parsable or not; a folder
    without one is a save that did not finish), newest first: by the step in the manifest, else the number
    in the folder's name, then modification time."""
    found = []
    for folder in output_dir.iterdir() if output_dir.is_dir() else ():
        if folder.name.startswith(".") or not folder.is_dir():
            continue  # staging and set-aside folders of an interrupted save (zo2.persist.durable)
        manifest = folder / MANIFEST_NAME
        if not manifest.is_file():
            continue
        try:
            step = json.loads(manifest.read_text()).get("step")
        except (OSError, ValueError, UnicodeDecodeError, AttributeError):
            step = None
        if not isinstance(step, int):
            digits = re.findall(r"\d+", folder.name)
            step = int(digits[-1]) if digits else -1
        found.append((step, folder.stat().st_mtime, folder))
    return [folder for _, _, folder in sorted(found, reverse=True)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint directly under ``output_dir`` (by step, then modification time); ``None`` if
    there is none. Its files are verified by :func:`load_checkpoint`, not here (hashing is slow).

    A newest checkpoint whose manifest does not parse is damage, not "no checkpoint": it
    raises :class:`CheckpointError` naming the file (:func:`find_intact_checkpoint` falls back to an older one)."""
    candidates = _candidates(Path(output_dir))
    if not candidates:
        return None
    read_json(candidates[0] / MANIFEST_NAME, f"manifest {MANIFEST_NAME} of the newest checkpoint (damaged; "
              "zo2.checkpoint.find_intact_checkpoint falls back to the newest intact one)")
    return candidates[0]


@dataclass
class CheckpointSearch:
    """What :func:`find_intact_checkpoint` found."""

    checkpoint: Checkpoint | None
    """The newest intact checkpoint, verified and loaded (None: there is none)."""
    damaged: list[tuple[Path, str]]
    """The newer checkpoints that failed verification, newest first, each with the reason."""


def find_intact_checkpoint(output_dir: str | Path) -> CheckpointSearch:
    """The newest checkpoint under ``output_dir`` whose manifest and files verify (:func:`load_checkpoint`),
    and the newer ones that do not, with the reasons. Falling back past a damaged checkpoint logs a warning
    naming it; nothing is deleted. ``checkpoint`` is None when no checkpoint verifies (``damaged`` then
    says why, or is empty when the folder holds no checkpoint at all)."""
    damaged: list[tuple[Path, str]] = []
    for folder in _candidates(Path(output_dir)):
        try:
            checkpoint = load_checkpoint(folder)
        except CheckpointError as err:
            damaged.append((folder, str(err)))
            continue
        for bad, reason in damaged:
            logger.warning("checkpoint %s is damaged (%s); falling back to the newest intact one, %s",
                           bad, reason, folder)
        return CheckpointSearch(checkpoint, damaged)
    return CheckpointSearch(None, damaged)


def _looks_intact(folder: Path) -> bool:
    """A cheap check (no hashing): the manifest parses and every file it lists is there with its size."""
    try:
        files = json.loads((folder / MANIFEST_NAME).read_text())["files"]
        return all((folder / name).stat().st_size == entry["size"] for name, entry in files.items())
    except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError):
        return False


def prune_checkpoints(output_dir: str | Path, keep: int) -> list[Path]:
    """Delete the checkpoints under ``output_dir`` older than the newest ``keep`` that look intact (manifest
    parses, files of their sizes); returns the deleted folders. A damaged checkpoint is never counted, so an
    intact one is never deleted because newer ones are damaged; damaged ones newer than it are kept as evidence."""
    if keep < 1:
        raise ValueError(f"keep={keep}: at least the newest checkpoint must be kept")
    candidates, intact = _candidates(Path(output_dir)), 0
    for index, folder in enumerate(candidates):
        intact += _looks_intact(folder)
        if intact == keep:
            for old in candidates[index + 1:]:
                shutil.rmtree(old)
            return candidates[index + 1:]
    return []
