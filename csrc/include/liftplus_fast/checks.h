// Argument guards shared by the CPU and CUDA kernels (host code only). Arguments are validated
// once, by the public Python op; these only guard direct torch.ops calls. Every message names the argument, its shape,
// dtype and device, and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>
#include <utility>
#include "liftplus_fast/cpu_capability.h"

namespace liftplus_fast {
inline namespace LPF_CPU_NS {
namespace checks {

inline std::string describe(const at::Tensor& t) {
  std::ostringstream os;
  os << "shape " << t.sizes() << ", dtype " << t.scalar_type() << ", device " << t.device();
  return os.str();
}

// float32, bfloat16, float16, and float64 (kept for gradcheck).
inline bool is_float_like(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kBFloat16 || s == at::kHalf || s == at::kDouble;
}

// `t` must live on `ref`'s device, and that device must be of `kind` (CPU or CUDA kernels).
inline void check_device(const at::Tensor& t, const char* op, const char* name, const at::Tensor& ref,
                         const char* ref_name, c10::DeviceType kind) {
  const char* kernel = kind == c10::DeviceType::CUDA ? "CUDA" : "CPU";
  TORCH_CHECK(ref.device().type() == kind, op, " (", kernel, " kernel): ", ref_name, " must be a ", kernel,
              " tensor; got ", ref_name, " with ", describe(ref));
  TORCH_CHECK(t.device() == ref.device(), op, " (", kernel, " kernel): ", name, " must be on ", ref.device(),
              " (the device of ", ref_name, "); got ", name, " with ", describe(t));
}

// la_cosine_ce_fwd / _bwd inputs.
inline void la_ce_args(const at::Tensor& feat, const at::Tensor& weight, const at::Tensor& labels,
                       const at::Tensor& log_prior, c10::DeviceType kind) {
  TORCH_CHECK(feat.dim() == 2 && is_float_like(feat),
              "feat must be a 2-D float32/bfloat16/float16/float64 tensor [B, D]; got ", describe(feat));
  TORCH_CHECK(feat.size(0) > 0, "feat must hold at least one row; got ", describe(feat));
  TORCH_CHECK(weight.dim() == 2 && is_float_like(weight), "weight must be a 2-D float tensor [K, D]; got ",
              describe(weight));
  TORCH_CHECK(weight.size(1) == feat.size(1) && weight.size(0) > 0, "weight must have shape [K >= 1, ", feat.size(1),
              "] to match feat; got ", describe(weight));
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == feat.size(0),
              "labels must be an int64 tensor of shape [", feat.size(0), "]; got ", describe(labels));
  TORCH_CHECK(log_prior.dim() == 1 && log_prior.size(0) == weight.size(0) && is_float_like(log_prior),
              "log_prior must be a float tensor of shape [", weight.size(0), "]; got ", describe(log_prior));
  const std::pair<const at::Tensor*, const char*> all[] = {
      {&feat, "feat"}, {&weight, "weight"}, {&labels, "labels"}, {&log_prior, "log_prior"}};
  for (const auto& [t, name] : all) check_device(*t, "la_cosine_ce", name, feat, "feat", kind);
}

inline void adaptformer_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_float_like(t), "adaptformer: ", name, " must be float32, bfloat16, float16 or float64; got ", name,
              " with ", describe(t));
}

inline void adaptformer_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, "adaptformer: ", name, " must have shape ", expected, "; got ", name, " with ",
              describe(t));
}

// AdaptFormer parameters against `a`; returns (D, r).
inline std::pair<int64_t, int64_t> adaptformer_params(const at::Tensor& a, const at::Tensor& ln_w,
                                                      const at::Tensor& ln_b, const at::Tensor& down_w,
                                                      const at::Tensor& down_b, const at::Tensor& up_w,
                                                      const at::Tensor& up_b, const at::Tensor& scale,
                                                      c10::DeviceType kind) {
  adaptformer_float(a, "a");
  TORCH_CHECK(a.dim() >= 1 && a.size(-1) > 0, "adaptformer: a must have a non-empty last dimension; got a with ",
              describe(a));
  const int64_t D = a.size(-1);
  const std::pair<const at::Tensor*, const char*> params[] = {{&ln_w, "ln_w"},     {&ln_b, "ln_b"}, {&down_w, "down_w"},
                                                              {&down_b, "down_b"}, {&up_w, "up_w"}, {&up_b, "up_b"},
                                                              {&scale, "scale"}};
  check_device(a, "adaptformer", "a", a, "a", kind);
  for (const auto& [t, name] : params) {
    check_device(*t, "adaptformer", name, a, "a", kind);
    adaptformer_float(*t, name);
  }
  TORCH_CHECK(down_w.dim() == 2 && down_w.size(1) == D && down_w.size(0) > 0,
              "adaptformer: down_w must have shape [r, ", D, "] with r >= 1; got down_w with ", describe(down_w));
  const int64_t r = down_w.size(0);
  adaptformer_shape(ln_w, "ln_w", {D});
  adaptformer_shape(ln_b, "ln_b", {D});
  adaptformer_shape(down_b, "down_b", {r});
  adaptformer_shape(up_w, "up_w", {D, r});
  adaptformer_shape(up_b, "up_b", {D});
  TORCH_CHECK(scale.numel() == 1, "adaptformer: scale must hold one value; got scale with ", describe(scale));
  return {D, r};
}

// `t` (mlp_out or grad_y) must have a's shape, dtype and device.
inline void adaptformer_like_a(const at::Tensor& t, const char* name, const at::Tensor& a, c10::DeviceType kind) {
  check_device(t, "adaptformer", name, a, "a", kind);
  TORCH_CHECK(t.sizes() == a.sizes() && t.scalar_type() == a.scalar_type(), "adaptformer: ", name,
              " must match a (shape ", a.sizes(), ", dtype ", a.scalar_type(), "); got ", name, " with ", describe(t));
}

// adaptformer_fwd arguments; returns (D, r).
inline std::pair<int64_t, int64_t> adaptformer_fwd_args(const at::Tensor& a, const at::Tensor& m,
                                                        const at::Tensor& ln_w, const at::Tensor& ln_b,
                                                        const at::Tensor& down_w, const at::Tensor& down_b,
                                                        const at::Tensor& up_w, const at::Tensor& up_b,
                                                        const at::Tensor& scale, c10::DeviceType kind) {
  const auto dims = adaptformer_params(a, ln_w, ln_b, down_w, down_b, up_w, up_b, scale, kind);
  adaptformer_like_a(m, "mlp_out", a, kind);
  return dims;
}

// adaptformer_bwd arguments, including the statistics saved by the forward; returns (D, r).
inline std::pair<int64_t, int64_t> adaptformer_bwd_args(
    const at::Tensor& gy, const at::Tensor& a, const at::Tensor& ln_w, const at::Tensor& ln_b, const at::Tensor& down_w,
    const at::Tensor& down_b, const at::Tensor& up_w, const at::Tensor& up_b, const at::Tensor& scale,
    const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& z, c10::DeviceType kind) {
  const auto [D, r] = adaptformer_params(a, ln_w, ln_b, down_w, down_b, up_w, up_b, scale, kind);
  adaptformer_like_a(gy, "grad_y", a, kind);
  const int64_t N = a.numel() / D;
  const auto acc_type = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const std::pair<const at::Tensor*, const char*> saved[] = {{&mean, "mean"}, {&rstd, "rstd"}, {&z, "z"}};
  for (const auto& [t, name] : saved) {
    check_device(*t, "adaptformer", name, a, "a", kind);
    TORCH_CHECK(t->scalar_type() == acc_type, "adaptformer: ", name, " must have dtype ", acc_type,
                " (saved by adaptformer_fwd); got ", name, " with ", describe(*t));
  }
  adaptformer_shape(mean, "mean", {N});
  adaptformer_shape(rstd, "rstd", {N});
  adaptformer_shape(z, "z", {N, r});
  return {D, r};
}

}  // namespace checks
}  // namespace LPF_CPU_NS
}  // namespace liftplus_fast
