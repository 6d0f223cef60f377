"""Elementwise update and perturbation of flat buffers: one entry point, several backends.

Every backend computes, for elements [offset, offset + numel) of a unit laid out like its master::

    theta <- theta - lr * (g * z(seed) + weight_decay * theta)      (per pending update, in order)
    copy_s = theta + s * eps * z(seed')                               (per sign s)

with z regenerated from its seed (:mod:`zo2.noise`), never stored. Backends (``ZOConfig.kernels``):

* ``"torch"``: :mod:`zo2.kernels.torch_path`, plain torch chunk by chunk: the reference;
* ``"triton"``: :mod:`zo2.kernels.triton_path`, one fused Triton launch per call (CUDA; CPU tensors
  only under Triton's interpreter);
* ``"auto"``: Triton for CUDA buffers of float32/bf16/fp16 when triton imports, else the torch path.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

from ..history import Update
from ..storage import Unit
from . import torch_path, triton_path
from .torch_path import stochastic_round
from .triton_path import triton_available

BACKENDS = ("auto", "torch", "triton")
ENV_DEFAULT = "ZO2_KERNELS"
"""Environment variable giving ``ZOConfig.kernels`` its default (read when a config is made)."""

__all__ = ["BACKENDS", "apply_updates", "default_backend", "stochastic_round", "triton_available",
           "update_and_perturb", "use_triton"]


def default_backend() -> str:
    """``$ZO2_KERNELS`` lower-cased, or ``"auto"``; validated by ``ZOConfig``."""
    return os.environ.get(ENV_DEFAULT, "auto").strip().lower() or "auto"


def use_triton(buffer: torch.Tensor, backend: str = "auto") -> bool:
    """Whether the update/perturbation of ``buffer`` runs the Triton kernel under ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend {backend!r} is unknown; expected one of {list(BACKENDS)}")
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("ZOConfig.kernels='triton' but triton is not installed: pip install 'zo2[gpu]'")
        return True
    return (backend == "auto" and buffer.is_cuda and buffer.dtype in triton_path.DTYPES
            and triton_available())


def update_and_perturb(buffer: torch.Tensor, unit: Unit, updates: Sequence[Update], seed: int, eps: float, *,
                       noise_kind: str, weight_decay: float, signs: Sequence[int] = (1, -1), offset: int = 0,
                       out: Sequence[torch.Tensor] | None = None, backend: str = "auto") -> list[torch.Tensor]:
    """Apply pending ``updates`` to ``buffer`` in place, then return ``buffer + sign*eps*z(seed)`` per sign.

    ``out`` (one tensor per sign, shaped like ``buffer``) receives the copies instead of new tensors."""
    path = triton_path if use_triton(buffer, backend) else torch_path
    return path.update_and_perturb(buffer, unit, updates, seed, eps, noise_kind=noise_kind,
                                   weight_decay=weight_decay, signs=signs, offset=offset, out=out)


def apply_updates(buffer: torch.Tensor, unit: Unit, updates: Sequence[Update], *, noise_kind: str,
                  weight_decay: float, offset: int = 0, backend: str = "auto") -> None:
    """Apply ``updates`` in order, in place, to ``buffer`` (elements [offset, offset + numel) of a unit)."""
    path = triton_path if use_triton(buffer, backend) else torch_path
    path.apply_updates(buffer, unit, updates, noise_kind=noise_kind, weight_decay=weight_decay, offset=offset)
