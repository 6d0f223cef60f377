// The fused CPU kernel behind zo2/kernels/cpu_fused.py: counters -> Philox-4x32-10 -> Box-Muller |
// signs | uniforms -> pending updates (decay, stochastic rounding) -> theta +- eps*z, one cache-sized
// block at a time, z never leaving a block. Every step mirrors zo2/noise.py and
// zo2/kernels/torch_path.py operation for operation (built with -ffp-contract=off, so a product is
// fused into an addition only in muladd, and there only if ZO2_FUSED_MULADD: where torch's
// add(..., alpha=) fuses on this CPU), hence bit-identical results. Values depend on the absolute
// element index only, never on the block or thread that computes them.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <thread>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#ifndef ZO2_FUSED_MULADD
#define ZO2_FUSED_MULADD 1
#endif

namespace {

constexpr int64_t BLOCK = 1024;  // elements per block: a multiple of 128 (one Rademacher counter)
enum Kind { GAUSSIAN = 0, RADEMACHER = 1, UNIFORM = 2 };
enum Dtype { F32 = 0, BF16 = 1, F16 = 2 };
constexpr uint32_t ROUNDING_STREAM = 1;

#define INLINE __attribute__((always_inline)) inline

inline uint32_t bits_of(float x) { return __builtin_bit_cast(uint32_t, x); }
inline float float_of(uint32_t b) { return __builtin_bit_cast(float, b); }

INLINE float muladd(float a, float b, float c) {  // a * b + c, as torch's add(c, a, alpha=b)
#if ZO2_FUSED_MULADD
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// Philox-4x32-10 words of counters first + [0, n): key = seed, counter = (c low, unit, stream, c high).
void philox(uint64_t seed, uint32_t unit, uint32_t stream, uint64_t first, int n,
            uint32_t* __restrict w0, uint32_t* __restrict w1, uint32_t* __restrict w2, uint32_t* __restrict w3) {
  uint32_t k0[10], k1[10];
  for (int r = 0; r < 10; ++r) {
    k0[r] = static_cast<uint32_t>(seed) + 0x9E3779B9u * static_cast<uint32_t>(r);
    k1[r] = static_cast<uint32_t>(seed >> 32) + 0xBB67AE85u * static_cast<uint32_t>(r);
  }
  int i = 0;
#ifdef __AVX2__
  // 16 counters at a time, as two independent groups of 8 lanes (the rounds are a latency chain):
  // high words from the 64-bit products of even and odd lanes (vpmuludq), low words by vpmulld
  const __m256i wide_a = _mm256_set1_epi64x(0xD2511F53u), wide_b = _mm256_set1_epi64x(0xCD9E8D57u);
  const __m256i low_a = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i low_b = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  // first % 16 == 0: the 16 low words c + lane do not wrap, so they share the high word
  for (; first % 16 == 0 && i + 16 <= n; i += 16) {
    uint64_t c = first + static_cast<uint64_t>(i);
    __m256i x0[2], x1[2], x2[2], x3[2];
    for (int g = 0; g < 2; ++g) {
      x0[g] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(c) + 8 * g)), lanes);
      x1[g] = _mm256_set1_epi32(static_cast<int>(unit));
      x2[g] = _mm256_set1_epi32(static_cast<int>(stream));
      x3[g] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(c >> 32)));
    }
    for (int r = 0; r < 10; ++r) {
      const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0[r])), key1 = _mm256_set1_epi32(static_cast<int>(k1[r]));
      for (int g = 0; g < 2; ++g) {
        __m256i even_b = _mm256_mul_epu32(x2[g], wide_b), odd_b = _mm256_mul_epu32(_mm256_srli_epi64(x2[g], 32), wide_b);
        __m256i even_a = _mm256_mul_epu32(x0[g], wide_a), odd_a = _mm256_mul_epu32(_mm256_srli_epi64(x0[g], 32), wide_a);
        __m256i hi_b = _mm256_blend_epi32(_mm256_srli_epi64(even_b, 32), odd_b, 0xAA);
        __m256i hi_a = _mm256_blend_epi32(_mm256_srli_epi64(even_a, 32), odd_a, 0xAA);
        __m256i lo_b = _mm256_mullo_epi32(x2[g], low_b), lo_a = _mm256_mullo_epi32(x0[g], low_a);
        x0[g] = _mm256_xor_si256(_mm256_xor_si256(hi_b, x1[g]), key0);
        x2[g] = _mm256_xor_si256(_mm256_xor_si256(hi_a, x3[g]), key1);
        x1[g] = lo_b;
        x3[g] = lo_a;
      }
    }
    for (int g = 0; g < 2; ++g) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w0 + i + 8 * g), x0[g]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w1 + i + 8 * g), x1[g]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w2 + i + 8 * g), x2[g]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w3 + i + 8 * g), x3[g]);
    }
  }
#endif
  for (; i < n; ++i) {
    uint64_t c = first + static_cast<uint64_t>(i);
    uint32_t x0 = static_cast<uint32_t>(c), x1 = unit, x2 = stream, x3 = static_cast<uint32_t>(c >> 32);
    for (int r = 0; r < 10; ++r) {
      uint64_t pb = static_cast<uint64_t>(x2) * 0xCD9E8D57u;
      uint64_t pa = static_cast<uint64_t>(x0) * 0xD2511F53u;
      x0 = static_cast<uint32_t>(pb >> 32) ^ x1 ^ k0[r];
      x2 = static_cast<uint32_t>(pa >> 32) ^ x3 ^ k1[r];
      x1 = static_cast<uint32_t>(pb);
      x3 = static_cast<uint32_t>(pa);
    }
    w0[i] = x0; w1[i] = x1; w2[i] = x2; w3[i] = x3;
  }
}

// A word read as int32 x, folded to x if x >= 0 else -x - 1, scaled into [0, 1) (noise._to_unit_float).
INLINE float unit_float(uint32_t w) {
  int32_t x = static_cast<int32_t>(w);
  return static_cast<float>(x < 0 ? ~x : x) * 4.6566127342e-10f;
}

// log(u) for u in [1e-7, 1): noise._log, the same float32 operations in the same order.
INLINE float log_unit(float u) {
  int32_t shifted = static_cast<int32_t>(bits_of(u)) - 0x3F3504F3;
  float k = static_cast<float>(shifted >> 23);
  float f = float_of(static_cast<uint32_t>((shifted & 0x007FFFFF) + 0x3F3504F3)) - 1.0f;
  float s = f / (f + 2.0f);
  float z = s * s;
  float r = z * (0x1.555556p-1f + z * (0x1.99999ap-2f + z * (0x1.24924ap-2f + z * 0x1.c71c72p-3f)));
  float hfsq = f * f * 0.5f;
  return k * 0x1.63p-1f + (f - (hfsq - (s * (hfsq + r) + k * -0x1.bd0106p-13f)));
}

// (cos 2 pi u, sin 2 pi u) for u in [0, 1): noise._cos_sin_2pi, operation for operation.
struct CosSin { float cos, sin; };
INLINE CosSin cos_sin_2pi(float u) {
  float q = (u * 4.0f + 12582912.0f) - 12582912.0f;  // round to nearest even
  float r = u - q * 0.25f;                            // exact, |r| <= 1/8
  float x2 = r * r;
  float s = r * (0x1.921fb6p+2f + x2 * (-0x1.4abbcep+5f + x2 * (0x1.466bc6p+6f + x2 * (-0x1.32d2ccp+6f
                 + x2 * 0x1.507834p+5f))));
  float c = 1.0f + x2 * (-0x1.3bd3ccp+4f + x2 * (0x1.03c1f0p+6f + x2 * (-0x1.55d3c8p+6f + x2 * (0x1.e1f506p+5f
                 + x2 * -0x1.a6d1f2p+4f))));
  // rotate by q quarter turns: swap for odd q, then negate cos for q = 1, 2 and sin for q = 2, 3
  uint32_t quadrant = static_cast<uint32_t>(static_cast<int32_t>(q));
  uint32_t swap = 0u - (quadrant & 1u);
  uint32_t cos_bits = (bits_of(s) & swap) | (bits_of(c) & ~swap), sin_bits = (bits_of(c) & swap) | (bits_of(s) & ~swap);
  return {float_of(cos_bits ^ (((quadrant + 1u) & 2u) << 30)), float_of(sin_bits ^ ((quadrant & 2u) << 30))};
}

// The pair transform of zo2.updates.noise._gaussian_chunk: radius sqrt(-2 log u1), angle 2 pi u2.
void box_muller(const uint32_t* __restrict w1, const uint32_t* __restrict w2, float* __restrict n1,
                float* __restrict n2, int n) {
  for (int i = 0; i < n; ++i) {
    float u1 = unit_float(w1[i]);
    float radius = std::sqrt(-2.0f * log_unit(u1 < 1.0e-7f ? 1.0e-7f : u1));  // never NaN: as clamp_min
    CosSin angle = cos_sin_2pi(unit_float(w2[i]));
    n1[i] = radius * angle.cos;
    n2[i] = radius * angle.sin;
  }
}

// Values of kind for the BLOCK elements from `start` (a multiple of BLOCK) of `unit`.
void noise_block(int kind, uint64_t seed, uint32_t unit, uint32_t stream, int64_t start, float* out) {
  alignas(64) uint32_t w[4][BLOCK / 4];
  if (kind == RADEMACHER) {
    constexpr int n = BLOCK / 128;
    philox(seed, unit, stream, static_cast<uint64_t>(start / 128), n, w[0], w[1], w[2], w[3]);
    for (int word = 0; word < BLOCK / 32; ++word) {
      uint32_t bits = w[word % 4][word / 4];  // counter word / 4, output word % 4
      for (int b = 0; b < 32; ++b) out[word * 32 + b] = 1.0f - 2.0f * static_cast<float>((bits >> b) & 1u);
    }
    return;
  }
  constexpr int n = BLOCK / 4;
  philox(seed, unit, stream, static_cast<uint64_t>(start / 4), n, w[0], w[1], w[2], w[3]);
  if (kind == UNIFORM) {
    for (int i = 0; i < n; ++i)
      for (int k = 0; k < 4; ++k) out[4 * i + k] = unit_float(w[k][i]);
    return;
  }
  alignas(64) float v[4][BLOCK / 4];
  box_muller(w[0], w[1], v[0], v[1], n);
  box_muller(w[2], w[3], v[2], v[3], n);
  for (int i = 0; i < n; ++i)
    for (int k = 0; k < 4; ++k) out[4 * i + k] = v[k][i];
}

// ---- 16-bit floats by their bits, exactly as torch converts them (round to nearest even).
template <int DTYPE> INLINE float widen(uint32_t h) {
  if (DTYPE == BF16) return float_of(h << 16);
  uint32_t sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
  float subnormal = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // mantissa * 2^-24, exact
  uint32_t normal = exponent == 31 ? 0x7F800000u | (mantissa << 13) : ((exponent + 112) << 23) | (mantissa << 13);
  return float_of((exponent == 0 ? bits_of(subnormal) : normal) | sign);
}

template <int DTYPE> INLINE uint32_t narrow(float x) {
  uint32_t b = bits_of(x);
  if (DTYPE == BF16) return x != x ? 0x7FC0u : (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  uint32_t sign = (b >> 16) & 0x8000u, a = b & 0x7FFFFFFFu;
  uint32_t normal = (a - 0x38000000u + 0xFFFu + ((a >> 13) & 1u)) >> 13;  // rebias, round to nearest even
  normal = normal > 0x7C00u ? 0x7C00u : normal;                           // overflow: infinity
  uint32_t subnormal = bits_of(float_of(a) + 0.5f) - 0x3F000000u;           // the 2^-24 grid, rounded by the FPU
  return (a > 0x7F800000u ? 0x7E00u : a >= 0x38800000u ? normal : subnormal) | sign;
}

// torch_path.stochastic_round of one value: nearest, or its neighbour toward x with probability
// |x - nearest| / gap (as the Triton kernel, on the bit pattern).
template <int DTYPE> INLINE float stochastic_round(float x, float u) {
  uint32_t near_bits = narrow<DTYPE>(x);
  float nearest = widen<DTYPE>(near_bits);
  float error = x - nearest;
  // nextafter(nearest, +inf if up else -inf) on the sign-magnitude pattern; the zeros step across the sign
  uint32_t up = error >= 0.0f ? 1u : 0u, negative = near_bits >> 15;
  uint32_t step = (near_bits + ((negative ^ up) ? 1u : 0xFFFFu)) & 0xFFFFu;  // the magnitude +-1
  step = (up == 1u && near_bits == 0x8000u) ? 1u : step;                     // -0 up: the smallest positive
  step = (up == 0u && near_bits == 0u) ? 0x8001u : step;                     // +0 down: the smallest negative
  float neighbour = widen<DTYPE>(step);
  return u * std::fabs(neighbour - nearest) < std::fabs(error) ? neighbour : nearest;
}

template <int DTYPE> INLINE float load(float x) { return x; }
template <int DTYPE> INLINE float load(uint16_t h) { return widen<DTYPE>(h); }

template <int DTYPE> using Word = std::conditional_t<DTYPE == F32, float, uint16_t>;

template <int DTYPE> INLINE Word<DTYPE> encode(float x) {
  if constexpr (DTYPE == F32) return x;
  else return static_cast<uint16_t>(narrow<DTYPE>(x));
}

// count values staged in L1 to dst[index...]: streaming (non-temporal) stores for the 32-byte aligned
// middle, so that writing a perturbed copy does not first read it into the cache (the forward reads
// it much later); plain copies for the unaligned ends
template <typename T> void write_out(void* dst, int64_t index, const T* src, int64_t count) {
  char* to = static_cast<char*>(dst) + index * static_cast<int64_t>(sizeof(T));
  const char* from = reinterpret_cast<const char*>(src);
  size_t bytes = static_cast<size_t>(count) * sizeof(T), done = 0;
#ifdef __AVX2__
  done = (32 - reinterpret_cast<uintptr_t>(to) % 32) % 32;
  done = done > bytes ? bytes : done;
  std::memcpy(to, from, done);
  for (; done + 32 <= bytes; done += 32)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(to + done),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(from + done)));
#endif
  std::memcpy(to + done, from + done, bytes - done);
}

struct Call {
  void* buffer; void* plus; void* minus; int dtype; int64_t n, base, n_decay; uint32_t unit; int kind;
  int n_updates; const uint64_t* seeds; const float* coefs; const float* decays; int decay; float eps;
};

// Blocks [first, last) of the absolute index space, block b covering [b * BLOCK, (b + 1) * BLOCK).
template <int DTYPE> void run_blocks(const Call& call, int64_t first, int64_t last) {
  alignas(64) float x[BLOCK], z[BLOCK], u[BLOCK];
  alignas(64) Word<DTYPE> staged[BLOCK];
  const bool perturb = call.plus || call.minus;
  for (int64_t b = first; b < last; ++b) {
    int64_t start = b * BLOCK;
    int64_t lo = start < call.base ? call.base - start : 0;  // the block's elements inside the buffer
    int64_t hi = start + BLOCK > call.base + call.n ? call.base + call.n - start : BLOCK;
    int64_t at = start - call.base;  // buffer index of the block's first element
    const Word<DTYPE>* in = static_cast<const Word<DTYPE>*>(call.buffer) + at;
    for (int64_t j = lo; j < hi; ++j) x[j] = load<DTYPE>(in[j]);
    int64_t decayed = call.n_decay - start < lo ? lo : (call.n_decay - start > hi ? hi : call.n_decay - start);
    for (int i = 0; i < call.n_updates; ++i) {
      noise_block(call.kind, call.seeds[i], call.unit, 0, start, z);
      const float decay = call.decays[i], coef = call.coefs[i];
      if (call.decay)
        for (int64_t j = lo; j < decayed; ++j) x[j] = x[j] * decay;
      for (int64_t j = lo; j < hi; ++j) x[j] = muladd(z[j], coef, x[j]);
      if (DTYPE != F32) {
        noise_block(UNIFORM, call.seeds[i], call.unit, ROUNDING_STREAM, start, u);
        for (int64_t j = lo; j < hi; ++j) x[j] = stochastic_round<DTYPE>(x[j], u[j]);
      }
    }
    if (call.n_updates) {
      Word<DTYPE>* out = static_cast<Word<DTYPE>*>(call.buffer) + at;  // in cache: plain stores
      for (int64_t j = lo; j < hi; ++j) out[j] = encode<DTYPE>(x[j]);
    }
    if (!perturb) continue;
    noise_block(call.kind, call.seeds[call.n_updates], call.unit, 0, start, z);
    const float eps = call.eps;
    if (call.plus) {
      for (int64_t j = lo; j < hi; ++j) staged[j] = encode<DTYPE>(muladd(z[j], eps, x[j]));
      write_out(call.plus, at + lo, staged + lo, hi - lo);
    }
    if (call.minus) {
      for (int64_t j = lo; j < hi; ++j) staged[j] = encode<DTYPE>(muladd(z[j], -eps, x[j]));
      write_out(call.minus, at + lo, staged + lo, hi - lo);
    }
  }
#ifdef __AVX2__
  _mm_sfence();  // streaming stores visible before the caller (or the joining thread) reads
#endif
}

void run(const Call& call, int64_t first, int64_t last) {
  if (call.dtype == BF16) run_blocks<BF16>(call, first, last);
  else if (call.dtype == F16) run_blocks<F16>(call, first, last);
  else run_blocks<F32>(call, first, last);
}

}  // namespace

extern "C" {

// Updates then perturbation of buffer (elements [base, base + n) of a unit), split over n_threads
// threads by whole blocks. seeds holds n_updates update seeds, then the perturbation's seed.
void zo2_update_perturb(void* buffer, void* plus, void* minus, int dtype, int64_t n, int64_t base, int64_t n_decay,
                        uint32_t unit, int kind, int n_updates, const uint64_t* seeds, const float* coefs,
                        const float* decays, int decay, float eps, int n_threads) {
  Call call{buffer, plus, minus, dtype, n, base, n_decay, unit, kind, n_updates, seeds, coefs, decays, decay, eps};
  int64_t first = base / BLOCK, last = (base + n + BLOCK - 1) / BLOCK, blocks = last - first;
  int64_t workers = n_threads < 1 ? 1 : (n_threads > blocks / 16 ? blocks / 16 : n_threads);  // >= 16 blocks each
  if (workers <= 1) { run(call, first, last); return; }
  std::vector<std::thread> threads;
  for (int64_t t = 1; t < workers; ++t)
    threads.emplace_back(run, std::cref(call), first + blocks * t / workers, first + blocks * (t + 1) / workers);
  run(call, first, first + blocks / workers);
  for (auto& thread : threads) thread.join();
}

// Noise of kind for elements [start, start + count) into out (to check the kernel against zo2.updates.noise).
void zo2_noise(float* out, int kind, uint64_t seed, uint32_t unit, uint32_t stream, int64_t start, int64_t count) {
  alignas(64) float block[BLOCK];
  for (int64_t b = start / BLOCK; b * BLOCK < start + count; ++b) {
    noise_block(kind, seed, unit, stream, b * BLOCK, block);
    for (int64_t j = 0; j < BLOCK; ++j) {
      int64_t i = b * BLOCK + j - start;
      if (i >= 0 && i < count) out[i] = block[j];
    }
  }
}

}  // extern "C"
