#pragma once

// addnorm::TransformerEncoder: a stack of addnorm::TransformerEncoderLayer, LibTorch
// counterpart of Python's torch.nn.TransformerEncoder (encoder_layer cloned num_layers
// times, an optional final norm; parameter names layers.<i>.* and norm.*, so that a
// state_dict moves between the two). LibTorch's torch::nn::TransformerEncoder takes only
// torch::nn::TransformerEncoderLayer.

#include <cstdint>
#include <ostream>

#include <ATen/core/Tensor.h>
#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/modules/common.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/pimpl.h>

#include <addnorm/export.h>
#include <addnorm/transformer_encoder_layer.h>

namespace addnorm {

// Options of addnorm::TransformerEncoder: those of LibTorch's
// torch::nn::TransformerEncoderOptions, and Python's nn.TransformerEncoder's but
// enable_nested_tensor and mask_check (no nested-tensor inference path; is_causal is the
// caller's hint, not detected from the mask).
struct ADDNORM_API TransformerEncoderOptions {
  TransformerEncoderOptions(TransformerEncoderLayer encoder_layer, int64_t num_layers);
  // A layer made from these options, then cloned.
  TransformerEncoderOptions(const TransformerEncoderLayerOptions& layer_options,
                            int64_t num_layers);
  TORCH_ARG(TransformerEncoderLayer, encoder_layer) = nullptr;
  TORCH_ARG(int64_t, num_layers);
  // The final norm (Python's norm=), e.g. addnorm::LayerNorm; empty: none.
  TORCH_ARG(torch::nn::AnyModule, norm);
};

class ADDNORM_API TransformerEncoderImpl : public torch::nn::Cloneable<TransformerEncoderImpl> {
 public:
  TransformerEncoderImpl(TransformerEncoderLayer encoder_layer, int64_t num_layers)
      : TransformerEncoderImpl(TransformerEncoderOptions(std::move(encoder_layer), num_layers)) {}
  TransformerEncoderImpl(const TransformerEncoderLayerOptions& layer_options, int64_t num_layers)
      : TransformerEncoderImpl(TransformerEncoderOptions(layer_options, num_layers)) {}
  explicit TransformerEncoderImpl(TransformerEncoderOptions options_);

  // Clones options.encoder_layer() num_layers times (each with the layer's parameter
  // values, as Python's deepcopy) and options.norm().
  void reset() override;
  // Re-initializes every layer (TransformerEncoderLayerImpl::reset_parameters) and clones
  // options.norm() afresh (a norm module has no common reset), as LibTorch's stack does,
  // onto the device and dtype of the norm it replaces (else the layers'). A module in
  // layers that is not an addnorm layer is refused before anything changes.
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;

  // Each layer's forward in turn (masks and is_causal as the layer takes them: undefined
  // tensors mean none), then the norm. A module in layers that is not an
  // addnorm::TransformerEncoderLayer is refused by index.
  at::Tensor forward(const at::Tensor& src, const at::Tensor& mask = {},
                     const at::Tensor& src_key_padding_mask = {}, bool is_causal = false);

  TransformerEncoderOptions options;
  torch::nn::ModuleList layers = nullptr;
  torch::nn::AnyModule norm;

 protected:
  FORWARD_HAS_DEFAULT_ARGS(
      {1, torch::nn::AnyValue(at::Tensor())}, {2, torch::nn::AnyValue(at::Tensor())},
      {3, torch::nn::AnyValue(false)})
};
TORCH_MODULE(TransformerEncoder);

}  // namespace addnorm
