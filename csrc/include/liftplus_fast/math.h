// Scalar math shared by the CPU and CUDA kernels, so every backend computes the same thing.
#pragma once

#include <cmath>
#include "liftplus_fast/cpu_capability.h"

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LPF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LPF_HOST_DEVICE inline
#endif

namespace liftplus_fast {
inline namespace LPF_CPU_NS {
namespace math {

// L2 normalisation as F.normalize: 1 / max(‖v‖, eps), in any float type.
constexpr float kNormEps = 1e-12f;
template <typename A>
LPF_HOST_DEVICE A inv_norm_of(A norm) {
  return A(1) / (norm > A(kNormEps) ? norm : A(kNormEps));
}

// Online logsumexp: merge a chunk (max m, Σ exp(z − m) = s) into a running (m_run, s_run), in
// the accumulation type; `ex` is the backend's exp.
template <typename A, typename Exp>
LPF_HOST_DEVICE void lse_merge_into(A& m_run, A& s_run, A m, A s, Exp ex) {
  if (m > m_run) {
    s_run = s_run * ex(m_run - m) + s;
    m_run = m;
  } else if (m != -INFINITY) {
    s_run += s * ex(m - m_run);
  }
}

// Argmax update where the first maximum wins (as torch.argmax); NaN counts as the maximum.
LPF_HOST_DEVICE void argmax_push(float v, long long idx, float& best, long long& best_idx) {
  bool take = (v > best) || (v != v && best == best);
  if (take) {
    best = v;
    best_idx = idx;
  }
}

}  // namespace math
}  // namespace LPF_CPU_NS
}  // namespace liftplus_fast
