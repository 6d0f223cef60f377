"""The dual forward: the model runs once on the batch doubled along dim 0 ([x; x]); every wrapped
module runs its first half under theta + eps*z and its second half under theta - eps*z.

Which tensors of a module's arguments are batched is not guessed from shapes alone (Bloom passes
ALiBi as (batch * heads, 1, T); ``cache_position`` is (T,)): it is calibrated by two small forwards
at batch 2 and 3. A leaf whose dim 0 is k * batch in both is batched with factor k; one whose dim 0
does not change is shared by both halves. Leaves are addressed by their path in the (nested)
arguments, and the calibration is cached per batch signature.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from transformers.utils import ModelOutput

Path = tuple


class DualForwardError(RuntimeError):
    """A module's inputs or outputs cannot be split into, or merged from, the two halves."""


def leaves(obj: Any, path: Path = ()) -> Iterator[tuple[Path, torch.Tensor]]:
    """(path, tensor) for every tensor in a nest of tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from leaves(value, path + (key,))
    elif isinstance(obj, (tuple, list)):
        for index, value in enumerate(obj):
            yield from leaves(value, path + (index,))


def _rebuild(obj: Any, items: list | dict) -> Any:
    if isinstance(obj, ModelOutput):
        return type(obj)(**items)
    if isinstance(obj, dict):
        return type(obj)(items)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*items)
    return type(obj)(items)


def tree_map(fn: Callable[[Path, torch.Tensor], Any], obj: Any, path: Path = ()) -> Any:
    """Rebuild a nest with ``fn(path, tensor)`` in place of every tensor."""
    if isinstance(obj, torch.Tensor):
        return fn(path, obj)
    if isinstance(obj, dict):
        return _rebuild(obj, {k: tree_map(fn, v, path + (k,)) for k, v in obj.items()})
    if isinstance(obj, (tuple, list)):
        return _rebuild(obj, [tree_map(fn, v, path + (i,)) for i, v in enumerate(obj)])
    return obj


def tree_zip(fn: Callable[[Path, torch.Tensor, torch.Tensor], Any], first: Any, second: Any, path: Path = ()) -> Any:
    """Rebuild two nests of the same shape with ``fn(path, a, b)`` for each pair of tensors."""
    if isinstance(first, torch.Tensor):
        return fn(path, first, second)
    if isinstance(first, dict):
        return _rebuild(first, {k: tree_zip(fn, v, second[k], path + (k,)) for k, v in first.items()})
    if isinstance(first, (tuple, list)):
        return _rebuild(first, [tree_zip(fn, v, second[i], path + (i,)) for i, v in enumerate(first)])
    return first


@dataclass
class MemberSpec:
    """Batch factor per leaf path of a module's inputs and outputs; None marks a shared leaf."""

    inputs: dict[Path, int | None] = field(default_factory=dict)
    outputs: dict[Path, int | None] = field(default_factory=dict)


def _factors(first: dict[Path, int], second: dict[Path, int], batches: tuple[int, int], where: str) -> dict:
    factors = {}
    for path in first.keys() & second.keys():
        a, b = first[path], second[path]
        if a == b:
            factors[path] = None
        elif a % batches[0] == 0 and b % batches[1] == 0 and a // batches[0] == b // batches[1]:
            factors[path] = a // batches[0]
        else:
            raise DualForwardError(f"{where} {path}: dim 0 is {a} at batch {batches[0]} and {b} at batch "
                                   f"{batches[1]}; it neither scales with the batch nor stays fixed")
    return factors


class Calibration:
    """Records dim 0 of every wrapped module's inputs and outputs during two plain forwards."""

    BATCHES = (2, 3)

    def __init__(self) -> None:
        self.records: list[dict[str, tuple[dict, dict]]] = [{}, {}]
        self.run = 0

    def record(self, name: str, args: tuple, kwargs: dict, output: Any) -> None:
        inputs = {p: t.shape[0] for p, t in leaves((args, kwargs)) if t.dim() > 0}
        outputs = {p: t.shape[0] for p, t in leaves(output) if t.dim() > 0}
        self.records[self.run].setdefault(name, (inputs, outputs))

    def specs(self) -> dict[str, MemberSpec]:
        first, second = self.records
        specs = {}
        for name in first.keys() & second.keys():
            specs[name] = MemberSpec(
                inputs=_factors(first[name][0], second[name][0], self.BATCHES, f"{name}: input"),
                outputs=_factors(first[name][1], second[name][1], self.BATCHES, f"{name}: output"))
        return specs


def split_inputs(spec: MemberSpec, args: tuple, kwargs: dict, half: int, name: str):
    """Split (args, kwargs) of a doubled batch into two halves; returns (half1, half2, any_split)."""
    doubled = 2 * half
    split_paths = {}
    for path, tensor in leaves((args, kwargs)):
        if tensor.dim() == 0:
            continue
        factor = spec.inputs.get(path, "unknown")
        if factor == "unknown":  # a leaf calibration never saw (e.g. a mask present only with padding)
            if tensor.shape[0] == doubled:
                factor = 1
            elif tensor.shape[0] % doubled == 0:
                raise DualForwardError(f"{name}: input {path} of shape {tuple(tensor.shape)} was not seen "
                                       "during calibration and its batch layout is ambiguous")
            else:
                factor = None
        if factor is None:
            continue
        if tensor.shape[0] != factor * doubled:
            raise DualForwardError(f"{name}: input {path} has dim 0 = {tensor.shape[0]}, expected "
                                   f"{factor} x {doubled} (factor x doubled batch) as calibrated")
        split_paths[path] = factor * half
    first = tree_map(lambda p, t: t[:split_paths[p]] if p in split_paths else t, (args, kwargs))
    second = tree_map(lambda p, t: t[split_paths[p]:] if p in split_paths else t, (args, kwargs))
    return first, second, bool(split_paths)


def merge_outputs(spec: MemberSpec, first: Any, second: Any, half: int, inputs_split: bool, name: str) -> Any:
    """Concatenate the two halves' outputs; broadcast outputs of modules that saw no batched input."""

    def merge(path: Path, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.dim() == 0:
            raise DualForwardError(f"{name}: output {path} is a scalar; zo2 cannot tell the halves apart")
        if not inputs_split:  # e.g. GPT-2's position embedding of (1, T): each half gets its own copy
            if a.shape[0] != 1:
                raise DualForwardError(f"{name}: output {path} of shape {tuple(a.shape)} comes from unbatched "
                                       "inputs and cannot be broadcast to the batch halves")
            return torch.cat((a.expand(half, *a.shape[1:]), b.expand(half, *b.shape[1:])))
        factor = spec.outputs.get(path, 1 if a.shape[0] == half else None)
        if factor is None or a.shape[0] != factor * half:
            raise DualForwardError(f"{name}: output {path} of shape {tuple(a.shape)} does not scale with the "
                                   "batch; zo2 cannot merge the two halves")
        return torch.cat((a, b))

    return tree_zip(merge, first, second)


def double_batch(inputs: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """[x; x] for every tensor whose dim 0 is the batch size; other values pass unchanged."""
    return {k: torch.cat((v, v)) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch_size else v
            for k, v in inputs.items()}


def calibration_rows(inputs: dict[str, Any], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of the two calibration sub-batches (most padded rows first, so masks appear)."""
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == batch_size:
        order = torch.argsort(mask.sum(dim=1), stable=True)
    else:
        order = torch.arange(batch_size)
    order = order.repeat(-(-3 // batch_size))
    return order[:Calibration.BATCHES[0]], order[:Calibration.BATCHES[1]]


#: Positions a calibration forward keeps of each row (the first and last half of them): calibration
#: records batch layouts, which do not depend on the sequence length, so long sequences cost nothing.
CALIBRATION_TOKENS = 8


def calibration_inputs(inputs: dict[str, Any], batch_size: int, rows: torch.Tensor) -> dict[str, Any]:
    """The sub-batch of ``rows``, cut to the first and last ``CALIBRATION_TOKENS // 2`` positions when every
    batched input is a (batch, length) tensor (ids, masks, positions); kept whole otherwise. The cut keeps
    both ends, so a left- or right-padded row keeps its padding and the model still builds its masks."""
    selected = select_rows(inputs, batch_size, rows)
    batched = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch_size]
    lengths = {inputs[k].shape[1] if inputs[k].dim() == 2 else -1 for k in batched}
    if len(lengths) != 1 or min(lengths) <= CALIBRATION_TOKENS:
        return selected
    keep = CALIBRATION_TOKENS // 2
    return {k: torch.cat((v[:, :keep], v[:, -keep:]), dim=1) if k in batched else v for k, v in selected.items()}


def select_rows(inputs: dict[str, Any], batch_size: int, rows: torch.Tensor) -> dict[str, Any]:
    """The sub-batch of ``rows`` (tensors whose dim 0 is the batch size are indexed; others pass)."""
    return {k: v[rows.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch_size else v
            for k, v in inputs.items()}


def batch_signature(inputs: dict[str, Any]) -> tuple:
    """What a calibration is valid for: the keys, and for tensors their rank and dtype."""
    return tuple(sorted((k, (v.dim(), str(v.dtype)) if isinstance(v, torch.Tensor) else type(v).__name__)
                        for k, v in inputs.items()))
