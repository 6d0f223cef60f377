"""Checkpoints that a crash cannot corrupt, and seed logs that rebuild a fine-tuned model from its base.

Two kinds:

* a full checkpoint (``save_checkpoint``): the model in Hugging Face layout (safetensors + config.json,
  the tokenizer if given), ``zo2_state.json`` (the engine's state without its update log, plus the
  caller's ``extra``: data position, trainer state, ...), the seed log (the update log, stored once),
  and ``zo2_manifest.json`` (every file's size and sha256), written last. Everything goes to a temporary sibling folder first, is fsynced, and is renamed into
  place: a crash leaves either the old checkpoint or the new one, never a mix.
* a seed log (``save_seed_log``): the ZO config, the noise generator version and one
  ``[seed, projected_grad, lr]`` per update (:class:`zo2.history.UpdateLog`'s JSON form), a few dozen
  bytes a step. With the base weights it rebuilds the fine-tuned weights bit for bit
  (``replay_seed_log``, ``zo2 replay``).

``load_checkpoint`` verifies the manifest and refuses a missing, partial or corrupt checkpoint with a
:class:`CheckpointError`; ``latest_checkpoint`` finds the newest complete one under an output folder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from . import adapters, noise
from .config import ZOConfig
from .engine import ZOEngine, replay
from .history import HistoryError, UpdateLog

logger = logging.getLogger(__name__)

MANIFEST_NAME = "zo2_manifest.json"
STATE_NAME = "zo2_state.json"
SEED_LOG_NAME = "zo2_seed_log.json"
SEED_LOG_FORMAT = "zo2-seed-log"
_FORMAT_VERSION = 2  # 2: the update log lives in the seed log only, with its generator version


class CheckpointError(RuntimeError):
    """A checkpoint or seed log is missing, partial or corrupt; the message names the file and the fault."""


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
        if adapters.is_peft_model(engine.model):  # the checkpoint holds the adapter only (peft's layout)
            missing = adapters.load_weights(engine.model, tensors)
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


# ------------------------------------------------------------------------------- durable files
def _fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's entry list holds the renames)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file, fsync and rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)


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
        _fsync_path(path)
        files[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    for folder in sorted({p.parent for p in directory.rglob("*")} | {directory}):
        _fsync_path(folder)
    write_json_atomic(directory / MANIFEST_NAME, {"format": "zo2-checkpoint", "version": _FORMAT_VERSION,
                                                  "step": step, "files": files})
    return directory / MANIFEST_NAME


def _read_json(path: Path, what: str) -> Any:
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
    manifest = _read_json(directory / MANIFEST_NAME, f"manifest {MANIFEST_NAME} (the save did not finish, or "
                                                     "this is not a zo2 checkpoint)")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{directory / MANIFEST_NAME}: not a zo2 manifest")
    for name, entry in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{directory}: file {name} listed in the manifest is missing")
        if path.stat().st_size != entry["size"]:
            raise CheckpointError(f"{path}: size {path.stat().st_size} != {entry['size']} bytes in the manifest "
                                  "(truncated or overwritten)")
        if _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{path}: sha256 differs from the manifest (the file is corrupt)")
    return manifest


# ----------------------------------------------------------------------------------- seed logs
def seed_log(engine: ZOEngine) -> dict[str, Any]:
    """The seed log of ``engine`` as a JSON-serialisable dict: a header and the update log's JSON form."""
    return {"format": SEED_LOG_FORMAT, "version": _FORMAT_VERSION, "model_class": type(engine.model).__name__,
            "dtype": str(engine.units[0].master.dtype).replace("torch.", ""), "config": engine.config.to_dict(),
            "step_count": engine.step_count, **engine.log.to_json()}


def save_seed_log(engine: ZOEngine, path: str | Path) -> Path:
    """Write the engine's seed log (config and ``[seed, projected_grad, lr]`` per update) atomically.

    Floats are written with ``repr`` precision, so the log replays to the same bits."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, seed_log(engine))
    return path


def read_seed_log(path: str | Path) -> dict[str, Any]:
    """Read and check a seed log; ``["updates"]`` holds :class:`~zo2.history.Update` s.

    Raises :class:`CheckpointError` if it is not one, or if it was made by another noise generator
    (replaying it would give other weights)."""
    path = Path(path)
    log = _read_json(path, "seed log")
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
    return replay(model, log["updates"], config).detach()


# ------------------------------------------------------------------------------ full checkpoints
def _clear_leftovers(target: Path) -> None:
    """Remove staging and set-aside folders that an interrupted save of ``target`` left behind."""
    for leftover in target.parent.glob(f".{target.name}.*"):
        shutil.rmtree(leftover, ignore_errors=True)


def save_checkpoint(engine: ZOEngine, directory: str | Path, *, tokenizer: Any = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Save a complete, verifiable checkpoint of ``engine`` to ``directory`` atomically; returns it.

    ``extra`` (JSON-serialisable) is stored beside the engine state, e.g. the data position. An
    existing ``directory`` is replaced only once the new checkpoint is complete on disk."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(target)
    engine.flush()
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        if engine.store is not None:  # disk-offloaded units exist only in their files: stream them out
            from .loading import save_pretrained
            save_pretrained(engine, staging)
        else:
            engine.model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        write_json_atomic(staging / STATE_NAME, {"engine": engine.state_dict(include_log=False), "extra": extra or {}})
        save_seed_log(engine, staging / SEED_LOG_NAME)
        write_manifest(staging, step=engine.step_count)
        _swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("saved checkpoint of step %d to %s", engine.step_count, target)
    return target


def _swap_into_place(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an old ``target`` is renamed aside first and removed after.

    At every instant a complete checkpoint exists under ``target`` or the aside name (which
    ``latest_checkpoint`` also finds)."""
    aside = None
    if target.exists():
        aside = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, aside)
    os.replace(staging, target)
    _fsync_path(target.parent)
    if aside is not None:
        shutil.rmtree(aside)


def load_checkpoint(directory: str | Path) -> Checkpoint:
    """Verify and read a checkpoint written by :func:`save_checkpoint`.

    Raises :class:`CheckpointError` for a missing, partial or corrupt checkpoint."""
    directory = Path(directory)
    verify_manifest(directory)
    data = _read_json(directory / STATE_NAME, STATE_NAME)
    if not isinstance(data, dict) or not isinstance(data.get("engine"), dict) or "step_count" not in data["engine"]:
        raise CheckpointError(f"{directory / STATE_NAME}: no engine state "
                              "(expected {'engine': {'step_count': ...}, 'extra': {...}})")
    state = dict(data["engine"])
    if "log" not in state and "history" not in state:  # the update log is stored once, in the seed log
        log = read_seed_log(directory / SEED_LOG_NAME)
        state["log"] = {"updates_per_step": log["updates_per_step"], "generator_version": log["generator_version"],
                        "updates": [u.to_json() for u in log["updates"]]}
    return Checkpoint(directory, state, data.get("extra") or {})


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (one whose manifest was written) directly under ``output_dir``,
    by step then modification time; ``None`` if there is none. Its files are verified by
    :func:`load_checkpoint`, not here (hashing is slow)."""
    found = []
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    for folder in output_dir.iterdir():
        manifest = folder / MANIFEST_NAME
        if not manifest.is_file():
            continue
        try:
            step = json.loads(manifest.read_text()).get("step")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            continue
        found.append((step if isinstance(step, int) else -1, manifest.stat().st_mtime, folder))
    return max(found)[2] if found else None


# --------------------------------------------------------------------------------- zo2 replay
def add_replay_command(commands: Any) -> None:
    """Add ``zo2 replay`` to the CLI's subcommands (an ``argparse`` subparsers object)."""
    parser = commands.add_parser("replay", help="rebuild a fine-tuned model from its base and a seed log",
                                 description="Apply a seed log's updates to the base model the run started from "
                                 "and save the fine-tuned model (save_pretrained).")
    parser.add_argument("--base", required=True, metavar="DIR", help="local Hugging Face folder of the base model")
    parser.add_argument("--seed-log", required=True, metavar="FILE", help=f"the run's seed log ({SEED_LOG_NAME} "
                        "in a checkpoint, or a file written by save_seed_log)")
    parser.add_argument("--output", required=True, metavar="DIR", help="where to save the rebuilt model")
    parser.add_argument("--working-device", help="device to replay on (default: the training run's, if present)")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="logging level (default: %(default)s)")
    parser.set_defaults(handler=run_replay)


def run_replay(args: Any) -> int:
    """``zo2 replay``: load the base model as the log's class and dtype, replay, save; returns 0."""
    import transformers

    log = read_seed_log(args.seed_log)
    base = Path(args.base)
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"--base {base}: not a local Hugging Face model folder (no config.json)")
    model_class = getattr(transformers, log.get("model_class", ""), transformers.AutoModelForCausalLM)
    dtype = getattr(torch, log.get("dtype", "float32"))
    model = model_class.from_pretrained(base, dtype=dtype, local_files_only=True)
    rebuilt = replay_seed_log(model, args.seed_log, working_device=args.working_device)
    rebuilt.save_pretrained(args.output)
    try:
        transformers.AutoTokenizer.from_pretrained(base, local_files_only=True).save_pretrained(args.output)
    except (OSError, ValueError, TypeError):
        logger.info("no tokenizer in %s; saved the model only", base)
    logger.info("applied %d updates to %s; saved the model to %s", len(log["updates"]), base, args.output)
    return 0
