// Every addnorm op schema, in one place. Kernels are registered next to their code:
// cpu/norm_cpu.cpp (CPU) and cuda/norm_kernels.cu (CUDA) for the internal ops,
// ops/norm_meta.cpp (Meta) for the internal ops, ops/norm_composite.cpp
// (CompositeExplicitAutograd; NestedTensor*, to refuse nested input) for the public ones,
// ops/norm_autograd.cpp (Autograd: the public ops, _dropout_apply and _dropout_matmul;
// torch's not-implemented kernel for _norm_fwd and _norm_bwd), ops/norm_autocast.cpp
// (AutocastCUDA, the LayerNorm ones), ops/norm_batching.cpp (FuncTorchBatched: every op),
// modules/transformer_encoder_layer.cpp (CompositeImplicitAutograd and FuncTorchVmapMode).
// See docs/architecture.md.

#include <torch/library.h>

TORCH_LIBRARY(addnorm, m) {
  // LayerNorm over the trailing normalized_shape dims (F.layer_norm).
  m.def(
      "layer_norm(Tensor input, SymInt[] normalized_shape, Tensor? weight=None, "
      "Tensor? bias=None, float eps=1e-05) -> Tensor");
  // RMSNorm over the trailing normalized_shape dims (F.rms_norm).
  m.def(
      "rms_norm(Tensor input, SymInt[] normalized_shape, Tensor? weight=None, "
      "float? eps=None) -> Tensor");
  // Fused residual add + LayerNorm: h = dropout(input) + residual; returns
  // (layer_norm(h), h). dropout_p > 0 needs dropout_seed, an int64 tensor [2] on the
  // input's device (see ops/dropout_mask.h): the keep-mask is a function of it.
  // memory_efficient: autograd keeps the output instead of h, and backward recovers the
  // normalized values from it (see ops/norm_autograd.cpp).
  m.def(
      "add_layer_norm(Tensor input, Tensor? residual, SymInt[] normalized_shape, "
      "Tensor? weight=None, Tensor? bias=None, float eps=1e-05, *, "
      "bool return_residual=True, bool residual_in_fp32=False, float dropout_p=0., "
      "Tensor? dropout_seed=None, bool memory_efficient=False) -> (Tensor, Tensor)");
  // Fused residual add + RMSNorm: h = dropout(input) + residual; returns (rms_norm(h), h).
  m.def(
      "add_rms_norm(Tensor input, Tensor? residual, SymInt[] normalized_shape, "
      "Tensor? weight=None, float? eps=None, *, bool return_residual=True, "
      "bool residual_in_fp32=False, float dropout_p=0., Tensor? dropout_seed=None, "
      "bool memory_efficient=False) -> (Tensor, Tensor)");
  // nn.TransformerEncoderLayer's forward (CompositeImplicitAutograd, in
  // modules/transformer_encoder_layer.cpp); every Add & Norm through add_layer_norm.
  // fast_path=False: never torch's fused inference kernel (the Python layer passes
  // torch.backends.mha.get_fastpath_enabled()).
  m.def(
      "transformer_encoder_layer(Tensor src, Tensor? src_mask, Tensor? src_key_padding_mask, "
      "bool is_causal, Tensor in_proj_weight, Tensor? in_proj_bias, Tensor out_proj_weight, "
      "Tensor? out_proj_bias, Tensor linear1_weight, Tensor? linear1_bias, "
      "Tensor linear2_weight, Tensor? linear2_bias, Tensor norm1_weight, Tensor? norm1_bias, "
      "Tensor norm2_weight, Tensor? norm2_bias, int nhead, float dropout, str activation, "
      "float layer_norm_eps, bool batch_first, bool norm_first, bool training, "
      "bool fast_path=True) -> Tensor");
  // Internal forward: (out, residual_out, mean, rstd); what backward needs.
  m.def(
      "_norm_fwd(Tensor input, Tensor? residual, SymInt[] normalized_shape, Tensor? weight, "
      "Tensor? bias, float eps, bool is_rms, bool store_residual, bool residual_in_fp32, "
      "float dropout_p=0., Tensor? dropout_seed=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // Internal: input * keep-mask / (1 - p) in dtype (default: the input's), the mask of
  // dropout_seed over input's elements; the input gradient of the fused dropout, and the
  // mask itself (of ones).
  m.def("_dropout_apply(Tensor input, Tensor dropout_seed, float p, ScalarType? dtype=None) "
        "-> Tensor");
  // Internal: matmul(_dropout_apply(probs, dropout_seed, p), value), probs [..., L, S] and
  // value [..., S, D] with the same batch dims: the encoder layer's attention-probability
  // dropout and product with v, whose graph node keeps probs, not the dropped copy
  // (backward regenerates it).
  m.def("_dropout_matmul(Tensor probs, Tensor value, Tensor dropout_seed, float p) -> Tensor");
  // Internal backward: (grad_h, grad_weight, grad_bias, grad_input). eps: the forward's; with it the
  // CPU kernels, and the CUDA kernels for float32 and float64 data and for 16-bit data with a
  // float32 h, take the row statistics from
  // h itself, in double (double-double for float64; mean as the saved mean plus a correction,
  // rstd = 1 / sqrt(var + eps)); without it (and on CUDA for float16/bfloat16 data with a 16-bit
  // h, where eps serves only RMSNorm rows of one element: grad_h = g * eps * rstd^3) mean and
  // rstd as given.
  // from_output: h is the forward's output y instead (grad_out's dtype), the normalized
  // values are (y - bias) / weight (RMSNorm: y / weight), mean and eps are not used, and
  // grad_h has dtype h_dtype (default: y's); weight must have no zeros.
  // dropout_p > 0: the forward's fused dropout (h = dropout(input) + residual); grad_input
  // is grad_h times its regenerated keep-mask and scale, in grad_out's dtype, written in
  // the same pass (what _dropout_apply of grad_h gives). Without dropout grad_input is
  // empty. grad_h is written only with grad_h_wanted (without it and without dropout: the
  // weight and bias gradients alone).
  m.def(
      "_norm_bwd(Tensor grad_out, Tensor? grad_residual_out, Tensor h, Tensor mean, "
      "Tensor rstd, Tensor? weight, bool has_bias, bool is_rms, bool weight_grad=True, "
      "float? eps=None, *, bool from_output=False, Tensor? bias=None, "
      "ScalarType? h_dtype=None, float dropout_p=0., Tensor? dropout_seed=None, "
      "bool grad_h_wanted=True) -> (Tensor, Tensor, Tensor, Tensor)");
}
