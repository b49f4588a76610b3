// Scalar math shared by the CPU and CUDA kernels, so every backend computes the same thing.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LPF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LPF_HOST_DEVICE inline
#endif

namespace liftplus_fast {
namespace math {

// Online logsumexp state: running maximum m and sum s of exp(x - m).
struct LseState {
  float m;
  float s;
};

LPF_HOST_DEVICE LseState lse_init() { return {-INFINITY, 0.f}; }

LPF_HOST_DEVICE LseState lse_push(LseState st, float x) {
  if (x > st.m) {
    st.s = st.s * expf(st.m - x) + 1.f;
    st.m = x;
  } else {
    st.s += expf(x - st.m);
  }
  return st;
}

LPF_HOST_DEVICE LseState lse_merge(LseState a, LseState b) {
  if (b.m == -INFINITY) return a;
  if (a.m == -INFINITY) return b;
  if (a.m >= b.m) return {a.m, a.s + b.s * expf(b.m - a.m)};
  return {b.m, b.s + a.s * expf(a.m - b.m)};
}

LPF_HOST_DEVICE float lse_value(LseState st) { return st.m + logf(st.s); }

// L2 normalisation as F.normalize: x / max(||x||, eps).
constexpr float kNormEps = 1e-12f;
LPF_HOST_DEVICE float inv_norm(float sumsq) {
  float n = sqrtf(sumsq);
  return 1.f / (n > kNormEps ? n : kNormEps);
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
}  // namespace liftplus_fast
