"""ZO2's ``zo2.utils`` path: ``seed_everything``."""
from .utils import seed_everything

__all__ = ["seed_everything"]
