// Multi-head self-attention on CPU, read straight from the packed qkv projection.
//
// qkv is the in-projection output, [B, N, 3D] (batch_first) or [N, B, 3D], heads of width
// hd = D / H side by side in each third. The forward writes O in qkv's layout ([B, N, D] or
// [N, B, D]: no split or merge of heads, no copies between layouts) and saves only the
// per-row log-sum-exp (fp32 [B, H, N], fp64 for fp64); the backward recomputes the probabilities from it.
//
// bf16 with AVX512-BF16: one (image, head) per task, all of it in the thread's cache
// (N = 197: the N x N scores are 160 KB in fp32). Every product is a bf16 GEMM with fp32
// accumulation on a register-blocked vdpbf16ps micro-kernel; the scores S = QKᵀ and
// dP = dO·Vᵀ stay in fp32 (what the softmax and its backward need), P and dS are rounded to
// bf16 only as GEMM inputs, as flash attention does:
//   forward : S = QKᵀ; lse = logsumexp(scale·S); P = exp(scale·S − lse); O = P·V
//   backward: P from lse; dP = dO·Vᵀ; Δ = rowsum(dO ⊙ O); dS = P ⊙ (dP − Δ)·scale;
//             dV = Pᵀ·dO; dQ = dS·K; dK = dSᵀ·Q
// Other dtypes (fp32, fp16, fp64 for gradcheck) and machines run the same formulas with ATen
// batched GEMMs in fp32 (fp64 for fp64), also saving only lse.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/logsumexp.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/sum.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define LPF_ATTN_BF16_KERNEL 1
#else
#define LPF_ATTN_BF16_KERNEL 0
#endif

#include "liftplus_fast/attention.h"
#include "liftplus_fast/cpu_capability.h"
#include "liftplus_fast/rows.h"
#include "liftplus_fast/tuning.h"

// Builds besides the baseline, chosen at run time (csrc/cpu_dispatch.cpp).
LPF_CPU_CAPABILITIES(avx512_bf16);

namespace liftplus_fast {
namespace LPF_CPU_NS {
namespace {

using attention::acc_type;
using attention::check_args;
using attention::Geometry;
using attention::new_like_layout;

// ---------------------------------------------------------------------------------------------
// Reference-structured path (any dtype): ATen GEMMs on [B, H, N, hd] views.
at::Tensor heads_view(const at::Tensor& t, const Geometry& g, int64_t part) {
  // t: [B, N, W] or [N, B, W] with W = parts * D; returns part `part` as [B, H, N, hd].
  at::Tensor x = g.batch_first ? t : t.transpose(0, 1);
  x = x.narrow(2, part * g.D, g.D).unflatten(2, {g.H, g.hd});
  return x.permute({0, 2, 1, 3});
}

std::tuple<at::Tensor, at::Tensor> fwd_generic(const at::Tensor& qkv, const Geometry& g, double scale) {
  const auto acc = acc_type(qkv);
  at::Tensor q = heads_view(qkv, g, 0).to(acc), k = heads_view(qkv, g, 1).to(acc), v = heads_view(qkv, g, 2).to(acc);
  at::Tensor s = at::matmul(q, k.transpose(-1, -2)).mul_(scale);
  at::Tensor lse = at::logsumexp(s, {-1}, /*keepdim=*/true);
  at::Tensor p = (s - lse).exp_();
  at::Tensor o = at::matmul(p, v);  // [B, H, N, hd]
  at::Tensor out = new_like_layout(qkv, g, g.D);
  heads_view(out, g, 0).copy_(o);
  return {out, lse.squeeze(-1).contiguous()};
}

at::Tensor bwd_generic(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out, const at::Tensor& lse,
                       const Geometry& g, double scale) {
  const auto acc = acc_type(qkv);
  at::Tensor q = heads_view(qkv, g, 0).to(acc), k = heads_view(qkv, g, 1).to(acc), v = heads_view(qkv, g, 2).to(acc);
  at::Tensor o = heads_view(out, g, 0).to(acc), dout = heads_view(grad_out, g, 0).to(acc);
  at::Tensor s = at::matmul(q, k.transpose(-1, -2)).mul_(scale);
  at::Tensor p = (s - lse.to(acc).unsqueeze(-1)).exp_();
  at::Tensor dp = at::matmul(dout, v.transpose(-1, -2));
  at::Tensor delta = (dout * o).sum(-1, /*keepdim=*/true);
  at::Tensor ds = p * (dp - delta) * scale;
  at::Tensor grad = new_like_layout(qkv, g, 3 * g.D);
  heads_view(grad, g, 0).copy_(at::matmul(ds, k));
  heads_view(grad, g, 1).copy_(at::matmul(ds.transpose(-1, -2), q));
  heads_view(grad, g, 2).copy_(at::matmul(p.transpose(-1, -2), dout));
  return grad;
}

#if LPF_ATTN_BF16_KERNEL
// ---------------------------------------------------------------------------------------------
// bf16 micro-GEMM: C[M, Nc] (fp32, ldc) = A[M, 2·P] (bf16 rows, lda, pairs along k) · B, with B
// packed in VNNI pairs: Bp[p][n][e] = B[2p + e][n], n padded to a multiple of 16 (zeros).
using bf16 = c10::BFloat16;

inline int64_t round_up(int64_t x, int64_t m) {
  return (x + m - 1) / m * m;
}

// Round a row of fp32 to bf16 (nearest even), 16 lanes at a time.
inline void to_bf16(const float* src, bf16* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
  if (i < n) {
    const __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
    const __m256i v = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + i));
    _mm256_mask_storeu_epi16(dst + i, m, v);
  }
}

// dst[j][i] = src[i][j] for an n x n block of bf16 (row strides ld), in cache-sized tiles.
inline void transpose_bf16(const bf16* src, bf16* dst, int64_t n, int64_t ld) {
  constexpr int64_t kT = 16;
  for (int64_t i0 = 0; i0 < n; i0 += kT)
    for (int64_t j0 = 0; j0 < n; j0 += kT) {
      const int64_t ie = std::min(n, i0 + kT), je = std::min(n, j0 + kT);
      for (int64_t j = j0; j < je; ++j)
        for (int64_t i = i0; i < ie; ++i) dst[j * ld + i] = src[i * ld + j];
    }
}

template <int MR>
inline void micro_tile(const bf16* a, int64_t lda, const bf16* bp, int64_t npad, int64_t pairs, float* c, int64_t ldc,
                       int64_t ncols) {
  // ncols <= 32 columns starting at the tile; two 16-lane accumulators per row.
  __m512 acc0[MR], acc1[MR];
  for (int r = 0; r < MR; ++r) {
    acc0[r] = _mm512_setzero_ps();
    acc1[r] = _mm512_setzero_ps();
  }
  const bool two = ncols > 16;
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bp + (p * npad) * 2);
    if (two) {
      const __m512bh b1 = (__m512bh)_mm512_loadu_si512(bp + (p * npad + 16) * 2);
      for (int r = 0; r < MR; ++r) {
        int32_t pair;
        std::memcpy(&pair, a + r * lda + 2 * p, sizeof(pair));
        const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
        acc0[r] = _mm512_dpbf16_ps(acc0[r], av, b0);
        acc1[r] = _mm512_dpbf16_ps(acc1[r], av, b1);
      }
    } else {
      for (int r = 0; r < MR; ++r) {
        int32_t pair;
        std::memcpy(&pair, a + r * lda + 2 * p, sizeof(pair));
        acc0[r] = _mm512_dpbf16_ps(acc0[r], (__m512bh)_mm512_set1_epi32(pair), b0);
      }
    }
  }
  const __mmask16 m0 = ncols >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << ncols) - 1);
  const __mmask16 m1 = ncols >= 32 ? (__mmask16)0xFFFF : two ? (__mmask16)((1u << (ncols - 16)) - 1) : 0;
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(c + r * ldc, m0, acc0[r]);
    if (two) _mm512_mask_storeu_ps(c + r * ldc + 16, m1, acc1[r]);
  }
}

// bp: B packed with `pairs` pairs of k rows and npad columns. The bp pointer passed to the tile
// is offset by the tile's first column (within each pair row).
void gemm_bf16(int64_t M, int64_t Nc, int64_t pairs, const bf16* a, int64_t lda, const bf16* bp, int64_t npad, float* c,
               int64_t ldc) {
  constexpr int MR = 6;
  for (int64_t n0 = 0; n0 < Nc; n0 += 32) {
    const int64_t nc = std::min<int64_t>(32, Nc - n0);
    const bf16* bt = bp + n0 * 2;
    int64_t i = 0;
    for (; i + MR <= M; i += MR) micro_tile<MR>(a + i * lda, lda, bt, npad, pairs, c + i * ldc + n0, ldc, nc);
    switch (M - i) {
      case 5:
        micro_tile<5>(a + i * lda, lda, bt, npad, pairs, c + i * ldc + n0, ldc, nc);
        break;
      case 4:
        micro_tile<4>(a + i * lda, lda, bt, npad, pairs, c + i * ldc + n0, ldc, nc);
        break;
      case 3:
        micro_tile<3>(a + i * lda, lda, bt, npad, pairs, c + i * ldc + n0, ldc, nc);
        break;
      case 2:
        micro_tile<2>(a + i * lda, lda, bt, npad, pairs, c + i * ldc + n0, ldc, nc);
        break;
      case 1:
        micro_tile<1>(a + i * lda, lda, bt, npad, pairs, c + i * ldc + n0, ldc, nc);
        break;
      default:
        break;
    }
  }
}

// B[k][n] = src[n * ld + k] (k contiguous in the source: Kᵀ, Vᵀ), k < K (even), n < Nn.
void pack_nt(const bf16* src, int64_t ld, int64_t K, int64_t Nn, int64_t npad, bf16* bp) {
  const int64_t pairs = K / 2;
  std::memset(static_cast<void*>(bp), 0, sizeof(bf16) * pairs * npad * 2);
  for (int64_t n = 0; n < Nn; ++n) {
    const bf16* row = src + n * ld;
    for (int64_t p = 0; p < pairs; ++p) {
      bp[(p * npad + n) * 2] = row[2 * p];
      bp[(p * npad + n) * 2 + 1] = row[2 * p + 1];
    }
  }
}

// B[k][n] = src[k * ld + n] (rows of the source are k: V, K, Q, dO), k < K (padded to even with
// zeros), n < Nn.
void pack_kn(const bf16* src, int64_t ld, int64_t K, int64_t Nn, int64_t npad, bf16* bp) {
  const int64_t pairs = (K + 1) / 2;
  std::memset(static_cast<void*>(bp), 0, sizeof(bf16) * pairs * npad * 2);
  for (int64_t k = 0; k < K; ++k) {
    const bf16* row = src + k * ld;
    bf16* dst = bp + (k / 2) * npad * 2 + (k & 1);
    for (int64_t n = 0; n < Nn; ++n) dst[2 * n] = row[n];
  }
}

struct Buffers {
  std::vector<float> s, c;               // [N, ld_s] scores / dP, [N, hd] GEMM output
  std::vector<bf16> pa, pb, pc, pd, pk;  // bf16 [N, ld_a] operands and a packed B operand
  std::vector<float> delta, dp;          // Δ [N], a block of dP rows [kRows, ld_s]
  static constexpr int64_t kRows = 12;
  void reserve(int64_t N, int64_t hd) {
    const int64_t ld_s = round_up(N, 16), ld_a = round_up(N, 2);
    s.resize(N * ld_s);
    c.resize(N * round_up(hd, 16));
    pa.resize(N * ld_a);
    pb.resize(N * ld_a);
    pc.resize(N * ld_a);
    pd.resize(N * ld_a);
    const int64_t packed = std::max(round_up(hd, 2) / 2 * round_up(N, 16), round_up(N, 2) / 2 * round_up(hd, 16)) * 2;
    pk.resize(packed);
    delta.resize(N);
    dp.resize(kRows * ld_s);
  }
};

// The A operands are read in place from qkv / O / dO: with hd and D even every row starts on a
// bf16 pair, which is what the micro-kernel's 32-bit broadcasts need.

// S = Q Kᵀ (fp32, [N, ld_s]) for one head.
void scores(const bf16* q, const bf16* k, int64_t ld, int64_t N, int64_t hd, Buffers& buf) {
  const int64_t npad = round_up(N, 16);
  pack_nt(k, ld, hd, N, npad, buf.pk.data());
  gemm_bf16(N, N, hd / 2, q, ld, buf.pk.data(), npad, buf.s.data(), npad);
}

void fwd_head(const bf16* q, const bf16* k, const bf16* v, int64_t ld, bf16* o, int64_t ld_o, float* lse, int64_t N,
              int64_t hd, float scale, Buffers& buf) {
  const int64_t ld_s = round_up(N, 16), ld_a = round_up(N, 2), hpad = round_up(hd, 16);
  scores(q, k, ld, N, hd, buf);
  for (int64_t i = 0; i < N; ++i) {
    float* s = buf.s.data() + i * ld_s;
    float mx[rows::kLanes];
    std::fill(mx, mx + rows::kLanes, -std::numeric_limits<float>::infinity());
    int64_t j = 0;
    for (; j + rows::kLanes <= N; j += rows::kLanes)
      for (int64_t l = 0; l < rows::kLanes; ++l) {
        const float x = s[j + l] * scale;
        s[j + l] = x;
        mx[l] = x > mx[l] ? x : mx[l];
      }
    for (; j < N; ++j) {
      s[j] *= scale;
      mx[0] = s[j] > mx[0] ? s[j] : mx[0];
    }
    float m = *std::max_element(mx, mx + rows::kLanes);
    const float l = rows::exp_sum<true, float>(s, N, m);
    const float inv = 1.f / l;
    for (j = 0; j < N; ++j) s[j] *= inv;
    bf16* p = buf.pa.data() + i * ld_a;
    to_bf16(s, p, N);
    if (ld_a > N) p[N] = static_cast<bf16>(0.f);
    lse[i] = m + std::log(l);
  }
  pack_kn(v, ld, N, hd, hpad, buf.pk.data());
  gemm_bf16(N, hd, ld_a / 2, buf.pa.data(), ld_a, buf.pk.data(), hpad, buf.c.data(), hpad);
  for (int64_t i = 0; i < N; ++i) to_bf16(buf.c.data() + i * hpad, o + i * ld_o, hd);
}

void bwd_head(const bf16* q, const bf16* k, const bf16* v, int64_t ld, const bf16* o, const bf16* dout, int64_t ld_o,
              const float* lse, bf16* dq, bf16* dk, bf16* dv, int64_t ld_g, int64_t N, int64_t hd, float scale,
              Buffers& buf) {
  const int64_t ld_s = round_up(N, 16), ld_a = round_up(N, 2), hpad = round_up(hd, 16);
  float* s = buf.s.data();
  float* c = buf.c.data();
  bf16* p_t = buf.pa.data();   // Pᵀ  [N, ld_a]
  bf16* ds = buf.pb.data();    // dS  [N, ld_a]
  bf16* ds_t = buf.pc.data();  // dSᵀ [N, ld_a]
  bf16* rowbuf = buf.pd.data();
  for (int64_t i = 0; i < N; ++i) buf.delta[i] = rows::dot<bf16, bf16, float>(dout + i * ld_o, o + i * ld_o, hd);
  scores(q, k, ld, N, hd, buf);
  // P = exp(scale·S − lse) in fp32 (kept for dS) and in bf16 (transposed below for dV).
  for (int64_t i = 0; i < N; ++i) {
    float* row = s + i * ld_s;
    const float li = lse[i];
    for (int64_t j = 0; j < N; ++j) row[j] = rows::exp_fast(row[j] * scale - li);
    to_bf16(row, rowbuf + i * ld_a, N);
    if (ld_a > N) rowbuf[i * ld_a + N] = static_cast<bf16>(0.f);
  }
  transpose_bf16(rowbuf, p_t, N, ld_a);
  // dP = dO·Vᵀ a block of rows at a time (dS needs P and dP of a row together; a whole second
  // [N, N] buffer would leave the cache).
  const int64_t npad = ld_s, kRows = Buffers::kRows;
  pack_nt(v, ld, hd, N, npad, buf.pk.data());
  float* dp = buf.dp.data();
  for (int64_t i0 = 0; i0 < N; i0 += kRows) {
    const int64_t rows_n = std::min(kRows, N - i0);
    gemm_bf16(rows_n, N, hd / 2, dout + i0 * ld_o, ld_o, buf.pk.data(), npad, dp, npad);
    for (int64_t r = 0; r < rows_n; ++r) {
      const int64_t i = i0 + r;
      const float* prow = s + i * ld_s;
      float* dprow = dp + r * npad;
      const float di = buf.delta[i];
      for (int64_t j = 0; j < N; ++j) dprow[j] = prow[j] * (dprow[j] - di) * scale;
      to_bf16(dprow, ds + i * ld_a, N);
      if (ld_a > N) ds[i * ld_a + N] = static_cast<bf16>(0.f);
    }
  }
  transpose_bf16(ds, ds_t, N, ld_a);
  if (ld_a > N)
    for (int64_t j = 0; j < N; ++j) {
      p_t[j * ld_a + N] = static_cast<bf16>(0.f);
      ds_t[j * ld_a + N] = static_cast<bf16>(0.f);
    }
  // dV = Pᵀ dO
  pack_kn(dout, ld_o, N, hd, hpad, buf.pk.data());
  gemm_bf16(N, hd, ld_a / 2, p_t, ld_a, buf.pk.data(), hpad, c, hpad);
  for (int64_t j = 0; j < N; ++j) to_bf16(c + j * hpad, dv + j * ld_g, hd);
  // dQ = dS K
  pack_kn(k, ld, N, hd, hpad, buf.pk.data());
  gemm_bf16(N, hd, ld_a / 2, ds, ld_a, buf.pk.data(), hpad, c, hpad);
  for (int64_t i = 0; i < N; ++i) to_bf16(c + i * hpad, dq + i * ld_g, hd);
  // dK = dSᵀ Q
  pack_kn(q, ld, N, hd, hpad, buf.pk.data());
  gemm_bf16(N, hd, ld_a / 2, ds_t, ld_a, buf.pk.data(), hpad, c, hpad);
  for (int64_t j = 0; j < N; ++j) to_bf16(c + j * hpad, dk + j * ld_g, hd);
}

bool use_bf16_kernel(const at::Tensor& qkv, const Geometry& g) {
  return qkv.scalar_type() == at::kBFloat16 && g.hd % 2 == 0 && tuning::env_int("LIFTPLUS_FAST_ATTN_GENERIC", 0) == 0;
}

std::tuple<at::Tensor, at::Tensor> fwd_bf16(const at::Tensor& qkv, const Geometry& g, double scale) {
  at::Tensor out = new_like_layout(qkv, g, g.D);
  at::Tensor lse = at::empty({g.B, g.H, g.N}, qkv.options().dtype(at::kFloat));
  const bf16* base = qkv.const_data_ptr<bf16>();
  bf16* obase = out.data_ptr<bf16>();
  float* lbase = lse.data_ptr<float>();
  at::parallel_for(0, g.B * g.H, 1, [&](int64_t begin, int64_t end) {
    Buffers buf;
    buf.reserve(g.N, g.hd);
    for (int64_t t = begin; t < end; ++t) {
      const bf16* q = base + g.qkv_head(t);
      fwd_head(q, q + g.D, q + 2 * g.D, g.qkv_row(), obase + g.out_head(t), g.out_row(), lbase + t * g.N, g.N, g.hd,
               static_cast<float>(scale), buf);
    }
  });
  return {out, lse};
}

at::Tensor bwd_bf16(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out, const at::Tensor& lse,
                    const Geometry& g, double scale) {
  at::Tensor grad = new_like_layout(qkv, g, 3 * g.D);
  const bf16* base = qkv.const_data_ptr<bf16>();
  const bf16* obase = out.const_data_ptr<bf16>();
  const bf16* gobase = grad_out.const_data_ptr<bf16>();
  const float* lbase = lse.const_data_ptr<float>();
  bf16* gbase = grad.data_ptr<bf16>();
  at::parallel_for(0, g.B * g.H, 1, [&](int64_t begin, int64_t end) {
    Buffers buf;
    buf.reserve(g.N, g.hd);
    for (int64_t t = begin; t < end; ++t) {
      const bf16* q = base + g.qkv_head(t);
      bf16* dq = gbase + g.qkv_head(t);
      const int64_t off_o = g.out_head(t);
      bwd_head(q, q + g.D, q + 2 * g.D, g.qkv_row(), obase + off_o, gobase + off_o, g.out_row(), lbase + t * g.N, dq,
               dq + g.D, dq + 2 * g.D, g.qkv_row(), g.N, g.hd, static_cast<float>(scale), buf);
    }
  });
  return grad;
}
#endif  // LPF_ATTN_BF16_KERNEL

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& qkv, int64_t num_heads, double scale,
                                                     bool batch_first) {
  const Geometry g = check_args(qkv, num_heads, batch_first);
#if LPF_ATTN_BF16_KERNEL
  if (use_bf16_kernel(qkv, g)) return fwd_bf16(qkv, g, scale);
#endif
  return fwd_generic(qkv, g, scale);
}

at::Tensor attention_bwd_cpu(const at::Tensor& grad_out_in, const at::Tensor& qkv, const at::Tensor& out_in,
                             const at::Tensor& lse_in, int64_t num_heads, double scale, bool batch_first) {
  const Geometry g = check_args(qkv, num_heads, batch_first);
  attention::check_bwd_args(grad_out_in, out_in, lse_in, qkv, g);
  const at::Tensor grad_out = grad_out_in.contiguous(), out = out_in.contiguous(), lse = lse_in.contiguous();
#if LPF_ATTN_BF16_KERNEL
  if (use_bf16_kernel(qkv, g)) return bwd_bf16(grad_out, qkv, out, lse, g, scale);
#endif
  return bwd_generic(grad_out, qkv, out, lse, g, scale);
}

bool attention_bf16_kernel() {
  return LPF_ATTN_BF16_KERNEL == 1;
}

}  // namespace

// No tensor arguments, so no backend key is computed for a call: the composite kernel serves
// it (the CPU entry below only records that the CPU library provides the op).
LPF_CPU_LIBRARY_IMPL(CompositeExplicitAutograd, m) {
  m.impl("attention_bf16_kernel", &attention_bf16_kernel);
}

LPF_CPU_LIBRARY_IMPL(CPU, m) {
  m.impl("attention_bf16_kernel", &attention_bf16_kernel);
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace LPF_CPU_NS
}  // namespace liftplus_fast
