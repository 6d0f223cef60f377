"""Streaming load and save: a :class:`~zo2.engine.ZOEngine` built from a Hugging Face safetensors
checkpoint without ever holding the whole model in host memory, and saved back the same way.

    engine = zo2.loading.from_pretrained("llama-70b/", ZOConfig(offloading_device="disk", offload_dir="/nvme/zo2"))
    ...
    zo2.loading.save_pretrained(engine, "llama-70b-zo/")   # a normal HF folder, one shard per unit

How a load proceeds:

1. The model is built on the meta device from its ``config.json`` (shapes only), in ``dtype`` as
   ``from_pretrained`` would build it, weights tied.
2. Each parameter gets a stand-in of zeros that no memory backs (an unwritten anonymous mapping), so
   the engine's probe forward (which finds the units) runs without weights. Buffers the checkpoint does not hold
   (rotary ``inv_freq``, embedding scales) are initialised as ``from_pretrained`` initialises them
   (:func:`zo2.persist.compat.initialize_missing_buffers`); persistent ones are read from the checkpoint.
3. The engine places the units one at a time: every parameter's tensor is read from its shard straight
   into its view of the unit's master (:mod:`zo2.persist.shards`, the page cache dropped behind), resident or
   in host memory; a disk unit is assembled in one staging buffer and written to its file. Host memory
   peaks at the resident units plus one block.

The result equals ``from_pretrained`` followed by ``ZOEngine`` bit for bit (tested on 25 architectures'
logits and on training). ``resume=True`` continues a disk-offloaded run after a crash or a stop from
the files and journal in ``offload_dir``.
"""
from __future__ import annotations

import hashlib
import logging
import mmap
import os
import platform
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .checkpoint import load_checkpoint
from .config import ZOConfig
from .engine import ZOEngine
from .offload.disk.folder import DiskOffloadError
from .offload.placement import WeightSource
from .persist import compat
from .persist.fingerprint import fingerprint, positions
from .persist.shards import CheckpointReader, ShardError, save_sharded
from .units.storage import Unit
from .updates.log import UpdateLog
from .walk.role import Role

logger = logging.getLogger(__name__)

_BASE_DIGEST = "base.json"


def _dtype(dtype: torch.dtype | str | None, config: Any, reader: CheckpointReader) -> torch.dtype:
    """``from_pretrained``'s rule (transformers 5): None or "auto" -> the config's dtype, else the first
    floating tensor's in the checkpoint; a dtype or its name as given."""
    if dtype is None or dtype == "auto":
        saved = getattr(config, "dtype", None)
        if saved is not None:
            return getattr(torch, saved) if isinstance(saved, str) else saved
        return next((e.dtype for e in reader.entries.values() if e.dtype.is_floating_point), torch.float32)
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


# MAP_NORESERVE (Python exposes it from 3.13): the mapping takes no commit charge, as nothing writes it
_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if platform.machine() in ("x86_64", "AMD64", "aarch64") else 0)


def _unwritten_zeros(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous CPU tensor of zeros in an anonymous mapping nothing writes: reading it maps the
    kernel's shared zero page, so it costs no host memory (page tables only, while mapped). Stand-ins
    of one element broadcast to the shape would cost nothing either, but matmuls copy them to
    contiguous buffers, and glibc keeps the freed copies: RSS grew by a block per layer in the probe."""
    numel = shape.numel()
    if numel == 0:
        return torch.zeros(shape, dtype=dtype)
    buffer = mmap.mmap(-1, numel * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _NORESERVE)
    return torch.frombuffer(buffer, dtype=dtype, count=numel).view(shape)  # the tensor keeps the mapping alive


def _give_stand_ins(model: nn.Module) -> list[tuple[nn.Parameter, list[str]]]:
    """Replace every meta parameter by a CPU parameter of unwritten zeros (tied parameters stay one
    object), so that the engine's probe forward runs; returns each parameter with all its names."""
    groups: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), (param, []))[1].append(name)
    result = []
    for param, names in groups.values():
        stand_in = nn.Parameter(_unwritten_zeros(param.shape, param.dtype), requires_grad=param.requires_grad)
        for name in names:
            module_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module_name), attr, stand_in)
        result.append((stand_in, names))
    return result


def _load_buffers(model: nn.Module, reader: CheckpointReader, names: dict[str, str]) -> None:
    loaded = set()
    for name, buffer in list(model.named_buffers(remove_duplicate=False)):
        if name in names and compat.is_persistent(model, name):
            value = torch.empty(buffer.shape, dtype=buffer.dtype)
            reader.read_into(names[name], value)
            module_name, _, attr = name.rpartition(".")
            model.get_submodule(module_name).register_buffer(attr, value, persistent=True)
            loaded.add(name)
    compat.initialize_missing_buffers(model, loaded)


def stream_model(directory: str | os.PathLike, *, model_class: Any = None, dtype: torch.dtype | str | None = None
                 ) -> tuple[nn.Module, Callable[[nn.Parameter, torch.Tensor], None], CheckpointReader]:
    """The model of a checkpoint folder with stand-in parameters and real buffers, and ``fill(param, view)``
    that reads a parameter's weights into ``view``. ``model_class``: a transformers auto class or model
    class (default ``AutoModelForCausalLM``); ``dtype``: as ``from_pretrained``'s."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    folder = Path(directory)
    reader = CheckpointReader(folder)
    config = AutoConfig.from_pretrained(folder)
    model = compat.build_on_meta(model_class or AutoModelForCausalLM, config, _dtype(dtype, config, reader))
    params = _give_stand_ins(model)
    names = compat.checkpoint_names(model, reader.entries)
    key_of, missing = {}, []
    for param, param_names in params:
        key = next((names[n] for n in param_names if n in names), None)
        if key is None:
            missing.append(param_names[0])
        key_of[id(param)] = key
    if missing:
        raise ShardError(f"{folder}: the checkpoint holds no weights for {missing[:5]} ({len(missing)} parameters of "
                         f"{type(model).__name__}); zo2's streaming load does not initialise missing weights")
    _load_buffers(model, reader, names)
    if model.can_generate() and (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    model.eval()

    def fill(param: nn.Parameter, view: torch.Tensor) -> None:
        reader.read_into(key_of[id(param)], view, via=param.dtype)

    return model, fill, reader


def from_pretrained(directory: str | os.PathLike, config: ZOConfig, *, model_class: Any = None,
                    dtype: torch.dtype | str | None = None, resume: bool = False, role: Role | None = None,
                    base: UpdateLog | None = None) -> ZOEngine:
    """A :class:`ZOEngine` for the safetensors checkpoint in ``directory``, filled unit by unit (see the
    module docstring); equal bit for bit to ``ZOEngine(Model.from_pretrained(directory, dtype=dtype), config)``.

    ``resume=True`` (disk offload): if ``config.offload_dir`` holds this run (same units and noise
    settings), its files and journal are kept, and the engine continues at the last step the journal
    recorded, every unit holding exactly the steps it held; otherwise the run starts afresh. Resume from
    the checkpoint the run started from. ``base``: the update log the checkpoint's weights already hold
    (:func:`from_checkpoint` passes it)."""
    model, fill, reader = stream_model(directory, model_class=model_class, dtype=dtype)
    try:
        source = WeightSource(fill, resume=resume, base=base,
                              fingerprint=_fingerprint(model, reader, config.torch_storage_dtype))
        engine = ZOEngine(model, config, role=role, weights=source)
    finally:
        reader.close()
    logger.info("zo2 streamed %.2f GB from %s", reader.bytes_read / 1e9, directory)
    if engine.store is not None:
        _check_base(engine)
        if engine.store.resumed:
            _resume(engine)
    return engine


def _fingerprint(model: nn.Module, reader: CheckpointReader, dtype: torch.dtype | None) -> dict[str, Any]:
    """The fingerprint of the checkpoint's weights as the model loads them (the parameters hold stand-ins):
    each sample read from the file, cast to the parameter's dtype, then to ``dtype`` (the storage dtype)."""
    names = compat.checkpoint_names(model, reader.entries)
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    samples = []
    for name, param in model.named_parameters():
        key = next(names[n] for n in groups[id(param)] if n in names)
        values = reader.sample(key, positions(param.numel())).to(param.dtype)
        samples.append((name, tuple(param.shape), values.to(dtype or values.dtype)))
    return fingerprint(samples)


def from_checkpoint(directory: str | os.PathLike, config: ZOConfig, *, model_class: Any = None,
                    resume: bool = False) -> ZOEngine:
    """An engine restored from a ``zo2.checkpoint.save_checkpoint`` folder (verified first), streamed:
    the saved (flushed) weights in their saved dtype and the saved engine state; training continues as if
    it had never stopped. ``resume`` as :func:`from_pretrained`'s (a disk run after that checkpoint)."""
    checkpoint = load_checkpoint(directory)
    log = UpdateLog.from_json(checkpoint.state["log"], updates_per_step=config.num_directions)
    engine = from_pretrained(directory, config, model_class=model_class, dtype="auto", resume=resume, base=log)
    if engine.store is None or not engine.store.resumed:
        engine.load_state_dict(checkpoint.state, weights_updated=True)
    engine.base_fingerprint = checkpoint.state.get("base_fingerprint")  # the run's base, not these weights
    return engine


def _digest(engine: ZOEngine) -> dict[str, str]:
    """sha256 of every unit's weights outside the store: what a restart rebuilds from the checkpoint."""
    digests = {}
    for unit in engine.units:
        if engine.store.holds(unit):
            continue
        digest = hashlib.sha256()
        flat = unit.master.detach()
        for start in range(0, flat.numel(), 1 << 24):
            digest.update(flat[start:start + (1 << 24)].cpu().contiguous().view(torch.uint8).numpy().tobytes())
        digests[unit.name] = digest.hexdigest()
    return digests


def _check_base(engine: ZOEngine) -> None:
    """A fresh store records the resident units' digests; a resumed one checks them (a run stopped before
    it recorded them, while placing its units, records them now)."""
    store, digests = engine.store, _digest(engine)
    saved = store.read_json(_BASE_DIGEST) if store.resumed else None
    if saved is None:
        store.write_json(_BASE_DIGEST, digests)
    elif saved != digests:
        raise DiskOffloadError(f"the units outside {store.directory} ({', '.join(digests)}) differ from those the run "
                               "in it started from: resume from the checkpoint the run was started from")


def _resume(engine: ZOEngine) -> None:
    """Load the journal as the engine's update log; each unit holds the steps its file (or the base) holds."""
    store = engine.store
    log = store.journal.log()
    engine.load_state_dict({"log": log.to_json(), "step_count": log.steps, "config": engine.config.to_dict()},
                           weights_updated=False)
    for unit in engine.units:
        engine.log.mark_applied(unit.index, store.applied(unit.index) if store.holds(unit) else store.base_steps)
    logger.info("zo2 resumed from %s at step %d", store.directory, log.steps)


def unit_weights(engine: ZOEngine, unit: Unit) -> torch.Tensor:
    """A unit's current master on the CPU (read from its file for a disk unit); flush the engine first."""
    return engine.residency.unit_weights(unit)


def save_pretrained(engine: ZOEngine, directory: str | os.PathLike) -> Path:
    """Flush and save the model as a Hugging Face folder (``from_pretrained`` loads it), one safetensors
    shard per unit, reading one unit at a time: host memory holds one unit, whatever the model's size."""
    engine.flush()
    return save_sharded(engine.model, engine.units, engine.residency.unit_weights, directory)


def save_offloaded(engine: ZOEngine, save_directory: str | os.PathLike, **kwargs: Any) -> Path:
    """``model.save_pretrained(save_directory, ...)`` of a model whose engine offloads to disk (the ZO2-style
    API, :mod:`zo2.hf`): :func:`save_pretrained`, which streams the trained weights unit by unit. Options of
    transformers' ``save_pretrained`` other than the folder do not apply; they are logged and ignored."""
    if kwargs:
        logger.warning("save_pretrained of a disk-offloaded model streams safetensors shards; ignoring %s",
                       sorted(kwargs))
    return save_pretrained(engine, save_directory)
