"""Find a model's units generically: [embedding unit, block 0 ... block L-1, head unit].

No per-architecture code: the blocks are the ``nn.ModuleList`` holding the most parameters; the
embedding and head units are the other children of the blocks' ancestors that hold parameters,
classified by one hooked forward on a tiny input as running before the first block or after the last.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger(__name__)


class UnsupportedModelError(ValueError):
    """The model's structure does not fit the [embedding, blocks, head] scheme zo2 needs."""


@dataclass
class Member:
    """A module whose forward zo2 wraps: it runs once per half, under each half's weights."""

    name: str
    module: nn.Module


@dataclass
class Partition:
    """The units of a model in execution order, as lists of member modules."""

    blocks_name: str
    matrices_read_by_owner: bool = True
    """Whether every weight matrix (parameter of 2+ dims) is read only while the module owning it runs:
    what module-scoped perturbation needs (checked by the probe forward)."""
    embedding: list[Member] = field(default_factory=list)
    blocks: list[Member] = field(default_factory=list)
    head: list[Member] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    def unit_members(self) -> list[tuple[str, list[Member]]]:
        """(unit name, members) for every unit: "embedding", "block.0", ..., "head"."""
        units = [("embedding", self.embedding)]
        units += [(f"block.{i}", [member]) for i, member in enumerate(self.blocks)]
        units.append(("head", self.head))
        return units


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` holding the most parameters (the transformer blocks) and its name."""
    candidates = [(name, module) for name, module in model.named_modules()
                  if isinstance(module, nn.ModuleList) and len(module) > 0]
    if not candidates:
        raise UnsupportedModelError(
            f"{type(model).__name__}: could not find the transformer blocks. zo2 looks for an "
            "nn.ModuleList of decoder layers (e.g. model.layers, transformer.h); this model has none.")
    name, blocks = max(candidates, key=lambda item: _param_count(item[1]))
    if _param_count(blocks) == 0:
        raise UnsupportedModelError(f"{type(model).__name__}: the largest nn.ModuleList ({name!r}) has no "
                                    "parameters; zo2 needs the decoder layers to hold the weights")
    return name, blocks


def _siblings_of_path(model: nn.Module, blocks_name: str) -> list[tuple[str, nn.Module]]:
    """Children of every ancestor of the blocks, except the ancestors and the blocks themselves."""
    parts = blocks_name.split(".")
    ancestors = [(".".join(parts[:i]), model.get_submodule(".".join(parts[:i])) if i else model)
                 for i in range(len(parts))]
    on_path = {".".join(parts[:i + 1]) for i in range(len(parts))}
    siblings = []
    for prefix, ancestor in ancestors:
        own = [n for n, _ in ancestor.named_parameters(recurse=False)]
        if own:
            raise UnsupportedModelError(
                f"{type(model).__name__}: {prefix or 'the model'} uses parameters {own} directly in its own "
                "forward, outside any submodule; zo2 perturbs weights per submodule and cannot handle them")
        for child_name, child in ancestor.named_children():
            full = f"{prefix}.{child_name}" if prefix else child_name
            if full not in on_path:
                siblings.append((full, child))
    return siblings


def _refuse_row_coupling(model: nn.Module) -> None:
    """Batch norm mixes batch rows, so the two halves of the dual forward would see each other."""
    coupled = [name for name, module in model.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    if coupled:
        raise UnsupportedModelError(f"{type(model).__name__}: {coupled[:3]} normalise across the batch; the dual "
                                    "forward runs both perturbations in one batch and needs rows to be independent")


def _probe_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a transformers model, so zo2 cannot make up an input for the probe "
            "forward that finds its units: pass probe_inputs={...} (a tiny batch of keyword arguments of its "
            "forward, e.g. {'idx': torch.zeros(1, 4, dtype=torch.long)}) to ZOEngine")
    vocab = int(getattr(config, "vocab_size", 8) or 8)
    device = next(model.parameters()).device
    ids = torch.arange(1, 5, device=device).remainder(vocab).unsqueeze(0)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def no_cache_kwargs(model: nn.Module) -> dict[str, bool]:
    """``{"use_cache": False}`` if the model's forward takes it (a KV cache would mix the parts), else ``{}``."""
    params = inspect.signature(model.forward).parameters
    takes = "use_cache" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    return {"use_cache": False} if takes else {}


def _matrix_owners(model: nn.Module) -> list[tuple[nn.Module, list[nn.Parameter]]]:
    owners = []
    for module in model.modules():
        matrices = [p for p in module.parameters(recurse=False) if p.dim() >= 2]
        if matrices:
            owners.append((module, matrices))
    return owners


class _MatricesHiddenOutsideOwners:
    """While active, a weight matrix holds its data only during its owner module's call and is an empty
    tensor otherwise, so a forward that reads it anywhere else fails instead of reading it."""

    def __init__(self, model: nn.Module) -> None:
        self.owners = _matrix_owners(model)
        self.data = {id(p): p.data for _, params in self.owners for p in params}
        self.handles: list = []

    def _show(self, params: list[nn.Parameter]) -> None:
        for param in params:
            param.data = self.data[id(param)]

    def _hide(self, params: list[nn.Parameter]) -> None:
        for param in params:
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)

    def __enter__(self) -> "_MatricesHiddenOutsideOwners":
        for module, params in self.owners:
            self.handles.append(module.register_forward_pre_hook(lambda m, a, params=params: self._show(params)))
            self.handles.append(module.register_forward_hook(lambda m, a, o, params=params: self._hide(params),
                                                             always_call=True))
            self._hide(params)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        for _, params in self.owners:
            self._show(params)


@torch.no_grad()
def find_partition(model: nn.Module, probe_inputs: dict | None = None) -> Partition:
    """Partition ``model`` into units by running one hooked forward on a tiny input.

    Raises :class:`UnsupportedModelError` when the blocks cannot be found, a parametrised module runs
    between blocks, or a module runs both before and after them.
    """
    blocks_name, blocks = find_blocks(model)
    _refuse_row_coupling(model)
    siblings = [(n, m) for n, m in _siblings_of_path(model, blocks_name) if _param_count(m) > 0]
    calls: dict[str, list[int]] = {}
    counter = [0]

    def recorder(name: str):
        def hook(module, args):
            calls.setdefault(name, []).append(counter[0])
            counter[0] += 1
        return hook

    watched = siblings + [("<first block>", blocks[0]), ("<last block>", blocks[-1])]
    handles = [module.register_forward_pre_hook(recorder(name)) for name, module in watched]
    was_training = model.training
    model.eval()
    inputs = probe_inputs or _probe_inputs(model)
    matrices_read_by_owner = True
    try:
        try:
            with _MatricesHiddenOutsideOwners(model):
                model(**inputs, **no_cache_kwargs(model))
        except Exception as error:  # e.g. attention code that reads q_proj.weight itself
            logger.info("%s reads a weight matrix outside the module owning it (%s: %s); zo2 perturbs "
                        "whole units for it", type(model).__name__, type(error).__name__, error)
            matrices_read_by_owner = False
            calls.clear()
            counter[0] = 0
            model(**inputs, **no_cache_kwargs(model))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if "<first block>" not in calls:
        raise UnsupportedModelError(f"{type(model).__name__}: the forward never called {blocks_name}[0]; "
                                    "zo2 needs the decoder layers to run on every forward")
    first_block, last_block = calls["<first block>"][0], calls["<last block>"][-1]
    partition = Partition(blocks_name=blocks_name, matrices_read_by_owner=matrices_read_by_owner,
                          blocks=[Member(f"{blocks_name}.{i}", b) for i, b in enumerate(blocks)])
    for name, module in siblings:
        order = calls.get(name)
        if order is None:
            partition.unused.append(name)
        elif order[-1] < first_block:
            partition.embedding.append(Member(name, module))
        elif order[0] > last_block:
            partition.head.append(Member(name, module))
        else:
            raise UnsupportedModelError(
                f"{type(model).__name__}: module {name!r} runs between or around the decoder layers "
                f"({blocks_name}); zo2 needs every parametrised module outside them to run strictly before "
                "the first layer or after the last")
    partition.embedding.sort(key=lambda m: calls[m.name][0])
    partition.head.sort(key=lambda m: calls[m.name][0])
    if partition.unused:
        logger.info("modules never called by the forward are left out of training: %s", partition.unused)
    return partition
