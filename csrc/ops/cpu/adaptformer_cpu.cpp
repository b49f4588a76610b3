// Fused AdaptFormer forward/backward on CPU. Math and saved tensors: docs/ops.md, "AdaptFormer".
//
// Rows are split into one contiguous chunk per thread and each chunk is streamed in tiles of
// a few rows whose fp32 working set (H, Â, G, dH: tile × D each) stays in L2. Per tile the
// forward does LN → down → ReLU → up → scale → residual in one pass over A and M; the backward
// recomputes Â and H from A, μ and rstd, so only μ, rstd and the pre-ReLU Z are saved.
//
// The three small GEMM shapes of the op (X·Wᵀ row dots, C·W row expansion and the Cᵀ·X rank
// update of the weight gradients) use register-blocked micro-kernels on GCC vector types
// (one zmm per vector in the AVX-512 build; split into halves in the others). Every fp32
// buffer and every weight copy is padded with zeros to a whole number of vectors, so the inner
// loops have no tails. Parameter gradients are summed per chunk and then added in chunk order:
// no float atomics, and the result depends only on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "liftplus_fast/adaptformer.h"
#include "liftplus_fast/checks.h"
#include "liftplus_fast/cpu_capability.h"

#pragma GCC diagnostic ignored "-Wpsabi"

// Builds besides the baseline, chosen at run time (csrc/cpu_dispatch.cpp).
LPF_CPU_CAPABILITIES(avx2, avx512);

namespace liftplus_fast {
namespace LPF_CPU_NS {
namespace {

using math::RowStats;

// ---------------------------------------------------------------------------------------------
// Vector type: 64 bytes of the accumulation type.
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(64)));
  static constexpr int W = 16;
};
template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(64)));
  static constexpr int W = 8;
};

template <typename T>
using VecOf = typename Simd<T>::V;

template <typename T>
inline __attribute__((always_inline)) VecOf<T> vload(const T* p) {
  VecOf<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline __attribute__((always_inline)) void vstore(T* p, VecOf<T> v) {
  std::memcpy(p, &v, sizeof(v));
}
template <typename T>
inline __attribute__((always_inline)) VecOf<T> vbcast(T s) {
  return VecOf<T>{} + s;
}
// Tree reduction: the serial lane-by-lane sum costs as much as a short dot product.
inline __attribute__((always_inline)) float hsum(VecOf<float> v) {
  typedef float V8 __attribute__((vector_size(32)));
  typedef float V4 __attribute__((vector_size(16)));
  const V8 h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const V4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}
inline __attribute__((always_inline)) double hsum(VecOf<double> v) {
  typedef double V4 __attribute__((vector_size(32)));
  const V4 h = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  return (h[0] + h[2]) + (h[1] + h[3]);
}

// 64-byte aligned, zero-initialised scratch (zeros are the padding the kernels rely on).
template <typename T>
struct Buf {
  std::unique_ptr<T[], void (*)(void*)> p{nullptr, std::free};
  Buf() = default;
  explicit Buf(int64_t n) {
    size_t bytes = (static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T) + 63) / 64 * 64;
    p.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
    TORCH_CHECK(p, "adaptformer: could not allocate ", bytes, " bytes of scratch");
    std::memset(p.get(), 0, bytes);
  }
  T* get() const { return p.get(); }
};

// ---------------------------------------------------------------------------------------------
// Micro-kernels. Widths (ld*) and the reduction length over d are multiples of the vector width.

// out[i*ldo + j] = Σ_d X[i*ldx + d]·Wm[j*ldw + d] + bias[j], for RT rows × RJ columns.
template <typename T, int RT, int RJ>
inline void dots_block(const T* X, int64_t ldx, const T* Wm, int64_t ldw, int64_t Dp, T* out, int64_t ldo,
                       const T* bias) {
  using V = VecOf<T>;
  constexpr int W = Simd<T>::W;
  V acc[RT][RJ];
#pragma GCC unroll 4
  for (int i = 0; i < RT; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < RJ; ++j) acc[i][j] = V{};
  for (int64_t d = 0; d < Dp; d += W) {
    V x[RT];
#pragma GCC unroll 4
    for (int i = 0; i < RT; ++i) x[i] = vload(X + i * ldx + d);
#pragma GCC unroll 4
    for (int j = 0; j < RJ; ++j) {
      const V w = vload(Wm + j * ldw + d);
#pragma GCC unroll 4
      for (int i = 0; i < RT; ++i) acc[i][j] += x[i] * w;
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < RT; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < RJ; ++j) out[i * ldo + j] = hsum(acc[i][j]) + (bias ? bias[j] : T(0));
}

template <typename T, int RT>
inline void dots_rows(const T* X, int64_t ldx, const T* Wm, int64_t ldw, int64_t Dp, int64_t r, T* out, int64_t ldo,
                      const T* bias) {
  int64_t j = 0;
  for (; j + 4 <= r; j += 4)
    dots_block<T, RT, 4>(X, ldx, Wm + j * ldw, ldw, Dp, out + j, ldo, bias ? bias + j : nullptr);
  const T* b = bias ? bias + j : nullptr;
  switch (r - j) {
    case 3:
      dots_block<T, RT, 3>(X, ldx, Wm + j * ldw, ldw, Dp, out + j, ldo, b);
      break;
    case 2:
      dots_block<T, RT, 2>(X, ldx, Wm + j * ldw, ldw, Dp, out + j, ldo, b);
      break;
    case 1:
      dots_block<T, RT, 1>(X, ldx, Wm + j * ldw, ldw, Dp, out + j, ldo, b);
      break;
    default:
      break;
  }
}

// out[nt × r] = X[nt × Dp] · Wm[r × Dp]ᵀ (+ bias).
template <typename T>
void gemm_dots(const T* X, int64_t ldx, int64_t nt, const T* Wm, int64_t ldw, int64_t Dp, int64_t r, T* out,
               int64_t ldo, const T* bias) {
  int64_t i = 0;
  for (; i + 4 <= nt; i += 4) dots_rows<T, 4>(X + i * ldx, ldx, Wm, ldw, Dp, r, out + i * ldo, ldo, bias);
  switch (nt - i) {
    case 3:
      dots_rows<T, 3>(X + i * ldx, ldx, Wm, ldw, Dp, r, out + i * ldo, ldo, bias);
      break;
    case 2:
      dots_rows<T, 2>(X + i * ldx, ldx, Wm, ldw, Dp, r, out + i * ldo, ldo, bias);
      break;
    case 1:
      dots_rows<T, 1>(X + i * ldx, ldx, Wm, ldw, Dp, r, out + i * ldo, ldo, bias);
      break;
    default:
      break;
  }
}

// Y[i*ldy + d0 + k*W] = init + Σ_j C[i*ldc + j]·Wm[j*ldw + d0 + k*W], RT rows × RD vectors.
template <typename T, int RT, int RD>
inline void expand_block(const T* C, int64_t ldc, const T* Wm, int64_t ldw, int64_t r, T* Y, int64_t ldy,
                         const T* bias) {
  using V = VecOf<T>;
  constexpr int W = Simd<T>::W;
  V acc[RT][RD];
#pragma GCC unroll 4
  for (int k = 0; k < RD; ++k) {
    const V b0 = bias ? vload(bias + k * W) : V{};
#pragma GCC unroll 4
    for (int i = 0; i < RT; ++i) acc[i][k] = b0;
  }
  for (int64_t j = 0; j < r; ++j) {
    V w[RD];
#pragma GCC unroll 4
    for (int k = 0; k < RD; ++k) w[k] = vload(Wm + j * ldw + k * W);
#pragma GCC unroll 4
    for (int i = 0; i < RT; ++i) {
      const V c = vbcast<T>(C[i * ldc + j]);
#pragma GCC unroll 4
      for (int k = 0; k < RD; ++k) acc[i][k] += c * w[k];
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < RT; ++i)
#pragma GCC unroll 4
    for (int k = 0; k < RD; ++k) vstore(Y + i * ldy + k * W, acc[i][k]);
}

template <typename T, int RT>
inline void expand_rows(const T* C, int64_t ldc, const T* Wm, int64_t ldw, int64_t r, int64_t Dp, T* Y, int64_t ldy,
                        const T* bias) {
  constexpr int W = Simd<T>::W;
  constexpr int RD = 4;
  int64_t d = 0;
  for (; d + RD * W <= Dp; d += RD * W)
    expand_block<T, RT, RD>(C, ldc, Wm + d, ldw, r, Y + d, ldy, bias ? bias + d : nullptr);
  const T* b = bias ? bias + d : nullptr;
  switch ((Dp - d) / W) {
    case 3:
      expand_block<T, RT, 3>(C, ldc, Wm + d, ldw, r, Y + d, ldy, b);
      break;
    case 2:
      expand_block<T, RT, 2>(C, ldc, Wm + d, ldw, r, Y + d, ldy, b);
      break;
    case 1:
      expand_block<T, RT, 1>(C, ldc, Wm + d, ldw, r, Y + d, ldy, b);
      break;
    default:
      break;
  }
}

// Y[nt × Dp] = C[nt × r] · Wm[r × Dp] (+ bias).
template <typename T>
void gemm_expand(const T* C, int64_t ldc, int64_t nt, const T* Wm, int64_t ldw, int64_t r, int64_t Dp, T* Y,
                 int64_t ldy, const T* bias) {
  int64_t i = 0;
  for (; i + 4 <= nt; i += 4) expand_rows<T, 4>(C + i * ldc, ldc, Wm, ldw, r, Dp, Y + i * ldy, ldy, bias);
  switch (nt - i) {
    case 3:
      expand_rows<T, 3>(C + i * ldc, ldc, Wm, ldw, r, Dp, Y + i * ldy, ldy, bias);
      break;
    case 2:
      expand_rows<T, 2>(C + i * ldc, ldc, Wm, ldw, r, Dp, Y + i * ldy, ldy, bias);
      break;
    case 1:
      expand_rows<T, 1>(C + i * ldc, ldc, Wm, ldw, r, Dp, Y + i * ldy, ldy, bias);
      break;
    default:
      break;
  }
}

// Acc[j*lda + k*W] += Σ_t C[t*ldc + j]·X[t*ldx + k*W], RJ rows of Acc × RD vectors.
template <typename T, int RJ, int RD>
inline void rank_block(const T* C, int64_t ldc, const T* X, int64_t ldx, int64_t nt, T* Acc, int64_t lda) {
  using V = VecOf<T>;
  constexpr int W = Simd<T>::W;
  V acc[RJ][RD];
#pragma GCC unroll 4
  for (int j = 0; j < RJ; ++j)
#pragma GCC unroll 4
    for (int k = 0; k < RD; ++k) acc[j][k] = vload(Acc + j * lda + k * W);
  for (int64_t t = 0; t < nt; ++t) {
    V x[RD];
#pragma GCC unroll 4
    for (int k = 0; k < RD; ++k) x[k] = vload(X + t * ldx + k * W);
#pragma GCC unroll 4
    for (int j = 0; j < RJ; ++j) {
      const V c = vbcast<T>(C[t * ldc + j]);
#pragma GCC unroll 4
      for (int k = 0; k < RD; ++k) acc[j][k] += c * x[k];
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < RJ; ++j)
#pragma GCC unroll 4
    for (int k = 0; k < RD; ++k) vstore(Acc + j * lda + k * W, acc[j][k]);
}

template <typename T, int RJ>
inline void rank_cols(const T* C, int64_t ldc, const T* X, int64_t ldx, int64_t nt, int64_t Dp, T* Acc, int64_t lda) {
  constexpr int W = Simd<T>::W;
  constexpr int RD = 4;
  int64_t d = 0;
  for (; d + RD * W <= Dp; d += RD * W) rank_block<T, RJ, RD>(C, ldc, X + d, ldx, nt, Acc + d, lda);
  switch ((Dp - d) / W) {
    case 3:
      rank_block<T, RJ, 3>(C, ldc, X + d, ldx, nt, Acc + d, lda);
      break;
    case 2:
      rank_block<T, RJ, 2>(C, ldc, X + d, ldx, nt, Acc + d, lda);
      break;
    case 1:
      rank_block<T, RJ, 1>(C, ldc, X + d, ldx, nt, Acc + d, lda);
      break;
    default:
      break;
  }
}

// Acc[r × Dp] += C[nt × r]ᵀ · X[nt × Dp].
template <typename T>
void gemm_rank(const T* C, int64_t ldc, const T* X, int64_t ldx, int64_t nt, int64_t r, int64_t Dp, T* Acc,
               int64_t lda) {
  int64_t j = 0;
  for (; j + 4 <= r; j += 4) rank_cols<T, 4>(C + j, ldc, X, ldx, nt, Dp, Acc + j * lda, lda);
  switch (r - j) {
    case 3:
      rank_cols<T, 3>(C + j, ldc, X, ldx, nt, Dp, Acc + j * lda, lda);
      break;
    case 2:
      rank_cols<T, 2>(C + j, ldc, X, ldx, nt, Dp, Acc + j * lda, lda);
      break;
    case 1:
      rank_cols<T, 1>(C + j, ldc, X, ldx, nt, Dp, Acc + j * lda, lda);
      break;
    default:
      break;
  }
}

// ---------------------------------------------------------------------------------------------
// Row math.

template <typename T>
inline RowStats<T> row_stats(const T* x, int64_t D, T eps) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < D; ++d) sum += x[d];
  const T mean = sum / static_cast<T>(D);
  T sq = 0;
#pragma omp simd reduction(+ : sq)
  for (int64_t d = 0; d < D; ++d) {
    const T c = x[d] - mean;
    sq += c * c;
  }
  return math::ln_finalize<T>(mean, sq, D, eps);
}

// Row of scalar_t → acc_t; returns src itself when no conversion is needed.
template <typename scalar_t, typename acc_t>
inline const acc_t* row_as_acc(const scalar_t* src, int64_t D, acc_t* tmp) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) tmp[d] = static_cast<acc_t>(src[d]);
    return tmp;
  }
}

// Y = A + (M + s·U) for one row, rounded once to the output dtype.
template <typename scalar_t, typename acc_t>
inline void fwd_epilogue(const scalar_t* a, const scalar_t* m, const acc_t* u, acc_t s, int64_t D, scalar_t* out,
                         acc_t* tmp_a, acc_t* tmp_m) {
  const acc_t* x = row_as_acc<scalar_t, acc_t>(a, D, tmp_a);
  const acc_t* mm = row_as_acc<scalar_t, acc_t>(m, D, tmp_m);
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<scalar_t>(math::adapter_out<acc_t>(x[d], mm[d], s, u[d]));
}

// Streams of the next tile are fetched into L2 while this tile computes: without it the
// tile's compute and its DRAM reads alternate instead of overlapping (measured: ~3x slower
// per row once the activations no longer fit in L3).
template <typename T>
inline void prefetch_row(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 2);
}

inline int64_t round_up(int64_t x, int64_t m) {
  return (x + m - 1) / m * m;
}

// Tile height: the fp32 tiles (4 × tile × D in the backward) stay in L2; bigger bottlenecks
// want taller tiles so the r × D weight-gradient accumulators are revisited less often.
inline int64_t tile_rows(int64_t r) {
  return r <= 16 ? 16 : (r <= 64 ? 32 : 64);
}

// Chunks of rows, one per thread; partial sums are indexed by chunk, so reductions are
// deterministic for a given thread count.
inline int64_t num_chunks(int64_t N, int64_t tile) {
  if (N == 0) return 0;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (N + tile - 1) / tile));
}

// Parameters as zero-padded acc_t copies: [D] vectors → [Dp]; [r, D] matrices → [r, Dp].
template <typename acc_t>
struct Params {
  int64_t D, Dp, r;
  Buf<acc_t> gamma, beta, wd, bd, wut, bu;
  acc_t s;
};

template <typename acc_t>
void copy_vec(const at::Tensor& t, acc_t* dst) {
  const at::Tensor c = t.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  std::memcpy(dst, c.const_data_ptr<acc_t>(), sizeof(acc_t) * c.numel());
}

template <typename acc_t>
Params<acc_t> make_params(const at::Tensor& ln_w, const at::Tensor& ln_b, const at::Tensor& down_w,
                          const at::Tensor& down_b, const at::Tensor& up_w, const at::Tensor& up_b,
                          const at::Tensor& scale, int64_t D, int64_t r) {
  constexpr int W = Simd<acc_t>::W;
  Params<acc_t> p;
  p.D = D;
  p.r = r;
  p.Dp = round_up(D, W);
  p.gamma = Buf<acc_t>(p.Dp);
  p.beta = Buf<acc_t>(p.Dp);
  p.bu = Buf<acc_t>(p.Dp);
  p.bd = Buf<acc_t>(r);
  p.wd = Buf<acc_t>(r * p.Dp);
  p.wut = Buf<acc_t>(r * p.Dp);
  copy_vec<acc_t>(ln_w, p.gamma.get());
  copy_vec<acc_t>(ln_b, p.beta.get());
  copy_vec<acc_t>(up_b, p.bu.get());
  copy_vec<acc_t>(down_b, p.bd.get());
  const auto st = c10::CppTypeToScalarType<acc_t>::value;
  const at::Tensor wd = down_w.to(st).contiguous();
  const at::Tensor wut = up_w.to(st).t().contiguous();  // [r, D]: rows are the up-projection's columns
  for (int64_t j = 0; j < r; ++j) {
    std::memcpy(p.wd.get() + j * p.Dp, wd.const_data_ptr<acc_t>() + j * D, sizeof(acc_t) * D);
    std::memcpy(p.wut.get() + j * p.Dp, wut.const_data_ptr<acc_t>() + j * D, sizeof(acc_t) * D);
  }
  p.s = static_cast<acc_t>(scale.to(at::kDouble).item<double>());
  return p;
}

// ---------------------------------------------------------------------------------------------
// Argument checks (the Python wrapper checks too; these guard direct torch.ops calls).

constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;

// ---------------------------------------------------------------------------------------------
// Forward.

template <typename scalar_t>
void fwd_impl(const at::Tensor& a, const at::Tensor& m, const at::Tensor& ln_w, const at::Tensor& ln_b,
              const at::Tensor& down_w, const at::Tensor& down_b, const at::Tensor& up_w, const at::Tensor& up_b,
              const at::Tensor& scale, double eps, int64_t N, int64_t D, int64_t r, at::Tensor& y, at::Tensor& mean,
              at::Tensor& rstd, at::Tensor& z) {
  using acc_t = at::opmath_type<scalar_t>;
  const Params<acc_t> p = make_params<acc_t>(ln_w, ln_b, down_w, down_b, up_w, up_b, scale, D, r);
  const int64_t Dp = p.Dp;
  const acc_t eps_t = static_cast<acc_t>(eps);
  const acc_t s = p.s;
  const scalar_t* ap = a.const_data_ptr<scalar_t>();
  const scalar_t* mp = m.const_data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  acc_t* meanp = mean.data_ptr<acc_t>();
  acc_t* rstdp = rstd.data_ptr<acc_t>();
  acc_t* zp = z.data_ptr<acc_t>();
  const int64_t T = tile_rows(r);
  const int64_t chunks = num_chunks(N, T);

  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    Buf<acc_t> hbuf(T * Dp), ubuf(T * Dp), pbuf(T * r), row(Dp), row2(Dp);
    acc_t* H = hbuf.get();
    acc_t* U = ubuf.get();
    acc_t* P = pbuf.get();
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t rb = N * c / chunks, re = N * (c + 1) / chunks;
      for (int64_t t0 = rb; t0 < re; t0 += T) {
        const int64_t nt = std::min(T, re - t0);
        for (int64_t t = 0; t < nt; ++t) {
          if (t0 + T + t < re) {
            prefetch_row(ap + (t0 + T + t) * D, D);
            prefetch_row(mp + (t0 + T + t) * D, D);
          }
          const acc_t* x = row_as_acc<scalar_t, acc_t>(ap + (t0 + t) * D, D, row.get());
          const RowStats<acc_t> st = row_stats<acc_t>(x, D, eps_t);
          meanp[t0 + t] = st.mean;
          rstdp[t0 + t] = st.rstd;
          acc_t* h = H + t * Dp;
          const acc_t* g = p.gamma.get();
          const acc_t* b = p.beta.get();
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) h[d] = math::ln_affine<acc_t>(math::ln_xhat<acc_t>(x[d], st), g[d], b[d]);
        }
        acc_t* Z = zp + t0 * r;
        gemm_dots<acc_t>(H, Dp, nt, p.wd.get(), Dp, Dp, r, Z, r, p.bd.get());
        for (int64_t i = 0; i < nt * r; ++i) P[i] = math::relu<acc_t>(Z[i]);
        gemm_expand<acc_t>(P, r, nt, p.wut.get(), Dp, r, Dp, U, Dp, p.bu.get());
        for (int64_t t = 0; t < nt; ++t) {
          const int64_t off = (t0 + t) * D;
          fwd_epilogue<scalar_t, acc_t>(ap + off, mp + off, U + t * Dp, s, D, yp + off, row.get(), row2.get());
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adaptformer_fwd_cpu(
    const at::Tensor& a_in, const at::Tensor& m_in, const at::Tensor& ln_w, const at::Tensor& ln_b,
    const at::Tensor& down_w, const at::Tensor& down_b, const at::Tensor& up_w, const at::Tensor& up_b,
    const at::Tensor& scale, double eps) {
  const auto [D, r] = checks::adaptformer_fwd_args(a_in, m_in, ln_w, ln_b, down_w, down_b, up_w, up_b, scale, kDevice);
  const at::Tensor a = a_in.contiguous();
  const at::Tensor m = m_in.contiguous();
  const int64_t N = a.numel() / D;
  const auto acc_type = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor y = at::empty(a.sizes(), a.options());
  at::Tensor mean = at::empty({N}, a.options().dtype(acc_type));
  at::Tensor rstd = at::empty({N}, a.options().dtype(acc_type));
  at::Tensor z = at::empty({N, r}, a.options().dtype(acc_type));
  if (N == 0) return {y, mean, rstd, z};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "adaptformer_fwd_cpu", [&] {
    fwd_impl<scalar_t>(a, m, ln_w, ln_b, down_w, down_b, up_w, up_b, scale, eps, N, D, r, y, mean, rstd, z);
  });
  return {y, mean, rstd, z};
}

// ---------------------------------------------------------------------------------------------
// Backward.

template <typename acc_t>
struct Partials {
  Buf<acc_t> dwut, dwd, colg, dgamma, dbeta, dbd;
  acc_t ds1 = 0;  // Σ ⟨G·Wu, P⟩
  Partials() = default;
  Partials(int64_t r, int64_t Dp) : dwut(r * Dp), dwd(r * Dp), colg(Dp), dgamma(Dp), dbeta(Dp), dbd(r) {}
};

template <typename scalar_t>
void bwd_impl(const at::Tensor& gy, const at::Tensor& a, const at::Tensor& ln_w, const at::Tensor& ln_b,
              const at::Tensor& down_w, const at::Tensor& down_b, const at::Tensor& up_w, const at::Tensor& up_b,
              const at::Tensor& scale, const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& z, int64_t N,
              int64_t D, int64_t r, at::Tensor& ga, at::Tensor& g_lnw, at::Tensor& g_lnb, at::Tensor& g_dw,
              at::Tensor& g_db, at::Tensor& g_uw, at::Tensor& g_ub, at::Tensor& g_s) {
  using acc_t = at::opmath_type<scalar_t>;
  const Params<acc_t> p = make_params<acc_t>(ln_w, ln_b, down_w, down_b, up_w, up_b, scale, D, r);
  const int64_t Dp = p.Dp;
  const acc_t s = p.s;
  const scalar_t* ap = a.const_data_ptr<scalar_t>();
  const scalar_t* gp = gy.const_data_ptr<scalar_t>();
  const acc_t* meanp = mean.const_data_ptr<acc_t>();
  const acc_t* rstdp = rstd.const_data_ptr<acc_t>();
  const acc_t* zp = z.const_data_ptr<acc_t>();
  scalar_t* gap = ga.data_ptr<scalar_t>();
  const int64_t T = tile_rows(r);
  const int64_t chunks = num_chunks(N, T);
  std::vector<Partials<acc_t>> parts(chunks);
  const acc_t inv_d = acc_t(1) / static_cast<acc_t>(D);

  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    // fp32 G rows are used in place when no padding is needed; otherwise converted into gb.
    constexpr bool same_type = std::is_same_v<scalar_t, acc_t>;
    const bool g_in_place = same_type && D == Dp;
    Buf<acc_t> xhb(T * Dp), gb(g_in_place ? 0 : T * Dp), dhb(T * Dp), gwb(T * r), pb(T * r), dzb(T * r), row(Dp);
    acc_t *Xh = xhb.get(), *dH = dhb.get();
    acc_t *GW = gwb.get(), *P = pb.get(), *dZ = dzb.get();
    for (int64_t c = c0; c < c1; ++c) {
      Partials<acc_t>& pt = parts[c] = Partials<acc_t>(r, Dp);
      acc_t* colg = pt.colg.get();
      acc_t* dgam = pt.dgamma.get();
      acc_t* dbet = pt.dbeta.get();
      acc_t* dbd = pt.dbd.get();
      const acc_t* gam = p.gamma.get();
      const int64_t rb = N * c / chunks, re = N * (c + 1) / chunks;
      for (int64_t t0 = rb; t0 < re; t0 += T) {
        const int64_t nt = std::min(T, re - t0);
        for (int64_t t = 0; t < nt; ++t) {
          const int64_t off = (t0 + t) * D;
          if (t0 + T + t < re) {
            prefetch_row(ap + off + T * D, D);
            prefetch_row(gp + off + T * D, D);
          }
          const acc_t* x = row_as_acc<scalar_t, acc_t>(ap + off, D, row.get());
          const acc_t mu = meanp[t0 + t], rs = rstdp[t0 + t];
          acc_t* xh = Xh + t * Dp;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) xh[d] = math::ln_xhat<acc_t>(x[d], {mu, rs});
          if (!g_in_place) {
            acc_t* g = gb.get() + t * Dp;
            const scalar_t* gsrc = gp + off;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) g[d] = static_cast<acc_t>(gsrc[d]);
          }
        }
        const acc_t* G;
        int64_t ldg;
        if constexpr (same_type) {
          G = g_in_place ? gp + t0 * D : gb.get();
        } else {
          G = gb.get();
        }
        ldg = g_in_place ? D : Dp;
        // GW = G·Wu (dP before the scale), then dZ, dbd and the ⟨G·Wu, P⟩ part of ds.
        gemm_dots<acc_t>(G, ldg, nt, p.wut.get(), Dp, Dp, r, GW, r, nullptr);
        const acc_t* Z = zp + t0 * r;
        acc_t ds1 = 0;
        for (int64_t t = 0; t < nt; ++t) {
          for (int64_t j = 0; j < r; ++j) {
            const int64_t i = t * r + j;
            const acc_t pv = math::relu<acc_t>(Z[i]);
            P[i] = pv;
            ds1 += GW[i] * pv;
            const acc_t dz = math::relu_grad<acc_t>(s * GW[i], Z[i]);
            dZ[i] = dz;
            dbd[j] += dz;
          }
        }
        pt.ds1 += ds1;
        gemm_rank<acc_t>(P, r, G, ldg, nt, r, Dp, pt.dwut.get(), Dp);
        // dWd = dZᵀ·H = γ ⊙ (dZᵀ·Â) + β ⊗ dbd: accumulate against Â, apply γ and β once at the end.
        gemm_rank<acc_t>(dZ, r, Xh, Dp, nt, r, Dp, pt.dwd.get(), Dp);
        gemm_expand<acc_t>(dZ, r, nt, p.wd.get(), Dp, r, Dp, dH, Dp, nullptr);
        for (int64_t t = 0; t < nt; ++t) {
          const acc_t* dh = dH + t * Dp;
          const acc_t* xh = Xh + t * Dp;
          acc_t sum1 = 0, sum2 = 0;
#pragma omp simd reduction(+ : sum1, sum2)
          for (int64_t d = 0; d < D; ++d) {
            dgam[d] += dh[d] * xh[d];
            dbet[d] += dh[d];
            const acc_t dxh = dh[d] * gam[d];
            sum1 += dxh;
            sum2 += dxh * xh[d];
          }
          const acc_t c1m = sum1 * inv_d, c2m = sum2 * inv_d, rs = rstdp[t0 + t];
          const acc_t* g = G + t * ldg;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) colg[d] += g[d];
          scalar_t* out = gap + (t0 + t) * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d)
            out[d] = static_cast<scalar_t>(g[d] + math::ln_grad_input<acc_t>(dh[d] * gam[d], xh[d], rs, c1m, c2m));
        }
      }
    }
  });

  // Deterministic reduction of the per-chunk partial sums, in chunk order.
  Partials<acc_t> tot(r, Dp);
  for (int64_t c = 0; c < chunks; ++c) {
    const Partials<acc_t>& pt = parts[c];
    auto add = [](acc_t* dst, const acc_t* src, int64_t n) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
    };
    add(tot.dwut.get(), pt.dwut.get(), r * Dp);
    add(tot.dwd.get(), pt.dwd.get(), r * Dp);
    add(tot.colg.get(), pt.colg.get(), Dp);
    add(tot.dgamma.get(), pt.dgamma.get(), Dp);
    add(tot.dbeta.get(), pt.dbeta.get(), Dp);
    add(tot.dbd.get(), pt.dbd.get(), r);
    tot.ds1 += pt.ds1;
  }
  const auto acc_opts = a.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor dlnw = at::empty({D}, acc_opts), dlnb = at::empty({D}, acc_opts), dub = at::empty({D}, acc_opts);
  at::Tensor ddw = at::empty({r, D}, acc_opts), ddb = at::empty({r}, acc_opts), duw = at::empty({D, r}, acc_opts);
  acc_t ds = tot.ds1;
  for (int64_t d = 0; d < D; ++d) {
    dlnw.data_ptr<acc_t>()[d] = tot.dgamma.get()[d];
    dlnb.data_ptr<acc_t>()[d] = tot.dbeta.get()[d];
    dub.data_ptr<acc_t>()[d] = s * tot.colg.get()[d];
    ds += tot.colg.get()[d] * p.bu.get()[d];
  }
  for (int64_t j = 0; j < r; ++j) {
    ddb.data_ptr<acc_t>()[j] = tot.dbd.get()[j];
    const acc_t* acc = tot.dwd.get() + j * Dp;
    acc_t* dst = ddw.data_ptr<acc_t>() + j * D;
    for (int64_t d = 0; d < D; ++d)
      dst[d] = math::down_w_grad<acc_t>(p.gamma.get()[d], acc[d], p.beta.get()[d], tot.dbd.get()[j]);
    for (int64_t d = 0; d < D; ++d) duw.data_ptr<acc_t>()[d * r + j] = s * tot.dwut.get()[j * Dp + d];
  }
  g_lnw = dlnw.to(ln_w.scalar_type());
  g_lnb = dlnb.to(ln_b.scalar_type());
  g_dw = ddw.to(down_w.scalar_type());
  g_db = ddb.to(down_b.scalar_type());
  g_uw = duw.to(up_w.scalar_type());
  g_ub = dub.to(up_b.scalar_type());
  g_s = at::full(scale.sizes(), static_cast<double>(ds), scale.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
adaptformer_bwd_cpu(const at::Tensor& gy_in, const at::Tensor& a_in, const at::Tensor& ln_w, const at::Tensor& ln_b,
                    const at::Tensor& down_w, const at::Tensor& down_b, const at::Tensor& up_w, const at::Tensor& up_b,
                    const at::Tensor& scale, const at::Tensor& mean_in, const at::Tensor& rstd_in,
                    const at::Tensor& z_in) {
  const auto [D, r] = checks::adaptformer_bwd_args(gy_in, a_in, ln_w, ln_b, down_w, down_b, up_w, up_b, scale, mean_in,
                                                   rstd_in, z_in, kDevice);
  const int64_t N = a_in.numel() / D;

  const at::Tensor a = a_in.contiguous();
  const at::Tensor gy = gy_in.contiguous();
  const at::Tensor mean = mean_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  const at::Tensor z = z_in.contiguous();
  at::Tensor ga = at::empty(a.sizes(), a.options());
  at::Tensor g_lnw, g_lnb, g_dw, g_db, g_uw, g_ub, g_s;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "adaptformer_bwd_cpu", [&] {
    bwd_impl<scalar_t>(gy, a, ln_w, ln_b, down_w, down_b, up_w, up_b, scale, mean, rstd, z, N, D, r, ga, g_lnw, g_lnb,
                       g_dw, g_db, g_uw, g_ub, g_s);
  });
  return {ga, g_lnw, g_lnb, g_dw, g_db, g_uw, g_ub, g_s};
}

}  // namespace

LPF_CPU_LIBRARY_IMPL(CPU, m) {
  m.impl("adaptformer_fwd", &adaptformer_fwd_cpu);
  m.impl("adaptformer_bwd", &adaptformer_bwd_cpu);
}

}  // namespace LPF_CPU_NS
}  // namespace liftplus_fast
