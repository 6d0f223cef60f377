"""Fused Triton kernels for the noise hot path (the ``"triton"`` backend of :mod:`zo2.kernels`).

One launch per unit applies the pending updates to the buffer in place (weight decay on
[0, n_decay), stochastic rounding for bf16/fp16 buffers) and writes buffer + eps*z and/or
buffer - eps*z of the new seed; z is generated in registers from :mod:`zo2.updates.noise`'s counter
layout and never stored. Semantics are those of :mod:`zo2.kernels.torch_path`.

CPU tensors run here only under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is
first imported): how the tests check these kernels without a GPU. triton is imported on first use
only, so importing zo2 never imports it.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Any, NamedTuple, Sequence

import torch

from ..units.storage import Unit
from ..updates import noise
from ..updates.log import Update
from .torch_path import signed_outputs

#: Elements per Triton program: a power of two >= 128 (one Philox counter covers 128 Rademacher signs).
BLOCK = 1024
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def triton_available() -> bool:
    """Whether triton can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


class _Kernels(NamedTuple):
    """The compiled kernels of :mod:`._triton_kernel` and the noise kinds they take."""

    kinds: dict[str, int]
    update_perturb: Any
    noise: Any


@functools.cache
def _triton() -> _Kernels:
    # importing the kernels imports triton: deferred to first use, so that TRITON_INTERPRET can be set first
    from ._triton_kernel import KINDS, noise_kernel, update_perturb_kernel

    return _Kernels(KINDS, update_perturb_kernel, noise_kernel)


def _as_int64(seed: int) -> int:
    """A 64-bit seed as the int64 with the same bits (Philox keys on the bit pattern)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return seed - (1 << 64) if seed >= 1 << 63 else seed


@functools.lru_cache(maxsize=16)
def _parameters(updates: tuple[Update, ...], seed: int | None, weight_decay: float,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel inputs for a list of updates, cached: every unit of a step shares them (one tiny copy a step).

    Scalars are rounded to float32 exactly as torch rounds a Python scalar for a float32 ``mul_``/``add_``."""
    seeds = [_as_int64(u.seed) for u in updates] + ([_as_int64(seed)] if seed is not None else [])
    seeds_t = torch.tensor(seeds or [0], dtype=torch.int64)
    coefs = torch.tensor([-u.lr * u.projected_grad for u in updates] or [0.0], dtype=torch.float32)
    decays = torch.tensor([1.0 - u.lr * weight_decay for u in updates] or [1.0], dtype=torch.float32)
    return seeds_t.to(device), coefs.to(device), decays.to(device)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch(buffer: torch.Tensor, unit: Unit, updates: Sequence[Update], seed: int | None, eps: float,
            outputs: dict[int, torch.Tensor], noise_kind: str, weight_decay: float, offset: int) -> None:
    if buffer.dtype not in DTYPES:
        raise ValueError(f"the Triton kernel takes {[str(d) for d in DTYPES]} buffers, got {buffer.dtype}; "
                         "set ZOConfig.kernels='torch' for other dtypes")
    if noise_kind not in ("gaussian", "rademacher"):
        raise ValueError(f"noise_kind must be 'gaussian' or 'rademacher', got {noise_kind!r}")
    if buffer.dim() != 1 or not buffer.is_contiguous():
        raise ValueError(f"buffer must be a contiguous 1-D tensor, got shape {tuple(buffer.shape)}")
    n = buffer.numel()
    if n == 0 or (not updates and not outputs):
        return
    kernels = _triton()
    seeds, coefs, decays = _parameters(tuple(updates), seed, float(weight_decay), buffer.device)
    kernels.update_perturb[(_cdiv(offset % BLOCK + n, BLOCK),)](
        buffer, outputs.get(1, buffer), outputs.get(-1, buffer), seeds, coefs, decays, len(updates), n, offset,
        unit.n_decay, unit.index, float(eps), KIND=kernels.kinds[noise_kind], UPDATE=bool(updates),
        ROUND=buffer.dtype != torch.float32, PLUS=1 in outputs, MINUS=-1 in outputs, BLOCK=BLOCK)


def update_and_perturb(buffer: torch.Tensor, unit: Unit, updates: Sequence[Update], seed: int, eps: float, *,
                       noise_kind: str, weight_decay: float, signs: Sequence[int] = (1, -1),
                       offset: int = 0, out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """:func:`zo2.kernels.torch_path.update_and_perturb` in one Triton launch: returns ``buffer + sign*eps*z``
    per sign (written into ``out`` when given)."""
    outputs = signed_outputs(buffer, signs, out)
    _launch(buffer, unit, updates, seed, eps, outputs, noise_kind, weight_decay, offset)
    return [outputs[sign] for sign in signs]


def apply_updates(buffer: torch.Tensor, unit: Unit, updates: Sequence[Update], *, noise_kind: str,
                  weight_decay: float, offset: int = 0) -> None:
    """:func:`zo2.kernels.torch_path.apply_updates` in one Triton launch (all updates applied per element in order)."""
    _launch(buffer, unit, updates, None, 0.0, {}, noise_kind, weight_decay, offset)


def generate(kind: str, seed: int, unit: int, start: int, count: int, *, stream: int = noise.PERTURBATION_STREAM,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """:func:`zo2.updates.noise.generate` by the kernel's own generator (to check it against the torch one)."""
    kernels = _triton()
    if kind not in kernels.kinds:
        raise ValueError(f"unknown noise kind {kind!r}; expected one of {sorted(kernels.kinds)}")
    if count < 0 or start < 0:
        raise ValueError(f"noise range must be non-negative, got start={start}, count={count}")
    first = start - start % BLOCK  # programs start at multiples of BLOCK
    out = torch.empty(start - first + count, dtype=torch.float32, device=device)
    if out.numel():
        kernels.noise[(_cdiv(out.numel(), BLOCK),)](
            out, _as_int64(seed), out.numel(), first, unit, KIND=kernels.kinds[kind], STREAM=stream, BLOCK=BLOCK)
    return out[start - first:]
