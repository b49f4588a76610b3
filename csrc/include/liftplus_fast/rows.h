// Per-row kernels of the fused CPU ops (LA cosine CE epilogues, TTE), written as plain loops
// over contiguous rows so that -O3 vectorises them in every capability build (no intrinsics).
// Reductions keep kLanes independent partial sums: without -ffast-math the compiler may not
// reorder a floating-point reduction, but it does vectorise kLanes independent accumulators.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

#include "liftplus_fast/cpu_capability.h"
#include "liftplus_fast/la_ce.h"

namespace liftplus_fast {
inline namespace LPF_CPU_NS {
namespace rows {

constexpr int64_t kLanes = 16;

// Branch-free expf (Cephes polynomial, ≈1 ulp on the reduced range) that the compiler can
// vectorise; libm's expf is a call per element. exp(x) for x < -87.3 flushes to 0 (as the
// true value is below the smallest normal), NaN stays NaN.
inline float exp_fast(float x) {
  const float xc = std::min(std::max(x, -87.3f), 88.3f);
  const float t = xc * 1.44269504088896341f;
  // Round to nearest via the 1.5·2^23 trick (|t| < 2^22), cheaper than nearbyint in a loop.
  const float n = (t + 12582912.f) - 12582912.f;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  const float v = p * std::bit_cast<float>(bits);
  const float res = x < -87.3f ? 0.f : v;
  return x == x ? res : x;
}
inline double exp_fast(double x) {
  return std::exp(x);
}

// bf16 <-> fp32 by bits, in forms the compiler vectorises: widening is a shift; narrowing
// rounds to nearest even and keeps NaN a (quiet) NaN, as c10::BFloat16 does.
inline float bf16_bits_to_float(uint16_t h) {
  return std::bit_cast<float>(static_cast<uint32_t>(h) << 16);
}
inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(f != f ? 0x7fc0u : rounded);
}

template <typename A>
inline A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}

template <typename V, typename A>
inline A sumsq(const V* v, int64_t n) {
  A acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) {
      const A x = static_cast<A>(v[i + j]);
      acc[j] += x * x;
    }
  for (; i < n; ++i) {
    const A x = static_cast<A>(v[i]);
    acc[0] += x * x;
  }
  A s = 0;
  for (int64_t j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

template <typename X, typename V, typename A>
inline A dot(const X* x, const V* v, int64_t n) {
  A acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += static_cast<A>(x[i + j]) * static_cast<A>(v[i + j]);
  for (; i < n; ++i) acc[0] += static_cast<A>(x[i]) * static_cast<A>(v[i]);
  A s = 0;
  for (int64_t j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// out = f · v, rounded once to the output type.
template <typename V, typename O, typename A>
inline void scale_row(const V* v, A f, O* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<O>(static_cast<A>(v[i]) * f);
}

// Adjusted logits of one row chunk: z = L·cs + lp (cs = per-class inverse weight norm when the
// GEMM ran on the raw weight, else absent). Writes the unadjusted logits L·cs (rounded to the
// feature dtype, as the reference returns them) when `logits` is given. Returns max(z).
template <typename T, typename A>
inline A shift_and_max(const T* L, const A* cs, const A* lp, int64_t n, A* z, T* logits) {
  if (cs != nullptr) {
    for (int64_t k = 0; k < n; ++k) z[k] = static_cast<A>(L[k]) * cs[k];
  } else {
    for (int64_t k = 0; k < n; ++k) z[k] = static_cast<A>(L[k]);
  }
  if (logits != nullptr) {
    if (cs != nullptr) {
      for (int64_t k = 0; k < n; ++k) logits[k] = static_cast<T>(z[k]);
    } else {
      std::copy(L, L + n, logits);
    }
  }
  A mx[kLanes];
  std::fill(mx, mx + kLanes, neg_inf<A>());
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) {
      const A v = z[k + j] + lp[k + j];
      z[k + j] = v;
      mx[j] = v > mx[j] ? v : mx[j];
    }
  for (; k < n; ++k) {
    const A v = z[k] + lp[k];
    z[k] = v;
    mx[0] = v > mx[0] ? v : mx[0];
  }
  A m = mx[0];
  for (int64_t j = 1; j < kLanes; ++j) m = mx[j] > m ? mx[j] : m;
  return m;
}

// sum_k exp(z_k − m); with kStore, z_k is replaced by exp(z_k − m).
template <bool kStore, typename A>
inline A exp_sum(A* z, int64_t n, A m) {
  A acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) {
      const A e = exp_fast(z[k + j] - m);
      if constexpr (kStore) z[k + j] = e;
      acc[j] += e;
    }
  for (; k < n; ++k) {
    const A e = exp_fast(z[k] - m);
    if constexpr (kStore) z[k] = e;
    acc[0] += e;
  }
  A s = 0;
  for (int64_t j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// Logit gradient of one row chunk, pre-multiplied for the GEMMs that follow:
//   out_k = (softmax_k − [k == y]) · g · cs_k,   g = grad_loss / B.
// softmax_k = z_k · mul when kStored (z holds exp(z − m), mul = 1/sum), else exp(z_k − lse).
template <bool kStored, typename T, typename A>
inline void logit_grad(const A* z, A mul_or_lse, A g, const A* cs, int64_t n, int64_t y_local, T* out) {
  for (int64_t k = 0; k < n; ++k) {
    A p;
    if constexpr (kStored) {
      p = z[k] * mul_or_lse;
    } else {
      p = exp_fast(z[k] - mul_or_lse);
    }
    A v = math::softmax_grad<A>(p, false, g);
    if (cs != nullptr) v *= cs[k];
    out[k] = static_cast<T>(v);
  }
  if (y_local >= 0 && y_local < n) {
    A p = kStored ? z[y_local] * mul_or_lse : exp_fast(z[y_local] - mul_or_lse);
    A v = math::softmax_grad<A>(p, true, g);
    if (cs != nullptr) v *= cs[y_local];
    out[y_local] = static_cast<T>(v);
  }
}

// Backward of v̂ = v / max(‖v‖, eps) applied to a row: with v̂ = v·rv,
//   out = a · (x − [‖v‖ > eps] · v̂ ⟨v̂, x⟩).
// `out` may alias `x` (the dot product is taken before anything is written).
template <typename X, typename V, typename O, typename A>
inline void project_row(const X* x, const V* v, A rv, A a, bool proj, O* out, int64_t n) {
  if (!proj) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<O>(a * static_cast<A>(x[i]));
    return;
  }
  const A c = math::project_coef<A>(dot<X, V, A>(x, v, n), rv, true);
  for (int64_t i = 0; i < n; ++i)
    out[i] = static_cast<O>(math::project_elem<A>(static_cast<A>(x[i]), static_cast<A>(v[i]), c, a));
}

// First index of the maximum of a row (torch.argmax semantics: the first maximum wins, a NaN
// counts as the maximum and the first NaN wins). Blocks of the row are reduced with a SIMD max
// (and a NaN flag); only a block whose maximum beats the best so far is rescanned for the
// first position of that maximum, which happens O(log n) times for unordered data.
template <typename T>
inline int64_t argmax_row(const T* v, int64_t n) {
  constexpr int64_t kBlock = 256;
  float best = -std::numeric_limits<float>::infinity();
  int64_t best_idx = 0;
  for (int64_t k0 = 0; k0 < n; k0 += kBlock) {
    const int64_t m = std::min(kBlock, n - k0);
    const T* p = v + k0;
    float block_max = -std::numeric_limits<float>::infinity();
    int has_nan = 0;
#pragma omp simd reduction(max : block_max) reduction(| : has_nan)
    for (int64_t j = 0; j < m; ++j) {
      const float x = static_cast<float>(p[j]);
      block_max = x > block_max ? x : block_max;
      has_nan |= (x != x);
    }
    if (has_nan) {
      for (int64_t j = 0; j < m; ++j)
        if (static_cast<float>(p[j]) != static_cast<float>(p[j])) return k0 + j;
    }
    // The first block always sets the answer, so an all -inf row returns index 0.
    if (k0 == 0 || block_max > best) {
      for (int64_t j = 0; j < m; ++j) {
        if (static_cast<float>(p[j]) == block_max) {
          best_idx = k0 + j;
          break;
        }
      }
      best = block_max;
    }
  }
  return best_idx;
}

}  // namespace rows
}  // namespace LPF_CPU_NS
}  // namespace liftplus_fast
