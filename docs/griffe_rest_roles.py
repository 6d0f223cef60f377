"""A Griffe extension for the API reference: render the docstrings' reST roles as code.

zo2's docstrings cross-reference with Sphinx roles (:class:`ZOConfigError`, :mod:`zo2.methods`), which
Markdown would otherwise show with the role's name in front. This turns ``:role:`target``` into
``target`` in code font (``~a.b.c`` into ``c``); the text is otherwise left as written.
"""
from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|mod|func|meth|attr|data|exc|obj|const):`(~?)([^`]+)`")


def _plain(match: re.Match) -> str:
    short, target = match.group(1), match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


class RestRoles(griffe.Extension):
    """Rewrite reST roles in every docstring once the object tree is loaded."""

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        _rewrite(obj)

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        _rewrite(pkg)  # a top-level package is not passed to on_object


def _rewrite(obj: griffe.Object) -> None:
    if obj.docstring is not None:
        obj.docstring.value = _ROLE.sub(_plain, obj.docstring.value)
