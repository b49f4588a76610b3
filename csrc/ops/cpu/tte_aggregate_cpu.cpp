// Test-time-ensembling aggregation on CPU: one pass over [C, B, K] crop logits per image row.
// Math: docs/ops.md, "Test-time ensembling".
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "liftplus_fast/cpu_capability.h"
#include "liftplus_fast/math.h"
#include "liftplus_fast/rows.h"

// Builds besides the baseline, chosen at run time (csrc/cpu_dispatch.cpp).
LPF_CPU_CAPABILITIES(avx2, avx512);

namespace liftplus_fast {
namespace LPF_CPU_NS {
namespace {

using liftplus_fast::math::inv_norm_of;

void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf, name,
              " must be float32, bfloat16 or float16; got ", t.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tte_aggregate_cpu(
    const at::Tensor& crop_logits_in, const std::optional<at::Tensor>& labels_in) {
  TORCH_CHECK(crop_logits_in.dim() == 3, "crop_logits must be [C, B, K]; got shape ", crop_logits_in.sizes());
  check_floating(crop_logits_in, "crop_logits");
  const int64_t C = crop_logits_in.size(0), B = crop_logits_in.size(1), K = crop_logits_in.size(2);
  TORCH_CHECK(C > 0 && K > 0, "crop_logits needs at least one crop and one class; got shape ", crop_logits_in.sizes());
  const at::Tensor x = crop_logits_in.contiguous();
  at::Tensor mean = at::empty({B, K}, x.options());
  at::Tensor pred = at::empty({B}, x.options().dtype(at::kLong));
  int64_t* pred_p = pred.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tte_aggregate_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* mp = mean.data_ptr<scalar_t>();
    const float inv_c = 1.f / static_cast<float>(C);
    // Enough rows per task that a thread's work (C·K elements each) outweighs the fork cost.
    const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, C * K));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      std::vector<const scalar_t*> rows_c(C);
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t c = 0; c < C; ++c) rows_c[c] = xp + (c * B + b) * K;
        scalar_t* out = mp + b * K;
        // fp32 accumulation in crop order (as the reference's .float().mean(0)), one block of
        // classes at a time in a register-sized buffer: one read of each crop row, one write.
        constexpr int64_t kBlock = 256;
        float acc[kBlock];
        for (int64_t k0 = 0; k0 < K; k0 += kBlock) {
          const int64_t n = std::min(kBlock, K - k0);
          const scalar_t* r0 = rows_c[0] + k0;
          for (int64_t j = 0; j < n; ++j) acc[j] = static_cast<float>(r0[j]);
          for (int64_t c = 1; c < C; ++c) {
            const scalar_t* r = rows_c[c] + k0;
            for (int64_t j = 0; j < n; ++j) acc[j] += static_cast<float>(r[j]);
          }
          for (int64_t j = 0; j < n; ++j) out[k0 + j] = static_cast<scalar_t>(acc[j] * inv_c);
        }
        // The argmax runs on the stored (rounded) mean, as the reference does.
        pred_p[b] = rows::argmax_row(out, K);
      }
    });
  });

  if (!labels_in.has_value()) {
    auto none = at::empty({0}, x.options().dtype(at::kLong));
    return {mean, pred, none, none.clone()};
  }
  const at::Tensor& labels_t = *labels_in;
  TORCH_CHECK(labels_t.scalar_type() == at::kLong, "labels must be int64; got ", labels_t.scalar_type());
  TORCH_CHECK(labels_t.dim() == 1 && labels_t.size(0) == B, "labels must have shape [", B,
              "] to match crop_logits; got ", labels_t.sizes());
  TORCH_CHECK(labels_t.device() == crop_logits_in.device(), "labels must be on ", crop_logits_in.device(), "; got ",
              labels_t.device());
  const at::Tensor labels = labels_t.contiguous();
  at::Tensor correct = at::zeros({K}, labels.options());
  at::Tensor total = at::zeros({K}, labels.options());
  const int64_t* lp = labels.const_data_ptr<int64_t>();
  int64_t* cp = correct.data_ptr<int64_t>();
  int64_t* tp = total.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t y = lp[b];
    TORCH_CHECK(y >= 0 && y < K, "labels[", b, "] = ", y, " is out of range [0, ", K, ")");
    tp[y] += 1;
    cp[y] += (pred_p[b] == y);
  }
  return {mean, pred, correct, total};
}

at::Tensor tte_mean_unit_features_cpu(const at::Tensor& feats_in) {
  TORCH_CHECK(feats_in.dim() == 3, "crop_feats must be [C, B, D]; got shape ", feats_in.sizes());
  check_floating(feats_in, "crop_feats");
  const int64_t C = feats_in.size(0), B = feats_in.size(1), D = feats_in.size(2);
  TORCH_CHECK(C > 0, "crop_feats needs at least one crop; got shape ", feats_in.sizes());
  const at::Tensor x = feats_in.contiguous();
  at::Tensor out = at::empty({B, D}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tte_mean_unit_features_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const float inv_c = 1.f / static_cast<float>(C);
    at::parallel_for(0, B, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, C * D)), [&](int64_t begin, int64_t end) {
      std::vector<float> acc(D);
      for (int64_t b = begin; b < end; ++b) {
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* row = xp + (c * B + b) * D;
          const float inv = inv_norm_of<float>(std::sqrt(rows::sumsq<scalar_t, float>(row, D)));
          for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<float>(row[d]) * inv;
        }
        for (int64_t d = 0; d < D; ++d) op[b * D + d] = static_cast<scalar_t>(acc[d] * inv_c);
      }
    });
  });
  return out;
}

}  // namespace

LPF_CPU_LIBRARY_IMPL(CPU, m) {
  m.impl("tte_aggregate", &tte_aggregate_cpu);
  m.impl("tte_mean_unit_features", &tte_mean_unit_features_cpu);
}

}  // namespace LPF_CPU_NS
}  // namespace liftplus_fast
