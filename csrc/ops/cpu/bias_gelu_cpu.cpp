// Bias + GELU of the ViT MLP on CPU: y = gelu(x + b) in one pass over x (the bias-free GEMM
// output), and its backward: grad_x = g · gelu'(x + b), grad_b = colsum(grad_x) (when the bias
// is trained), again one pass.
// Eager PyTorch runs QuickGELU as three element-wise ops forward (mul, sigmoid, mul) and three
// backward, each a full read and write of the [N, 4D] activation, and saves two such tensors; this
// saves only x. Math in fp32 (fp64 for fp64) for every input dtype, output in the input dtype.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "liftplus_fast/checks.h"
#include "liftplus_fast/cpu_capability.h"

// The loops are bound by their arithmetic (exp and a division per element): where the compiler
// targets AVX-512 they run 16 lanes wide (GCC's default tuning for recent Xeons stops at 8).
#if defined(__GNUC__) && !defined(__clang__) && defined(__AVX512F__)
#pragma GCC target("prefer-vector-width=512")
#endif
#include "liftplus_fast/rows.h"
#include "liftplus_fast/vec.h"

// Builds besides the baseline, chosen at run time (csrc/cpu_dispatch.cpp).
LPF_CPU_CAPABILITIES(avx2, avx512, avx512_bf16);

namespace liftplus_fast {
namespace LPF_CPU_NS {
namespace {

using checks::describe;

// kind: 0 = QuickGELU u·σ(1.702u) (OpenAI CLIP), 1 = GELU (erf), 2 = GELU (tanh approximation).
template <typename A>
inline A sigmoid(A z) {
  return A(1) / (A(1) + rows::exp_fast(-z));
}

// erf for the vectorised loops: Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7, what ATen's own
// vectorised CPU erf uses); libm's erff is a call per element. fp64 keeps std::erf.
inline float erf_fast(float x) {
  const float a = std::abs(x);
  const float t = 1.f / (1.f + 0.3275911f * a);
  const float r = ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f) * t;
  const float e = 1.f - r * rows::exp_fast(-a * a);
  return x < 0.f ? -e : e;
}
inline double erf_fast(double x) {
  return std::erf(x);
}

template <int kKind, typename A>
inline A gelu(A u) {
  if constexpr (kKind == 0) {
    return u * sigmoid<A>(A(1.702) * u);
  } else if constexpr (kKind == 1) {
    return A(0.5) * u * (A(1) + erf_fast(u * A(M_SQRT1_2)));
  } else {
    const A k = A(0.7978845608028654);                                               // sqrt(2 / pi)
    const A t = A(2) * sigmoid<A>(A(2) * k * (u + A(0.044715) * u * u * u)) - A(1);  // tanh
    return A(0.5) * u * (A(1) + t);
  }
}

template <int kKind, typename A>
inline A gelu_grad(A u) {
  if constexpr (kKind == 0) {
    const A s = sigmoid<A>(A(1.702) * u);
    return s + A(1.702) * u * s * (A(1) - s);
  } else if constexpr (kKind == 1) {
    const A cdf = A(0.5) * (A(1) + erf_fast(u * A(M_SQRT1_2)));
    const A pdf = rows::exp_fast(A(-0.5) * u * u) * A(0.3989422804014327);
    return cdf + u * pdf;
  } else {
    const A k = A(0.7978845608028654);
    const A t = A(2) * sigmoid<A>(A(2) * k * (u + A(0.044715) * u * u * u)) - A(1);
    return A(0.5) * (A(1) + t) + A(0.5) * u * (A(1) - t * t) * k * (A(1) + A(3) * A(0.044715) * u * u);
  }
}

// The row loops live in noexcept, never-inlined functions outside the parallel_for lambdas (inlined
// there, GCC sees the lambda's exception region and vectorises nothing), and read/write bf16 by its bits
// (c10::BFloat16's conversions do not vectorise). Needs -fno-trapping-math (CMakeLists.txt) so
// that the branch-free selects in exp_fast are if-converted.
template <typename T, typename A>
inline A load(const T* p, int64_t j) {
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    return rows::bf16_bits_to_float(reinterpret_cast<const uint16_t*>(p)[j]);
  else
    return static_cast<A>(p[j]);
}

template <typename T, typename A>
inline void store(T* p, int64_t j, A v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    reinterpret_cast<uint16_t*>(p)[j] = rows::float_to_bf16_bits(v);
  else
    p[j] = static_cast<T>(v);
}

// QuickGELU on 16-lane vectors (float math, fp32 or bf16 storage): σ(1.702u) = 1/(1 + 2^(−1.702·
// log2(e)·u)) with the vector exp2, about half the operations of the scalar exp GCC vectorises.
template <typename T>
constexpr bool kQuickVector = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>;
constexpr float kQuickExp2 = -1.702f * vec::kLog2e;

template <int kKind, typename T, typename A>
[[gnu::noinline]] void gelu_row(const T* __restrict x, const A* __restrict b, T* __restrict y, int64_t n) noexcept {
  int64_t j = 0;
  if constexpr (kKind == 0 && std::is_same_v<A, float> && kQuickVector<T>) {
    for (; j + vec::kLanes <= n; j += vec::kLanes) {
      const vec::vfloat u = vec::load_t(x + j) + vec::load(b + j);
      vec::store_t(y + j, u * vec::reciprocal(1.f + vec::exp2(u * kQuickExp2)));
    }
  }
  for (; j < n; ++j) store<T, A>(y, j, gelu<kKind, A>(load<T, A>(x, j) + b[j]));
}

// kColsum: also add grad_x into colsum (the bias gradient's partial sums).
template <int kKind, bool kColsum, typename T, typename A>
[[gnu::noinline]] void gelu_grad_row(const T* __restrict g, const T* __restrict x, const A* __restrict b,
                                     T* __restrict gx, A* __restrict colsum, int64_t n) noexcept {
  int64_t j = 0;
  if constexpr (kKind == 0 && std::is_same_v<A, float> && kQuickVector<T>) {
    for (; j + vec::kLanes <= n; j += vec::kLanes) {
      const vec::vfloat u = vec::load_t(x + j) + vec::load(b + j);
      const vec::vfloat s = vec::reciprocal(1.f + vec::exp2(u * kQuickExp2));
      const vec::vfloat d = vec::load_t(g + j) * (s + 1.702f * u * s * (1.f - s));
      vec::store_t(gx + j, d);
      if constexpr (kColsum) vec::store(colsum + j, vec::load(colsum + j) + d);
    }
  }
  for (; j < n; ++j) {
    const A d = load<T, A>(g, j) * gelu_grad<kKind, A>(load<T, A>(x, j) + b[j]);
    store<T, A>(gx, j, d);
    if constexpr (kColsum) colsum[j] += d;
  }
}

void check_args(const at::Tensor& x, const at::Tensor& bias, int64_t kind) {
  TORCH_CHECK(x.device().is_cpu(), "bias_gelu (CPU kernel): x must be a CPU tensor; got ", describe(x));
  TORCH_CHECK(x.dim() >= 1 && checks::is_float_like(x) && x.size(-1) > 0,
              "bias_gelu: x must be a float tensor [..., F] with F >= 1; got ", describe(x));
  TORCH_CHECK(
      bias.dim() == 1 && bias.size(0) == x.size(-1) && checks::is_float_like(bias) && bias.device() == x.device(),
      "bias_gelu: bias must be a float tensor [", x.size(-1), "] on ", x.device(), "; got ", describe(bias));
  TORCH_CHECK(kind >= 0 && kind <= 2, "bias_gelu: kind must be 0 (QuickGELU), 1 (GELU erf) or 2 (GELU tanh); got ",
              kind);
}

template <typename F>
void with_kind(int64_t kind, F&& f) {
  if (kind == 0)
    f(std::integral_constant<int, 0>{});
  else if (kind == 1)
    f(std::integral_constant<int, 1>{});
  else
    f(std::integral_constant<int, 2>{});
}

at::Tensor bias_gelu_fwd_cpu(const at::Tensor& x_in, const at::Tensor& bias_in, int64_t kind) {
  check_args(x_in, bias_in, kind);
  const at::Tensor x = x_in.contiguous();
  const int64_t F = x.size(-1), rows_n = x.numel() / F;
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_gelu_fwd", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const at::Tensor b = bias_in.to(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
    const A* bp = b.const_data_ptr<A>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    with_kind(kind, [&](auto k) {
      constexpr int K = decltype(k)::value;
      at::parallel_for(0, rows_n, std::max<int64_t>(1, 16384 / F), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) gelu_row<K, scalar_t, A>(xp + r * F, bp, yp + r * F, F);
      });
    });
  });
  return y;
}

// grad_bias is [F] when bias_grad, else empty ([0]): a frozen bias skips the column sums.
std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                     const at::Tensor& bias_in, int64_t kind, bool bias_grad) {
  check_args(x_in, bias_in, kind);
  TORCH_CHECK(grad_in.sizes() == x_in.sizes() && grad_in.scalar_type() == x_in.scalar_type(),
              "bias_gelu_bwd: grad_y must match x (", describe(x_in), "); got ", describe(grad_in));
  const at::Tensor x = x_in.contiguous(), g = grad_in.contiguous();
  const int64_t F = x.size(-1), rows_n = x.numel() / F;
  at::Tensor gx = at::empty_like(x);
  at::Tensor gb = at::empty({0}, bias_in.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_gelu_bwd", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const at::Tensor b = bias_in.to(acc).contiguous();
    const A* bp = b.const_data_ptr<A>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / F);
    if (!bias_grad) {
      with_kind(kind, [&](auto k) {
        constexpr int K = decltype(k)::value;
        at::parallel_for(0, rows_n, grain, [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r)
            gelu_grad_row<K, false, scalar_t, A>(gp + r * F, xp + r * F, bp, gxp + r * F, nullptr, F);
        });
      });
      return;
    }
    // Column sums per chunk of rows, added in chunk order: deterministic for a thread count.
    const int64_t chunks =
        std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads() * 4, (rows_n + grain - 1) / grain));
    const int64_t per = (rows_n + chunks - 1) / chunks;
    at::Tensor partial = at::zeros({chunks, F}, x.options().dtype(acc));
    A* pp = partial.data_ptr<A>();
    with_kind(kind, [&](auto k) {
      constexpr int K = decltype(k)::value;
      at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          A* colsum = pp + c * F;
          const int64_t r_end = std::min(rows_n, (c + 1) * per);
          for (int64_t r = c * per; r < r_end; ++r)
            gelu_grad_row<K, true, scalar_t, A>(gp + r * F, xp + r * F, bp, gxp + r * F, colsum, F);
        }
      });
    });
    gb = partial.sum(0).to(bias_in.scalar_type());
  });
  return {gx, gb};
}

}  // namespace

LPF_CPU_LIBRARY_IMPL(CPU, m) {
  m.impl("bias_gelu_fwd", &bias_gelu_fwd_cpu);
  m.impl("bias_gelu_bwd", &bias_gelu_bwd_cpu);
}

}  // namespace LPF_CPU_NS
}  // namespace liftplus_fast
