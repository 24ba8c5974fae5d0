// The LibTorch norm modules (addnorm/norm_modules.h): parameter holders whose forward calls
// the C++ functions of addnorm/ops.h with the module's options and parameters (an
// undefined parameter or residual means none there).

#include <ios>
#include <optional>
#include <ostream>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/nn/init.h>

#include <addnorm/norm_modules.h>
#include <addnorm/ops.h>

namespace addnorm {
namespace {

// Registers weight (ones) and, if with_bias, bias (zeros) of shape on m when affine; the
// others are left undefined. A negative size is refused by name (at::empty's message names
// neither the module nor normalized_shape).
void make_params(torch::nn::Module& m, const char* module, const std::vector<int64_t>& shape,
                 bool affine, bool with_bias, at::Tensor& weight, at::Tensor* bias) {
  for (const int64_t size : shape) {
    TORCH_CHECK(size >= 0, "addnorm::", module, ": normalized_shape must have no negative "
                "size, got ", at::IntArrayRef(shape));
  }
  weight = affine ? m.register_parameter("weight", at::empty(shape)) : at::Tensor();
  if (bias != nullptr) {
    *bias = affine && with_bias ? m.register_parameter("bias", at::empty(shape)) : at::Tensor();
  }
}

void init_params(const at::Tensor& weight, const at::Tensor& bias) {
  if (weight.defined()) torch::nn::init::ones_(weight);
  if (bias.defined()) torch::nn::init::zeros_(bias);
}

void check_dropout(double p, const char* module) {
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "addnorm::", module,
              ": dropout must be in [0, 1], got ", p);
}

// At construction (reset), as the dropout: the ops refuse it at the first call, without
// the module's name. (RMSNorm's eps may be unset: the dtype's machine epsilon.)
void check_eps(std::optional<double> eps, const char* module) {
  TORCH_CHECK(!eps.has_value() || *eps >= 0.0, "addnorm::", module,  // (NaN too)
              ": eps must be a non-negative number, got ", eps.value_or(0.0));
}

std::ostream& print_eps(std::ostream& stream, std::optional<double> eps) {
  if (eps.has_value()) return stream << *eps;
  return stream << "None";
}

// The fused add's options in LibTorch's pretty_print style, with Python's option names.
template <typename Options>
void print_add_options(std::ostream& stream, const Options& o) {
  stream << ", return_residual=" << o.return_residual()
         << ", residual_in_fp32=" << o.residual_in_fp32() << ", dropout=" << o.dropout()
         << ", memory_efficient=" << o.memory_efficient() << ")";
}

}  // namespace

LayerNormImpl::LayerNormImpl(LayerNormOptions options_) : options(std::move(options_)) {
  reset();
}

void LayerNormImpl::reset() {
  check_eps(options.eps(), "LayerNorm");
  make_params(*this, "LayerNorm", options.normalized_shape(), options.elementwise_affine(),
              options.bias(), weight, &bias);
  reset_parameters();
}

void LayerNormImpl::reset_parameters() { init_params(weight, bias); }

void LayerNormImpl::pretty_print(std::ostream& stream) const {
  stream << "addnorm::LayerNorm(" << at::IntArrayRef(options.normalized_shape())
         << ", eps=" << options.eps() << ", elementwise_affine=" << std::boolalpha
         << options.elementwise_affine() << ", bias=" << options.bias() << ")";
}

at::Tensor LayerNormImpl::forward(const at::Tensor& input) {
  return addnorm::layer_norm(input, options.normalized_shape(), weight, bias,
                             options.eps());
}

RMSNormImpl::RMSNormImpl(RMSNormOptions options_) : options(std::move(options_)) { reset(); }

void RMSNormImpl::reset() {
  check_eps(options.eps(), "RMSNorm");
  make_params(*this, "RMSNorm", options.normalized_shape(), options.elementwise_affine(),
              false, weight, nullptr);
  reset_parameters();
}

void RMSNormImpl::reset_parameters() { init_params(weight, at::Tensor()); }

void RMSNormImpl::pretty_print(std::ostream& stream) const {
  stream << "addnorm::RMSNorm(" << at::IntArrayRef(options.normalized_shape()) << ", eps=";
  print_eps(stream, options.eps()) << ", elementwise_affine=" << std::boolalpha
                                   << options.elementwise_affine() << ")";
}

at::Tensor RMSNormImpl::forward(const at::Tensor& input) {
  return addnorm::rms_norm(input, options.normalized_shape(), weight, options.eps());
}

AddLayerNormImpl::AddLayerNormImpl(AddLayerNormOptions options_)
    : options(std::move(options_)) {
  reset();
}

void AddLayerNormImpl::reset() {
  check_dropout(options.dropout(), "AddLayerNorm");
  check_eps(options.eps(), "AddLayerNorm");
  make_params(*this, "AddLayerNorm", options.normalized_shape(), options.elementwise_affine(),
              options.bias(), weight, &bias);
  reset_parameters();
}

void AddLayerNormImpl::reset_parameters() { init_params(weight, bias); }

void AddLayerNormImpl::pretty_print(std::ostream& stream) const {
  stream << "addnorm::AddLayerNorm(" << at::IntArrayRef(options.normalized_shape())
         << ", eps=" << options.eps() << ", elementwise_affine=" << std::boolalpha
         << options.elementwise_affine() << ", bias=" << options.bias();
  print_add_options(stream, options);
}

std::tuple<at::Tensor, at::Tensor> AddLayerNormImpl::forward(const at::Tensor& input,
                                                             const at::Tensor& residual) {
  // (the probability is read at each call, as Python's module reads its attribute)
  check_dropout(options.dropout(), "AddLayerNorm");
  return addnorm::add_layer_norm(
      input, residual, options.normalized_shape(), weight, bias, options.eps(),
      options.return_residual(), options.residual_in_fp32(),
      is_training() ? options.dropout() : 0.0, std::nullopt, options.memory_efficient());
}

AddRMSNormImpl::AddRMSNormImpl(AddRMSNormOptions options_) : options(std::move(options_)) {
  reset();
}

void AddRMSNormImpl::reset() {
  check_dropout(options.dropout(), "AddRMSNorm");
  check_eps(options.eps(), "AddRMSNorm");
  make_params(*this, "AddRMSNorm", options.normalized_shape(), options.elementwise_affine(),
              false, weight, nullptr);
  reset_parameters();
}

void AddRMSNormImpl::reset_parameters() { init_params(weight, at::Tensor()); }

void AddRMSNormImpl::pretty_print(std::ostream& stream) const {
  stream << "addnorm::AddRMSNorm(" << at::IntArrayRef(options.normalized_shape()) << ", eps=";
  print_eps(stream, options.eps()) << ", elementwise_affine=" << std::boolalpha
                                   << options.elementwise_affine();
  print_add_options(stream, options);
}

std::tuple<at::Tensor, at::Tensor> AddRMSNormImpl::forward(const at::Tensor& input,
                                                           const at::Tensor& residual) {
  check_dropout(options.dropout(), "AddRMSNorm");
  return addnorm::add_rms_norm(
      input, residual, options.normalized_shape(), weight, options.eps(),
      options.return_residual(), options.residual_in_fp32(),
      is_training() ? options.dropout() : 0.0, std::nullopt, options.memory_efficient());
}

}  // namespace addnorm
