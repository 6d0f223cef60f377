"""Elementwise update and perturbation of flat buffers: one entry point, several backends.

Every backend computes, for elements [offset, offset + numel) of a unit laid out like its master::

    theta <- theta - lr * (g * z(seed) + weight_decay * theta)      (per pending update, in order)
    copy_s = theta + s * eps * z(seed')                               (per sign s)

with z regenerated from its seed (:mod:`zo2.updates.noise`), never stored. Backends (``ZOConfig.kernels``):

* ``"torch"``: :mod:`zo2.kernels.torch_path`, plain eager torch chunk by chunk: the reference;
* ``"cpu"``: :mod:`zo2.kernels.cpu_fused`, one fused C++ pass per 1024-element block (CPU buffers of
  float32/bf16/fp16; built with the system's C++ compiler on first use and cached), bit-identical to
  the torch path;
* ``"triton"``: :mod:`zo2.kernels.triton_path`, one fused Triton launch per call (CUDA; CPU tensors
  only under Triton's interpreter);
* ``"auto"``: Triton for CUDA buffers of float32/bf16/fp16 when triton imports; the fused CPU kernel
  for CPU buffers it takes when it builds (else, logged once, the torch path); the torch path otherwise.
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Iterable, Sequence

import torch

from ..units.storage import Unit
from ..updates import noise
from ..updates.log import Update
from . import cpu_fused, torch_path, triton_path
from .torch_path import stochastic_round
from .triton_path import triton_available

BACKENDS = ("auto", "cpu", "torch", "triton")
ENV_DEFAULT = "ZO2_KERNELS"
"""Environment variable giving ``ZOConfig.kernels`` its default (read when a config is made)."""
WARM_UP_NUMEL = 4096
"""Elements of the scratch buffer that warms a backend up (builds or compiles it) before a first step."""

__all__ = ["BACKENDS", "WARM_UP_NUMEL", "apply_updates", "default_backend", "generate", "resolve",
           "stochastic_round", "triton_available", "update_and_perturb", "use_triton", "warm_up"]


def default_backend() -> str:
    """``$ZO2_KERNELS`` lower-cased, or ``"auto"``; validated by ``ZOConfig``."""
    return os.environ.get(ENV_DEFAULT, "auto").strip().lower() or "auto"


def resolve(buffer: torch.Tensor, backend: str = "auto", noise_kind: str = "gaussian",
            out: Sequence[torch.Tensor] | None = None) -> str:
    """The backend ("cpu", "torch" or "triton") that runs the update/perturbation of ``buffer`` under
    ``backend``. Raises when an explicitly chosen backend is unavailable (saying how to fix it)."""
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend {backend!r} is unknown; expected one of {list(BACKENDS)}")
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("ZOConfig.kernels='triton' but triton is not installed: pip install 'zo2[gpu]'")
        return "triton"
    if backend == "cpu":
        if not cpu_fused.available():
            raise RuntimeError("ZOConfig.kernels='cpu' but the fused CPU kernel cannot be built (see the warning "
                               "above: install a C++ compiler such as g++, or set ZOConfig.kernels='auto')")
        return "cpu"
    if backend == "auto":
        if buffer.is_cuda and buffer.dtype in triton_path.DTYPES and triton_available():
            return "triton"
        if cpu_fused.supports(buffer, out, noise_kind) is None and cpu_fused.available():
            return "cpu"
    return "torch"


def use_triton(buffer: torch.Tensor, backend: str = "auto") -> bool:
    """Whether the update/perturbation of ``buffer`` runs the Triton kernel under ``backend``."""
    return resolve(buffer, backend) == "triton"


_PATHS: dict[str, ModuleType] = {"cpu": cpu_fused, "torch": torch_path, "triton": triton_path}


def update_and_perturb(buffer: torch.Tensor, unit: Unit, updates: Sequence[Update], seed: int, eps: float, *,
                       noise_kind: str, weight_decay: float, signs: Sequence[int] = (1, -1), offset: int = 0,
                       out: Sequence[torch.Tensor] | None = None, backend: str = "auto") -> list[torch.Tensor]:
    """Apply pending ``updates`` to ``buffer`` in place, then return ``buffer + sign*eps*z(seed)`` per sign.

    ``out`` (one tensor per sign, shaped like ``buffer``) receives the copies instead of new tensors."""
    path = _PATHS[resolve(buffer, backend, noise_kind, out)]
    return path.update_and_perturb(buffer, unit, updates, seed, eps, noise_kind=noise_kind,
                                   weight_decay=weight_decay, signs=signs, offset=offset, out=out)


def apply_updates(buffer: torch.Tensor, unit: Unit, updates: Sequence[Update], *, noise_kind: str,
                  weight_decay: float, offset: int = 0, backend: str = "auto") -> None:
    """Apply ``updates`` in order, in place, to ``buffer`` (elements [offset, offset + numel) of a unit)."""
    path = _PATHS[resolve(buffer, backend, noise_kind)]
    path.apply_updates(buffer, unit, updates, noise_kind=noise_kind, weight_decay=weight_decay, offset=offset)


def generate(kind: str, seed: int, unit: int, start: int, count: int, *, stream: int = noise.PERTURBATION_STREAM,
             device: torch.device | str = "cpu", backend: str = "auto") -> torch.Tensor:
    """:func:`zo2.updates.noise.generate` for the plain-torch update rules of some methods: on the CPU, under
    ``backend`` "auto" (when the kernel builds) or "cpu", by the fused kernel's generator, which gives the
    same bits about ten times faster than the torch path; elsewhere by :mod:`zo2.updates.noise` itself."""
    if torch.device(device).type == "cpu" and resolve(torch.empty(0), backend) == "cpu":  # validates backend
        return cpu_fused.generate(kind, seed, unit, start, count, stream=stream)
    return noise.generate(kind, seed, unit, start, count, stream=stream, device=device)


def warm_up(dtypes: Iterable[torch.dtype], device: torch.device, numel: int, signs: Sequence[int], eps: float, *,
            noise_kind: str, weight_decay: float, backend: str = "auto") -> None:
    """Run every call a step makes (a flush, update-and-perturb with all ``signs``, with none and with each
    alone) once on a scratch buffer of at most :data:`WARM_UP_NUMEL` elements per master dtype, so that
    building the fused CPU kernel or Triton's JIT happens at load time and not in the first step."""
    size = min(max(numel, 1), WARM_UP_NUMEL)
    kwargs = dict(noise_kind=noise_kind, weight_decay=weight_decay, backend=backend)
    pending = [Update(seed=0, projected_grad=0.0, lr=0.0)]
    signs = sorted(set(signs), reverse=True)
    for dtype in set(dtypes):
        buffer = torch.zeros(size, dtype=dtype, device=device)
        scratch = Unit(index=0, name="warm-up", params=[], master=buffer, offloaded=False, n_decay=size // 2)
        apply_updates(buffer, scratch, pending, **kwargs)  # flush, and module scope's update pass
        for updates, chosen in ((pending, signs), ((), signs), *(((), [s]) for s in signs)):
            update_and_perturb(buffer, scratch, updates, 0, eps, signs=chosen, **kwargs)
