// Fused logit-adjusted cosine cross-entropy on CPU (forward, and the gradients in the same call).
// Math and saved tensors: docs/ops.md, "Logit-adjusted cosine cross-entropy".
//
// Work plan (B rows, K classes, D features; GEMMs on MKL through at::mm, the rest fused here):
//   * F and W are normalised row by row; only the inverse norms are kept. In fp32/fp64 the
//     GEMMs run on the raw W and the inverse norms scale the logit columns
//     (Ŵᵀ = Wᵀ·diag(rw)), so the [K, D] normalised weight is never materialised; in bf16/fp16
//     a normalised copy of each class chunk is the GEMM operand.
//   * Classes go in chunks. Per chunk: L = (s·F̂)·W_cᵀ, then one sweep per row gives the
//     adjusted logits, an online logsumexp and (if asked) the unadjusted logits output.
//   * With compute_grad the gradients are produced in the same call (as Liger-Kernel's fused
//     linear cross-entropy does), so the backward only scales them by grad_loss and the
//     logits GEMM is never recomputed: 3 GEMMs in total, as the reference, versus 4 for a
//     forward that saves lse and a backward that recomputes the logits.
//     - If B·K fits the store budget (K ≤ 32k at B = 128), there is one chunk: the softmax
//       gradient overwrites the logits buffer right after the row's logsumexp is known.
//     - Otherwise (K = 100k) the gradient needs every chunk's logsumexp first, so a second
//       sweep recomputes each chunk's logits GEMM: 4 GEMMs, O(B·chunk + chunk·D) extra memory.
//   * dŴ = s·dCᵀF̂ is produced per chunk into the [K, D] gradient and projected in place while
//     the chunk is still in cache; dF̂ accumulates across chunks in the accumulation dtype.
// Tuning knobs (read per call; tests use them to force the chunked path on small shapes):
//   LIFTPLUS_FAST_LA_CE_CHUNK (classes per chunk, default 4096) and
//   LIFTPLUS_FAST_LA_CE_STORE (max B·K handled as a single chunk, default 2^22).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "liftplus_fast/checks.h"
#include "liftplus_fast/cpu_capability.h"
#include "liftplus_fast/la_ce.h"
#include "liftplus_fast/math.h"
#include "liftplus_fast/rows.h"
#include "liftplus_fast/tuning.h"

// Builds besides the baseline, chosen at run time (csrc/cpu_dispatch.cpp).
LPF_CPU_CAPABILITIES(avx2, avx512);

namespace liftplus_fast {
namespace LPF_CPU_NS {
namespace {

namespace R = liftplus_fast::rows;

using checks::describe;
using checks::is_float_like;
using tuning::env_int;

void check_args(const at::Tensor& feat, const at::Tensor& weight, const at::Tensor& labels,
                const at::Tensor& log_prior) {
  checks::la_ce_args(feat, weight, labels, log_prior, c10::DeviceType::CPU);
}

struct Outputs {
  at::Tensor loss, logits, lse, grad_feat, grad_weight;
};

template <typename T>
void run(const at::Tensor& feat_in, const at::Tensor& weight_in, const at::Tensor& labels_in,
         const at::Tensor& log_prior, double scale, double tau, bool want_logits, bool want_grad,
         const at::Tensor* lse_given, double grad_loss, Outputs& out) {
  using A = at::opmath_type<T>;
  const at::ScalarType acc_type = std::is_same_v<A, double> ? at::kDouble : at::kFloat;
  const at::Tensor F = feat_in.contiguous();
  const at::Tensor W = weight_in.contiguous();
  const int64_t B = F.size(0), D = F.size(1), K = W.size(0);
  const auto opts = F.options();
  // Raw-weight GEMMs only in fp32/fp64: in bf16/fp16 the reference rounds Ŵ (not W) to the
  // feature dtype and so does the normalised copy, keeping the low-precision error pattern.
  const bool raw = W.scalar_type() == F.scalar_type() && std::is_same_v<T, A>;

  // Labels: checked before any work so a bad index never leaves half-written outputs.
  const at::Tensor labels = labels_in.contiguous();
  const int64_t* y = labels.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(y[b] >= 0 && y[b] < K, "labels[", b, "] = ", y[b], " is out of range [0, ", K,
                ") for weight with K = ", K, " classes");
  }

  // Row norms of F, and s·F̂ in the feature dtype (the GEMM operand, as the reference rounds it).
  std::vector<A> rf(B);
  std::vector<uint8_t> pf(B);
  at::Tensor Fs = at::empty({B, D}, opts);
  {
    const T* fp = F.const_data_ptr<T>();
    T* fsp = Fs.data_ptr<T>();
    at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const A ss = R::sumsq<T, A>(fp + b * D, D);
        const A n = std::sqrt(ss);
        rf[b] = math::inv_norm_of<A>(n);
        pf[b] = math::norm_active<A>(n);
        R::scale_row<T, T, A>(fp + b * D, A(scale) * rf[b], fsp + b * D, D);
      }
    });
  }

  // Row norms of W (any float dtype).
  std::vector<A> rw(K);
  std::vector<uint8_t> pw(K);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "la_ce_wnorm", [&] {
    const scalar_t* wp = W.const_data_ptr<scalar_t>();
    at::parallel_for(0, K, 256, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const A n = std::sqrt(R::sumsq<scalar_t, A>(wp + k * D, D));
        rw[k] = math::inv_norm_of<A>(n);
        pw[k] = math::norm_active<A>(n);
      }
    });
  });

  // τ·log π in the accumulation dtype (the reference adds it in fp32).
  std::vector<A> lp_v(K);
  {
    const at::Tensor lp_t = log_prior.to(acc_type).contiguous();
    const A* src = lp_t.const_data_ptr<A>();
    for (int64_t k = 0; k < K; ++k) lp_v[k] = A(tau) * src[k];
  }
  const A* lp = lp_v.data();

  const int64_t chunk = std::max<int64_t>(1, env_int("LIFTPLUS_FAST_LA_CE_CHUNK", 4096));
  const int64_t budget = env_int("LIFTPLUS_FAST_LA_CE_STORE", int64_t(1) << 22);
  const bool single = K <= chunk || B * K <= budget;
  const int64_t kc = single ? K : chunk;
  const int64_t nchunks = (K + kc - 1) / kc;

  at::Tensor Lflat = at::empty({B * kc}, opts);
  at::Tensor Wg_buf = raw ? at::Tensor() : at::empty({kc, D}, opts);

  out.loss = at::empty({}, opts.dtype(acc_type));
  out.lse = at::empty({B}, opts.dtype(acc_type));
  out.logits = want_logits ? at::empty({B, K}, opts) : at::empty({0}, opts);
  if (want_grad) {
    out.grad_feat = at::empty({B, D}, opts);
    out.grad_weight = at::empty({K, D}, W.options());
  } else {
    out.grad_feat = at::empty({0}, opts);
    out.grad_weight = at::empty({0}, W.options());
  }
  A* lse_p = out.lse.data_ptr<A>();
  T* logits_p = want_logits ? out.logits.data_ptr<T>() : nullptr;
  at::Tensor dFh = want_grad ? at::zeros({B, D}, opts.dtype(acc_type)) : at::Tensor();
  const A g = A(grad_loss) / A(B);

  // The GEMM operand for classes [k0, k0+n): the raw weight rows, or their normalised copy.
  auto weight_chunk = [&](int64_t k0, int64_t n) -> at::Tensor {
    if (raw) return W.narrow(0, k0, n);
    at::Tensor wg = Wg_buf.narrow(0, 0, n);
    T* dst = wg.data_ptr<T>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "la_ce_wcopy", [&] {
      const scalar_t* wp = W.const_data_ptr<scalar_t>() + k0 * D;
      at::parallel_for(0, n, 64, [&](int64_t a, int64_t e) {
        for (int64_t k = a; k < e; ++k) R::scale_row<scalar_t, T, A>(wp + k * D, rw[k0 + k], dst + k * D, D);
      });
    });
    return wg;
  };
  auto logits_chunk = [&](const at::Tensor& wg, int64_t n) -> at::Tensor {
    at::Tensor L = Lflat.narrow(0, 0, B * n).view({B, n});
    at::mm_out(L, Fs, wg.t());
    return L;
  };
  const A* cs_all = raw ? rw.data() : nullptr;

  // Gradient GEMMs of one chunk, P = the pre-multiplied logit gradient [B, n] (feature dtype).
  auto chunk_grads = [&](const at::Tensor& P, const at::Tensor& wg, int64_t k0, int64_t n) {
    at::Tensor gw = out.grad_weight.narrow(0, k0, n);
    const bool in_place = raw;  // same dtype, contiguous output: GEMM straight into the gradient
    at::Tensor X = in_place ? gw : at::empty({n, D}, opts);
    at::mm_out(X, P.t(), Fs);
    // raw: X_k = rw_k·dŴ_k so dW_k = X_k − Ŵ_k⟨Ŵ_k, X_k⟩; copy: X_k = dŴ_k, dW_k = rw_k·(…).
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "la_ce_dw", [&] {
      const scalar_t* wp = W.const_data_ptr<scalar_t>() + k0 * D;
      scalar_t* gp = gw.data_ptr<scalar_t>();
      const T* xp = X.const_data_ptr<T>();
      at::parallel_for(0, n, 64, [&](int64_t a, int64_t e) {
        for (int64_t k = a; k < e; ++k) {
          const A r = rw[k0 + k];
          R::project_row<T, scalar_t, scalar_t, A>(xp + k * D, wp + k * D, r, raw ? A(1) : r, pw[k0 + k], gp + k * D,
                                                   D);
        }
      });
    });
    if constexpr (std::is_same_v<T, A>) {
      dFh.addmm_(P, wg);
    } else {
      dFh.add_(at::mm(P, wg));
    }
  };

  std::vector<A> zy(B, A(0));
  std::vector<A> run_m(B, R::neg_inf<A>()), run_s(B, A(0));

  if (lse_given == nullptr) {
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t k0 = c * kc, n = std::min(kc, K - k0);
      const at::Tensor wg = weight_chunk(k0, n);
      at::Tensor L = logits_chunk(wg, n);
      T* Lp = L.data_ptr<T>();
      const bool fuse_grad = single && want_grad;
      const A* cs = cs_all ? cs_all + k0 : nullptr;
      at::parallel_for(0, B, std::max<int64_t>(1, 8192 / n), [&](int64_t b0, int64_t b1) {
        std::vector<A> z(n);
        for (int64_t b = b0; b < b1; ++b) {
          T* Lrow = Lp + b * n;
          const A m =
              R::shift_and_max<T, A>(Lrow, cs, lp + k0, n, z.data(), logits_p ? logits_p + b * K + k0 : nullptr);
          const int64_t yl = y[b] - k0;
          if (yl >= 0 && yl < n) zy[b] = z[yl];
          if (fuse_grad) {
            const A s = R::exp_sum<true, A>(z.data(), n, m);
            run_m[b] = m;
            run_s[b] = s;
            R::logit_grad<true, T, A>(z.data(), A(1) / s, g, cs, n, yl, Lrow);
          } else {
            const A s = R::exp_sum<false, A>(z.data(), n, m);
            // Online merge in the accumulation dtype.
            math::lse_merge_into<A>(run_m[b], run_s[b], m, s, [](A v) { return R::exp_fast(v); });
          }
        }
      });
      if (fuse_grad) chunk_grads(L, wg, k0, n);
    }
    double total = 0;
    for (int64_t b = 0; b < B; ++b) {
      lse_p[b] = run_m[b] + std::log(run_s[b]);
      total += double(lse_p[b]) - double(zy[b]);
    }
    out.loss.fill_(total / double(B));
  } else {
    const at::Tensor lse_c = lse_given->to(acc_type).contiguous();
    std::copy(lse_c.const_data_ptr<A>(), lse_c.const_data_ptr<A>() + B, lse_p);
    out.loss.zero_();
  }

  const bool second_sweep = want_grad && (!single || lse_given != nullptr);
  if (second_sweep) {
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t k0 = c * kc, n = std::min(kc, K - k0);
      const at::Tensor wg = weight_chunk(k0, n);
      at::Tensor L = logits_chunk(wg, n);
      T* Lp = L.data_ptr<T>();
      const A* cs = cs_all ? cs_all + k0 : nullptr;
      at::parallel_for(0, B, std::max<int64_t>(1, 8192 / n), [&](int64_t b0, int64_t b1) {
        std::vector<A> z(n);
        for (int64_t b = b0; b < b1; ++b) {
          T* Lrow = Lp + b * n;
          R::shift_and_max<T, A>(Lrow, cs, lp + k0, n, z.data(), nullptr);
          R::logit_grad<false, T, A>(z.data(), lse_p[b], g, cs, n, y[b] - k0, Lrow);
        }
      });
      chunk_grads(L, wg, k0, n);
    }
  }

  if (want_grad) {
    // dF̂ = s·P·Ŵ (P already carries grad_loss/B and the column norms), then the projection.
    const A* dp = dFh.const_data_ptr<A>();
    const T* fp = F.const_data_ptr<T>();
    T* gp = out.grad_feat.data_ptr<T>();
    at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        R::project_row<A, T, T, A>(dp + b * D, fp + b * D, rf[b], A(scale) * rf[b], pf[b], gp + b * D, D);
    });
  }
}

Outputs dispatch_run(const at::Tensor& feat, const at::Tensor& weight, const at::Tensor& labels,
                     const at::Tensor& log_prior, double scale, double tau, bool want_logits, bool want_grad,
                     const at::Tensor* lse_given, double grad_loss) {
  check_args(feat, weight, labels, log_prior);
  Outputs out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feat.scalar_type(), "la_cosine_ce_cpu", [&] {
    run<scalar_t>(feat, weight, labels, log_prior, scale, tau, want_logits, want_grad, lse_given, grad_loss, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> la_cosine_ce_fwd_cpu(
    const at::Tensor& feat, const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& log_prior,
    double scale, double tau, bool return_logits, bool compute_grad) {
  Outputs o = dispatch_run(feat, weight, labels, log_prior, scale, tau, return_logits, compute_grad, nullptr, 1.0);
  return {o.loss, o.logits, o.lse, o.grad_feat, o.grad_weight};
}

std::tuple<at::Tensor, at::Tensor> la_cosine_ce_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& feat,
                                                        const at::Tensor& weight, const at::Tensor& labels,
                                                        const at::Tensor& log_prior, const at::Tensor& lse,
                                                        double scale, double tau) {
  TORCH_CHECK(grad_loss.numel() == 1, "grad_loss must be a scalar; got ", describe(grad_loss));
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == feat.size(0) && is_float_like(lse),
              "lse must be a float tensor of shape [", feat.size(0), "]; got ", describe(lse));
  const double gl = grad_loss.item<double>();
  Outputs o = dispatch_run(feat, weight, labels, log_prior, scale, tau, false, true, &lse, gl);
  return {o.grad_feat, o.grad_weight};
}

}  // namespace

LPF_CPU_LIBRARY_IMPL(CPU, m) {
  m.impl("la_cosine_ce_fwd", &la_cosine_ce_fwd_cpu);
  m.impl("la_cosine_ce_bwd", &la_cosine_ce_bwd_cpu);
}

}  // namespace LPF_CPU_NS
}  // namespace liftplus_fast
