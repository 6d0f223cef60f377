"""The walk's forward: the model runs once on the batch replicated K times along dim 0 ([x; x; ...]);
every wrapped module runs part k of its inputs under part k's weights (theta + s_k*eps*z_k) and
concatenates the parts' outputs. K = 2 (+eps, -eps) is MeZO's dual forward.

Which tensors of a module's arguments are batched is not guessed from shapes alone (Bloom passes
ALiBi as (batch * heads, 1, T); ``cache_position`` is (T,)): it is calibrated by two small forwards
at batch 2 and 3. A leaf whose dim 0 is k * batch in both is batched with factor k; one whose dim 0
does not change is shared by both halves. Leaves are addressed by their path in the (nested)
arguments, and the calibration is cached per batch signature.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from transformers.utils import ModelOutput

Path = tuple


class BatchLayoutError(RuntimeError):
    """A module's inputs or outputs cannot be split into the parts of a walk, or its outputs merged from them:
    their batch layout is not what calibration found (was ``DualForwardError``, when a walk had two halves)."""


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


def tree_zip(fn: Callable[..., Any], first: Any, *others: Any, path: Path = ()) -> Any:
    """Rebuild nests of the same shape with ``fn(path, a, b, ...)`` for each tuple of tensors."""
    if isinstance(first, torch.Tensor):
        return fn(path, first, *others)
    if isinstance(first, dict):
        return _rebuild(first, {k: tree_zip(fn, v, *(o[k] for o in others), path=path + (k,))
                                for k, v in first.items()})
    if isinstance(first, (tuple, list)):
        return _rebuild(first, [tree_zip(fn, v, *(o[i] for o in others), path=path + (i,))
                                for i, v in enumerate(first)])
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
            raise BatchLayoutError(f"{where} {path}: dim 0 is {a} at batch {batches[0]} and {b} at batch "
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


def split_inputs(spec: MemberSpec, args: tuple, kwargs: dict, part_batch: int, parts: int, name: str):
    """Split (args, kwargs) of a batch replicated ``parts`` times into the parts' (args, kwargs).

    Returns (pieces, any_split): pieces[k] holds rows [k*f*b, (k+1)*f*b) of every batched leaf (f its
    calibrated factor, b = ``part_batch``); unbatched leaves are passed whole to every part."""
    total = parts * part_batch
    split_paths = {}
    for path, tensor in leaves((args, kwargs)):
        if tensor.dim() == 0:
            continue
        factor = spec.inputs.get(path, "unknown")
        if factor == "unknown":  # a leaf calibration never saw (e.g. a mask present only with padding)
            if tensor.shape[0] == total:
                factor = 1
            elif tensor.shape[0] % total == 0:
                raise BatchLayoutError(f"{name}: input {path} of shape {tuple(tensor.shape)} was not seen "
                                       "during calibration and its batch layout is ambiguous")
            else:
                factor = None
        if factor is None:
            continue
        if tensor.shape[0] != factor * total:
            raise BatchLayoutError(f"{name}: input {path} has dim 0 = {tensor.shape[0]}, expected "
                                   f"{factor} x {total} (factor x replicated batch) as calibrated")
        split_paths[path] = factor * part_batch

    def piece(k: int):
        return tree_map(lambda p, t: t[k * split_paths[p]:(k + 1) * split_paths[p]] if p in split_paths else t,
                        (args, kwargs))
    return [piece(k) for k in range(parts)], bool(split_paths)


def merge_outputs(spec: MemberSpec, outputs: list[Any], part_batch: int, inputs_split: bool, name: str) -> Any:
    """Concatenate the parts' outputs; broadcast outputs of modules that saw no batched input."""

    def merge(path: Path, *tensors: torch.Tensor) -> torch.Tensor:
        first = tensors[0]
        if first.dim() == 0:
            raise BatchLayoutError(f"{name}: output {path} is a scalar; zo2 cannot tell the parts apart")
        if not inputs_split:  # e.g. GPT-2's position embedding of (1, T): each part gets its own copy
            if first.shape[0] != 1:
                raise BatchLayoutError(f"{name}: output {path} of shape {tuple(first.shape)} comes from unbatched "
                                       "inputs and cannot be broadcast to the batch parts")
            return torch.cat([t.expand(part_batch, *t.shape[1:]) for t in tensors])
        factor = spec.outputs.get(path, 1 if first.shape[0] == part_batch else None)
        if factor is None or first.shape[0] != factor * part_batch:
            raise BatchLayoutError(f"{name}: output {path} of shape {tuple(first.shape)} does not scale with the "
                                   "batch; zo2 cannot merge the parts")
        return torch.cat(tensors)

    return tree_zip(merge, *outputs)


def writes_parts_in_place(module: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> bool:
    """Whether the parts of this call can write straight into one merged output (:func:`linear_part_into`)
    instead of being concatenated: a bias-free ``nn.Linear`` running its own forward on one tensor, without
    autograd or autocast. For the LM head this saves a copy of the whole logits (K x batch x T x vocab)."""
    return (type(module) is nn.Linear and module.bias is None and getattr(forward, "__func__", None) is nn.Linear.forward
            and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled(args[0].device.type))


def linear_part_into(module: nn.Linear, part_input: torch.Tensor, out: torch.Tensor) -> None:
    """``out[:] = module(part_input)``, bit for bit: a bias-free ``F.linear`` is ``matmul(x, W^T)``, and the
    out= form runs the same matrix product with the same shapes into the given rows."""
    torch.matmul(part_input, module.weight.t(), out=out)


def replicate_batch(inputs: dict[str, Any], batch_size: int, parts: int) -> dict[str, Any]:
    """[x; x; ...] (``parts`` times) for every tensor whose dim 0 is the batch size; others pass unchanged."""
    return {k: torch.cat([v] * parts) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch_size else v
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
    batched input is a (batch, length) tensor (ids, masks, positions), together with shared (1, length)
    inputs (a leading dim of 1 is shared by the batch); kept whole otherwise. The cut keeps
    both ends, so a left- or right-padded row keeps its padding and the model still builds its masks."""
    selected = select_rows(inputs, batch_size, rows)
    tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.dim()}
    batched = [k for k, v in tensors.items() if v.shape[0] == batch_size]
    lengths = {tensors[k].shape[1] if tensors[k].dim() == 2 else -1 for k in batched}
    if len(lengths) != 1 or min(lengths) <= CALIBRATION_TOKENS:
        return selected
    length = lengths.pop()
    # a shared (1, T) input (positions broadcast over the batch) is cut with the rows; any other shared
    # input that has a dimension of T could not be cut consistently, so then nothing is cut
    cut = batched + [k for k, v in tensors.items() if k not in batched and tuple(v.shape) == (1, length)]
    if any(length in v.shape for k, v in tensors.items() if k not in cut):
        return selected
    keep = CALIBRATION_TOKENS // 2
    return {k: torch.cat((v[:, :keep], v[:, -keep:]), dim=1) if k in cut else v for k, v in selected.items()}


def select_rows(inputs: dict[str, Any], batch_size: int, rows: torch.Tensor) -> dict[str, Any]:
    """The sub-batch of ``rows`` (tensors whose dim 0 is the batch size are indexed; others pass)."""
    return {k: v[rows.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch_size else v
            for k, v in inputs.items()}


def batch_signature(inputs: dict[str, Any]) -> tuple:
    """What a calibration is valid for: the keys, and for tensors their rank and dtype."""
    return tuple(sorted((k, (v.dim(), str(v.dtype)) if isinstance(v, torch.Tensor) else type(v).__name__)
                        for k, v in inputs.items()))


def batch_size(inputs: Mapping[str, Any]) -> int:
    """The batch size: dim 0 of ``input_ids`` (or ``inputs_embeds``; for other models, of the first
    tensor input)."""
    for key in ("input_ids", "inputs_embeds"):
        if isinstance(inputs.get(key), torch.Tensor):
            return int(inputs[key].shape[0])
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim():
            return int(value.shape[0])
    raise ValueError(f"cannot find the batch size: no tensor input with a batch dimension among {sorted(inputs)}")


def split_output(output: Any, part_batch: int, parts: int) -> list[Any]:
    """The ``parts`` row blocks of a replicated-batch output (a ModelOutput, tensor or tuple): a tensor
    whose dim 0 is f x parts x part_batch gives part k its rows [k*f*b, (k+1)*f*b); others pass whole."""
    total = parts * part_batch

    def rows(k: int):
        def cut(_, tensor: torch.Tensor) -> torch.Tensor:
            if tensor.dim() == 0 or tensor.shape[0] % total:
                return tensor
            size = tensor.shape[0] // parts
            return tensor[k * size:(k + 1) * size]
        return cut
    return [tree_map(rows(k), output) for k in range(parts)]
