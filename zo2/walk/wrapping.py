"""Member wrapping: the engine replaces the forward of every member module (the units' top modules), so
that inside a walk each member runs once per part under that part's weights; in module scope, every
module below a member that owns weight matrices also gets a pre/post hook that perturbs them for the
part being computed. ``unwrap`` restores the model exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from ..units.partition import Member, Partition
from ..units.storage import Unit
from .scope import Matrix


@dataclass
class Wrapped:
    """A member module whose forward the engine replaced, and the weights it reads."""

    member: Member
    forward: Callable
    """The module's own forward (called once per part)."""
    refs: list[tuple[nn.Parameter, Unit, int]]
    """(parameter, owning unit, index in ``unit.params``) of every parameter the member reads."""
    units: list[Unit]
    matrices: list[Matrix] = field(default_factory=list)
    """Module scope: the weight matrices the member module owns itself (perturbed per part here, as
    module hooks would fire once around all parts)."""


def _matrices_of(module: nn.Module, owner: dict[int, tuple[Unit, int]]) -> list[Matrix]:
    """The trainable weight matrices ``module`` owns directly (not through submodules)."""
    return [Matrix(p, *owner[id(p)]) for p in module.parameters(recurse=False)
            if p.dim() >= 2 and owner[id(p)][0].trainable]


def wrap(partition: Partition, units: list[Unit], call: Callable[[Wrapped, tuple, dict], Any], *,
         matrix_hooks: tuple[Callable[[list[Matrix]], None], Callable[[list[Matrix], Any], None]] | None = None
         ) -> tuple[list[Wrapped], list]:
    """Replace every member's forward by ``call(entry, args, kwargs)``; with ``matrix_hooks`` (enter,
    leave), hook every module below a member that owns weight matrices. Returns (entries, hook handles)."""
    owner = {id(p): (unit, k) for unit in units for k, p in enumerate(unit.params)}
    entries, handles, hooked = [], [], set()
    for _, members in partition.unit_members():
        for member in members:
            refs = [(p, *owner[id(p)]) for p in member.module.parameters()]
            entry = Wrapped(member, member.module.forward, refs, list({id(u): u for _, u, _ in refs}.values()))
            if matrix_hooks is not None:
                entry.matrices = _matrices_of(member.module, owner)
                handles += _hook_matrix_owners(member.module, owner, hooked, *matrix_hooks)
            member.module.forward = (lambda entry: lambda *args, **kwargs: call(entry, args, kwargs))(entry)
            entries.append(entry)
    return entries, handles


def _hook_matrix_owners(member_module: nn.Module, owner: dict, hooked: set[int], enter: Callable,
                        leave: Callable) -> list:
    handles = []
    for module in member_module.modules():
        matrices = _matrices_of(module, owner)
        if module is member_module or not matrices or id(module) in hooked:
            continue
        hooked.add(id(module))
        handles.append(module.register_forward_pre_hook(lambda m, args, matrices=matrices: enter(matrices)))
        handles.append(module.register_forward_hook(lambda m, args, out, matrices=matrices: leave(matrices, out),
                                                    always_call=True))
    return handles


def unwrap(entries: list[Wrapped], handles: list) -> None:
    """Give every member its own forward back and remove the hooks."""
    for entry in entries:
        del entry.member.module.forward
    for handle in handles:
        handle.remove()
