#pragma once

// LibTorch norm modules, counterparts of the Python modules addnorm.LayerNorm, RMSNorm,
// AddLayerNorm and AddRMSNorm: the same options and parameter names (weight, bias).
// Parameters saved from LibTorch's torch::nn::LayerNorm load into LayerNorm and
// AddLayerNorm. Their forward calls the C++ functions of addnorm/ops.h (through the
// dispatcher: autograd, every backend). See csrc/modules/norm_modules.cpp.

#include <optional>
#include <ostream>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/modules/common.h>
#include <torch/nn/pimpl.h>

#include <addnorm/export.h>
#include <addnorm/ops.h>

namespace addnorm {

// Options of addnorm::LayerNorm (those of Python's nn.LayerNorm).
struct LayerNormOptions {
  /* implicit */ LayerNormOptions(std::vector<int64_t> normalized_shape)
      : normalized_shape_(std::move(normalized_shape)) {}
  TORCH_ARG(std::vector<int64_t>, normalized_shape);
  TORCH_ARG(double, eps) = 1e-5;
  TORCH_ARG(bool, elementwise_affine) = true;
  TORCH_ARG(bool, bias) = true;
};

// LayerNorm module running addnorm::layer_norm. Unlike torch::nn::LayerNorm it has
// Python's `bias` option (weight without bias).
class ADDNORM_API LayerNormImpl : public torch::nn::Cloneable<LayerNormImpl> {
 public:
  explicit LayerNormImpl(LayerNormOptions options_);
  void reset() override;
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;
  at::Tensor forward(const at::Tensor& input);

  LayerNormOptions options;
  at::Tensor weight;  // undefined without elementwise_affine
  at::Tensor bias;    // undefined without elementwise_affine or bias
};
TORCH_MODULE(LayerNorm);

// Options of addnorm::RMSNorm (those of Python's nn.RMSNorm). eps nullopt: the machine
// epsilon of the type the norm computes in (addnorm::rms_norm).
struct RMSNormOptions {
  /* implicit */ RMSNormOptions(std::vector<int64_t> normalized_shape)
      : normalized_shape_(std::move(normalized_shape)) {}
  TORCH_ARG(std::vector<int64_t>, normalized_shape);
  TORCH_ARG(std::optional<double>, eps) = std::nullopt;
  TORCH_ARG(bool, elementwise_affine) = true;
};

// RMSNorm module running addnorm::rms_norm.
class ADDNORM_API RMSNormImpl : public torch::nn::Cloneable<RMSNormImpl> {
 public:
  explicit RMSNormImpl(RMSNormOptions options_);
  void reset() override;
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;
  at::Tensor forward(const at::Tensor& input);

  RMSNormOptions options;
  at::Tensor weight;  // undefined without elementwise_affine
};
TORCH_MODULE(RMSNorm);

// Options of addnorm::AddLayerNorm (those of Python's addnorm.AddLayerNorm): LayerNorm's,
// and the fused add's (see addnorm::add_layer_norm). dropout: the probability applied to
// the input in training mode.
struct AddLayerNormOptions {
  /* implicit */ AddLayerNormOptions(std::vector<int64_t> normalized_shape)
      : normalized_shape_(std::move(normalized_shape)) {}
  TORCH_ARG(std::vector<int64_t>, normalized_shape);
  TORCH_ARG(double, eps) = 1e-5;
  TORCH_ARG(bool, elementwise_affine) = true;
  TORCH_ARG(bool, bias) = true;
  TORCH_ARG(bool, return_residual) = false;
  TORCH_ARG(bool, residual_in_fp32) = false;
  TORCH_ARG(double, dropout) = 0.0;
  TORCH_ARG(bool, memory_efficient) = false;
};

// Options of addnorm::AddRMSNorm (those of Python's addnorm.AddRMSNorm): RMSNorm's, and the
// fused add's.
struct AddRMSNormOptions {
  /* implicit */ AddRMSNormOptions(std::vector<int64_t> normalized_shape)
      : normalized_shape_(std::move(normalized_shape)) {}
  TORCH_ARG(std::vector<int64_t>, normalized_shape);
  TORCH_ARG(std::optional<double>, eps) = std::nullopt;
  TORCH_ARG(bool, elementwise_affine) = true;
  TORCH_ARG(bool, return_residual) = false;
  TORCH_ARG(bool, residual_in_fp32) = false;
  TORCH_ARG(double, dropout) = 0.0;
  TORCH_ARG(bool, memory_efficient) = false;
};

// norm(dropout(input) + residual): forward(input, residual) returns what
// addnorm::add_layer_norm returns with the options, (out, h), h an empty tensor unless
// return_residual (Python's module returns out alone then). The dropout applies in
// training mode only (is_training()), its mask drawn from the default generator; an
// undefined residual means none.
class ADDNORM_API AddLayerNormImpl : public torch::nn::Cloneable<AddLayerNormImpl> {
 public:
  explicit AddLayerNormImpl(AddLayerNormOptions options_);
  void reset() override;
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;
  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& input,
                                             const at::Tensor& residual = {});

  AddLayerNormOptions options;
  at::Tensor weight;  // undefined without elementwise_affine
  at::Tensor bias;    // undefined without elementwise_affine or bias

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(at::Tensor())})
};
TORCH_MODULE(AddLayerNorm);

// RMSNorm(dropout(input) + residual); see AddLayerNormImpl.
class ADDNORM_API AddRMSNormImpl : public torch::nn::Cloneable<AddRMSNormImpl> {
 public:
  explicit AddRMSNormImpl(AddRMSNormOptions options_);
  void reset() override;
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;
  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& input,
                                             const at::Tensor& residual = {});

  AddRMSNormOptions options;
  at::Tensor weight;  // undefined without elementwise_affine

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(at::Tensor())})
};
TORCH_MODULE(AddRMSNorm);

}  // namespace addnorm
