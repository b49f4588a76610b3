// Element-wise AdaptFormer math shared by the CPU and CUDA kernels (docs/ops.md). Backends
// differ in how they tile rows and reduce, never in these formulas, so the CPU tests cover the
// arithmetic the CUDA kernels run.
#pragma once

#include "liftplus_fast/cpu_capability.h"
#include "liftplus_fast/layernorm.h"
#include "liftplus_fast/math.h"

namespace liftplus_fast {
inline namespace LPF_CPU_NS {
namespace math {

// H = x̂·γ + β.
template <typename T>
LPF_HOST_DEVICE T ln_affine(T xhat, T gamma, T beta) {
  return xhat * gamma + beta;
}

// P = relu(Z). A NaN Z gives 0 here and in relu_grad: the mask is the same comparison.
template <typename T>
LPF_HOST_DEVICE T relu(T z) {
  return z > T(0) ? z : T(0);
}

// dZ = dP ⊙ [Z > 0].
template <typename T>
LPF_HOST_DEVICE T relu_grad(T dp, T z) {
  return z > T(0) ? dp : T(0);
}

// Y = A + (M + s·U): the MLP output and the scaled branch are summed first, as the reference
// (and the published block) adds them, then rounded once to the output dtype by the caller.
template <typename T>
LPF_HOST_DEVICE T adapter_out(T a, T m, T s, T u) {
  return a + (m + s * u);
}

// dWd[j, d] = Σ_n dZ[n, j]·H[n, d] = γ_d·Σ_n dZ[n, j]·Â[n, d] + β_d·Σ_n dZ[n, j]: the kernels
// accumulate against Â (recomputed from A) and apply the affine part once at the end.
template <typename T>
LPF_HOST_DEVICE T down_w_grad(T gamma, T dz_xhat_sum, T beta, T dbd) {
  return gamma * dz_xhat_sum + beta * dbd;
}

}  // namespace math
}  // namespace LPF_CPU_NS
}  // namespace liftplus_fast
