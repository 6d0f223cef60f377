"""Counter-based, stateless noise: z for element j of unit u at seed s is a pure function of (s, u, j).

The generator is Philox-4x32-10, laid out as Triton's ``tl.philox``/``tl.randn4x`` lay it out, so a
GPU kernel can regenerate exactly the integers produced here:

* key  = the 64-bit seed (low word, high word)
* counter = (j // 4 low word, unit, stream, j // 4 high word); element j takes output j % 4
* Gaussian: Box-Muller on output pairs (0, 1) and (2, 3), as ``tl.randn4x``, with zo2's own float32
  log and (cos, sin)(2 pi u) made of basic IEEE operations (no libm, no Sleef), so every CPU and the
  fused CPU kernel (:mod:`zo2.kernels.cpu_fused`) produce the same bits (generator version 2)
* Rademacher: one 32-bit word gives the signs of 32 elements (counter j // 128, word (j % 128) // 32,
  bit j % 32)

No global RNG is read or advanced, so the same z appears in resident and offloaded mode, in every
process and after a resume. Every float operation is elementwise, so a value never depends on how
a caller slices a range; ranges are produced in chunks aligned at absolute offsets to bound memory.
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUNDS = 10
_INT_TO_UNIT = 4.6566127342e-10  # Triton's scale: largest value with MAX_INT * scale < 1.0 in float32

#: Streams of the counter's third word: independent noise for independent purposes.
PERTURBATION_STREAM = 0
ROUNDING_STREAM = 1

#: Elements per chunk on the CPU (cache-sized) and on GPUs (fewer kernel launches). Values never
#: depend on the chunking; it only bounds the memory of one generation.
CHUNK = 1 << 20
CUDA_CHUNK = 1 << 24

#: What produced the bits of z. 1: Box-Muller through torch's log/cos/sin (zo2 <= 0.1 before the
#: fused CPU kernel); 2: zo2's own log and cos/sin in basic float32 operations. Rademacher signs and
#: the rounding uniforms are the same in both. Checkpoints and seed logs record it.
GENERATOR_VERSION = 2


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


def philox(seed: int, counters: torch.Tensor, unit: int, stream: int, *, folded: bool = False) -> torch.Tensor:
    """Philox-4x32-10 output for 64-bit ``counters``: (n, 4) int64 words, or folded float32 values."""
    device = counters.device
    key = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0 = torch.tensor(key & _M32, dtype=torch.int64, device=device)
    k1 = torch.tensor(key >> 32, dtype=torch.int64, device=device)
    args = (counters & _M32, torch.full_like(counters, int(unit) & _M32),
            torch.full_like(counters, int(stream) & _M32), counters >> 32, k0, k1)
    return _philox_folded(*args) if folded else _philox_words(*args)


def _to_unit_float(folded: torch.Tensor) -> torch.Tensor:
    """Folded words -> float32 in [0, 1), exactly as Triton's ``uint_to_uniform_float``."""
    return folded * _INT_TO_UNIT


def _hex(*values: str) -> tuple[float, ...]:
    return tuple(float.fromhex(v) for v in values)


# float32 constants (exact as written): atanh series 2/3, 2/5, 2/7, 2/9; ln 2 in two parts; the Taylor
# coefficients (2 pi)^k / k! of sin and cos. Written identically in zo2/kernels/cpu_kernel.cpp.
_LOG_SERIES = _hex("0x1.555556p-1", "0x1.99999ap-2", "0x1.24924ap-2", "0x1.c71c72p-3")
_LN2_HI, _LN2_LO = _hex("0x1.63p-1", "-0x1.bd0106p-13")
_SIN_2PI = _hex("0x1.921fb6p+2", "-0x1.4abbcep+5", "0x1.466bc6p+6", "-0x1.32d2ccp+6", "0x1.507834p+5")
_COS_2PI = _hex("-0x1.3bd3ccp+4", "0x1.03c1f0p+6", "-0x1.55d3c8p+6", "0x1.e1f506p+5", "-0x1.a6d1f2p+4")
_PIVOT = 0x3F3504F3  # the bits of sqrt(1/2): mantissas are reduced to [sqrt(1/2), sqrt(2))


def _horner(x: torch.Tensor, coefficients: tuple[float, ...]) -> torch.Tensor:
    """c0 + x * (c1 + x * (...)): one rounded multiply and one rounded add per step, never fused."""
    result = torch.full_like(x, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        result = result * x + c
    return result


def _log(u: torch.Tensor) -> torch.Tensor:
    """log of float32 ``u`` in [1e-7, 1) in basic float32 operations only (no libm), to ~1 ulp.

    u = 2^k m with m in [sqrt(1/2), sqrt(2)), f = m - 1, s = f / (2 + f):
    log(1 + f) = 2 atanh(s) = f - (f^2/2 - s (f^2/2 + R(s^2))), R(z) = 2z/3 + 2z^2/5 + ... (4 terms)."""
    shifted = u.view(torch.int32) - _PIVOT
    k = (shifted >> 23).to(torch.float32)
    f = ((shifted & 0x007FFFFF) + _PIVOT).view(torch.float32) - 1.0
    s = f / (f + 2.0)
    z = s * s
    r = z * _horner(z, _LOG_SERIES)
    hfsq = f * f * 0.5
    return k * _LN2_HI + (f - (hfsq - (s * (hfsq + r) + k * _LN2_LO)))


def _cos_sin_2pi(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos 2 pi u, sin 2 pi u) for float32 ``u`` in [0, 1), basic float32 operations only, to ~1 ulp:
    u = q/4 + r with q the nearest integer to 4u (exact, |r| <= 1/8), Taylor polynomials of degree 9
    and 10 in r, rotated by the quadrant q."""
    q = (u * 4.0 + 12582912.0) - 12582912.0  # 1.5 * 2^23: rounds 4u to the nearest (even) integer
    r = u - q * 0.25
    x2 = r * r
    sin = r * _horner(x2, _SIN_2PI)
    cos = x2 * _horner(x2, _COS_2PI) + 1.0
    quadrant = q.to(torch.int32) & 3
    rotated_cos = torch.where(quadrant == 0, cos, torch.where(quadrant == 1, -sin, torch.where(quadrant == 2, -cos, sin)))
    rotated_sin = torch.where(quadrant == 0, sin, torch.where(quadrant == 1, cos, torch.where(quadrant == 2, -sin, -cos)))
    return rotated_cos, rotated_sin


def _gaussian_chunk(seed: int, unit: int, first_counter: int, n_counters: int, stream: int,
                    device: torch.device) -> torch.Tensor:
    """Box-Muller on output pairs (0, 1) and (2, 3): radius sqrt(-2 log u1), angle 2 pi u2."""
    counters = torch.arange(first_counter, first_counter + n_counters, dtype=torch.int64, device=device)
    u = _to_unit_float(philox(seed, counters, unit, stream, folded=True))
    radius_squared = _log(torch.clamp_min(u[:, 0::2].contiguous(), 1.0e-7)) * -2.0
    # torch's float32 sqrt need not round correctly (on CPU it may be MKL's, within 1 ulp); the float64
    # root rounded to float32 is the correctly rounded float32 root, as the kernels' sqrt gives
    radius = torch.sqrt(radius_squared.double()).float()
    cos, sin = _cos_sin_2pi(u[:, 1::2].contiguous())
    pairs = torch.stack((radius * cos, radius * sin), dim=-1)  # (n, 2, 2)
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
