// 16-lane float vectors in the compiler's vector extension (GCC, Clang): lowered to whatever the
// target has (one AVX-512 register, two AVX2 ones, four SSE ones). Two intrinsics where a build
// has the instructions: store_t rounds to bf16 with AVX512-BF16's, reciprocal refines AVX-512's
// estimate instead of dividing.
// For the element-wise loops whose auto-vectorisation is poor or impossible (float max
// reductions, bf16 rounding by bits, exp) in the CPU kernels. Include it after a kernel's
// `#pragma GCC target` so that its functions are compiled alike.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include <c10/util/BFloat16.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "liftplus_fast/cpu_capability.h"

namespace liftplus_fast {
inline namespace LPF_CPU_NS {
namespace vec {

constexpr int kLanes = 16;
using vfloat = float __attribute__((vector_size(4 * kLanes)));
using vint = int32_t __attribute__((vector_size(4 * kLanes)));
using vuint = uint32_t __attribute__((vector_size(4 * kLanes)));
using vhalf = uint16_t __attribute__((vector_size(2 * kLanes)));

constexpr float kLog2e = 1.4426950408889634f;

inline vfloat splat(float x) {
  return vfloat{} + x;
}
inline vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, vfloat v) {
  std::memcpy(p, &v, sizeof(v));
}
inline vint lane_index() {
  vint v;
  for (int l = 0; l < kLanes; ++l) v[l] = l;
  return v;
}
inline float sum(vfloat v) {
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// 16 values of T (float or bf16) from / to memory; bf16 by bits, rounded to nearest even with NaN
// kept a quiet NaN, as rows::float_to_bf16_bits rounds.
template <typename T>
inline vfloat load_t(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return load(p);
  } else {
    static_assert(std::is_same_v<T, c10::BFloat16>, "float or bf16");
    vhalf h;
    std::memcpy(&h, p, sizeof(h));
    return (vfloat)(__builtin_convertvector(h, vuint) << 16);
  }
}
template <typename T>
inline void store_t(T* p, vfloat v) {
  if constexpr (std::is_same_v<T, float>) {
    store(p, v);
  } else {
    static_assert(std::is_same_v<T, c10::BFloat16>, "float or bf16");
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    // One instruction for the ~6 of the rounding below (same rounding; it reads fp32 subnormals,
    // below 1.2e-38, as zero).
    const __m256bh h = _mm512_cvtneps_pbh((__m512)v);
#else
    const vuint u = (vuint)v;
    vuint r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    r = v != v ? vuint{} + 0x7fc0u : r;
    const vhalf h = __builtin_convertvector(r, vhalf);
#endif
    std::memcpy(p, &h, sizeof(h));
  }
}

// 1/x: on AVX-512, its 14-bit estimate refined by one Newton step (within 2 ulp; a division
// costs 5-16 cycles per 16 lanes there, the estimate and step 3 instructions); a division
// elsewhere. For x ≥ 1 (the sigmoid's denominators) and +inf (gives 0).
inline vfloat reciprocal(vfloat x) {
#if defined(__AVX512F__)
  const vfloat r = (vfloat)_mm512_rcp14_ps((__m512)x);
  const vfloat refined = r * (2.f - x * r);
  return r == 0.f ? r : refined;
#else
  return 1.f / x;
#endif
}

// 2^t: t = n + f with n = round(t), 2^f by Cephes' exp2f polynomial on [-0.5, 0.5] (≈ 2 ulp), n
// added to the exponent bits. t < −126 gives 0 (−inf too), t > 127 gives 2^127·2^f (finite, as
// rows::exp_fast saturates), NaN stays NaN. exp(x) = exp2(x·log2 e): callers fold the factor
// into the FMA that forms x.
inline vfloat exp2(vfloat t) {
  vfloat tc = t < -127.f ? splat(-127.f) : t;
  tc = tc > 127.f ? splat(127.f) : tc;
  const vfloat y = tc + 12582912.f;  // 1.5·2^23: n lands in y's low mantissa bits
  const vfloat f = tc - (y - 12582912.f);
  vfloat p = splat(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.f;
  const vfloat e = (vfloat)((vint)p + ((vint)y << 23));
  return t != t ? t : (t < -126.f ? splat(0.f) : e);
}

// In-register transpose of a 16 x 16 block of 32-bit lanes (vfloat or vuint rows): four rounds,
// each swapping one bit of the row index with the same bit of the column index between rows i
// and i + s (two-source shuffles: one vpermt2d each on AVX-512).
template <typename V>
inline void transpose16(V (&r)[kLanes]) {
#define LPF_SWAP_ROUND(s, ...)                                \
  for (int i = 0; i < kLanes; ++i) {                          \
    if (i & (s)) continue;                                    \
    const V a = r[i], b = r[i + (s)];                         \
    r[i] = __builtin_shufflevector(a, b, __VA_ARGS__);        \
    r[i + (s)] = __builtin_shufflevector(a, b, LPF_HIGH_##s); \
  }
#define LPF_HIGH_8 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define LPF_HIGH_4 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31
#define LPF_HIGH_2 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31
#define LPF_HIGH_1 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31
  LPF_SWAP_ROUND(8, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
  LPF_SWAP_ROUND(4, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27)
  LPF_SWAP_ROUND(2, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29)
  LPF_SWAP_ROUND(1, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30)
#undef LPF_SWAP_ROUND
#undef LPF_HIGH_8
#undef LPF_HIGH_4
#undef LPF_HIGH_2
#undef LPF_HIGH_1
}

// dst[c·ld_dst + r] = src[r·ld_src + c] for r < 16 and c < cols (at most 16: the dst rows past
// cols are not written), reading whole 16-value source rows. Types float or bf16 on either side:
// bf16 is widened exactly and stores round to nearest even.
template <typename S, typename D>
inline void transpose_block(const S* src, int64_t ld_src, D* dst, int64_t ld_dst, int cols = kLanes) {
  vfloat r[kLanes];
  for (int i = 0; i < kLanes; ++i) r[i] = load_t(src + i * ld_src);
  transpose16(r);
  for (int c = 0; c < cols; ++c) store_t(dst + c * ld_dst, r[c]);
}

}  // namespace vec
}  // namespace LPF_CPU_NS
}  // namespace liftplus_fast
