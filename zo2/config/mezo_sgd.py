"""``MeZOSGDConfig``: ZO2's name for the MeZO-SGD config, with ZO2's defaults."""
from __future__ import annotations

from dataclasses import dataclass

from . import ZOConfig
from .zo2_fields import accepts_zo2_fields


@accepts_zo2_fields
@dataclass
class MeZOSGDConfig(ZOConfig):
    """A :class:`~zo2.config.ZOConfig` with the defaults ZO2 gives an omitted field: ``lr=1e-3`` and
    ``weight_decay=0.1`` (``ZOConfig``'s own defaults differ). Everything else is ``ZOConfig``."""

    lr: float = 1e-3
    """Learning rate (ZO2's default, 1e-3)."""
    weight_decay: float = 0.1
    """Decoupled weight decay on weight matrices (ZO2's default, 0.1)."""
