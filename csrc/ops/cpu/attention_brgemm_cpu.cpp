// Multi-head self-attention on CPU through PyTorch's batch-reduce GEMM (at::native::cpublas::brgemm),
// the micro-kernel interface PyTorch's own CPU flash attention uses. oneDNN generates the kernel for
// the running CPU: AMX tiles where the CPU has them (bf16 operands, fp32 accumulation), AVX-512
// otherwise; where oneDNN's micro-kernels are not available, brgemm runs a plain BLAS GEMM. No
// compile flag of this file selects an instruction set.
//
// Same contract and arithmetic as attention_cpu.cpp's bf16 kernel: qkv read in place, one (image,
// head) per task with the whole N x N block in the thread's cache, S = QKᵀ and dP = dO·Vᵀ in fp32,
// P and dS rounded to the input dtype only as GEMM operands, only lse saved:
//   forward : S = QKᵀ; lse = logsumexp(scale·S); P = exp(scale·S − lse); O = P·V
//   backward: P from lse; dP = dO·Vᵀ; Δ = rowsum(dO ⊙ O); dS = P ⊙ (dP − Δ)·scale;
//             dV = Pᵀ·dO; dQ = dS·K; dK = dSᵀ·Q
// bf16 and fp32 (every GEMM's second operand B is copied once per head into the layout brgemm
// reads: VNNI pairs [K/2][N][2] for bf16 where the micro-kernels take them, plain [K][N]
// otherwise, the copy skipped where qkv's own rows already are B).
//
// brgemm exists from torch 2.6 (the package's floor) with this signature; without it the ops are
// not registered and attention_brgemm_available() is false, so the Python side never offers this
// path.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "liftplus_fast/attention.h"
#include "liftplus_fast/tuning.h"

// The element-wise loops around the GEMMs (softmax, its backward, rounding to bf16) are most of
// this file's time; where the compiler targets AVX-512 it vectorises them 16 lanes wide (GCC's
// default tuning for recent Xeons stops at 8). rows.h comes after, so its exp is compiled alike.
#if defined(__GNUC__) && !defined(__clang__) && defined(__AVX512F__)
#pragma GCC target("prefer-vector-width=512")
#endif
#include "liftplus_fast/rows.h"

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 6)
#define LPF_HAS_BRGEMM 1
#else
#define LPF_HAS_BRGEMM 0
#endif

namespace liftplus_fast {
namespace {

using attention::Geometry;
using bf16 = c10::BFloat16;

inline int64_t round_up(int64_t x, int64_t m) {
  return (x + m - 1) / m * m;
}

#if LPF_HAS_BRGEMM

// ---------------------------------------------------------------------------------------------
// Whether brgemm takes bf16 B in VNNI layout here. Asked once by running a 2 x 2 product: the
// answer depends on the torch build (oneDNN micro-kernels compiled in) and the CPU, and the query
// functions for it were renamed between torch releases, so running it is the portable question.
bool vnni_brgemm_runs() {
  static const bool ok = [] {
    const bf16 a[4] = {bf16(1.f), bf16(2.f), bf16(3.f), bf16(4.f)};
    const bf16 b_vnni[4] = {bf16(5.f), bf16(7.f), bf16(6.f), bf16(8.f)};  // B = [[5, 6], [7, 8]]
    float c[4] = {0.f, 0.f, 0.f, 0.f};
    try {
      at::native::cpublas::brgemm(2, 2, 2, 2, 2, 2, false, a, b_vnni, c, true);
      at::native::cpublas::brgemm_release();
    } catch (const c10::Error&) {
      return false;
    }
    return c[0] == 19.f && c[1] == 22.f && c[2] == 43.f && c[3] == 50.f;
  }();
  return ok;
}

// bf16 GEMMs take the VNNI layout where it runs (LIFTPLUS_FAST_BRGEMM_PLAIN=1 keeps the plain
// layout, so tests cover both on one machine); fp32 always takes the plain one.
template <typename T>
bool use_vnni() {
  if constexpr (std::is_same_v<T, float>) {
    return false;
  } else {
    return vnni_brgemm_runs() && tuning::env_int("LIFTPLUS_FAST_BRGEMM_PLAIN", 0) == 0;
  }
}

// An odd head width would be an odd K of QKᵀ and dO·Vᵀ, read in place from qkv: VNNI needs pairs.
template <typename T>
bool use_vnni(const Geometry& g) {
  return g.hd % 2 == 0 && use_vnni<T>();
}

// C[M, N] (fp32, ldc) = A[M, K] (rows of lda) · B (ldb, laid out as `vnni` says).
template <typename T>
inline void gemm(int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb, float* c,
                 int64_t ldc, bool vnni) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, /*add_C=*/false, a, b, c, vnni);
}

// The B operand of a product, K x N, from rows of a source with row stride ld: `rows_are_k`
// (B[k][n] = src[k·ld + n]: V, dO, K, Q as the right factor) or not (B[k][n] = src[n·ld + k]: Kᵀ,
// Vᵀ). VNNI: dst[k/2][n][k%2] with n < ldb, K padded with a zero row to even. Plain: dst[k][n].
// Returns the pointer to pass as B (src itself where it already is plain B).
template <typename T>
const T* operand_b(const T* src, int64_t ld, int64_t K, int64_t N, bool rows_are_k, bool vnni, int64_t ldb, T* dst,
                   int64_t* ldb_out) {
  if (!vnni && rows_are_k) {
    *ldb_out = ld;
    return src;
  }
  *ldb_out = ldb;
  if (!vnni) {  // plain transpose: dst[k][n] = src[n][k]
    for (int64_t n = 0; n < N; ++n) {
      const T* row = src + n * ld;
      for (int64_t k = 0; k < K; ++k) dst[k * ldb + n] = row[k];
    }
    return dst;
  }
  const int64_t pairs = (K + 1) / 2;
  for (int64_t p = 0; p < pairs; ++p) std::fill(dst + (p * ldb + N) * 2, dst + (p + 1) * ldb * 2, T(0.f));
  if (rows_are_k) {
    for (int64_t p = 0; p < pairs; ++p) {
      const T* r0 = src + (2 * p) * ld;
      T* out = dst + p * ldb * 2;
      if (2 * p + 1 < K) {
        const T* r1 = r0 + ld;
        for (int64_t n = 0; n < N; ++n) {
          out[2 * n] = r0[n];
          out[2 * n + 1] = r1[n];
        }
      } else {
        for (int64_t n = 0; n < N; ++n) {
          out[2 * n] = r0[n];
          out[2 * n + 1] = T(0.f);
        }
      }
    }
  } else {
    // Pairs along k are adjacent in each source row: copied as one word each.
    for (int64_t n = 0; n < N; ++n) {
      const T* row = src + n * ld;
      for (int64_t p = 0; p < K / 2; ++p) std::memcpy(dst + (p * ldb + n) * 2, row + 2 * p, 2 * sizeof(T));
      if (K % 2) {
        dst[((K / 2) * ldb + n) * 2] = row[K - 1];
        dst[((K / 2) * ldb + n) * 2 + 1] = T(0.f);
      }
    }
  }
  return dst;
}

// Rounds a row of fp32 to T (bf16: nearest even, by bits so the loop vectorises).
template <typename T>
inline void store_row(const float* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, sizeof(float) * n);
  } else {
    auto* bits = reinterpret_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) bits[i] = rows::float_to_bf16_bits(src[i]);
  }
}

// Rows of scores are ld_s = round_up(N, 16) floats: the loops below run over whole 16-lane
// blocks, the columns past N made neutral (−inf before exp, 0 after) instead of a scalar tail,
// which at N = 197 would cost as much as the 12 full blocks of a row.
using vfloat = float __attribute__((vector_size(4 * rows::kLanes)));
using vint = int32_t __attribute__((vector_size(4 * rows::kLanes)));

inline vfloat load_v(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store_v(float* p, vfloat v) {
  std::memcpy(p, &v, sizeof(v));
}
inline vint lane_index() {
  vint v;
  for (int l = 0; l < rows::kLanes; ++l) v[l] = l;
  return v;
}

// s ← scale·s for columns < n, −inf for n ≤ column < ld (a multiple of kLanes); returns the max.
inline float scale_and_max(float* s, int64_t n, int64_t ld, float scale) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const vint lanes = lane_index();
  vfloat mx = vfloat{} - kInf;
  for (int64_t j = 0; j < ld; j += rows::kLanes) {
    vfloat v = load_v(s + j) * scale;
    v = (lanes + static_cast<int32_t>(j)) < static_cast<int32_t>(n) ? v : vfloat{} - kInf;
    store_v(s + j, v);
    mx = v > mx ? v : mx;
  }
  float m = -kInf;
  for (int l = 0; l < rows::kLanes; ++l) m = mx[l] > m ? mx[l] : m;
  return m;
}

// x ← exp(x − m) over ld columns (a multiple of kLanes); returns the sum.
inline float exp_sum(float* x, int64_t ld, float m) {
  float acc[rows::kLanes] = {};
  for (int64_t j = 0; j < ld; j += rows::kLanes)
    for (int64_t l = 0; l < rows::kLanes; ++l) {
      const float e = rows::exp_fast(x[j + l] - m);
      x[j + l] = e;
      acc[l] += e;
    }
  float sum = 0.f;
  for (int64_t l = 0; l < rows::kLanes; ++l) sum += acc[l];
  return sum;
}

// dst = f · src, rounded to T.
template <typename T>
inline void store_scaled_row(const float* src, float f, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i] * f;
  } else {
    auto* bits = reinterpret_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) bits[i] = rows::float_to_bf16_bits(src[i] * f);
  }
}

template <typename T>
inline float as_float(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    return rows::bf16_bits_to_float(x.x);
  }
}

// Per-thread buffers of one (image, head) task. ld_s: fp32 rows of N scores (and the N of the
// products with N output columns); ld_a: rows of P / dSᵀ / Kᵀ as A operands, which is also the K
// of the products reducing over tokens (even, its padding column zero, for VNNI); ldb_d: B
// operands and outputs head_dim wide.
template <typename T>
struct Work {
  int64_t N, hd, ld_s, ld_a, ldb_d;
  bool vnni;
  std::vector<float> s, dp, c, cq, delta, lse;
  std::vector<T> p, ds, ds_b, kt, b;
  Work(int64_t N_, int64_t hd_, bool vnni_, bool backward) : N(N_), hd(hd_), vnni(vnni_) {
    ld_s = round_up(N, 16);
    ld_a = vnni ? round_up(N, 2) : N;
    ldb_d = round_up(hd, 16);
    s.resize(N * ld_s);
    c.resize(N * ldb_d);
    p.assign(N * ld_a, T(0.f));  // padding columns stay zero
    b.assign(std::max(round_up(hd, 2) * ld_s, ld_a * ldb_d), T(0.f));
    if (backward) {
      dp.assign(N * ld_s, 0.f);  // the plain layout leaves columns past N unwritten: keep them 0
      cq.resize(hd * ld_s);
      delta.assign(ld_s, 0.f);
      lse.assign(ld_s, std::numeric_limits<float>::infinity());
      ds.assign(N * ld_a, T(0.f));
      ds_b.assign(ld_a * ld_s, T(0.f));  // dSᵀ as a B operand (VNNI), padding rows/columns zero
      kt.assign(hd * ld_a, T(0.f));
    }
  }
  // N of a product with n output columns: oneDNN's AMX kernels run a column tail ~10x slower than
  // whole 16-column blocks (measured at N = 197), so VNNI products compute whole blocks (the
  // extra columns of C are never read; B's are zero). The plain layout reads B in place: exact N.
  int64_t cols(int64_t n) const { return vnni ? round_up(n, 16) : n; }
};

// S = X Yᵀ (fp32, [N, ld_s]) for X, Y [N, hd] rows (Q Kᵀ, K Qᵀ, V dOᵀ).
template <typename T>
void products_nt(const T* x, int64_t ld_x, const T* y, int64_t ld_y, float* out, Work<T>& w) {
  int64_t ldb;
  const T* by = operand_b(y, ld_y, w.hd, w.N, /*rows_are_k=*/false, w.vnni, w.ld_s, w.b.data(), &ldb);
  gemm(w.N, w.cols(w.N), w.hd, x, ld_x, by, ldb, out, w.ld_s, w.vnni);
}

// out = A · X for X one of qkv's parts or dO ([N, hd] rows of stride ld) and A [N, ld_a], rounded
// into out (row stride ld_out).
template <typename T>
void times_rows(const T* a, const T* x, int64_t ld, T* out, int64_t ld_out, Work<T>& w) {
  int64_t ldb;
  const T* bx = operand_b(x, ld, w.N, w.hd, /*rows_are_k=*/true, w.vnni, w.ldb_d, w.b.data(), &ldb);
  if constexpr (std::is_same_v<T, float>) {
    gemm(w.N, w.hd, w.N, a, w.ld_a, bx, ldb, out, ld_out, false);
  } else {
    gemm(w.N, w.cols(w.hd), w.ld_a, a, w.ld_a, bx, ldb, w.c.data(), w.ldb_d, w.vnni);
    for (int64_t i = 0; i < w.N; ++i) store_row(w.c.data() + i * w.ldb_d, out + i * ld_out, w.hd);
  }
}

template <typename T>
void fwd_head(const T* q, const T* k, const T* v, int64_t ld, T* o, int64_t ld_o, float* lse, float scale, Work<T>& w) {
  const int64_t N = w.N;
  products_nt(q, ld, k, ld, w.s.data(), w);
  for (int64_t i = 0; i < N; ++i) {
    float* s = w.s.data() + i * w.ld_s;
    const float m = scale_and_max(s, N, w.ld_s, scale);
    const float l = exp_sum(s, w.ld_s, m);
    store_scaled_row(s, 1.f / l, w.p.data() + i * w.ld_a, w.ld_a);  // the padding column: 0
    lse[i] = m + std::log(l);
  }
  times_rows(w.p.data(), v, ld, o, ld_o, w);
}

// Σ_d a[d]·b[d] in fp32 (kLanes partial sums, so the loop vectorises).
template <typename T>
float dot(const T* a, const T* b, int64_t n) {
  float acc[rows::kLanes] = {};
  int64_t i = 0;
  for (; i + rows::kLanes <= n; i += rows::kLanes)
    for (int64_t l = 0; l < rows::kLanes; ++l) acc[l] += as_float(a[i + l]) * as_float(b[i + l]);
  for (; i < n; ++i) acc[0] += as_float(a[i]) * as_float(b[i]);
  float sum = 0.f;
  for (int64_t l = 0; l < rows::kLanes; ++l) sum += acc[l];
  return sum;
}

// The backward works on the transposed scores, one key row j at a time, so that the two products
// reducing over queries (dV = Pᵀ·dO, dK = dSᵀ·Q) take Pᵀ and dSᵀ as the row-major A operands
// brgemm reads, and only head_dim x N blocks are ever transposed (Kᵀ, dQᵀ) instead of N x N ones:
//   Sᵀ = K·Qᵀ;  Pᵀ = exp(scale·Sᵀ − lse[i]);  dPᵀ = V·dOᵀ;  dSᵀ = Pᵀ ⊙ (dPᵀ − Δ[i])·scale
//   dV = Pᵀ·dO;  dK = dSᵀ·Q;  dQᵀ = Kᵀ·dSᵀ
template <typename T>
void bwd_head(const T* q, const T* k, const T* v, int64_t ld, const T* o, const T* dout, int64_t ld_o, const float* lse,
              T* dq, T* dk, T* dv, int64_t ld_g, float scale, Work<T>& w) {
  const int64_t N = w.N, hd = w.hd, ld_s = w.ld_s, ld_a = w.ld_a;
  // Δ and lse over ld_s columns: past N, Δ = 0 and lse = +inf, so P and dS are 0 there.
  float* delta = w.delta.data();
  float* lse_p = w.lse.data();
  for (int64_t i = 0; i < N; ++i) {
    delta[i] = dot(dout + i * ld_o, o + i * ld_o, hd);
    lse_p[i] = lse[i];
  }
  products_nt(k, ld, q, ld, w.s.data(), w);        // Sᵀ
  products_nt(v, ld, dout, ld_o, w.dp.data(), w);  // dPᵀ
  for (int64_t j = 0; j < N; ++j) {
    float* pt = w.s.data() + j * ld_s;
    float* dpt = w.dp.data() + j * ld_s;
    for (int64_t i = 0; i < ld_s; ++i) {
      const float e = rows::exp_fast(pt[i] * scale - lse_p[i]);
      pt[i] = e;
      dpt[i] = e * (dpt[i] - delta[i]) * scale;
    }
    store_row(pt, w.p.data() + j * ld_a, ld_a);
    store_row(dpt, w.ds.data() + j * ld_a, ld_a);
  }
  times_rows(w.p.data(), dout, ld_o, dv, ld_g, w);  // dV = Pᵀ dO
  times_rows(w.ds.data(), q, ld, dk, ld_g, w);      // dK = dSᵀ Q
  // dQᵀ = Kᵀ dSᵀ: A = Kᵀ [hd, ld_a], B = dSᵀ [tokens j, queries i].
  for (int64_t j = 0; j < N; ++j)
    for (int64_t d = 0; d < hd; ++d) w.kt[d * ld_a + j] = k[j * ld + d];
  const T* b = w.ds.data();
  int64_t ldb = ld_a;
  if (w.vnni) {  // pairs of key rows interleaved: ds_b[j/2][i][j%2]
    T* out = w.ds_b.data();
    for (int64_t j = 0; j < N; j += 2) {
      const float* r0 = w.dp.data() + j * ld_s;
      T* dst = out + (j / 2) * ld_s * 2;
      if (j + 1 < N) {
        const float* r1 = r0 + ld_s;
        for (int64_t i = 0; i < N; ++i) {
          dst[2 * i] = T(r0[i]);
          dst[2 * i + 1] = T(r1[i]);
        }
      } else {
        for (int64_t i = 0; i < N; ++i) dst[2 * i] = T(r0[i]);
      }
    }
    b = out;
    ldb = ld_s;
  }
  gemm(hd, w.cols(N), ld_a, w.kt.data(), ld_a, b, ldb, w.cq.data(), ld_s, w.vnni);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t d = 0; d < hd; ++d) dq[i * ld_g + d] = T(w.cq[d * ld_s + i]);
}

void check_dtype(const at::Tensor& qkv) {
  TORCH_CHECK(qkv.scalar_type() == at::kBFloat16 || qkv.scalar_type() == at::kFloat,
              "attention_brgemm: qkv must be bfloat16 or float32; got ", checks::describe(qkv));
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& qkv, const Geometry& g, double scale) {
  at::Tensor out = attention::new_like_layout(qkv, g, g.D);
  at::Tensor lse = at::empty({g.B, g.H, g.N}, qkv.options().dtype(at::kFloat));
  const T* base = qkv.const_data_ptr<T>();
  T* obase = out.data_ptr<T>();
  float* lbase = lse.data_ptr<float>();
  const bool vnni = use_vnni<T>(g);
  at::parallel_for(0, g.B * g.H, 1, [&](int64_t begin, int64_t end) {
    Work<T> w(g.N, g.hd, vnni, /*backward=*/false);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / g.H, h = t % g.H;
      const T* q = base + g.qkv_base(b) + h * g.hd;
      fwd_head(q, q + g.D, q + 2 * g.D, g.qkv_row(), obase + g.out_base(b) + h * g.hd, g.out_row(), lbase + t * g.N,
               static_cast<float>(scale), w);
    }
    if (vnni) at::native::cpublas::brgemm_release();
  });
  return {out, lse};
}

template <typename T>
at::Tensor bwd(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out, const at::Tensor& lse,
               const Geometry& g, double scale) {
  at::Tensor grad = attention::new_like_layout(qkv, g, 3 * g.D);
  const T* base = qkv.const_data_ptr<T>();
  const T* obase = out.const_data_ptr<T>();
  const T* gobase = grad_out.const_data_ptr<T>();
  const float* lbase = lse.const_data_ptr<float>();
  T* gbase = grad.data_ptr<T>();
  const bool vnni = use_vnni<T>(g);
  at::parallel_for(0, g.B * g.H, 1, [&](int64_t begin, int64_t end) {
    Work<T> w(g.N, g.hd, vnni, /*backward=*/true);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / g.H, h = t % g.H;
      const T* q = base + g.qkv_base(b) + h * g.hd;
      T* dq = gbase + g.qkv_base(b) + h * g.hd;
      const int64_t off_o = g.out_base(b) + h * g.hd;
      bwd_head(q, q + g.D, q + 2 * g.D, g.qkv_row(), obase + off_o, gobase + off_o, g.out_row(), lbase + t * g.N, dq,
               dq + g.D, dq + 2 * g.D, g.qkv_row(), static_cast<float>(scale), w);
    }
    if (vnni) at::native::cpublas::brgemm_release();
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor> attention_brgemm_fwd_cpu(const at::Tensor& qkv, int64_t num_heads, double scale,
                                                            bool batch_first) {
  const Geometry g = attention::check_args(qkv, num_heads, batch_first);
  check_dtype(qkv);
  if (qkv.scalar_type() == at::kFloat) return fwd<float>(qkv, g, scale);
  return fwd<bf16>(qkv, g, scale);
}

at::Tensor attention_brgemm_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out,
                                    const at::Tensor& lse, int64_t num_heads, double scale, bool batch_first) {
  const Geometry g = attention::check_args(qkv, num_heads, batch_first);
  check_dtype(qkv);
  attention::check_bwd_args(grad_out, out, lse, qkv, g);
  const at::Tensor go = grad_out.contiguous(), o = out.contiguous(), l = lse.contiguous();
  if (qkv.scalar_type() == at::kFloat) return bwd<float>(go, qkv, o, l, g, scale);
  return bwd<bf16>(go, qkv, o, l, g, scale);
}

#endif  // LPF_HAS_BRGEMM

// "" where brgemm is missing (torch older than 2.6), else the bf16 operand layout it runs here:
// "vnni" (oneDNN micro-kernels: AMX tiles where the CPU has them) or "plain" (a BLAS GEMM).
std::string attention_brgemm_layout() {
#if LPF_HAS_BRGEMM
  return use_vnni<bf16>() ? "vnni" : "plain";
#else
  return "";
#endif
}

}  // namespace

// No tensor arguments: the composite kernel serves calls (the CPU entry records that the CPU
// library provides the op).
TORCH_LIBRARY_IMPL(liftplus_fast, CompositeExplicitAutograd, m) {
  m.impl("attention_brgemm_layout", &attention_brgemm_layout);
}

TORCH_LIBRARY_IMPL(liftplus_fast, CPU, m) {
  m.impl("attention_brgemm_layout", &attention_brgemm_layout);
#if LPF_HAS_BRGEMM
  m.impl("attention_brgemm_fwd", &attention_brgemm_fwd_cpu);
  m.impl("attention_brgemm_bwd", &attention_brgemm_bwd_cpu);
#endif
}

}  // namespace liftplus_fast
