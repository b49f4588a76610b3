// Fused AdaptFormer forward/backward on CUDA. Math and saved tensors: docs/ops.md, "AdaptFormer".
//
// Small path (r <= 64, D <= 1024; ViT-B/L with every published bottleneck up to 64): one warp
// per row, the row held in registers (lane l owns columns l, l+32, ...). Per row the forward
// does LN → down → ReLU → up → scale → residual reading A and M once; each bottleneck unit j is
// one warp dot product (butterfly shuffles, so every lane holds the same z_j and takes the same
// ReLU branch) followed by the rank-1 update of U. The backward recomputes Â from A, μ and rstd:
//   rows kernel:    dA, dZ (to a [N, r] workspace) and per-block partial sums of colsum(dZ)
//                   and ⟨G·Wu, P⟩;
//   weights kernel: per-chunk partials of Pᵀ·G and dZᵀ·Â (thread per column, r in groups of
//                   16) and of colsum(G), colsum(dH ⊙ Â), colsum(dH) (dH rebuilt from dZ);
//   colsum kernel:  sums the partials over blocks/chunks in a fixed order;
//   finalize:       applies s, γ, β (the shared formulas) and writes the parameter gradients.
// Grid sizes depend only on N, so results are bitwise reproducible; there are no float atomics.
// The column sums live in the weights kernel, not in the rows kernel, because a warp-per-row
// kernel would need 3·D/32 more registers per lane for them (measured with ptxas -v at D = 768:
// 238 registers, one block per SM; spills at D = 1024). The price is a second read of A and G.
//
// Other shapes (r > 64, D > 1024, float64 for gradcheck) run the cuBLAS path: the GEMMs via
// ATen (addmm/mm on [N, D] × [D, r]), the residual epilogue and the LN input gradient as fused
// element-wise kernels.
//
// Element-wise math comes from liftplus_fast/{layernorm,adaptformer}.h, which the CPU kernel
// uses too, so the CPU tests cover the formulas; the indexing here has no CPU test.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "liftplus_fast/adaptformer.h"
#include "liftplus_fast/checks.h"

namespace liftplus_fast {
namespace {

using math::RowStats;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxSmallR = 64;
constexpr int kMaxSmallD = 1024;
// Weights are staged in shared memory only below the default 48 KB limit (no opt-in needed);
// larger ones are read through L1/L2, where they stay (r·D·4 ≤ 256 KB).
constexpr int64_t kSmemWeightBytes = 48 * 1024;
// Upper bounds on blocks/chunks that own a partial sum: fixed numbers (not the SM count) keep
// the reduction order, and so the result, the same on every GPU.
constexpr int64_t kMaxRowBlocks = 256;
constexpr int64_t kMaxWeightChunks = 64;
constexpr int64_t kMinChunkRows = 256;
constexpr int kRJ = 16;  // bottleneck units per block in the weights kernel

// Two blocks per SM (<= 128 registers) keep twice the row loads in flight; without the bound
// ptxas gives the D = 768 row kernels 155-188 registers (one block per SM), with it 128 and
// ~40 bytes of spills (ptxas -v, sm_90). Unmeasured on hardware: revisit with a GPU. At
// D = 1024 a row needs 32 floats per lane and array, so one block.
template <int KPER>
constexpr int kRowMinBlocks = KPER <= 24 ? 2 : 1;

__device__ __forceinline__ float warp_sum(float v) {
  // xor butterfly: every lane ends with the same value (a+b == b+a exactly at each level).
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// ---------------------------------------------------------------------------------------------
// Small path: forward.

template <typename scalar_t, int KPER>
__global__ void __launch_bounds__(kThreads, kRowMinBlocks<KPER>)
    fwd_rows_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ m, const float* __restrict__ gamma,
                    const float* __restrict__ beta, const float* __restrict__ wd, const float* __restrict__ bd,
                    const float* __restrict__ wut, const float* __restrict__ bu, const float* __restrict__ scale,
                    float eps, int64_t N, int D, int r, bool smem_w, scalar_t* __restrict__ y, float* __restrict__ mean,
                    float* __restrict__ rstd, float* __restrict__ z) {
  extern __shared__ float smem[];
  const float* w_d = wd;
  const float* w_ut = wut;
  if (smem_w) {
    for (int i = threadIdx.x; i < r * D; i += blockDim.x) {
      smem[i] = wd[i];
      smem[r * D + i] = wut[i];
    }
    __syncthreads();
    w_d = smem;
    w_ut = smem + r * D;
  }
  const int lane = threadIdx.x & 31;
  const float s = *scale;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); row < N;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    const scalar_t* ar = a + row * D;
    float x[KPER];
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < KPER; ++k) {
      const int d = lane + 32 * k;
      x[k] = d < D ? static_cast<float>(ar[d]) : 0.f;
      sum += x[k];
    }
    const float mu = warp_sum(sum) / static_cast<float>(D);
    float sq = 0.f;
#pragma unroll
    for (int k = 0; k < KPER; ++k) {
      const float c = x[k] - mu;
      if (lane + 32 * k < D) sq += c * c;
    }
    const RowStats<float> st = math::ln_finalize<float>(mu, warp_sum(sq), D, eps);
    float h[KPER], u[KPER];
#pragma unroll
    for (int k = 0; k < KPER; ++k) {
      const int d = lane + 32 * k;
      h[k] = d < D ? math::ln_affine<float>(math::ln_xhat<float>(x[k], st), gamma[d], beta[d]) : 0.f;
      u[k] = d < D ? bu[d] : 0.f;
    }
#pragma unroll 1
    for (int j = 0; j < r; ++j) {
      const float* wdj = w_d + j * D;
      float part = 0.f;
#pragma unroll
      for (int k = 0; k < KPER; ++k) {
        const int d = lane + 32 * k;
        if (d < D) part += h[k] * wdj[d];
      }
      const float zj = warp_sum(part) + bd[j];
      if (lane == (j & 31)) z[row * r + j] = zj;
      const float pj = math::relu<float>(zj);
      const float* wuj = w_ut + j * D;
#pragma unroll
      for (int k = 0; k < KPER; ++k) {
        const int d = lane + 32 * k;
        if (d < D) u[k] += pj * wuj[d];
      }
    }
    const scalar_t* mr = m + row * D;
    scalar_t* yr = y + row * D;
#pragma unroll
    for (int k = 0; k < KPER; ++k) {
      const int d = lane + 32 * k;
      if (d < D) yr[d] = static_cast<scalar_t>(math::adapter_out<float>(x[k], static_cast<float>(mr[d]), s, u[k]));
    }
    if (lane == 0) {
      mean[row] = st.mean;
      rstd[row] = st.rstd;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Small path: backward, per row. Partial record of block b, ws1[b, :], width r + 1:
//   [colsum(dZ) | ⟨G·Wu, P⟩].

template <typename scalar_t, int KPER>
__global__ void __launch_bounds__(kThreads, kRowMinBlocks<KPER>)
    bwd_rows_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ a, const float* __restrict__ gamma,
                    const float* __restrict__ wd, const float* __restrict__ wut, const float* __restrict__ scale,
                    const float* __restrict__ mean, const float* __restrict__ rstd, const float* __restrict__ z,
                    int64_t N, int D, int r, bool smem_w, scalar_t* __restrict__ ga, float* __restrict__ dz_out,
                    float* __restrict__ ws1) {
  extern __shared__ float smem[];
  const float* w_d = wd;
  const float* w_ut = wut;
  if (smem_w) {
    for (int i = threadIdx.x; i < r * D; i += blockDim.x) {
      smem[i] = wd[i];
      smem[r * D + i] = wut[i];
    }
    __syncthreads();
    w_d = smem;
    w_ut = smem + r * D;
  }
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const float s = *scale;
  const float inv_d = 1.f / static_cast<float>(D);
  float dbd_lo = 0.f, dbd_hi = 0.f;  // units j = lane and j = lane + 32 (r <= 64)
  float ds1 = 0.f;                   // identical in every lane
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp; row < N;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    const scalar_t* ar = a + row * D;
    const scalar_t* gr = gy + row * D;
    const RowStats<float> st{mean[row], rstd[row]};
    float xh[KPER], g[KPER], dh[KPER];
#pragma unroll
    for (int k = 0; k < KPER; ++k) {
      const int d = lane + 32 * k;
      xh[k] = d < D ? math::ln_xhat<float>(static_cast<float>(ar[d]), st) : 0.f;
      g[k] = d < D ? static_cast<float>(gr[d]) : 0.f;
      dh[k] = 0.f;
    }
#pragma unroll 1
    for (int j = 0; j < r; ++j) {
      const float* wuj = w_ut + j * D;
      float part = 0.f;
#pragma unroll
      for (int k = 0; k < KPER; ++k) {
        const int d = lane + 32 * k;
        if (d < D) part += g[k] * wuj[d];
      }
      const float gw = warp_sum(part);
      const float zj = z[row * r + j];
      ds1 += gw * math::relu<float>(zj);
      const float dzj = math::relu_grad<float>(s * gw, zj);
      if (lane == (j & 31)) {
        dz_out[row * r + j] = dzj;
        if (j < 32) {
          dbd_lo += dzj;
        } else {
          dbd_hi += dzj;
        }
      }
      const float* wdj = w_d + j * D;
#pragma unroll
      for (int k = 0; k < KPER; ++k) {
        const int d = lane + 32 * k;
        if (d < D) dh[k] += dzj * wdj[d];
      }
    }
    float sum1 = 0.f, sum2 = 0.f;
#pragma unroll
    for (int k = 0; k < KPER; ++k) {
      const int d = lane + 32 * k;
      if (d < D) {
        const float dxh = dh[k] * gamma[d];
        sum1 += dxh;
        sum2 += dxh * xh[k];
      }
    }
    const float c1 = warp_sum(sum1) * inv_d, c2 = warp_sum(sum2) * inv_d;
    scalar_t* out = ga + row * D;
#pragma unroll
    for (int k = 0; k < KPER; ++k) {
      const int d = lane + 32 * k;
      if (d < D) {
        out[d] = static_cast<scalar_t>(g[k] + math::ln_grad_input<float>(dh[k] * gamma[d], xh[k], st.rstd, c1, c2));
      }
    }
  }

  // Block partial, summed over warps in warp order through shared memory. The weights are no
  // longer read, so their shared memory is reused (the launch reserves at least kWarps·65 floats).
  __syncthreads();
  float* red = smem;
  float* rec = ws1 + static_cast<int64_t>(blockIdx.x) * (r + 1);
  red[warp * (kMaxSmallR + 1) + lane] = dbd_lo;
  red[warp * (kMaxSmallR + 1) + 32 + lane] = dbd_hi;
  if (lane == 0) red[warp * (kMaxSmallR + 1) + kMaxSmallR] = ds1;
  __syncthreads();
  for (int j = threadIdx.x; j < r; j += blockDim.x) {
    float acc = 0.f;
    for (int w = 0; w < kWarps; ++w) acc += red[w * (kMaxSmallR + 1) + j];
    rec[j] = acc;
  }
  if (threadIdx.x == 0) {
    float acc = 0.f;
    for (int w = 0; w < kWarps; ++w) acc += red[w * (kMaxSmallR + 1) + kMaxSmallR];
    rec[r] = acc;
  }
}

// Weight-gradient partials of one chunk of rows, for kRJ bottleneck units and 32 columns; the
// partial record of a chunk, ws2[chunk, :], has width 2·r·D + 3·D:
//   [Σ_n P[n, j]·G[n, d] (r × D) | Σ_n dZ[n, j]·Â[n, d] (r × D) | colsum(G) | colsum(dH ⊙ Â) | colsum(dH)].
// The column sums are made by the blocks of the first unit group (blockIdx.z == 0), with
// dH[n, d] = Σ_j dZ[n, j]·Wd[j, d] summed in the same order as the rows kernel.
// Block (32, kWarps): x = column (coalesced), y = row phase within the chunk.
constexpr int kCols = 3;  // colsum(G), colsum(dH ⊙ Â), colsum(dH)

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    bwd_weights_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ a, const float* __restrict__ mean,
                       const float* __restrict__ rstd, const float* __restrict__ z, const float* __restrict__ dz,
                       const float* __restrict__ wd, int64_t N, int D, int r, int64_t chunk_rows,
                       float* __restrict__ ws2) {
  __shared__ float red[kWarps][2 * kRJ + kCols][32];
  const int d = blockIdx.x * 32 + threadIdx.x;
  const int j0 = blockIdx.z * kRJ;
  const bool with_cols = blockIdx.z == 0;
  const int64_t chunk = blockIdx.y;
  const int64_t n0 = chunk * chunk_rows;
  const int64_t n1 = min(N, n0 + chunk_rows);
  float acc_u[kRJ], acc_d[kRJ];
#pragma unroll
  for (int jj = 0; jj < kRJ; ++jj) acc_u[jj] = acc_d[jj] = 0.f;
  float colg = 0.f, dgam = 0.f, dbet = 0.f;
  if (d < D) {
    for (int64_t n = n0 + threadIdx.y; n < n1; n += kWarps) {
      const float g = static_cast<float>(gy[n * D + d]);
      const float xh = math::ln_xhat<float>(static_cast<float>(a[n * D + d]), RowStats<float>{mean[n], rstd[n]});
      const float* zr = z + n * r;
      const float* dzr = dz + n * r;
#pragma unroll
      for (int jj = 0; jj < kRJ; ++jj) {
        const int j = j0 + jj;
        if (j < r) {
          acc_u[jj] += math::relu<float>(zr[j]) * g;
          acc_d[jj] += dzr[j] * xh;
        }
      }
      if (with_cols) {
        float dh = 0.f;
        for (int j = 0; j < r; ++j) dh += dzr[j] * wd[j * D + d];
        colg += g;
        dgam += dh * xh;
        dbet += dh;
      }
    }
  }
#pragma unroll
  for (int jj = 0; jj < kRJ; ++jj) {
    red[threadIdx.y][jj][threadIdx.x] = acc_u[jj];
    red[threadIdx.y][kRJ + jj][threadIdx.x] = acc_d[jj];
  }
  red[threadIdx.y][2 * kRJ][threadIdx.x] = colg;
  red[threadIdx.y][2 * kRJ + 1][threadIdx.x] = dgam;
  red[threadIdx.y][2 * kRJ + 2][threadIdx.x] = dbet;
  __syncthreads();
  // Thread (x, y) finishes rows q = y, y + kWarps, ... of red for column d, summing in
  // row-phase order.
  if (d < D) {
    const int64_t rD = static_cast<int64_t>(r) * D;
    float* rec = ws2 + chunk * (2 * rD + kCols * static_cast<int64_t>(D));
    for (int q = threadIdx.y; q < 2 * kRJ + kCols; q += kWarps) {
      int64_t dst;
      if (q < 2 * kRJ) {
        const int which = q / kRJ, j = j0 + q % kRJ;
        if (j >= r) continue;
        dst = which * rD + static_cast<int64_t>(j) * D + d;
      } else {
        if (!with_cols) continue;
        dst = 2 * rD + static_cast<int64_t>(q - 2 * kRJ) * D + d;
      }
      float acc = 0.f;
      for (int w = 0; w < kWarps; ++w) acc += red[w][q][threadIdx.x];
      rec[dst] = acc;
    }
  }
}

// out[c] = Σ_p in[p, c] over p = 0..P-1 in order (one thread per column).
__global__ void colsum_kernel(const float* __restrict__ in, int64_t P, int64_t C, float* __restrict__ out) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float acc = 0.f;
    for (int64_t p = 0; p < P; ++p) acc += in[p * C + c];
    out[c] = acc;
  }
}

// Parameter gradients (fp32) from the reduced sums: tot1 = [dbd (r) | ds1],
// tot2 = [PᵀG (r × D) | dZᵀÂ (r × D) | colg | dγ | dβ].
__global__ void finalize_kernel(const float* __restrict__ tot1, const float* __restrict__ tot2,
                                const float* __restrict__ gamma, const float* __restrict__ beta,
                                const float* __restrict__ scale, int D, int r, float* __restrict__ dlnw,
                                float* __restrict__ dlnb, float* __restrict__ ddw, float* __restrict__ ddb,
                                float* __restrict__ duw, float* __restrict__ dub) {
  const float s = *scale;
  const float* dbd = tot1;
  const int64_t total = static_cast<int64_t>(r) * D;
  const float* cols = tot2 + 2 * total;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int j = static_cast<int>(i / D), d = static_cast<int>(i % D);
    ddw[i] = math::down_w_grad<float>(gamma[d], tot2[total + i], beta[d], dbd[j]);
    duw[static_cast<int64_t>(d) * r + j] = s * tot2[i];
    if (j == 0) {
      dlnw[d] = cols[D + d];
      dlnb[d] = cols[2 * D + d];
      dub[d] = s * cols[d];
    }
    if (d == 0) ddb[j] = dbd[j];
  }
}

// ds = ⟨G·Wu, P⟩ + ⟨colsum(G), bu⟩: one block, fixed tree.
__global__ void grad_scale_kernel(const float* __restrict__ tot1, const float* __restrict__ colg,
                                  const float* __restrict__ bu, int D, int r, float* __restrict__ ds) {
  __shared__ float red[kThreads];
  float acc = 0.f;
  for (int d = threadIdx.x; d < D; d += blockDim.x) acc += colg[d] * bu[d];
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) red[threadIdx.x] += red[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) ds[0] = tot1[r] + red[0];
}

// ---------------------------------------------------------------------------------------------
// cuBLAS path: fused element-wise kernels around ATen GEMMs.

// y = A + (M + s·U), U in the accumulation type.
template <typename scalar_t, typename acc_t>
__global__ void epilogue_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ m,
                                const acc_t* __restrict__ u, const acc_t* __restrict__ scale, int64_t total,
                                scalar_t* __restrict__ y) {
  const acc_t s = *scale;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[i] = static_cast<scalar_t>(math::adapter_out<acc_t>(static_cast<acc_t>(a[i]), static_cast<acc_t>(m[i]), s, u[i]));
}

// dA = G + rstd·(dÂ − c1 − Â·c2) with per-row c1 = mean(dÂ), c2 = mean(dÂ ⊙ Â).
template <typename scalar_t, typename acc_t>
__global__ void ln_grad_kernel(const scalar_t* __restrict__ g, const acc_t* __restrict__ dxh,
                               const acc_t* __restrict__ xh, const acc_t* __restrict__ rstd,
                               const acc_t* __restrict__ c1, const acc_t* __restrict__ c2, int64_t total, int64_t D,
                               scalar_t* __restrict__ ga) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / D;
    ga[i] = static_cast<scalar_t>(static_cast<acc_t>(g[i]) +
                                  math::ln_grad_input<acc_t>(dxh[i], xh[i], rstd[n], c1[n], c2[n]));
  }
}

int elementwise_blocks(int64_t total) {
  return static_cast<int>(std::min<int64_t>(ceil_div(total, kThreads), 4096));
}

// ---------------------------------------------------------------------------------------------
// Argument checks (the Python wrapper checks too; these guard direct torch.ops calls).

constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;

// The fused path has no float64 instantiation (float64 is for gradcheck and takes the cuBLAS path).
#define LPF_DISPATCH_SMALL(TYPE, NAME, ...)                                                             \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                                                        \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

bool use_small_path(const at::Tensor& a, int64_t D, int64_t r) {
  return a.scalar_type() != at::kDouble && r <= kMaxSmallR && D <= kMaxSmallD;
}

// Registers per lane: ceil(D / 32) rounded up to an instantiated width.
template <typename F>
void dispatch_kper(int64_t D, F&& f) {
  if (D <= 256) {
    f(std::integral_constant<int, 8>{});
  } else if (D <= 768) {
    f(std::integral_constant<int, 24>{});
  } else {
    f(std::integral_constant<int, 32>{});
  }
}

// Parameters as contiguous fp32 on the device; up_w transposed to [r, D] so that a warp reads
// a unit's column of Wu contiguously.
struct Params32 {
  at::Tensor gamma, beta, wd, bd, wut, bu, s;
};

Params32 params32(const at::Tensor& ln_w, const at::Tensor& ln_b, const at::Tensor& down_w, const at::Tensor& down_b,
                  const at::Tensor& up_w, const at::Tensor& up_b, const at::Tensor& scale,
                  at::ScalarType st = at::kFloat) {
  return {ln_w.to(st).contiguous(),
          ln_b.to(st).contiguous(),
          down_w.to(st).contiguous(),
          down_b.to(st).contiguous(),
          up_w.to(st).t().contiguous(),
          up_b.to(st).contiguous(),
          scale.to(st).reshape({1}).contiguous()};
}

bool weights_in_smem(int64_t D, int64_t r) {
  return 2 * r * D * 4 <= kSmemWeightBytes;
}

// ---------------------------------------------------------------------------------------------
// Forward.

void fwd_small(const at::Tensor& a, const at::Tensor& m, const Params32& p, double eps, int64_t N, int64_t D, int64_t r,
               at::Tensor& y, at::Tensor& mean, at::Tensor& rstd, at::Tensor& z) {
  const bool smem_w = weights_in_smem(D, r);
  const size_t smem = smem_w ? static_cast<size_t>(2 * r * D) * sizeof(float) : 0;
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(N, kWarps), 65535));
  auto stream = c10::cuda::getCurrentCUDAStream();
  LPF_DISPATCH_SMALL(a.scalar_type(), "adaptformer_fwd_cuda", [&] {
    dispatch_kper(D, [&](auto kper) {
      fwd_rows_kernel<scalar_t, decltype(kper)::value><<<blocks, kThreads, smem, stream>>>(
          a.const_data_ptr<scalar_t>(), m.const_data_ptr<scalar_t>(), p.gamma.const_data_ptr<float>(),
          p.beta.const_data_ptr<float>(), p.wd.const_data_ptr<float>(), p.bd.const_data_ptr<float>(),
          p.wut.const_data_ptr<float>(), p.bu.const_data_ptr<float>(), p.s.const_data_ptr<float>(),
          static_cast<float>(eps), N, static_cast<int>(D), static_cast<int>(r), smem_w, y.data_ptr<scalar_t>(),
          mean.data_ptr<float>(), rstd.data_ptr<float>(), z.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void fwd_gemm(const at::Tensor& a, const at::Tensor& m, const at::Tensor& ln_w, const at::Tensor& ln_b,
              const at::Tensor& down_w, const at::Tensor& down_b, const at::Tensor& up_w, const at::Tensor& up_b,
              const at::Tensor& scale, double eps, int64_t N, int64_t D, at::Tensor& y, at::Tensor& mean,
              at::Tensor& rstd, at::Tensor& z) {
  const auto ct = mean.scalar_type();
  const Params32 p = params32(ln_w, ln_b, down_w, down_b, up_w, up_b, scale, ct);
  const at::Tensor A = a.reshape({N, D}).to(ct);
  const at::Tensor mu = A.mean({1}, /*keepdim=*/true);
  const at::Tensor xc = A.sub(mu);
  const at::Tensor rs = xc.square().mean({1}, true).add(eps).rsqrt();
  const at::Tensor H = xc.mul(rs).mul(p.gamma).add(p.beta);
  z.copy_(p.bd.addmm(H, p.wd.t()));
  const at::Tensor U = p.bu.addmm(z.relu(), p.wut).contiguous();
  mean.copy_(mu.reshape({N}));
  rstd.copy_(rs.reshape({N}));
  const int64_t total = N * D;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "adaptformer_fwd_cuda_gemm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    epilogue_kernel<scalar_t, acc_t><<<elementwise_blocks(total), kThreads, 0, stream>>>(
        a.const_data_ptr<scalar_t>(), m.const_data_ptr<scalar_t>(), U.const_data_ptr<acc_t>(),
        p.s.const_data_ptr<acc_t>(), total, y.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adaptformer_fwd_cuda(
    const at::Tensor& a_in, const at::Tensor& m_in, const at::Tensor& ln_w, const at::Tensor& ln_b,
    const at::Tensor& down_w, const at::Tensor& down_b, const at::Tensor& up_w, const at::Tensor& up_b,
    const at::Tensor& scale, double eps) {
  const auto [D, r] = checks::adaptformer_fwd_args(a_in, m_in, ln_w, ln_b, down_w, down_b, up_w, up_b, scale, kDevice);
  c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = a_in.contiguous();
  const at::Tensor m = m_in.contiguous();
  const int64_t N = a.numel() / D;
  const auto acc_type = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor y = at::empty(a.sizes(), a.options());
  at::Tensor mean = at::empty({N}, a.options().dtype(acc_type));
  at::Tensor rstd = at::empty({N}, a.options().dtype(acc_type));
  at::Tensor z = at::empty({N, r}, a.options().dtype(acc_type));
  if (N == 0) return {y, mean, rstd, z};
  if (use_small_path(a, D, r)) {
    fwd_small(a, m, params32(ln_w, ln_b, down_w, down_b, up_w, up_b, scale), eps, N, D, r, y, mean, rstd, z);
  } else {
    fwd_gemm(a, m, ln_w, ln_b, down_w, down_b, up_w, up_b, scale, eps, N, D, y, mean, rstd, z);
  }
  return {y, mean, rstd, z};
}

// ---------------------------------------------------------------------------------------------
// Backward.

struct Grads {
  at::Tensor dlnw, dlnb, ddw, ddb, duw, dub, ds;  // in the accumulation type
};

Grads bwd_small(const at::Tensor& gy, const at::Tensor& a, const Params32& p, const at::Tensor& mean,
                const at::Tensor& rstd, const at::Tensor& z, int64_t N, int64_t D, int64_t r, at::Tensor& ga) {
  const auto f32 = a.options().dtype(at::kFloat);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool smem_w = weights_in_smem(D, r);
  const size_t smem = std::max<size_t>(smem_w ? static_cast<size_t>(2 * r * D) * sizeof(float) : 0,
                                       static_cast<size_t>(kWarps) * (kMaxSmallR + 1) * sizeof(float));
  const int64_t row_blocks = std::min<int64_t>(ceil_div(N, kWarps), kMaxRowBlocks);
  const int64_t w1 = r + 1;
  const int64_t w2 = 2 * r * D + kCols * D;
  at::Tensor dz = at::empty({N, r}, f32);
  at::Tensor ws1 = at::empty({row_blocks, w1}, f32);
  const int64_t chunk_rows = std::max<int64_t>(kMinChunkRows, ceil_div(N, kMaxWeightChunks));
  const int64_t chunks = ceil_div(N, chunk_rows);
  at::Tensor ws2 = at::empty({chunks, w2}, f32);
  LPF_DISPATCH_SMALL(a.scalar_type(), "adaptformer_bwd_cuda", [&] {
    dispatch_kper(D, [&](auto kper) {
      bwd_rows_kernel<scalar_t, decltype(kper)::value><<<static_cast<int>(row_blocks), kThreads, smem, stream>>>(
          gy.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), p.gamma.const_data_ptr<float>(),
          p.wd.const_data_ptr<float>(), p.wut.const_data_ptr<float>(), p.s.const_data_ptr<float>(),
          mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(), z.const_data_ptr<float>(), N, static_cast<int>(D),
          static_cast<int>(r), smem_w, ga.data_ptr<scalar_t>(), dz.data_ptr<float>(), ws1.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const dim3 grid(static_cast<unsigned>(ceil_div(D, 32)), static_cast<unsigned>(chunks),
                    static_cast<unsigned>(ceil_div(r, kRJ)));
    bwd_weights_kernel<scalar_t><<<grid, dim3(32, kWarps), 0, stream>>>(
        gy.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), mean.const_data_ptr<float>(),
        rstd.const_data_ptr<float>(), z.const_data_ptr<float>(), dz.const_data_ptr<float>(),
        p.wd.const_data_ptr<float>(), N, static_cast<int>(D), static_cast<int>(r), chunk_rows, ws2.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor tot1 = at::empty({w1}, f32);
  at::Tensor tot2 = at::empty({w2}, f32);
  colsum_kernel<<<elementwise_blocks(w1), kThreads, 0, stream>>>(ws1.const_data_ptr<float>(), row_blocks, w1,
                                                                 tot1.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  colsum_kernel<<<elementwise_blocks(w2), kThreads, 0, stream>>>(ws2.const_data_ptr<float>(), chunks, w2,
                                                                 tot2.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  Grads g{at::empty({D}, f32),    at::empty({D}, f32), at::empty({r, D}, f32), at::empty({r}, f32),
          at::empty({D, r}, f32), at::empty({D}, f32), at::empty({1}, f32)};
  finalize_kernel<<<elementwise_blocks(r * D), kThreads, 0, stream>>>(
      tot1.const_data_ptr<float>(), tot2.const_data_ptr<float>(), p.gamma.const_data_ptr<float>(),
      p.beta.const_data_ptr<float>(), p.s.const_data_ptr<float>(), static_cast<int>(D), static_cast<int>(r),
      g.dlnw.data_ptr<float>(), g.dlnb.data_ptr<float>(), g.ddw.data_ptr<float>(), g.ddb.data_ptr<float>(),
      g.duw.data_ptr<float>(), g.dub.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  grad_scale_kernel<<<1, kThreads, 0, stream>>>(tot1.const_data_ptr<float>(), tot2.const_data_ptr<float>() + 2 * r * D,
                                                p.bu.const_data_ptr<float>(), static_cast<int>(D), static_cast<int>(r),
                                                g.ds.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return g;
}

Grads bwd_gemm(const at::Tensor& gy, const at::Tensor& a, const at::Tensor& ln_w, const at::Tensor& ln_b,
               const at::Tensor& down_w, const at::Tensor& down_b, const at::Tensor& up_w, const at::Tensor& up_b,
               const at::Tensor& scale, const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& z, int64_t N,
               int64_t D, at::Tensor& ga) {
  const auto ct = mean.scalar_type();
  const Params32 p = params32(ln_w, ln_b, down_w, down_b, up_w, up_b, scale, ct);
  const at::Tensor G = gy.reshape({N, D}).to(ct);
  const at::Tensor rs = rstd.reshape({N, 1});
  const at::Tensor xh = a.reshape({N, D}).to(ct).sub(mean.reshape({N, 1})).mul(rs).contiguous();
  const at::Tensor H = xh.mul(p.gamma).add(p.beta);
  const at::Tensor P = z.relu();
  const at::Tensor GW = G.mm(p.wut.t());  // G·Wu, [N, r]
  const at::Tensor colg = G.sum(0);
  // dZ = relu_grad(s·GW, Z): the mask is Z > 0, as math::relu_grad.
  const at::Tensor dZ = GW.mul(p.s).mul(z.gt(0).to(ct));
  Grads g;
  g.ds = GW.mul(P).sum().reshape({1}).add(colg.mul(p.bu).sum());
  g.dub = colg.mul(p.s);
  g.duw = G.t().mm(P).mul(p.s);
  g.ddw = dZ.t().mm(H);
  g.ddb = dZ.sum(0);
  const at::Tensor dH = dZ.mm(p.wd);
  g.dlnw = dH.mul(xh).sum(0);
  g.dlnb = dH.sum(0);
  const at::Tensor dxh = dH.mul(p.gamma).contiguous();
  const at::Tensor c1 = dxh.mean({1}).contiguous();
  const at::Tensor c2 = dxh.mul(xh).mean({1}).contiguous();
  const at::Tensor rs_c = rstd.contiguous();
  const int64_t total = N * D;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "adaptformer_bwd_cuda_gemm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ln_grad_kernel<scalar_t, acc_t><<<elementwise_blocks(total), kThreads, 0, stream>>>(
        gy.const_data_ptr<scalar_t>(), dxh.const_data_ptr<acc_t>(), xh.const_data_ptr<acc_t>(),
        rs_c.const_data_ptr<acc_t>(), c1.const_data_ptr<acc_t>(), c2.const_data_ptr<acc_t>(), total, D,
        ga.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
adaptformer_bwd_cuda(const at::Tensor& gy_in, const at::Tensor& a_in, const at::Tensor& ln_w, const at::Tensor& ln_b,
                     const at::Tensor& down_w, const at::Tensor& down_b, const at::Tensor& up_w, const at::Tensor& up_b,
                     const at::Tensor& scale, const at::Tensor& mean_in, const at::Tensor& rstd_in,
                     const at::Tensor& z_in) {
  const auto [D, r] = checks::adaptformer_bwd_args(gy_in, a_in, ln_w, ln_b, down_w, down_b, up_w, up_b, scale, mean_in,
                                                   rstd_in, z_in, kDevice);
  const int64_t N = a_in.numel() / D;
  const auto acc_type = a_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = a_in.contiguous();
  const at::Tensor gy = gy_in.contiguous();
  const at::Tensor mean = mean_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  const at::Tensor z = z_in.contiguous();
  at::Tensor ga = at::empty(a.sizes(), a.options());
  Grads g;
  if (N == 0) {
    // Sums over no rows (the GEMM path would also give zeros; this avoids empty launches).
    const auto opts = a.options().dtype(acc_type);
    g = {at::zeros({D}, opts),    at::zeros({D}, opts), at::zeros({r, D}, opts), at::zeros({r}, opts),
         at::zeros({D, r}, opts), at::zeros({D}, opts), at::zeros({1}, opts)};
  } else if (use_small_path(a, D, r)) {
    g = bwd_small(gy, a, params32(ln_w, ln_b, down_w, down_b, up_w, up_b, scale), mean, rstd, z, N, D, r, ga);
  } else {
    g = bwd_gemm(gy, a, ln_w, ln_b, down_w, down_b, up_w, up_b, scale, mean, rstd, z, N, D, ga);
  }
  return {ga,
          g.dlnw.to(ln_w.scalar_type()),
          g.dlnb.to(ln_b.scalar_type()),
          g.ddw.to(down_w.scalar_type()),
          g.ddb.to(down_b.scalar_type()),
          g.duw.to(up_w.scalar_type()),
          g.dub.to(up_b.scalar_type()),
          g.ds.reshape(scale.sizes()).to(scale.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(liftplus_fast, CUDA, m) {
  m.impl("adaptformer_fwd", &adaptformer_fwd_cuda);
  m.impl("adaptformer_bwd", &adaptformer_bwd_cuda);
}

}  // namespace liftplus_fast
