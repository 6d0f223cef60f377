"""Counter-based, stateless noise: z for element j of unit u at seed s is a pure function of (s, u, j).

The generator is Philox-4x32-10, laid out as Triton's ``tl.philox``/``tl.randn4x`` lay it out, so a
GPU kernel can regenerate exactly the integers produced here:

* key  = the 64-bit seed (low word, high word)
* counter = (j // 4 low word, unit, stream, j // 4 high word); element j takes output j % 4
* Gaussian: Box-Muller on output pairs (0, 1) and (2, 3), as ``tl.randn4x``
* Rademacher: one 32-bit word gives the signs of 32 elements (counter j // 128, word (j % 128) // 32,
  bit j % 32)

No global RNG is read or advanced, so the same z appears in resident and offloaded mode, in every
process and after a resume. Every float operation is elementwise, so a value never depends on how
a caller slices a range; ranges are produced in chunks aligned at absolute offsets to bound memory.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import torch

logger = logging.getLogger(__name__)

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUNDS = 10
_INT_TO_UNIT = 4.6566127342e-10  # Triton's scale: largest value with MAX_INT * scale < 1.0 in float32

#: Version of the values this module (and every kernel backend) generates for a (seed, unit, element):
#: recorded in every update history, which refuses to replay under another version.
GENERATOR_VERSION = 1

#: Streams of the counter's third word: independent noise for independent purposes.
PERTURBATION_STREAM = 0
ROUNDING_STREAM = 1

#: Elements per chunk on the CPU (cache-sized) and on GPUs (fewer kernel launches). Values never
#: depend on the chunking; it only bounds the memory of one generation.
CHUNK = 1 << 20
CUDA_CHUNK = 1 << 24
_COMPILE_MIN_COUNTERS = 1 << 14  # below this, compiled-call overhead outweighs the gain


def chunk_size(device: torch.device | str) -> int:
    """Elements per chunk of noise work on ``device``."""
    return CUDA_CHUNK if torch.device(device).type == "cuda" else CHUNK


def _philox_words(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor,
                  k0: torch.Tensor, k1: torch.Tensor) -> torch.Tensor:
    """Ten Philox-4x32 rounds on int64 tensors holding uint32 values; returns (n, 4) words."""
    for _ in range(_ROUNDS):
        prod_b = c2 * _ROUND_B  # < 2**64: wraps in int64, but its bit pattern is the exact product
        prod_a = c0 * _ROUND_A
        c0 = ((prod_b >> 32) & _M32) ^ c1 ^ k0
        c2 = ((prod_a >> 32) & _M32) ^ c3 ^ k1
        c1 = prod_b & _M32
        c3 = prod_a & _M32
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return torch.stack((c0, c1, c2, c3), dim=-1)


def _philox_folded(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor,
                   k0: torch.Tensor, k1: torch.Tensor) -> torch.Tensor:
    """Philox words read as int32 x, folded to x if x >= 0 else -x - 1, as float32 (exact)."""
    words = _philox_words(c0, c1, c2, c3, k0, k1)
    return (words ^ ((words >> 31) * _M32)).to(torch.float32)


_compiled: dict[Callable, Callable] = {}
_compile_failed = False


def _maybe_compiled(fn: Callable, n_counters: int, device: torch.device) -> Callable:
    """``fn`` compiled (one fused loop or kernel instead of ~400 ops) for large chunks, else ``fn``.

    The Philox rounds are integer math, so compiled and eager results are bitwise equal."""
    global _compile_failed
    if (n_counters < _COMPILE_MIN_COUNTERS or _compile_failed
            or os.environ.get("ZO2_COMPILE_NOISE", "1") == "0"):
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)  # one kernel for every length (chunk tails too)
    return _compiled[fn]


def philox(seed: int, counters: torch.Tensor, unit: int, stream: int, *, folded: bool = False) -> torch.Tensor:
    """Philox-4x32-10 output for 64-bit ``counters``: (n, 4) int64 words, or folded float32 values."""
    global _compile_failed
    device = counters.device
    key = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0 = torch.tensor(key & _M32, dtype=torch.int64, device=device)
    k1 = torch.tensor(key >> 32, dtype=torch.int64, device=device)
    args = (counters & _M32, torch.full_like(counters, int(unit) & _M32),
            torch.full_like(counters, int(stream) & _M32), counters >> 32, k0, k1)
    eager = _philox_folded if folded else _philox_words
    fn = _maybe_compiled(eager, len(counters), device)
    if fn is eager:
        return eager(*args)
    try:
        with torch.no_grad():  # one grad mode for every caller: a change would recompile
            return fn(*args)
    except Exception as err:  # e.g. no C++ toolchain: eager is exact too, only slower
        _compile_failed = True
        logger.warning("compiled noise generator unavailable (%s); using eager torch", err)
        return eager(*args)


def _to_unit_float(folded: torch.Tensor) -> torch.Tensor:
    """Folded words -> float32 in [0, 1), exactly as Triton's ``uint_to_uniform_float``."""
    return folded * _INT_TO_UNIT


def _gaussian_chunk(seed: int, unit: int, first_counter: int, n_counters: int, stream: int,
                    device: torch.device) -> torch.Tensor:
    counters = torch.arange(first_counter, first_counter + n_counters, dtype=torch.int64, device=device)
    u = _to_unit_float(philox(seed, counters, unit, stream, folded=True))
    radius = torch.sqrt(-2.0 * torch.log(torch.clamp_min(u[:, 0::2], 1.0e-7)))
    angle = 6.283185307179586 * u[:, 1::2]
    pairs = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=-1)  # (n, 2, 2)
    return pairs.reshape(-1)  # element order: n1, n2 from pair 0, n3, n4 from pair 1


def _rademacher_chunk(seed: int, unit: int, first_counter: int, n_counters: int, stream: int,
                      device: torch.device) -> torch.Tensor:
    counters = torch.arange(first_counter, first_counter + n_counters, dtype=torch.int64, device=device)
    words = philox(seed, counters, unit, stream)
    bits = (words.unsqueeze(-1) >> torch.arange(32, device=device)) & 1
    return (1 - 2 * bits).to(torch.float32).reshape(-1)


def _uniform_chunk(seed: int, unit: int, first_counter: int, n_counters: int, stream: int,
                   device: torch.device) -> torch.Tensor:
    counters = torch.arange(first_counter, first_counter + n_counters, dtype=torch.int64, device=device)
    return _to_unit_float(philox(seed, counters, unit, stream, folded=True)).reshape(-1)


_KINDS = {"gaussian": (_gaussian_chunk, 4), "rademacher": (_rademacher_chunk, 128),
          "uniform": (_uniform_chunk, 4)}


def compile_threshold(kind: str) -> int:
    """Elements from which one generation of ``kind`` runs the compiled generator."""
    return _COMPILE_MIN_COUNTERS * _KINDS[kind][1]


def chunks(start: int, count: int, size: int = CHUNK) -> list[tuple[int, int]]:
    """Split [start, start + count) at absolute multiples of ``size``: [(offset, length), ...]."""
    pieces = []
    pos, end = start, start + count
    while pos < end:
        stop = min(end, (pos // size + 1) * size)
        pieces.append((pos, stop - pos))
        pos = stop
    return pieces


def generate(kind: str, seed: int, unit: int, start: int, count: int, *,
             stream: int = PERTURBATION_STREAM, device: torch.device | str = "cpu") -> torch.Tensor:
    """Noise of ``kind`` ("gaussian", "rademacher" or "uniform") for elements [start, start + count).

    Returns a float32 tensor on ``device``. Deterministic in (kind, seed, unit, stream, element);
    independent of how a caller splits a range. Callers that need long ranges should iterate over
    :func:`chunks` to bound memory; this function accepts any range.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; expected one of {sorted(_KINDS)}")
    if count < 0 or start < 0:
        raise ValueError(f"noise range must be non-negative, got start={start}, count={count}")
    make_chunk, per_counter = _KINDS[kind]
    device = torch.device(device)
    parts = []
    for offset, length in chunks(start, count, chunk_size(device)):
        first_counter = offset // per_counter
        n_counters = -(-(offset + length) // per_counter) - first_counter
        values = make_chunk(seed, unit, first_counter, n_counters, stream, device)
        skip = offset - first_counter * per_counter
        parts.append(values[skip: skip + length])
    if not parts:
        return torch.empty(0, dtype=torch.float32, device=device)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def step_seed(base_seed: int, step: int) -> int:
    """The seed of training step ``step``: a 63-bit SplitMix64 hash of (base_seed, step)."""
    x = (int(base_seed) * 0x9E3779B97F4A7C15 + int(step) + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF
