"""Safetensors checkpoints read and written one tensor at a time, never a whole shard in memory.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length, a JSON
header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the
data. A Hugging Face checkpoint is one ``model.safetensors`` or several shards listed by
``model.safetensors.index.json``.

:class:`CheckpointReader` reads a tensor's bytes with ``pread`` straight into the caller's buffer (a
view of a unit's flat master, or a staging buffer), casting in chunks when the dtypes differ, and drops
the pages it read from the page cache, so a streaming load holds one unit, not a shard.
:func:`write_shard` writes tensors (views of one master) the same way, without copying them first.
"""
from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from ..units.storage import Unit

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_CHUNK_BYTES = 64 << 20  # cast through buffers of this size when dtypes differ
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class ShardError(ValueError):
    """A checkpoint folder or shard is missing, malformed or does not fit the model."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in a shard."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    """Absolute byte offset of the data in the file."""
    nbytes: int


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (no copy)."""
    flat = tensor.reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of one safetensors file; a file shorter than its header says (cut short) is refused."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8 or 8 + struct.unpack("<Q", raw)[0] > size:
            raise ShardError(f"{path}: not a whole safetensors file ({size} bytes: shorter than its header); "
                             "the file was cut short: copy or download it again")
        (length,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ShardError(f"{path}: malformed safetensors header ({err})") from None
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise ShardError(f"{path}: tensor {name} has dtype {info['dtype']}, which zo2 cannot read")
        begin, end = info["data_offsets"]
        entries[name] = TensorEntry(path, DTYPES[info["dtype"]], tuple(info["shape"]), 8 + length + begin, end - begin)
    expected = max((e.offset + e.nbytes for e in entries.values()), default=8 + length)
    if size < expected:
        raise ShardError(f"{path}: truncated ({size} of the {expected} bytes its header describes): the file was "
                         "cut short (an interrupted download, copy or save); copy or download it again")
    return entries


def check_files(directory: str | os.PathLike) -> None:
    """Check, by their headers and sizes only (fast), that the safetensors files of a Hugging Face folder are
    whole; raise :class:`ShardError` naming the first one that is not."""
    for path in checkpoint_files(directory):
        read_header(path)


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a Hugging Face checkpoint folder (sharded or not)."""
    folder = Path(directory)
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({folder / name for name in weight_map.values()})
    elif (folder / SINGLE_NAME).is_file():
        files = [folder / SINGLE_NAME]
    else:
        raise ShardError(f"{folder}: no {INDEX_NAME} or {SINGLE_NAME}; zo2 streams safetensors checkpoints "
                              "(convert a .bin checkpoint once with save_pretrained(safe_serialization=True))")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ShardError(f"{folder}: shards listed in {INDEX_NAME} are missing: {missing[:3]}")
    return files


class CheckpointReader:
    """Random access to the tensors of a checkpoint folder, read straight into caller buffers."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.entries: dict[str, TensorEntry] = {}
        for path in checkpoint_files(directory):
            self.entries.update(read_header(path))
        self._fds: dict[Path, int] = {}
        self.bytes_read = 0

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def _pread(self, fd: int, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            count = os.preadv(fd, [view[done:]], offset + done)
            if count == 0:
                raise ShardError(f"unexpected end of a shard at byte {offset + done}")
            done += count

    def read_into(self, name: str, out: torch.Tensor, *, via: torch.dtype | None = None) -> None:
        """Fill ``out`` (contiguous, same number of elements, any dtype and device) with tensor ``name``,
        cast to ``via`` first if given (the model's dtype: the casts a normal load followed by the
        storage dtype's would make), then to ``out``'s dtype."""
        entry = self.entries[name]
        if out.numel() * entry.dtype.itemsize != entry.nbytes:
            raise ShardError(f"{entry.path}: tensor {name} has shape {list(entry.shape)}, the model expects "
                                  f"{list(out.shape)}")
        fd = self._fd(entry.path)
        flat = out.reshape(-1)
        if flat.device.type == "cpu" and flat.dtype == entry.dtype and via in (None, entry.dtype):
            self._pread(fd, _as_bytes(flat), entry.offset)  # no conversion: straight into the buffer
        else:
            per_chunk = max(1, _CHUNK_BYTES // entry.dtype.itemsize)
            chunk = torch.empty(min(per_chunk, flat.numel()), dtype=entry.dtype)
            for start in range(0, flat.numel(), per_chunk):
                part = chunk[:min(per_chunk, flat.numel() - start)]
                self._pread(fd, _as_bytes(part), entry.offset + start * entry.dtype.itemsize)
                flat[start:start + part.numel()].copy_(part.to(via) if via is not None else part)
        if hasattr(os, "posix_fadvise"):  # a load reads each byte once: keep the page cache from growing
            os.posix_fadvise(fd, entry.offset, entry.nbytes, os.POSIX_FADV_DONTNEED)
        self.bytes_read += entry.nbytes

    def sample(self, name: str, positions: list[int]) -> torch.Tensor:
        """The elements of tensor ``name`` at flat ``positions``, in its stored dtype (a few small reads)."""
        entry, fd = self.entries[name], self._fd(self.entries[name].path)
        size = entry.dtype.itemsize
        raw = b"".join(os.pread(fd, size, entry.offset + position * size) for position in positions)
        if len(raw) != size * len(positions):
            raise ShardError(f"{entry.path}: truncated inside tensor {name}")
        return torch.frombuffer(bytearray(raw), dtype=entry.dtype) if raw else torch.empty(0, dtype=entry.dtype)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def write_shard(path: Path, tensors: Mapping[str, torch.Tensor]) -> int:
    """Write ``tensors`` (contiguous CPU tensors, e.g. views of one master) as one safetensors file,
    streaming each tensor's bytes; returns the data bytes written."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        for tensor in tensors.values():
            handle.write(_as_bytes(tensor.detach().contiguous()))
        handle.flush()
        os.fsync(handle.fileno())
    return offset



def save_sharded(model: nn.Module, units: Sequence[Unit], weights_of: Callable[[Unit], torch.Tensor],
                 directory: str | os.PathLike) -> Path:
    """Save ``model`` as a Hugging Face folder with one safetensors shard per unit, each unit's flat weights
    coming from ``weights_of(unit)`` (a CPU tensor laid out like its master), one unit at a time: host
    memory holds one unit, whatever the model's size. Buffers go into the last shard; a tied weight is
    saved once, under its first name."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    first_name = {id(p): name for name, p in model.named_parameters()}
    params = {id(p) for p in model.parameters()}
    buffers = {name: t for name, t in model.state_dict(keep_vars=True).items() if id(t) not in params}
    units = [u for u in units if u.params]
    weight_map, total = {}, 0
    for number, unit in enumerate(units, start=1):
        weights = weights_of(unit)
        tensors = {first_name[id(p)]: weights[start:start + p.numel()].view(p.shape)
                   for p, start in zip(unit.params, unit.offsets)}
        if number == len(units):
            tensors.update({name: t.detach().cpu().contiguous() for name, t in buffers.items()})
        shard = f"model-{number:05d}-of-{len(units):05d}.safetensors"
        total += write_shard(folder / shard, tensors)
        weight_map.update(dict.fromkeys(tensors, shard))
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2))
    model.config.save_pretrained(folder)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    return folder
