// Layout and argument guards of the CPU attention kernels (attention_cpu.cpp, attention_brgemm_cpu.cpp):
// both read the packed in-projection output qkv ([B, N, 3D] batch_first, else [N, B, 3D]) in place and
// write O in its layout ([B, N, D] / [N, B, D]), saving only the per-row log-sum-exp [B, H, N].
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#include "liftplus_fast/checks.h"

#include "liftplus_fast/cpu_capability.h"

namespace liftplus_fast {
inline namespace LPF_CPU_NS {
namespace attention {

struct Geometry {
  int64_t B, N, H, hd, D;
  bool batch_first;
  // Element strides of the token axis and offsets of image b in qkv (width 3D) and O (width D).
  int64_t qkv_row() const { return batch_first ? 3 * D : B * 3 * D; }
  int64_t qkv_base(int64_t b) const { return batch_first ? b * N * 3 * D : b * 3 * D; }
  int64_t out_row() const { return batch_first ? D : B * D; }
  int64_t out_base(int64_t b) const { return batch_first ? b * N * D : b * D; }
  // Offsets of task t's head (image t / H, head t % H): its q slice in qkv, its slice of O.
  int64_t qkv_head(int64_t t) const { return qkv_base(t / H) + t % H * hd; }
  int64_t out_head(int64_t t) const { return out_base(t / H) + t % H * hd; }
};

// fp64 keeps fp64 (gradcheck); every other dtype accumulates and saves lse in fp32.
inline at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline Geometry check_args(const at::Tensor& qkv, int64_t num_heads, bool batch_first) {
  using checks::describe;
  TORCH_CHECK(qkv.device().is_cpu(), "attention (CPU kernel): qkv must be a CPU tensor; got ", describe(qkv));
  TORCH_CHECK(qkv.dim() == 3 && checks::is_float_like(qkv),
              "attention: qkv must be a 3-D float32/bfloat16/float16/float64 tensor [B, N, 3D] "
              "(or [N, B, 3D]); got ",
              describe(qkv));
  TORCH_CHECK(qkv.is_contiguous(), "attention: qkv must be contiguous; got strides ", qkv.strides());
  TORCH_CHECK(num_heads > 0, "attention: num_heads must be positive; got ", num_heads);
  const int64_t width = qkv.size(2);
  TORCH_CHECK(width % (3 * num_heads) == 0 && width > 0,
              "attention: the last dimension of qkv must be 3 * num_heads * head_dim; got ", width, " with num_heads ",
              num_heads);
  Geometry g;
  g.batch_first = batch_first;
  g.B = batch_first ? qkv.size(0) : qkv.size(1);
  g.N = batch_first ? qkv.size(1) : qkv.size(0);
  g.H = num_heads;
  g.D = width / 3;
  g.hd = g.D / num_heads;
  TORCH_CHECK(g.N > 0, "attention: qkv must hold at least one token; got ", describe(qkv));
  return g;
}

// grad_out and out must be [B, N, D] (or [N, B, D]) in qkv's dtype, lse [B, H, N] in acc_type.
inline void check_bwd_args(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse,
                           const at::Tensor& qkv, const Geometry& g) {
  using checks::describe;
  const auto expect = g.batch_first ? std::vector<int64_t>{g.B, g.N, g.D} : std::vector<int64_t>{g.N, g.B, g.D};
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(expect) && grad_out.scalar_type() == qkv.scalar_type(),
              "attention_bwd: grad_out must have shape ", at::IntArrayRef(expect), " and dtype ", qkv.scalar_type(),
              "; got ", describe(grad_out));
  TORCH_CHECK(out.sizes() == at::IntArrayRef(expect) && out.scalar_type() == qkv.scalar_type(),
              "attention_bwd: out must have shape ", at::IntArrayRef(expect), " and dtype ", qkv.scalar_type(),
              "; got ", describe(out));
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({g.B, g.H, g.N}) && lse.scalar_type() == acc_type(qkv),
              "attention_bwd: lse must be ", acc_type(qkv), " [", g.B, ", ", g.H, ", ", g.N, "]; got ", describe(lse));
}

inline at::Tensor new_like_layout(const at::Tensor& qkv, const Geometry& g, int64_t width) {
  return g.batch_first ? at::empty({g.B, g.N, width}, qkv.options()) : at::empty({g.N, g.B, width}, qkv.options());
}

}  // namespace attention
}  // namespace LPF_CPU_NS
}  // namespace liftplus_fast
