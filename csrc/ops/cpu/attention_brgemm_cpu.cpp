// Multi-head self-attention on CPU through PyTorch's batch-reduce GEMM (at::native::cpublas::brgemm),
// the micro-kernel interface PyTorch's own CPU flash attention uses. oneDNN generates the kernel for
// the running CPU: AMX tiles where the CPU has them (bf16 operands, fp32 accumulation), AVX-512
// otherwise; where oneDNN's micro-kernels are not available, brgemm runs a plain BLAS GEMM. No
// compile flag of this file selects an instruction set.
//
// Same contract as attention_cpu.cpp: qkv read in place, one (image, head) per task with the
// whole N x N block in the thread's cache, S = QKᵀ and dP = dO·Vᵀ in fp32, P and dS rounded to the
// input dtype only as GEMM operands, only lse saved:
//   forward : S = QKᵀ; m = max(scale·S); P̃ = exp(scale·S − m); l = rowsum(P̃); O = (P̃·V) / l;
//             lse = m + log(l)
//   backward: Sᵀ = K·Qᵀ; Pᵀ = exp(scale·Sᵀ − lse); dPᵀ = V·dOᵀ; Δ = rowsum(dO ⊙ O);
//             dSᵀ = Pᵀ ⊙ (dPᵀ − Δ)·scale; dV = Pᵀ·dO; dK = dSᵀ·Q; dQᵀ = Kᵀ·dSᵀ
// bf16 and fp32. Every product's second operand B is copied once per head into the layout brgemm
// reads: VNNI pairs [K/2][N][2] for bf16 where its micro-kernels take them, plain [K][N]
// otherwise (read in place where qkv's own rows already are B). On CPUs with AMX the products run
// in whole AMX tiles (16 rows, 16 columns, K of 32 for the reductions over tokens), padding with
// zeros; elsewhere at their own sizes (K even for VNNI pairs).
//
// brgemm exists with this signature from torch 2.6 (the package's floor); with an older torch the
// ops are not registered and attention_brgemm_layout() is "", so the Python side never offers this
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
#include "liftplus_fast/cpu_capability.h"
#include "liftplus_fast/tuning.h"

// The element-wise loops around the GEMMs (softmax, its backward, rounding to bf16) are most of
// this file's time; where the compiler targets AVX-512 it vectorises them 16 lanes wide (GCC's
// default tuning for recent Xeons stops at 8). rows.h comes after, so its exp is compiled alike.
#if defined(__GNUC__) && !defined(__clang__) && defined(__AVX512F__)
#pragma GCC target("prefer-vector-width=512")
#endif
#include "liftplus_fast/rows.h"
#include "liftplus_fast/vec.h"

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 6)
#define LPF_HAS_BRGEMM 1
#else
#define LPF_HAS_BRGEMM 0
#endif

// Builds besides the baseline, chosen at run time (csrc/cpu_dispatch.cpp): the GEMMs dispatch
// inside PyTorch (AMX tiles where present); the softmax and rounding loops around them gain from
// wider vectors.
LPF_CPU_CAPABILITIES(avx2, avx512, avx512_bf16);

namespace liftplus_fast {
namespace LPF_CPU_NS {
namespace {

using attention::Geometry;
using bf16 = c10::BFloat16;
using vec::kLog2e;
using vec::load_t;
using vec::store_t;
using vec::vfloat;
using vec::vint;

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

// Whether the products are shaped for AMX tiles (whole 16-row and 16-column tiles, K in blocks of
// kTileK; see Work): where oneDNN runs them on AMX, which it does on a CPU with AMX. Its AVX-512
// micro-kernels take any M and N and an even K, so elsewhere the products run unpadded.
// LIFTPLUS_FAST_BRGEMM_TILES=0/1 overrides (tests run both shapes on any CPU).
bool amx_shaped(bool vnni) {
  static const bool amx = cpu::supported_capability() >= cpu::Capability::kAMX;
  return vnni && tuning::env_int("LIFTPLUS_FAST_BRGEMM_TILES", amx ? 1 : 0) != 0;
}

// C[M, N] (fp32, ldc) = A[M, K] (rows of lda) · B (ldb, laid out as `vnni` says).
template <typename T>
inline void gemm(int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb, float* c,
                 int64_t ldc, bool vnni) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, /*add_C=*/false, a, b, c, vnni);
}

// VNNI operands hold bf16 pairs along K as one 32-bit word: B[k][n], B[k+1][n] -> word n of pair
// row k/2. The packers work on the bits (c10::BFloat16's copies do not vectorise).
inline const uint16_t* bits(const bf16* p) {
  return reinterpret_cast<const uint16_t*>(p);
}

// B[k][n] = src[k·ld + n] for k < K, 0 for K <= k < Kpad (Kpad even), n < N; columns up to ldb
// stay as they are (zero from the buffer's start).
void pack_rows_vnni(const bf16* src, int64_t ld, int64_t K, int64_t Kpad, int64_t N, int64_t ldb, bf16* dst) {
  auto* out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t p = 0; p < Kpad / 2; ++p) {
    uint32_t* row = out + p * ldb;
    const int64_t k = 2 * p;
    if (k + 1 < K) {
      const uint16_t* r0 = bits(src + k * ld);
      const uint16_t* r1 = bits(src + (k + 1) * ld);
      for (int64_t n = 0; n < N; ++n) row[n] = static_cast<uint32_t>(r0[n]) | static_cast<uint32_t>(r1[n]) << 16;
    } else if (k < K) {
      const uint16_t* r0 = bits(src + k * ld);
      for (int64_t n = 0; n < N; ++n) row[n] = r0[n];
    } else {
      std::fill(row, row + N, 0u);
    }
  }
}

// B[k][n] = src[n·ld + k] (K even: each pair is one word of a source row), n < N: a transpose of
// 32-bit words, in 16 x 16 blocks in registers where whole blocks fit.
void pack_cols_vnni(const bf16* src, int64_t ld, int64_t K, int64_t N, int64_t ldb, bf16* dst) {
  auto* out = reinterpret_cast<uint32_t*>(dst);
  const int64_t words = K / 2, n_whole = N / 16 * 16, p_whole = words / 16 * 16;
  for (int64_t n0 = 0; n0 < n_whole; n0 += 16)
    for (int64_t p0 = 0; p0 < p_whole; p0 += 16) {
      vec::vuint r[vec::kLanes];
      for (int i = 0; i < vec::kLanes; ++i) std::memcpy(&r[i], src + (n0 + i) * ld + 2 * p0, sizeof(r[i]));
      vec::transpose16(r);
      for (int c = 0; c < vec::kLanes; ++c) std::memcpy(out + (p0 + c) * ldb + n0, &r[c], sizeof(r[c]));
    }
  for (int64_t n = 0; n < N; ++n) {
    const bf16* row = src + n * ld;
    for (int64_t p = n < n_whole ? p_whole : 0; p < words; ++p)
      std::memcpy(out + p * ldb + n, row + 2 * p, sizeof(uint32_t));
  }
}

// The B operand of a product, K x N, from a source with row stride ld whose rows are k
// (`rows_are_k`: V, dO, K, Q as right factors) or n (Kᵀ, Qᵀ, dOᵀ). VNNI (bf16): pairs along K
// packed into dst (ldb words per pair row), K padded with zero rows to Kpad. Plain: rows-are-k
// sources are read in place, the others transposed into dst. Returns B and sets its ldb.
template <typename T>
const T* operand_b(const T* src, int64_t ld, int64_t K, int64_t Kpad, int64_t N, bool rows_are_k, bool vnni,
                   int64_t ldb, T* dst, int64_t* ldb_out) {
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
  } else if constexpr (std::is_same_v<T, bf16>) {
    if (rows_are_k) {
      pack_rows_vnni(src, ld, K, Kpad, N, ldb, dst);
    } else {
      pack_cols_vnni(src, ld, K, N, ldb, dst);
    }
  }
  return dst;
}

// Rounds a row of fp32 to T (bf16: nearest even), times f.
template <typename T>
inline void store_row(const float* src, T* dst, int64_t n, float f = 1.f) {
  int64_t i = 0;
  for (; i + vec::kLanes <= n; i += vec::kLanes) store_t(dst + i, vec::load(src + i) * f);
  if constexpr (std::is_same_v<T, float>) {
    for (; i < n; ++i) dst[i] = src[i] * f;
  } else {
    for (; i < n; ++i) dst[i].x = rows::float_to_bf16_bits(src[i] * f);
  }
}

// Rows of scores are ld_s = round_up(N, 16) floats: the loops below run over whole 16-lane
// blocks, the columns past N masked in the last one (never read: the GEMMs leave them unwritten
// where products run at their own sizes) instead of a scalar tail, which at N = 197 would cost as
// much as the 12 full blocks of a row.
//
// max over columns < n of scale·s.
inline float scaled_max(const float* s, int64_t n, float scale) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  vfloat mx = vfloat{} - kInf;
  int64_t j = 0;
  for (; j + vec::kLanes <= n; j += vec::kLanes) {
    const vfloat v = vec::load(s + j) * scale;
    mx = v > mx ? v : mx;
  }
  if (j < n) {
    const vfloat v = vec::load(s + j) * scale;
    mx = vec::lane_index() + static_cast<int32_t>(j) < static_cast<int32_t>(n) && v > mx ? v : mx;
  }
  float m = -kInf;
  for (int l = 0; l < vec::kLanes; ++l) m = mx[l] > m ? mx[l] : m;
  return m;
}

// out ← exp(scale·s − m) rounded to T for columns < n, 0 for n ≤ column < ld (a multiple of
// kLanes: the zeros are the padding of P as a GEMM operand); returns the sum of the unrounded
// values.
template <typename T>
inline float exp_store(const float* s, int64_t n, int64_t ld, float scale, float m, T* out) {
  vfloat acc = vfloat{};
  const float a = scale * kLog2e, mb = m * kLog2e;
  const int64_t whole = n / vec::kLanes * vec::kLanes;
  int64_t j = 0;
  for (; j < whole; j += vec::kLanes) {
    const vfloat e = vec::exp2(vec::load(s + j) * a - mb);
    store_t(out + j, e);
    acc += e;
  }
  for (; j < ld; j += vec::kLanes) {
    vfloat e = vec::exp2(vec::load(s + j) * a - mb);
    e = vec::lane_index() + static_cast<int32_t>(j) < static_cast<int32_t>(n) ? e : vfloat{};
    store_t(out + j, e);
    acc += e;
  }
  return vec::sum(acc);
}

template <typename T>
inline float as_float(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    return rows::bf16_bits_to_float(x.x);
  }
}

// AMX multiplies bf16 in K blocks of 32: a product whose K is not a multiple of 32 runs its tail
// through a second tile configuration, ~2x slower in all at K = 197 (measured, oneDNN 3.12).
constexpr int64_t kTileK = 32;

// The next task's operands, pulled into the L2 cache one token row at a time while this task
// runs its element-wise loops: a head's slice of a token row is a few cache lines every few KB,
// which the hardware prefetchers do not run ahead of (measured: the first pass over a head's
// rows was a tenth of the kernel's time without this).
struct Ahead {
  static constexpr int kMax = 5;
  const char* src[kMax] = {};
  int64_t stride = 0, stride_o = 0, bytes = 0;  // row strides of qkv and of O/dO, slice bytes
  int n = 0, n_qkv = 0;                         // sources, of which the first n_qkv are in qkv
  void add(const void* p, bool in_qkv) {
    src[n++] = static_cast<const char*>(p);
    n_qkv += in_qkv;
  }
  void row(int64_t i) const {
    for (int s = 0; s < n; ++s) {
      const char* r = src[s] + i * (s < n_qkv ? stride : stride_o);
      for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(r + off, 0, 2);
    }
  }
};

// Per-thread buffers of one (image, head) task.
//   ld_s: fp32 score rows (N rounded up to 16), also the N of products with N output columns;
//   kn:   K of the products reducing over tokens (P·V, Pᵀ·dO, dSᵀ·Q, Kᵀ·dSᵀ): N, rounded up to
//         kTileK with zero padding for AMX tiles, to even for other VNNI products; also the row
//         length of their A operands;
//   mp:   rows of every product's A and C buffers: N, or N rounded up to 16 for AMX tiles (a row
//         tail costs like a whole second product there, measured at N = 197);
//   la:   row stride of those A operands (at least ld_s, so whole 16-lane blocks fit a row);
//   ldb_d: B operands and outputs head_dim wide.
template <typename T>
struct Work {
  int64_t N, hd, ld_s, kn, la, mp, hp, ldb_d;
  bool vnni, tiles;
  Ahead ahead;
  std::vector<float> s, dp, c, cq, delta, lse, inv;
  std::vector<T> p, ds, ds_b, kt, b, a_tail;
  Work(int64_t N_, int64_t hd_, bool vnni_, bool backward) : N(N_), hd(hd_), vnni(vnni_), tiles(amx_shaped(vnni_)) {
    ld_s = round_up(N, 16);
    kn = vnni ? round_up(N, tiles ? kTileK : 2) : N;
    la = std::max(kn, ld_s);
    mp = tiles ? round_up(N, 16) : N;
    hp = tiles ? round_up(hd, 16) : hd;
    ldb_d = round_up(hd, 16);
    s.resize(mp * ld_s);
    c.resize(mp * ldb_d);
    inv.resize(N);
    // Padding rows and columns of the A operands below stay zero: only [N, N] / [hd, N] is written.
    p.assign(mp * la, T(0.f));
    b.assign(std::max(round_up(hd, 2) * ld_s, kn * ldb_d), T(0.f));
    a_tail.assign(16 * hd, T(0.f));
    if (backward) {
      dp.assign(mp * ld_s, 0.f);  // the plain layout leaves columns past N unwritten: keep them 0
      cq.resize(hp * ld_s);
      delta.assign(ld_s, 0.f);
      lse.assign(ld_s, std::numeric_limits<float>::infinity());
      ds.assign(mp * la, T(0.f));
      ds_b.assign(kn * ld_s, T(0.f));
      kt.assign(hp * la, T(0.f));
    }
  }
  // N of a product with n output columns: oneDNN's AMX kernels run a column tail ~10x slower than
  // whole 16-column blocks (measured at N = 197), so AMX-shaped products compute whole blocks
  // (the extra columns of C are never read; B's are zero). Otherwise exact N.
  int64_t cols(int64_t n) const { return tiles ? round_up(n, 16) : n; }
};

// C = A·B for A = N rows of qkv or dO read in place (row stride lda, K = hd). AMX-shaped: whole
// 16-row tiles in place, the last N % 16 rows from a zero-padded copy (reading past row N would
// leave the tensor), so that C's rows up to mp are written.
template <typename T>
void gemm_rows_in_place(int64_t ncols, const T* a, int64_t lda, const T* b, int64_t ldb, float* c, int64_t ldc,
                        Work<T>& w) {
  const int64_t whole = w.tiles ? w.N / 16 * 16 : w.N;
  if (whole > 0) gemm(whole, ncols, w.hd, a, lda, b, ldb, c, ldc, w.vnni);
  if (whole == w.N) return;
  for (int64_t r = 0; r < w.N - whole; ++r)
    std::memcpy(w.a_tail.data() + r * w.hd, a + (whole + r) * lda, sizeof(T) * w.hd);
  gemm(16, ncols, w.hd, w.a_tail.data(), w.hd, b, ldb, c + whole * ldc, ldc, w.vnni);
}

// S = X Yᵀ (fp32, [N, ld_s]) for X, Y [N, hd] rows (Q Kᵀ, K Qᵀ, V dOᵀ).
template <typename T>
void products_nt(const T* x, int64_t ld_x, const T* y, int64_t ld_y, float* out, Work<T>& w) {
  int64_t ldb;
  const T* by = operand_b(y, ld_y, w.hd, w.hd, w.N, /*rows_are_k=*/false, w.vnni, w.ld_s, w.b.data(), &ldb);
  gemm_rows_in_place(w.cols(w.N), x, ld_x, by, ldb, out, w.ld_s, w);
}

// out = diag(f) · A · X for X one of qkv's parts or dO ([N, hd] rows of stride ld) and A [mp, kn],
// rounded into out (row stride ld_out); f = 1 when absent.
template <typename T>
void times_rows(const T* a, const T* x, int64_t ld, T* out, int64_t ld_out, Work<T>& w, const float* f = nullptr) {
  int64_t ldb;
  const T* bx = operand_b(x, ld, w.N, w.kn, w.hd, /*rows_are_k=*/true, w.vnni, w.ldb_d, w.b.data(), &ldb);
  gemm(w.mp, w.cols(w.hd), w.kn, a, w.la, bx, ldb, w.c.data(), w.ldb_d, w.vnni);
  for (int64_t i = 0; i < w.N; ++i) store_row(w.c.data() + i * w.ldb_d, out + i * ld_out, w.hd, f ? f[i] : 1.f);
}

// The forward keeps P unnormalised (exp(scale·S − max) rounded to T) and divides O's rows by the
// row sums instead: N x hd multiplications rather than N x N.
template <typename T>
void fwd_head(const T* q, const T* k, const T* v, int64_t ld, T* o, int64_t ld_o, float* lse, float scale, Work<T>& w) {
  const int64_t N = w.N;
  products_nt(q, ld, k, ld, w.s.data(), w);
  for (int64_t i = 0; i < N; ++i) {
    float* s = w.s.data() + i * w.ld_s;
    const float m = scaled_max(s, N, scale);
    const float l = exp_store(s, N, w.ld_s, scale, m, w.p.data() + i * w.la);
    w.inv[i] = 1.f / l;
    lse[i] = m + std::log(l);
    w.ahead.row(i);
  }
  times_rows(w.p.data(), v, ld, o, ld_o, w, w.inv.data());
}

// Σ_d a[d]·b[d] in fp32.
template <typename T>
float dot(const T* a, const T* b, int64_t n) {
  vfloat acc = vfloat{};
  int64_t i = 0;
  for (; i + vec::kLanes <= n; i += vec::kLanes) acc += load_t(a + i) * load_t(b + i);
  float sum = vec::sum(acc);
  for (; i < n; ++i) sum += as_float(a[i]) * as_float(b[i]);
  return sum;
}

// dst[c·ld_dst + r] = src[r·ld + c] for r < rows_n, c < cols, in 16 x 16 blocks: whole ones in
// registers (source rows read up to a multiple of 16 columns, so ld must allow it), the rows past
// the last whole block of 16 one value at a time. T rounds from S (fp32 to bf16) or copies.
template <typename S, typename T>
void transpose(const S* src, int64_t ld, int64_t rows_n, int64_t cols, T* dst, int64_t ld_dst) {
  const int64_t r_whole = rows_n / 16 * 16;
  for (int64_t r0 = 0; r0 < r_whole; r0 += 16)
    for (int64_t c0 = 0; c0 < cols; c0 += 16)
      vec::transpose_block(src + r0 * ld + c0, ld, dst + c0 * ld_dst + r0, ld_dst,
                           static_cast<int>(std::min<int64_t>(16, cols - c0)));
  for (int64_t r = r_whole; r < rows_n; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + r] = static_cast<T>(as_float(src[r * ld + c]));
}

// The backward works on the transposed scores, one key row j at a time, so that the two products
// reducing over queries (dV = Pᵀ·dO, dK = dSᵀ·Q) take Pᵀ and dSᵀ as the row-major A operands
// brgemm reads, and only head_dim x N blocks are ever transposed (Kᵀ, dQᵀ) instead of N x N ones:
//   Sᵀ = K·Qᵀ;  Pᵀ = exp(scale·Sᵀ − lse[i]);  dPᵀ = V·dOᵀ;  dSᵀ = Pᵀ ⊙ (dPᵀ − Δ[i])·scale
//   dV = Pᵀ·dO;  dK = dSᵀ·Q;  dQᵀ = Kᵀ·dSᵀ
template <typename T>
void bwd_head(const T* q, const T* k, const T* v, int64_t ld, const T* o, const T* dout, int64_t ld_o, const float* lse,
              T* dq, T* dk, T* dv, int64_t ld_g, float scale, Work<T>& w) {
  const int64_t N = w.N, hd = w.hd, ld_s = w.ld_s, kn = w.kn, la = w.la;
  // Δ and lse over ld_s columns: past N, Δ = 0 and lse = +inf, so P and dS are 0 there.
  // (lse in log2 units, as exp2_v takes it.)
  float* delta = w.delta.data();
  float* lse2 = w.lse.data();
  for (int64_t i = 0; i < N; ++i) {
    delta[i] = dot(dout + i * ld_o, o + i * ld_o, hd);
    lse2[i] = lse[i] * kLog2e;
  }
  products_nt(k, ld, q, ld, w.s.data(), w);        // Sᵀ
  products_nt(v, ld, dout, ld_o, w.dp.data(), w);  // dPᵀ
  const float scale2 = scale * kLog2e;
  for (int64_t j = 0; j < N; ++j) {
    const float* pt = w.s.data() + j * ld_s;
    const float* dpt = w.dp.data() + j * ld_s;
    T* p_row = w.p.data() + j * la;
    T* ds_row = w.ds.data() + j * la;
    w.ahead.row(j);
    for (int64_t i = 0; i < ld_s; i += vec::kLanes) {
      const vfloat e = vec::exp2(vec::load(pt + i) * scale2 - vec::load(lse2 + i));
      store_t(p_row + i, e);
      store_t(ds_row + i, e * (vec::load(dpt + i) - vec::load(delta + i)) * scale);
    }
  }
  times_rows(w.p.data(), dout, ld_o, dv, ld_g, w);  // dV = Pᵀ dO
  times_rows(w.ds.data(), q, ld, dk, ld_g, w);      // dK = dSᵀ Q
  // dQᵀ = Kᵀ dSᵀ: A = Kᵀ [hp, kn], B = dSᵀ [tokens j, queries i].
  transpose(k, ld, N, hd, w.kt.data(), la);
  int64_t ldb;
  const T* b = operand_b(w.ds.data(), la, N, kn, N, /*rows_are_k=*/true, w.vnni, ld_s, w.ds_b.data(), &ldb);
  gemm(w.hp, w.cols(N), kn, w.kt.data(), la, b, ldb, w.cq.data(), ld_s, w.vnni);
  transpose(w.cq.data(), ld_s, hd, N, dq, ld_g);
}

// The Ahead of a task whose q slice starts at q (none if null), with its O and dO slices where given.
template <typename T>
Ahead ahead_of(const Geometry& g, const T* q, const T* o = nullptr, const T* dout = nullptr) {
  Ahead a;
  if (q == nullptr) return a;
  a.stride = g.qkv_row() * static_cast<int64_t>(sizeof(T));
  a.stride_o = g.out_row() * static_cast<int64_t>(sizeof(T));
  a.bytes = g.hd * static_cast<int64_t>(sizeof(T));
  for (int part = 0; part < 3; ++part) a.add(q + part * g.D, true);
  if (o != nullptr) a.add(o, false);
  if (dout != nullptr) a.add(dout, false);
  return a;
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
      const T* q = base + g.qkv_head(t);
      w.ahead = ahead_of<T>(g, t + 1 < end ? base + g.qkv_head(t + 1) : nullptr);
      fwd_head(q, q + g.D, q + 2 * g.D, g.qkv_row(), obase + g.out_head(t), g.out_row(), lbase + t * g.N,
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
      const T* q = base + g.qkv_head(t);
      T* dq = gbase + g.qkv_head(t);
      const int64_t off_o = g.out_head(t);
      const int64_t n = t + 1;
      w.ahead = n < end ? ahead_of<T>(g, base + g.qkv_head(n), obase + g.out_head(n), gobase + g.out_head(n)) : Ahead{};
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
LPF_CPU_LIBRARY_IMPL(CompositeExplicitAutograd, m) {
  m.impl("attention_brgemm_layout", &attention_brgemm_layout);
}

LPF_CPU_LIBRARY_IMPL(CPU, m) {
  m.impl("attention_brgemm_layout", &attention_brgemm_layout);
#if LPF_HAS_BRGEMM
  m.impl("attention_brgemm_fwd", &attention_brgemm_fwd_cpu);
  m.impl("attention_brgemm_bwd", &attention_brgemm_bwd_cpu);
#endif
}

}  // namespace LPF_CPU_NS
}  // namespace liftplus_fast
