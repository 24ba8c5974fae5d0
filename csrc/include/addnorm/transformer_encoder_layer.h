#pragma once

// addnorm::TransformerEncoderLayer: LibTorch counterpart of Python's
// torch.nn.TransformerEncoderLayer (same options, same math, same parameter names, so
// weights move between the two), with every Add & Norm through the fused ops. The math
// lives once, in the addnorm::transformer_encoder_layer op; the module holds parameters.
// In training every dropout's mask is a function of a seed drawn from torch's generator
// (not torch's masks for the same torch::manual_seed), regenerated in backward; the
// residual-branch dropouts that an Add & Norm follows run fused in it. See
// csrc/modules/transformer_encoder_layer.cpp.

#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>
#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/common.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <addnorm/export.h>
#include <addnorm/norm_modules.h>

namespace addnorm {

// The op torch.ops.addnorm.transformer_encoder_layer, through the dispatcher (autograd,
// every backend). src is [S, N, E] ([N, S, E] with batch_first) or unbatched [S, E].
// src_mask: bool (true = masked) or float (added) [S, S] or [N * nhead, S, S];
// src_key_padding_mask: bool or float [N, S]. is_causal is a hint that src_mask is the
// causal mask (as in torch: src_mask must then be given). activation: "relu" or "gelu".
// fast_path: inference in bfloat16 on the CPU (any dtype under CPU autocast), or
// float16/bfloat16 on CUDA, may run torch's fused inference kernel, as torch's layer does
// (false: never).
ADDNORM_API at::Tensor transformer_encoder_layer(
    const at::Tensor& src, const std::optional<at::Tensor>& src_mask,
    const std::optional<at::Tensor>& src_key_padding_mask, bool is_causal,
    const at::Tensor& in_proj_weight, const std::optional<at::Tensor>& in_proj_bias,
    const at::Tensor& out_proj_weight, const std::optional<at::Tensor>& out_proj_bias,
    const at::Tensor& linear1_weight, const std::optional<at::Tensor>& linear1_bias,
    const at::Tensor& linear2_weight, const std::optional<at::Tensor>& linear2_bias,
    const at::Tensor& norm1_weight, const std::optional<at::Tensor>& norm1_bias,
    const at::Tensor& norm2_weight, const std::optional<at::Tensor>& norm2_bias, int64_t nhead,
    double dropout, c10::string_view activation, double layer_norm_eps, bool batch_first,
    bool norm_first, bool training, bool fast_path = true);

// Options of addnorm::TransformerEncoderLayer: those of Python's nn.TransformerEncoderLayer.
struct TransformerEncoderLayerOptions {
  TransformerEncoderLayerOptions(int64_t d_model, int64_t nhead)
      : d_model_(d_model), nhead_(nhead) {}
  TORCH_ARG(int64_t, d_model);
  TORCH_ARG(int64_t, nhead);
  TORCH_ARG(int64_t, dim_feedforward) = 2048;
  TORCH_ARG(double, dropout) = 0.1;
  TORCH_ARG(std::string, activation) = "relu";  // "relu" or "gelu"
  TORCH_ARG(double, layer_norm_eps) = 1e-5;
  TORCH_ARG(bool, batch_first) = false;
  TORCH_ARG(bool, norm_first) = false;
  TORCH_ARG(bool, bias) = true;
  // Inference in bfloat16 on the CPU (any dtype under CPU autocast), or float16/bfloat16
  // on CUDA, may run torch's fused inference kernel, as torch's layer does (the fast_path
  // of transformer_encoder_layer above; Python's layer follows
  // torch.backends.mha.set_fastpath_enabled); false: addnorm's ops always.
  TORCH_ARG(bool, fast_path) = true;
};

// Parameters (named as in Python): self_attn.in_proj_weight, self_attn.in_proj_bias,
// self_attn.out_proj.{weight,bias}, linear1.{weight,bias}, linear2.{weight,bias},
// norm1.{weight,bias}, norm2.{weight,bias}; bias=false drops every bias. The submodules
// are those of Python's layer, in its order (self_attn, linear1, dropout, linear2, norm1,
// norm2, dropout1, dropout2), so that an archive of either layer (torch::save) loads into
// LibTorch's torch::nn::TransformerEncoderLayer and the reverse. They are parameter holders
// and settings: forward runs the addnorm::transformer_encoder_layer op, which takes one
// dropout probability and one training mode, and refuses by name a dropout submodule
// whose p is not options.dropout or, with dropout > 0, whose mode is not the layer's. In training
// mode its float32/float64 norms keep their outputs, not their inputs (memory_efficient):
// an in-place change of the post-LN layer's output before backward raises autograd's
// error, and second derivatives are refused. Eval mode computes them as far as the attention's
// backward does: on the CPU with the math backend only (at::globalContext().setSDPUseFlash(
// false)), as torch's layer, since the flash kernel's backward is not differentiable.
class ADDNORM_API TransformerEncoderLayerImpl
    : public torch::nn::Cloneable<TransformerEncoderLayerImpl> {
 public:
  TransformerEncoderLayerImpl(int64_t d_model, int64_t nhead)
      : TransformerEncoderLayerImpl(TransformerEncoderLayerOptions(d_model, nhead)) {}
  explicit TransformerEncoderLayerImpl(TransformerEncoderLayerOptions options_);

  void reset() override;
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;

  // src_mask / src_key_padding_mask: undefined tensors mean none.
  at::Tensor forward(
      const at::Tensor& src, const at::Tensor& src_mask = {},
      const at::Tensor& src_key_padding_mask = {}, bool is_causal = false);

  TransformerEncoderLayerOptions options;
  torch::nn::MultiheadAttention self_attn = nullptr;
  torch::nn::Linear linear1 = nullptr;
  torch::nn::Linear linear2 = nullptr;
  LayerNorm norm1 = nullptr;
  LayerNorm norm2 = nullptr;
  torch::nn::Dropout dropout = nullptr;   // after the activation
  torch::nn::Dropout dropout1 = nullptr;  // of the attention block's output
  torch::nn::Dropout dropout2 = nullptr;  // of the feed-forward block's output

 protected:
  FORWARD_HAS_DEFAULT_ARGS(
      {1, torch::nn::AnyValue(at::Tensor())}, {2, torch::nn::AnyValue(at::Tensor())},
      {3, torch::nn::AnyValue(false)})
};
TORCH_MODULE(TransformerEncoderLayer);

}  // namespace addnorm
