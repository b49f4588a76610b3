// Per-element and per-row-state math of the logit-adjusted cosine cross-entropy, shared by the
// CPU (rows.h, la_cosine_ce_cpu.cpp) and CUDA (la_cosine_ce_cuda.cu) kernels (docs/ops.md).
// Backends differ in how they loop and reduce, not in these formulas.
#pragma once

#include <cmath>

#include "liftplus_fast/cpu_capability.h"
#include "liftplus_fast/math.h"

namespace liftplus_fast {
inline namespace LPF_CPU_NS {
namespace math {

// Whether normalisation is active (‖v‖ > eps); below it the gradient is a plain scale.
template <typename A>
LPF_HOST_DEVICE bool norm_active(A norm) {
  return norm > A(kNormEps);
}

// Logit gradient of one class: (softmax − [class == label]) · g, g = grad_loss / B.
template <typename A>
LPF_HOST_DEVICE A softmax_grad(A p, bool is_label, A g) {
  return is_label ? (p - A(1)) * g : p * g;
}

// Backward of v̂ = v·rv for one element: out = a·(x − v·c) with c = ⟨v, x⟩·rv² (0 when the
// normalisation is inactive), a = rv (times the classifier scale for the features).
template <typename A>
LPF_HOST_DEVICE A project_coef(A dot_vx, A rv, bool active) {
  return active ? dot_vx * rv * rv : A(0);
}
template <typename A>
LPF_HOST_DEVICE A project_elem(A x, A v, A c, A a) {
  return a * (x - v * c);
}

}  // namespace math
}  // namespace LPF_CPU_NS
}  // namespace liftplus_fast
