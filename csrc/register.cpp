// The schemas of every liftplus_fast op, defined once. Kernels for each dispatch key live in
// ops/cpu/*.cpp and ops/cuda/*.cu (TORCH_LIBRARY_IMPL); autograd and fake (meta) kernels are
// registered from Python (liftplus_fast/ops/*.py) so torch.compile can trace every op.
#include <torch/library.h>

TORCH_LIBRARY(liftplus_fast, m) {
  // AdaptFormer: y = a + (m + s * up(relu(down(LN(a))))). Saves row mean/rstd (fp32, [N]) and
  // the pre-ReLU bottleneck z (fp32, [N, r]) for the backward (float64 for float64 inputs, which
  // the CPU kernel accepts for gradcheck). Parameters may have any float dtype; their gradients
  // come back in that dtype.
  m.def(
      "adaptformer_fwd(Tensor a, Tensor mlp_out, Tensor ln_w, Tensor ln_b, Tensor down_w, "
      "Tensor down_b, Tensor up_w, Tensor up_b, Tensor scale, float eps) "
      "-> (Tensor y, Tensor mean, Tensor rstd, Tensor z)");
  m.def(
      "adaptformer_bwd(Tensor grad_y, Tensor a, Tensor ln_w, Tensor ln_b, Tensor down_w, "
      "Tensor down_b, Tensor up_w, Tensor up_b, Tensor scale, Tensor mean, Tensor rstd, Tensor z) "
      "-> (Tensor grad_a, Tensor grad_ln_w, Tensor grad_ln_b, Tensor grad_down_w, "
      "Tensor grad_down_b, Tensor grad_up_w, Tensor grad_up_b, Tensor grad_scale)");
  // Logit-adjusted cosine cross-entropy: loss (fp32 scalar; fp64 for fp64 inputs), unadjusted
  // logits [B, K] when return_logits (else empty), per-row logsumexp of the adjusted logits
  // ([B], loss dtype). With compute_grad the forward also returns d loss / d feat and
  // d loss / d weight for grad_loss = 1 (else empty tensors), so the backward only scales them
  // and never recomputes the logits GEMM (as Liger-Kernel's fused linear cross-entropy).
  // la_cosine_ce_bwd is the recomputing backward for a forward run without compute_grad.
  m.def(
      "la_cosine_ce_fwd(Tensor feat, Tensor weight, Tensor labels, Tensor log_prior, "
      "float scale, float tau, bool return_logits, bool compute_grad=False) "
      "-> (Tensor loss, Tensor logits, Tensor lse, Tensor grad_feat, Tensor grad_weight)");
  m.def(
      "la_cosine_ce_bwd(Tensor grad_loss, Tensor feat, Tensor weight, Tensor labels, "
      "Tensor log_prior, Tensor lse, float scale, float tau) "
      "-> (Tensor grad_feat, Tensor grad_weight)");
  // Test-time ensembling: mean over crops, argmax, per-class correct/total counts (empty
  // tensors when labels is None).
  m.def(
      "tte_aggregate(Tensor crop_logits, Tensor? labels) "
      "-> (Tensor logits, Tensor pred, Tensor correct, Tensor total)");
  m.def("tte_mean_unit_features(Tensor crop_feats) -> Tensor");
  // Multi-head self-attention from the packed in-projection qkv ([B, N, 3D], or [N, B, 3D] when
  // not batch_first): out in qkv's layout ([B, N, D] / [N, B, D]) and the per-row log-sum-exp of
  // the scaled scores ([B, H, N], fp32; fp64 for fp64 inputs), which is all the backward keeps.
  m.def("attention_fwd(Tensor qkv, int num_heads, float scale, bool batch_first) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, int num_heads, float scale, "
      "bool batch_first) -> Tensor grad_qkv");
  // Whether attention_fwd/bwd have the bf16 micro-kernel (AVX512-BF16 at build time); without
  // it bf16 runs the fp32 fallback, which is slower than PyTorch's SDPA.
  m.def("attention_bf16_kernel() -> bool");
  // y = gelu(x + bias) for the MLP (x: the bias-free GEMM output [..., F]); kind 0 = QuickGELU
  // u·sigmoid(1.702u), 1 = GELU (erf), 2 = GELU (tanh). The backward needs only x.
  m.def("bias_gelu_fwd(Tensor x, Tensor bias, int kind) -> Tensor");
  m.def("bias_gelu_bwd(Tensor grad_y, Tensor x, Tensor bias, int kind) -> (Tensor grad_x, Tensor grad_bias)");
}
