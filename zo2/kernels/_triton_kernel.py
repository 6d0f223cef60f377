"""Triton kernels behind :mod:`zo2.kernels.triton_path` (imported lazily: this module imports triton).

The noise is :mod:`zo2.updates.noise`'s Philox-4x32-10 with the same counter layout, generated in
registers: key = the 64-bit seed, counter = (c low word, unit, stream, c high word), where c is
j // 4 for Gaussian and uniform values (element j takes output j % 4) and j // 128 for Rademacher
signs (bit j % 32 of output (j % 128) // 32). Every arithmetic step mirrors the torch reference in
:mod:`zo2.kernels.torch_path` (``tl.fma`` where torch's ``add(..., alpha=)`` fuses), so Rademacher and uniform
values are bit-identical and Gaussian values differ only by the log/cos/sin implementations.
"""
from __future__ import annotations

import triton
import triton.language as tl

#: Noise kinds as kernel constants, and the stream of the stochastic-rounding draws.
KINDS = {"gaussian": 0, "rademacher": 1, "uniform": 2}
GAUSSIAN: tl.constexpr = tl.constexpr(0)
RADEMACHER: tl.constexpr = tl.constexpr(1)
ROUNDING_STREAM: tl.constexpr = tl.constexpr(1)  # zo2.updates.noise.ROUNDING_STREAM


@triton.jit
def _philox(seed, first_counter, unit, STREAM: tl.constexpr, N: tl.constexpr):
    """Four uint32 blocks of shape [N]: Philox-4x32-10 words for counters first_counter + [0, N).

    The rounds of ``tl.philox``, written out: triton's own jit helpers cannot run under the
    interpreter once triton was imported without it (torch imports triton early)."""
    counter = first_counter + tl.arange(0, N).to(tl.int64)
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c3 = (counter >> 32).to(tl.uint32)
    c1 = tl.full(c0.shape, 0, tl.uint32) + unit.to(tl.uint32)
    c2 = tl.full(c0.shape, STREAM, tl.uint32)
    key = seed.to(tl.int64).to(tl.uint64, bitcast=True)
    k0 = (key & 0xFFFFFFFF).to(tl.uint32)
    k1 = (key >> 32).to(tl.uint32)
    for _ in tl.static_range(10):
        prev_c0, prev_c2 = c0, c2
        c0 = tl.umulhi(prev_c2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(prev_c0, 0xD2511F53) ^ c3 ^ k1
        c1 = prev_c2 * 0xCD9E8D57
        c3 = prev_c0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _to_unit_float(words):
    """uint32 words -> float32 in [0, 1), as ``tl.uint_to_uniform_float`` and zo2.updates.noise."""
    x = words.to(tl.int32, bitcast=True)
    return tl.where(x < 0, ~x, x).to(tl.float32) * 4.6566127342e-10


@triton.jit
def _interleave4(a, b, c, d, N: tl.constexpr):
    """[N] blocks a, b, c, d -> [4N] block a0 b0 c0 d0 a1 b1 ..."""
    return tl.reshape(tl.join(tl.join(a, c), tl.join(b, d)), [4 * N])


@triton.jit
def _uniform(seed, start, unit, STREAM: tl.constexpr, BLOCK: tl.constexpr):
    """U[0, 1) for elements [start, start + BLOCK), start a multiple of 4."""
    w0, w1, w2, w3 = _philox(seed, start // 4, unit, STREAM, BLOCK // 4)
    return _interleave4(_to_unit_float(w0), _to_unit_float(w1),
                        _to_unit_float(w2), _to_unit_float(w3), BLOCK // 4)


@triton.jit
def _box_muller(u1, u2):
    """The pair transform of zo2.updates.noise._gaussian_chunk (and of tl.randn4x)."""
    radius = tl.sqrt_rn(-2.0 * tl.log(tl.maximum(u1, 1.0e-7)))  # IEEE sqrt as torch; tl.sqrt is approximate on GPUs
    angle = 6.283185307179586 * u2
    return radius * tl.cos(angle), radius * tl.sin(angle)


@triton.jit
def _noise(seed, start, unit, KIND: tl.constexpr, STREAM: tl.constexpr, BLOCK: tl.constexpr):
    """Values of KIND for elements [start, start + BLOCK) of ``unit``; start a multiple of BLOCK (of 128)."""
    if KIND == GAUSSIAN:
        w0, w1, w2, w3 = _philox(seed, start // 4, unit, STREAM, BLOCK // 4)
        n1, n2 = _box_muller(_to_unit_float(w0), _to_unit_float(w1))
        n3, n4 = _box_muller(_to_unit_float(w2), _to_unit_float(w3))
        z = _interleave4(n1, n2, n3, n4, BLOCK // 4)
    elif KIND == RADEMACHER:
        w0, w1, w2, w3 = _philox(seed, start // 128, unit, STREAM, BLOCK // 128)
        words = tl.reshape(_interleave4(w0, w1, w2, w3, BLOCK // 128), [BLOCK // 32])
        bits = (words[:, None] >> tl.arange(0, 32).to(tl.uint32)[None, :]) & 1
        z = tl.reshape(1.0 - 2.0 * bits.to(tl.float32), [BLOCK])
    else:
        z = _uniform(seed, start, unit, STREAM, BLOCK)
    return z


@triton.jit
def _to_float32(x):
    """Exact widening; bf16 by its bits (the interpreter's own bf16 conversions truncate)."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def _round_nearest(x, DTYPE: tl.constexpr):
    """float32 -> DTYPE, round to nearest even; bf16 by its bits, exactly as torch (and the GPU) do."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + ((bits >> 16) & 1) + 0x7FFF) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN stays a (quiet) NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def _stochastic_round(x, u, DTYPE: tl.constexpr):
    """zo2.kernels.torch_path.stochastic_round in registers: x (float32) to DTYPE (16-bit), up or down at random."""
    nearest = _round_nearest(x, DTYPE)
    error = x - _to_float32(nearest)
    bits = nearest.to(tl.int16, bitcast=True).to(tl.int32)  # sign-magnitude, sign-extended
    up = error >= 0
    # nextafter(nearest, +inf if up else -inf) on the bit pattern; the zeros step across the sign
    grows = (bits >= 0) == up  # away from zero: one more ulp of magnitude
    step = tl.where(grows, bits + 1, bits - 1)
    step = tl.where(up & (bits == -32768), 1, step)  # -0 up -> smallest positive
    step = tl.where(~up & (bits == 0), -32767, step)  # +0 down -> smallest negative
    neighbour = step.to(tl.int16).to(DTYPE, bitcast=True)
    gap = _to_float32(neighbour) - _to_float32(nearest)
    return tl.where(u * tl.abs(gap) < tl.abs(error), neighbour, nearest)


@triton.jit(do_not_specialize=["n_updates", "unit", "base"])
def update_perturb_kernel(buf_ptr, plus_ptr, minus_ptr, seeds_ptr, coefs_ptr, decays_ptr, n_updates, n, base,
                          n_decay, unit, eps, KIND: tl.constexpr, UPDATE: tl.constexpr, ROUND: tl.constexpr,
                          PLUS: tl.constexpr, MINUS: tl.constexpr, BLOCK: tl.constexpr):
    """Apply ``n_updates`` updates to ``buf`` in place, then write buf + eps*z and/or buf - eps*z.

    ``buf`` holds the unit's elements [base, base + n); program p covers the absolute elements
    [first + p * BLOCK, first + (p + 1) * BLOCK), first = base rounded down to a multiple of BLOCK,
    so z and the decay mask depend on the absolute index only.
    Update i: x <- x * decays[i] on [0, n_decay), then x <- x + coefs[i] * z(seeds[i]), rounded
    stochastically (uniform of seeds[i] on the rounding stream) when ROUND; the perturbation uses
    z(seeds[n_updates]). z never leaves registers; the buffer is read once and written at most once.
    """
    start = (base - base % BLOCK) + tl.program_id(0).to(tl.int64) * BLOCK
    absolute = start + tl.arange(0, BLOCK)
    offsets = absolute - base
    inside = (offsets >= 0) & (offsets < n)
    x = _to_float32(tl.load(buf_ptr + offsets, mask=inside, other=0.0))
    if UPDATE:
        decayed = absolute < n_decay
        for i in range(n_updates):
            seed = tl.load(seeds_ptr + i)
            x = tl.where(decayed, x * tl.load(decays_ptr + i), x)
            x = tl.fma(_noise(seed, start, unit, KIND, 0, BLOCK), tl.load(coefs_ptr + i), x)
            if ROUND:
                rounded = _stochastic_round(x, _uniform(seed, start, unit, ROUNDING_STREAM, BLOCK),
                                            buf_ptr.dtype.element_ty)
                x = _to_float32(rounded)
        tl.store(buf_ptr + offsets, _round_nearest(x, buf_ptr.dtype.element_ty), mask=inside)
    if PLUS or MINUS:
        z = _noise(tl.load(seeds_ptr + n_updates), start, unit, KIND, 0, BLOCK)
        if PLUS:
            tl.store(plus_ptr + offsets, _round_nearest(tl.fma(z, eps, x), plus_ptr.dtype.element_ty), mask=inside)
        if MINUS:
            tl.store(minus_ptr + offsets, _round_nearest(tl.fma(z, -eps, x), minus_ptr.dtype.element_ty),
                     mask=inside)


@triton.jit(do_not_specialize=["seed", "unit"])
def noise_kernel(out_ptr, seed, n, start, unit, KIND: tl.constexpr, STREAM: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = the value of element start + i (start a multiple of BLOCK), as zo2.updates.noise.generate."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    values = _noise(seed, start + tl.program_id(0).to(tl.int64) * BLOCK, unit, KIND, STREAM, BLOCK)
    tl.store(out_ptr + offsets, values, mask=offsets < n)
