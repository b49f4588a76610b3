// Test-time-ensembling aggregation on CUDA: one block per image row, fp32 accumulation.
// Math: docs/ops.md, "Test-time ensembling".
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "liftplus_fast/math.h"

namespace liftplus_fast {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void tte_aggregate_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ mean,
                                     int64_t* __restrict__ pred, const int64_t* __restrict__ labels,
                                     int64_t* __restrict__ correct, int64_t* __restrict__ total, int64_t C, int64_t B,
                                     int64_t K) {
  const int64_t b = blockIdx.x;
  const float inv_c = 1.f / static_cast<float>(C);
  float best = -INFINITY;
  long long best_idx = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    float acc = 0.f;
    for (int64_t c = 0; c < C; ++c) acc += static_cast<float>(x[(c * B + b) * K + k]);
    const scalar_t v = static_cast<scalar_t>(acc * inv_c);
    mean[b * K + k] = v;
    math::argmax_push(static_cast<float>(v), k, best, best_idx);
  }
  __shared__ float s_best[kThreads];
  __shared__ long long s_idx[kThreads];
  s_best[threadIdx.x] = best;
  s_idx[threadIdx.x] = best_idx;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
      const float ov = s_best[threadIdx.x + stride];
      const long long oi = s_idx[threadIdx.x + stride];
      const float mv = s_best[threadIdx.x];
      const long long mi = s_idx[threadIdx.x];
      // Larger value wins; on ties (or both NaN) the smaller index wins.
      const bool o_nan = ov != ov, m_nan = mv != mv;
      bool take = (o_nan && !m_nan) || (!m_nan && ov > mv) || ((ov == mv || (o_nan && m_nan)) && oi < mi);
      if (take) {
        s_best[threadIdx.x] = ov;
        s_idx[threadIdx.x] = oi;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    pred[b] = s_idx[0];
    if (labels != nullptr) {
      const int64_t y = labels[b];
      CUDA_KERNEL_ASSERT(y >= 0 && y < K);
      atomicAdd(reinterpret_cast<unsigned long long*>(total + y), 1ULL);
      if (s_idx[0] == y) atomicAdd(reinterpret_cast<unsigned long long*>(correct + y), 1ULL);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tte_aggregate_cuda(
    const at::Tensor& crop_logits_in, const std::optional<at::Tensor>& labels_in) {
  TORCH_CHECK(crop_logits_in.dim() == 3, "crop_logits must be [C, B, K]; got shape ", crop_logits_in.sizes());
  const int64_t C = crop_logits_in.size(0), B = crop_logits_in.size(1), K = crop_logits_in.size(2);
  TORCH_CHECK(C > 0 && K > 0, "crop_logits needs at least one crop and one class");
  c10::cuda::CUDAGuard guard(crop_logits_in.device());
  const at::Tensor x = crop_logits_in.contiguous();
  at::Tensor mean = at::empty({B, K}, x.options());
  at::Tensor pred = at::empty({B}, x.options().dtype(at::kLong));
  at::Tensor labels, correct, total;
  const bool has_labels = labels_in.has_value();
  if (has_labels) {
    TORCH_CHECK(labels_in->scalar_type() == at::kLong && labels_in->dim() == 1 && labels_in->size(0) == B,
                "labels must be int64 of shape [", B, "]; got ", labels_in->scalar_type(), " ", labels_in->sizes());
    TORCH_CHECK(labels_in->device() == crop_logits_in.device(), "labels must be on ", crop_logits_in.device(), "; got ",
                labels_in->device());
    labels = labels_in->contiguous();
    correct = at::zeros({K}, labels.options());
    total = at::zeros({K}, labels.options());
  } else {
    correct = at::empty({0}, x.options().dtype(at::kLong));
    total = at::empty({0}, x.options().dtype(at::kLong));
  }
  if (B == 0) return {mean, pred, correct, total};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tte_aggregate_cuda", [&] {
    tte_aggregate_kernel<scalar_t><<<B, kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(), pred.data_ptr<int64_t>(),
        has_labels ? labels.const_data_ptr<int64_t>() : nullptr, has_labels ? correct.data_ptr<int64_t>() : nullptr,
        has_labels ? total.data_ptr<int64_t>() : nullptr, C, B, K);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {mean, pred, correct, total};
}

// Mean over crops of L2-normalised features: one block per image, fp32 accumulation in
// registers (each thread owns the same feature columns for every crop).
template <typename scalar_t>
__global__ void tte_mean_unit_features_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t C,
                                              int64_t B, int64_t D) {
  constexpr int kMaxPerThread = 16;  // D <= kThreads * kMaxPerThread (4096)
  const int64_t b = blockIdx.x;
  float acc[kMaxPerThread];
#pragma unroll
  for (int i = 0; i < kMaxPerThread; ++i) acc[i] = 0.f;
  __shared__ float s_red[kThreads];
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* row = x + (c * B + b) * D;
    float ss = 0.f;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const float v = static_cast<float>(row[d]);
      ss += v * v;
    }
    s_red[threadIdx.x] = ss;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
      if (threadIdx.x < stride) s_red[threadIdx.x] += s_red[threadIdx.x + stride];
      __syncthreads();
    }
    const float inv = math::inv_norm_of<float>(sqrtf(s_red[0]));
    __syncthreads();
    int i = 0;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x, ++i) acc[i] += static_cast<float>(row[d]) * inv;
  }
  const float inv_c = 1.f / static_cast<float>(C);
  int i = 0;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x, ++i) out[b * D + d] = static_cast<scalar_t>(acc[i] * inv_c);
}

at::Tensor tte_mean_unit_features_cuda(const at::Tensor& feats_in) {
  TORCH_CHECK(feats_in.dim() == 3, "crop_feats must be [C, B, D]; got shape ", feats_in.sizes());
  const int64_t C = feats_in.size(0), B = feats_in.size(1), D = feats_in.size(2);
  TORCH_CHECK(C > 0, "crop_feats needs at least one crop; got shape ", feats_in.sizes());
  TORCH_CHECK(D <= kThreads * 16, "crop_feats feature size must be <= ", kThreads * 16, "; got ", D);
  c10::cuda::CUDAGuard guard(feats_in.device());
  const at::Tensor x = feats_in.contiguous();
  at::Tensor out = at::empty({B, D}, x.options());
  if (B == 0 || D == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tte_mean_unit_features_cuda", [&] {
    tte_mean_unit_features_kernel<scalar_t>
        <<<B, kThreads, 0, stream>>>(x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), C, B, D);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(liftplus_fast, CUDA, m) {
  m.impl("tte_aggregate", &tte_aggregate_cuda);
  m.impl("tte_mean_unit_features", &tte_mean_unit_features_cuda);
}

}  // namespace liftplus_fast
