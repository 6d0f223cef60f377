"""MeZO-SGD on flat buffers: the update of a step and the two perturbed copies of the next.

    theta <- theta - lr * (g * z(seed) + weight_decay * theta)      (decay on [0, n_decay) only)
    plus   = theta + eps * z(seed'),   minus = theta - eps * z(seed')

z is regenerated from its seed chunk by chunk (never stored). Every function here is elementwise
and processes chunks at absolute offsets, so training, flushing and replaying an update history
produce the same bits. Masters in bf16/fp16 take updates with stochastic rounding, so updates far
below one ulp survive in expectation. This is the reference every other backend of
:mod:`zo2.kernels` must reproduce.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..units.storage import Unit
from ..updates import noise
from ..updates.log import Update

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def stochastic_round(values: torch.Tensor, dtype: torch.dtype, uniform: torch.Tensor) -> torch.Tensor:
    """Round float32 ``values`` to ``dtype``, up or down with probability given by the distance.

    ``uniform`` holds one U[0, 1) draw per element. E[result] == values (for finite values in range).
    """
    nearest = values.to(dtype)
    error = values - nearest.float()
    toward = torch.where(error >= 0, torch.full_like(nearest, float("inf")), torch.full_like(nearest, float("-inf")))
    neighbour = torch.nextafter(nearest, toward)
    gap = neighbour.float() - nearest.float()
    take_neighbour = uniform * gap.abs() < error.abs()
    return torch.where(take_neighbour, neighbour, nearest)


def signed_outputs(buffer: torch.Tensor, signs: Sequence[int],
                   out: Sequence[torch.Tensor] | None) -> dict[int, torch.Tensor]:
    """The fused backends' outputs: sign -> ``out`` tensor (or a new one like ``buffer``), signs checked."""
    if any(sign not in (1, -1) for sign in signs) or len(set(signs)) != len(signs):
        raise ValueError(f"signs must be distinct values of +1 and -1, got {tuple(signs)}")
    return dict(zip(signs, list(out) if out is not None else [torch.empty_like(buffer) for _ in signs]))


def _update_chunk(chunk: torch.Tensor, offset: int, unit: Unit, update: Update, noise_kind: str,
                  weight_decay: float) -> None:
    z = noise.generate(noise_kind, update.seed, unit.index, offset, chunk.numel(), device=chunk.device)
    low_precision = chunk.dtype in _LOW_PRECISION
    work = chunk.float() if low_precision else chunk
    decayed = max(0, min(chunk.numel(), unit.n_decay - offset))
    if weight_decay and decayed:
        work[:decayed].mul_(1.0 - update.lr * weight_decay)
    work.add_(z.to(work.dtype), alpha=-update.lr * update.projected_grad)
    if low_precision:
        uniform = noise.generate("uniform", update.seed, unit.index, offset, chunk.numel(),
                                 stream=noise.ROUNDING_STREAM, device=chunk.device)
        chunk.copy_(stochastic_round(work, chunk.dtype, uniform))


def apply_updates(buffer: torch.Tensor, unit: Unit, updates: Sequence[Update], *, noise_kind: str,
                  weight_decay: float, offset: int = 0) -> None:
    """Apply ``updates`` in order, in place, to ``buffer``: elements [offset, offset + numel) of a
    tensor laid out like ``unit.master``."""
    for start, length in noise.chunks(offset, buffer.numel(), noise.chunk_size(buffer.device)):
        for update in updates:
            _update_chunk(buffer[start - offset:start - offset + length], start, unit, update, noise_kind,
                          weight_decay)


def update_and_perturb(buffer: torch.Tensor, unit: Unit, updates: Sequence[Update], seed: int, eps: float, *,
                       noise_kind: str, weight_decay: float, signs: Sequence[int] = (1, -1),
                       offset: int = 0, out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Apply pending ``updates`` to ``buffer`` in place, then return ``buffer + sign*eps*z`` per sign.

    ``buffer`` holds elements [offset, offset + numel) of a tensor laid out like ``unit.master`` (one
    parameter's slice, for module-scoped perturbation); z and the decay mask follow the absolute
    element index, so a slice gets exactly the bits it would get as part of the whole unit.
    One pass over the buffer: each chunk is updated and perturbed while it is hot in cache.
    ``out`` (one tensor per sign, shaped like ``buffer``) receives the copies instead of new tensors.
    """
    perturbed = list(out) if out is not None else [torch.empty_like(buffer) for _ in signs]
    for start, length in noise.chunks(offset, buffer.numel(), noise.chunk_size(buffer.device)):
        local = slice(start - offset, start - offset + length)
        chunk = buffer[local]
        for update in updates:
            _update_chunk(chunk, start, unit, update, noise_kind, weight_decay)
        z = noise.generate(noise_kind, seed, unit.index, start, length, device=buffer.device)
        base = chunk.float() if chunk.dtype in _LOW_PRECISION else chunk
        z = z.to(base.dtype)
        for out, sign in zip(perturbed, signs):
            out[local] = torch.add(base, z, alpha=sign * eps)
    return perturbed
