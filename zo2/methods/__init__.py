"""Zeroth-order methods as plug-ins: each module holds one method, registered in :data:`METHODS`.

``ZOConfig(method=name, method_options={...})`` picks one; :data:`DEFAULTS` holds each one's default
lr and eps and the scale its lr lives on; its options are the fields of the method's
``Options`` dataclass (documented there, validated when the config is made). See :mod:`.base` for
what a method is to the engine.
"""
from __future__ import annotations

from .adamezo import AdaMeZO
from .base import Decision, Method, Part, build_options
from .defaults import DEFAULTS, MethodDefaults, defaults_for, out_of_scale
from .fzoo import FZOO
from .meazo import MEAZO
from .mezo_sgd import MeZOSGD
from .sparse_mezo import SparseMeZO

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (MeZOSGD, FZOO, SparseMeZO, AdaMeZO, MEAZO)}

__all__ = ["DEFAULTS", "METHODS", "Decision", "Method", "MethodDefaults", "Part", "build_options", "defaults_for",
           "method_class", "out_of_scale"]


def method_class(name: str) -> type[Method]:
    """The registered method called ``name``; ValueError listing the known ones otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {list(METHODS)}")
    return METHODS[name]
