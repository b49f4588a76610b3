// Fused logit-adjusted cosine cross-entropy on CUDA (forward, and the gradients in the same call).
// Math and saved tensors: docs/ops.md, "Logit-adjusted cosine cross-entropy".
//
// Same plan and schema as the CPU kernel (la_cosine_ce_cpu.cpp): the three GEMMs run on cuBLAS
// through ATen, everything between them is fused here.
//   * norm kernel (warp per row): ‖F_b‖, s·F̂ in the feature dtype; per class chunk ‖W_k‖ and Ŵ
//     in the feature dtype (the GEMM operand, rounded as the reference rounds it).
//   * L = (s·F̂)·Ŵ_cᵀ per chunk of classes (at::mm_out), then one block per row: adjusted logits,
//     the unadjusted logits output, an online logsumexp merged into a running state, the label's
//     logit; with one chunk and compute_grad, the softmax gradient overwrites L in the same pass.
//   * dŴ = Pᵀ·(s·F̂), dF̂/s += P·Ŵ (at::mm), then the normalisation backward per row (warp per row).
//   * With several chunks the gradient needs every chunk's logsumexp: a second sweep recomputes
//     each chunk's logits, as the CPU kernel. Knobs shared with the CPU kernel:
//     LIFTPLUS_FAST_LA_CE_CHUNK (classes per chunk, default 4096), LIFTPLUS_FAST_LA_CE_STORE
//     (max B·K handled as one chunk, default 2^22).
// Reductions are fixed trees (no atomics), so results are reproducible. The loss is reduced on
// the device, so nothing synchronises with the host (grad_loss is read on the device too).
// Formulas: liftplus_fast/la_ce.h (shared with the CPU kernel and covered by its tests).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <sstream>
#include <string>

#include "liftplus_fast/checks.h"
#include "liftplus_fast/la_ce.h"
#include "liftplus_fast/tuning.h"

namespace liftplus_fast {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}
int grid_for(int64_t n, int per_block) {
  return static_cast<int>(std::min<int64_t>(ceil_div(n, per_block), 65535));
}

// Row norms and, when out != nullptr, out = mul · v / max(‖v‖, eps) in the output dtype.
template <typename V, typename O, typename A>
__global__ void __launch_bounds__(kThreads) norm_rows_kernel(const V* __restrict__ v, int64_t rows, int64_t D, A mul,
                                                             A* __restrict__ norm, O* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    const V* x = v + row * D;
    A ss = 0;
    for (int64_t d = lane; d < D; d += 32) {
      const A t = static_cast<A>(x[d]);
      ss += t * t;
    }
    const A n = std::sqrt(warp_sum(ss));
    if (lane == 0) norm[row] = n;
    if (out != nullptr) {
      const A f = mul * math::inv_norm_of<A>(n);
      O* o = out + row * D;
      for (int64_t d = lane; d < D; d += 32) o[d] = static_cast<O>(static_cast<A>(x[d]) * f);
    }
  }
}

// Block-wide merge of per-thread (max, Σexp) states, fixed tree; result in thread 0.
template <typename A>
__device__ void block_lse(A& m, A& s, A* sm, A* ss) {
  sm[threadIdx.x] = m;
  ss[threadIdx.x] = s;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
      A mm = sm[threadIdx.x], s0 = ss[threadIdx.x];
      math::lse_merge_into<A>(mm, s0, sm[threadIdx.x + stride], ss[threadIdx.x + stride], [](A x) { return exp(x); });
      sm[threadIdx.x] = mm;
      ss[threadIdx.x] = s0;
    }
    __syncthreads();
  }
  m = sm[0];
  s = ss[0];
}

// One block per row b over the chunk's classes [k0, k0 + n):
//   z_k = L[b, k] + τ·log π_k; logits[b, k0 + k] = L[b, k]; merge the chunk's logsumexp into
//   (run_m, run_s)[b]; zy[b] = z_y when y is in the chunk.
//   With fuse_grad (single chunk): L[b, k] = softmax_grad(exp(z_k − lse), k == y, g).
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    ce_rows_kernel(T* __restrict__ L, int64_t n, int64_t K, int64_t k0, const A* __restrict__ lp,
                   const int64_t* __restrict__ labels, T* __restrict__ logits, A* __restrict__ run_m,
                   A* __restrict__ run_s, A* __restrict__ zy, bool fuse_grad, const A* __restrict__ grad_loss,
                   int64_t B) {
  __shared__ A sm[kThreads], ss[kThreads];
  const int64_t b = blockIdx.x;
  const int64_t y = labels[b];
  CUDA_KERNEL_ASSERT(y >= 0 && y < K);
  T* Lrow = L + b * n;
  A m = -INFINITY, s = 0;
  for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
    const T l = Lrow[k];
    const A z = static_cast<A>(l) + lp[k0 + k];
    if (logits != nullptr) logits[b * K + k0 + k] = l;
    if (k0 + k == y) zy[b] = z;
    // Per-thread online logsumexp (one element is a chunk of max z and Σ = 1).
    math::lse_merge_into<A>(m, s, z, A(1), [](A x) { return exp(x); });
  }
  block_lse<A>(m, s, sm, ss);
  if (!fuse_grad) {
    if (threadIdx.x == 0) {
      A rm = run_m[b], rs = run_s[b];
      math::lse_merge_into<A>(rm, rs, m, s, [](A x) { return exp(x); });
      run_m[b] = rm;
      run_s[b] = rs;
    }
    return;
  }
  if (threadIdx.x == 0) {
    run_m[b] = m;
    run_s[b] = s;
  }
  const A lse = m + log(s);
  const A g = *grad_loss / static_cast<A>(B);
  for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
    const A z = static_cast<A>(Lrow[k]) + lp[k0 + k];
    Lrow[k] = static_cast<T>(math::softmax_grad<A>(exp(z - lse), k0 + k == y, g));
  }
}

// Second sweep: L[b, k] = softmax_grad(exp(z_k − lse_b), k == y, g) from a known lse.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    grad_rows_kernel(T* __restrict__ L, int64_t n, int64_t k0, const A* __restrict__ lp,
                     const int64_t* __restrict__ labels, const A* __restrict__ lse, const A* __restrict__ grad_loss,
                     int64_t B) {
  const int64_t b = blockIdx.x;
  const int64_t y = labels[b];
  const A l = lse[b];
  const A g = *grad_loss / static_cast<A>(B);
  T* Lrow = L + b * n;
  for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
    const A z = static_cast<A>(Lrow[k]) + lp[k0 + k];
    Lrow[k] = static_cast<T>(math::softmax_grad<A>(exp(z - l), k0 + k == y, g));
  }
}

// lse_b = m_b + log s_b and loss = mean_b (lse_b − z_{b,y_b}); one block, fixed tree.
template <typename A>
__global__ void loss_kernel(const A* __restrict__ run_m, const A* __restrict__ run_s, const A* __restrict__ zy,
                            int64_t B, A* __restrict__ lse, A* __restrict__ loss) {
  __shared__ A red[kThreads];
  A acc = 0;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    const A l = run_m[b] + log(run_s[b]);
    lse[b] = l;
    acc += l - zy[b];
  }
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) red[threadIdx.x] += red[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) *loss = red[0] / static_cast<A>(B);
}

// Normalisation backward per row (warp per row): out = a·(x − v·c), c = ⟨v, x⟩·rv² when
// ‖v‖ > eps, with rv = 1/max(‖v‖, eps) and a = mul·rv.
template <typename X, typename V, typename O, typename A>
__global__ void __launch_bounds__(kThreads)
    project_rows_kernel(const X* __restrict__ x, const V* __restrict__ v, const A* __restrict__ norm, int64_t rows,
                        int64_t D, A mul, O* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    const X* xr = x + row * D;
    const V* vr = v + row * D;
    A dot = 0;
    for (int64_t d = lane; d < D; d += 32) dot += static_cast<A>(xr[d]) * static_cast<A>(vr[d]);
    dot = warp_sum(dot);
    const A n = norm[row];
    const A rv = math::inv_norm_of<A>(n);
    const A c = math::project_coef<A>(dot, rv, math::norm_active<A>(n));
    const A a = mul * rv;
    O* o = out + row * D;
    for (int64_t d = lane; d < D; d += 32)
      o[d] = static_cast<O>(math::project_elem<A>(static_cast<A>(xr[d]), static_cast<A>(vr[d]), c, a));
  }
}

// ---------------------------------------------------------------------------------------------

using checks::describe;
using checks::is_float_like;
using tuning::env_int;

void check_args(const at::Tensor& feat, const at::Tensor& weight, const at::Tensor& labels,
                const at::Tensor& log_prior) {
  checks::la_ce_args(feat, weight, labels, log_prior, c10::DeviceType::CUDA);
}

struct Outputs {
  at::Tensor loss, logits, lse, grad_feat, grad_weight;
};

template <typename T>
void run(const at::Tensor& feat_in, const at::Tensor& weight_in, const at::Tensor& labels_in,
         const at::Tensor& log_prior, double scale, double tau, bool want_logits, bool want_grad,
         const at::Tensor* lse_given, const at::Tensor& grad_loss, Outputs& out) {
  using A = at::opmath_type<T>;
  const at::ScalarType acc_type = std::is_same_v<A, double> ? at::kDouble : at::kFloat;
  const at::Tensor F = feat_in.contiguous();
  const at::Tensor W = weight_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const int64_t B = F.size(0), D = F.size(1), K = W.size(0);
  const auto opts = F.options();
  const auto aopts = opts.dtype(acc_type);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t* y = labels.const_data_ptr<int64_t>();

  // ‖F_b‖ and s·F̂ in the feature dtype.
  at::Tensor nf = at::empty({B}, aopts);
  at::Tensor Fs = at::empty({B, D}, opts);
  norm_rows_kernel<T, T, A><<<grid_for(B, kWarps), kThreads, 0, stream>>>(
      F.const_data_ptr<T>(), B, D, static_cast<A>(scale), nf.data_ptr<A>(), Fs.data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const at::Tensor lp = log_prior.to(acc_type).mul(tau).contiguous();  // τ·log π in the accumulation dtype
  const at::Tensor gl = grad_loss.to(acc_type).reshape({1}).contiguous();

  const int64_t chunk = std::max<int64_t>(1, env_int("LIFTPLUS_FAST_LA_CE_CHUNK", 4096));
  const int64_t budget = env_int("LIFTPLUS_FAST_LA_CE_STORE", int64_t(1) << 22);
  const bool single = K <= chunk || B * K <= budget;
  const int64_t kc = single ? K : chunk;
  const int64_t nchunks = ceil_div(K, kc);

  at::Tensor Lbuf = at::empty({B * kc}, opts);
  at::Tensor Wg_buf = at::empty({kc, D}, opts);
  at::Tensor nw = at::empty({K}, aopts);

  out.loss = at::zeros({}, aopts);
  out.lse = at::empty({B}, aopts);
  out.logits = want_logits ? at::empty({B, K}, opts) : at::empty({0}, opts);
  out.grad_feat = want_grad ? at::empty({B, D}, opts) : at::empty({0}, opts);
  out.grad_weight = want_grad ? at::empty({K, D}, W.options()) : at::empty({0}, W.options());
  at::Tensor dFh = want_grad ? at::zeros({B, D}, aopts) : at::Tensor();

  // Ŵ for classes [k0, k0 + n) in the feature dtype, and their norms into nw.
  auto weight_chunk = [&](int64_t k0, int64_t n) -> at::Tensor {
    at::Tensor wg = Wg_buf.narrow(0, 0, n);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "la_ce_cuda_wnorm", [&] {
      norm_rows_kernel<scalar_t, T, A><<<grid_for(n, kWarps), kThreads, 0, stream>>>(
          W.const_data_ptr<scalar_t>() + k0 * D, n, D, A(1), nw.data_ptr<A>() + k0, wg.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return wg;
  };
  auto logits_chunk = [&](const at::Tensor& wg, int64_t n) -> at::Tensor {
    at::Tensor L = Lbuf.narrow(0, 0, B * n).view({B, n});
    at::mm_out(L, Fs, wg.t());
    return L;
  };
  // P = the chunk's logit gradient [B, n]: dŴ = Pᵀ·(s·F̂), projected into grad_weight; dF̂/s += P·Ŵ.
  auto chunk_grads = [&](const at::Tensor& P, const at::Tensor& wg, int64_t k0, int64_t n) {
    const at::Tensor X = at::mm(P.t(), Fs);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "la_ce_cuda_dw", [&] {
      project_rows_kernel<T, scalar_t, scalar_t, A><<<grid_for(n, kWarps), kThreads, 0, stream>>>(
          X.const_data_ptr<T>(), W.const_data_ptr<scalar_t>() + k0 * D, nw.const_data_ptr<A>() + k0, n, D, A(1),
          out.grad_weight.data_ptr<scalar_t>() + k0 * D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if constexpr (std::is_same_v<T, A>) {
      dFh.addmm_(P, wg);
    } else {
      dFh.add_(at::mm(P, wg));
    }
  };

  if (lse_given == nullptr) {
    at::Tensor run_m = at::full({B}, -INFINITY, aopts);
    at::Tensor run_s = at::zeros({B}, aopts);
    at::Tensor zy = at::zeros({B}, aopts);
    const bool fuse_grad = single && want_grad;
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t k0 = c * kc, n = std::min(kc, K - k0);
      const at::Tensor wg = weight_chunk(k0, n);
      at::Tensor L = logits_chunk(wg, n);
      ce_rows_kernel<T, A><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
          L.data_ptr<T>(), n, K, k0, lp.const_data_ptr<A>(), y, want_logits ? out.logits.data_ptr<T>() : nullptr,
          run_m.data_ptr<A>(), run_s.data_ptr<A>(), zy.data_ptr<A>(), fuse_grad, gl.const_data_ptr<A>(), B);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (fuse_grad) chunk_grads(L, wg, k0, n);
    }
    loss_kernel<A><<<1, kThreads, 0, stream>>>(run_m.const_data_ptr<A>(), run_s.const_data_ptr<A>(),
                                               zy.const_data_ptr<A>(), B, out.lse.data_ptr<A>(),
                                               out.loss.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    out.lse.copy_(*lse_given);
  }

  if (want_grad && (!single || lse_given != nullptr)) {
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t k0 = c * kc, n = std::min(kc, K - k0);
      const at::Tensor wg = weight_chunk(k0, n);
      at::Tensor L = logits_chunk(wg, n);
      grad_rows_kernel<T, A><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
          L.data_ptr<T>(), n, k0, lp.const_data_ptr<A>(), y, out.lse.const_data_ptr<A>(), gl.const_data_ptr<A>(), B);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      chunk_grads(L, wg, k0, n);
    }
  }

  if (want_grad) {
    // dF = s·rf·(dF̂/s − F·⟨F, dF̂/s⟩·rf²).
    project_rows_kernel<A, T, T, A><<<grid_for(B, kWarps), kThreads, 0, stream>>>(
        dFh.const_data_ptr<A>(), F.const_data_ptr<T>(), nf.const_data_ptr<A>(), B, D, static_cast<A>(scale),
        out.grad_feat.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

Outputs dispatch_run(const at::Tensor& feat, const at::Tensor& weight, const at::Tensor& labels,
                     const at::Tensor& log_prior, double scale, double tau, bool want_logits, bool want_grad,
                     const at::Tensor* lse_given, const at::Tensor& grad_loss) {
  check_args(feat, weight, labels, log_prior);
  c10::cuda::CUDAGuard guard(feat.device());
  Outputs out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feat.scalar_type(), "la_cosine_ce_cuda", [&] {
    run<scalar_t>(feat, weight, labels, log_prior, scale, tau, want_logits, want_grad, lse_given, grad_loss, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> la_cosine_ce_fwd_cuda(
    const at::Tensor& feat, const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& log_prior,
    double scale, double tau, bool return_logits, bool compute_grad) {
  const at::Tensor one =
      at::full({}, 1.0, feat.options().dtype(feat.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  Outputs o = dispatch_run(feat, weight, labels, log_prior, scale, tau, return_logits, compute_grad, nullptr, one);
  return {o.loss, o.logits, o.lse, o.grad_feat, o.grad_weight};
}

std::tuple<at::Tensor, at::Tensor> la_cosine_ce_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& feat,
                                                         const at::Tensor& weight, const at::Tensor& labels,
                                                         const at::Tensor& log_prior, const at::Tensor& lse,
                                                         double scale, double tau) {
  TORCH_CHECK(grad_loss.numel() == 1 && is_float_like(grad_loss), "grad_loss must be a float scalar; got ",
              describe(grad_loss));
  TORCH_CHECK(grad_loss.device() == feat.device(), "grad_loss must be on ", feat.device(), "; got ",
              describe(grad_loss));
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == feat.size(0) && is_float_like(lse) && lse.device() == feat.device(),
              "lse must be a float tensor of shape [", feat.size(0), "] on ", feat.device(), "; got ", describe(lse));
  const auto acc_type = feat.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor lse_acc = lse.to(acc_type);
  Outputs o = dispatch_run(feat, weight, labels, log_prior, scale, tau, false, true, &lse_acc, grad_loss);
  return {o.grad_feat, o.grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(liftplus_fast, CUDA, m) {
  m.impl("la_cosine_ce_fwd", &la_cosine_ce_fwd_cuda);
  m.impl("la_cosine_ce_bwd", &la_cosine_ce_bwd_cuda);
}

}  // namespace liftplus_fast
