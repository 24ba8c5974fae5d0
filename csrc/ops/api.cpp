// The C++ API (include/addnorm/ops.h): each entry calls its op through the dispatcher, so
// callers get autograd and every backend; and what the library says about itself.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <addnorm/ops.h>

#include "cpu/norm_cpu.h"

namespace addnorm {

namespace {
template <typename Sig>
c10::TypedOperatorHandle<Sig> public_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}
}  // namespace

at::Tensor layer_norm(
    const at::Tensor& input, at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps) {
  static const auto op = public_op<at::Tensor(
      const at::Tensor&, c10::SymIntArrayRef, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&, double)>("addnorm::layer_norm");
  return op.call(input, c10::fromIntArrayRefSlow(normalized_shape), weight, bias, eps);
}

at::Tensor rms_norm(
    const at::Tensor& input, at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, std::optional<double> eps) {
  static const auto op = public_op<at::Tensor(
      const at::Tensor&, c10::SymIntArrayRef, const std::optional<at::Tensor>&,
      std::optional<double>)>("addnorm::rms_norm");
  return op.call(input, c10::fromIntArrayRefSlow(normalized_shape), weight, eps);
}

std::tuple<at::Tensor, at::Tensor> add_layer_norm(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool return_residual,
    bool residual_in_fp32) {
  static const auto op = public_op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const std::optional<at::Tensor>&, c10::SymIntArrayRef,
      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double, bool, bool)>(
      "addnorm::add_layer_norm");
  return op.call(
      input, residual, c10::fromIntArrayRefSlow(normalized_shape), weight, bias, eps,
      return_residual, residual_in_fp32);
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    std::optional<double> eps, bool return_residual, bool residual_in_fp32) {
  static const auto op = public_op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const std::optional<at::Tensor>&, c10::SymIntArrayRef,
      const std::optional<at::Tensor>&, std::optional<double>, bool, bool)>("addnorm::add_rms_norm");
  return op.call(
      input, residual, c10::fromIntArrayRefSlow(normalized_shape), weight, eps, return_residual,
      residual_in_fp32);
}

const char* version() { return ADDNORM_VERSION_STRING; }

const char* cpu_kernel_capability() { return cpu::capability(); }

bool built_with_cuda() {
  // Registration follows the build: the CUDA kernels exist when cuda/ was compiled in.
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("addnorm::_norm_fwd", "")
      .hasKernelForDispatchKey(c10::DispatchKey::CUDA);
}

namespace detail {
int ensure_ops_registered() { return 1; }
}  // namespace detail

}  // namespace addnorm
