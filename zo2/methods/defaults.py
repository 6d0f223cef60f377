"""Each method's default learning rate and perturbation scale, and the scale its lr lives on: one table.

The methods do not share an lr scale. MeZO-SGD, sparse-mezo and adamezo step by ``lr`` times an
estimate of the gradient; meazo divides ``lr`` by the root of a running mean of g² (a normalised step,
so its lr is about MeZO-SGD's times a typical |g|); fzoo divides its step by the spread of the raw
losses, about ε·|g|, so its lr is about ε times MeZO-SGD's. A lr that trains one method can make another
diverge or stand still, hence one default per method and a warning for an lr far from it.

The values come from the convergence benchmark's lr sweep (``bench/convergence.py --rows sweep``, two
datasets; the table and its limits are in docs/results/convergence.md): per method the lr that gained on
both datasets without ever ending below zero-shot. The sweep was small (one seed, 24 steps), so these are
provisional; this table is where a larger run sets them.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodDefaults:
    """A method's defaults and the scale its learning rate lives on."""

    lr: float
    """The learning rate ``ZOConfig(lr=None)`` (and ``zo2 finetune`` without ``--lr``) trains with."""
    eps: float
    """The perturbation scale ``ZOConfig(eps=None)`` uses."""
    scale: str
    """What the lr multiplies, in words (quoted by the out-of-scale warning and the docs)."""


DEFAULTS: dict[str, MethodDefaults] = {
    "mezo-sgd": MethodDefaults(1e-5, 1e-3, "lr x g z: plain SGD on the projected gradient"),
    "fzoo": MethodDefaults(1e-7, 1e-3, "lr / sigma of the losses (about eps x MeZO-SGD's lr)"),
    "sparse-mezo": MethodDefaults(3e-5, 1e-3, "lr x g z on the perturbed (small) weights: MeZO-SGD's scale"),
    "adamezo": MethodDefaults(3e-4, 1e-3, "lr x m / sqrt(v): an Adam-style step of about lr per element"),
    "meazo": MethodDefaults(1e-3, 1e-3, "lr / sqrt(mean g^2) (about MeZO-SGD's lr x a typical |g|)"),
}
"""Per method name (the keys of :data:`zo2.methods.METHODS`)."""


def defaults_for(method: str) -> MethodDefaults:
    """``method``'s row of :data:`DEFAULTS`; a method registered without one (a plug-in) gets MeZO-SGD's, whose
    update rule the base :class:`~zo2.methods.base.Method` implements."""
    return DEFAULTS.get(method, DEFAULTS["mezo-sgd"])


OUT_OF_SCALE = 100.0
"""An lr more than this factor away from its method's default is warned about."""


def out_of_scale(method: str, lr: float) -> str | None:
    """A one-line warning when ``lr`` is more than :data:`OUT_OF_SCALE` times away from ``method``'s
    default (e.g. a MeZO-SGD lr given to fzoo); None when it is within range (or 0)."""
    default = defaults_for(method)
    if lr == 0 or default.lr / OUT_OF_SCALE <= lr <= default.lr * OUT_OF_SCALE:
        return None
    return (f"lr={lr:g} is {'above' if lr > default.lr else 'below'} the scale of method {method!r} by more than "
            f"{OUT_OF_SCALE:g}x: its lr is {default.scale}, default {default.lr:g}. Leave lr unset for the default, "
            "or use lr='auto' to search around it")


@dataclass(frozen=True)
class LearningRate:
    """The learning rate a run trains with and where it came from (``ZOEngine`` holds the one instance)."""

    value: float | None
    """None only while ``ZOConfig.lr="auto"`` waits for its search."""
    source: str
    """``"given"``, ``"default of <method>"``, ``"auto search"`` or ``"auto search pending"``."""
    search: tuple[dict, ...] = ()
    """The search's table (``lr``, ``steps``, ``score``, ``seconds`` per candidate) when it picked the lr."""

    @classmethod
    def requested(cls, method: str, lr: float | str | None) -> "LearningRate":
        """What ``ZOConfig.lr`` asks for, before any search: the method's default for None."""
        if lr is None:
            return cls(defaults_for(method).lr, f"default of {method}")
        if lr == "auto":
            return cls(None, "auto search pending")
        return cls(float(lr), "given")

    def to_json(self) -> dict:
        return {"value": self.value, "source": self.source, "search": [dict(row) for row in self.search]}

    @classmethod
    def from_json(cls, data: dict) -> "LearningRate":
        value = data.get("value")
        return cls(None if value is None else float(value), str(data["source"]),
                   tuple(dict(row) for row in data.get("search", ())))
