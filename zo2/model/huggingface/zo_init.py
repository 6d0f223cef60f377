"""ZO2's path of ``zo_hf_init`` (defined in :mod:`zo2.hf`)."""
from ...hf import zo_hf_init

__all__ = ["zo_hf_init"]
