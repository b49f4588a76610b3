// Per-row LayerNorm math shared by the CPU and CUDA kernels (AdaptFormer's adapter LN).
// Backends differ only in how they reduce over a row; the finalisation and the element-wise
// formulas live here so every backend rounds the same way.
#pragma once

#include <cmath>

#include "liftplus_fast/cpu_capability.h"
#include "liftplus_fast/math.h"

namespace liftplus_fast {
inline namespace LPF_CPU_NS {
namespace math {

template <typename T>
struct RowStats {
  T mean;
  T rstd;
};

// From the row sum and the sum of squared deviations from the mean (two-pass variance: the
// rows are in cache, and two passes avoid the cancellation of E[x^2] - E[x]^2).
template <typename T>
LPF_HOST_DEVICE RowStats<T> ln_finalize(T mean, T sq_dev_sum, long long n, T eps) {
  const T var = sq_dev_sum / static_cast<T>(n);
  return {mean, static_cast<T>(1) / std::sqrt(var + eps)};
}

template <typename T>
LPF_HOST_DEVICE T ln_xhat(T x, RowStats<T> st) {
  return (x - st.mean) * st.rstd;
}

// dL/dx of x̂ = (x − μ)·rstd for one element, given the row means
// c1 = mean(dx̂) and c2 = mean(dx̂ ⊙ x̂) over the row.
template <typename T>
LPF_HOST_DEVICE T ln_grad_input(T dxhat, T xhat, T rstd, T c1, T c2) {
  return rstd * (dxhat - c1 - xhat * c2);
}

}  // namespace math
}  // namespace LPF_CPU_NS
}  // namespace liftplus_fast
