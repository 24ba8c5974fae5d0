// Autocast (CUDA) kernels of layer_norm and add_layer_norm. torch runs layer_norm in float32
// under CUDA autocast (its float32 list: float16/bfloat16 CUDA arguments are cast to float32,
// and the output is float32); addnorm's LayerNorm ops follow that policy, so that
// addnorm.LayerNorm under autocast returns what nn.LayerNorm returns. add_layer_norm casts
// input and residual where h is float32 anyway (a float32 residual, as the residual stream
// is under autocast, or residual_in_fp32): h is then eager's x + r exactly, and out
// F.layer_norm(h)'s float32 output; so it does without a residual when h is not returned.
// A float16/bfloat16 input and residual (or an input whose h = dropout(input) is returned)
// keep their dtype: h is eager's in it, and out has it too, where eager's layer_norm of h
// is float32 (the same values, rounded once more). torch has no autocast policy for
// rms_norm, nor for either norm on the CPU: rms_norm, add_rms_norm and the CPU fall through
// to the kernels, which take float16/bfloat16 input with float32 weights.

#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace addnorm {
namespace {

template <typename T>
T to_float(const T& t) {  // (float16/bfloat16 CUDA tensors; others as they are)
  return at::autocast::cached_cast(at::kFloat, t, c10::DeviceType::CUDA);
}

at::Tensor layer_norm_autocast(const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
                               const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, double eps) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("addnorm::layer_norm", "")
                             .typed<at::Tensor(const at::Tensor&, c10::SymIntArrayRef,
                                               const std::optional<at::Tensor>&,
                                               const std::optional<at::Tensor>&, double)>();
  return op.call(to_float(input), normalized_shape, to_float(weight), to_float(bias), eps);
}

std::tuple<at::Tensor, at::Tensor> add_layer_norm_autocast(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    c10::SymIntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool return_residual,
    bool residual_in_fp32, double dropout_p, const std::optional<at::Tensor>& dropout_seed,
    bool memory_efficient) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("addnorm::add_layer_norm", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const std::optional<at::Tensor>&, c10::SymIntArrayRef,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double, bool,
              bool, double, const std::optional<at::Tensor>&, bool)>();
  const bool h_float =
      residual.has_value()
          ? residual_in_fp32 ||
                c10::promoteTypes(input.scalar_type(), residual->scalar_type()) == at::kFloat
          : !return_residual;
  return op.call(h_float ? to_float(input) : input, h_float ? to_float(residual) : residual,
                 normalized_shape, to_float(weight), to_float(bias), eps, return_residual,
                 residual_in_fp32, dropout_p, dropout_seed, memory_efficient);
}

}  // namespace

TORCH_LIBRARY_IMPL(addnorm, AutocastCUDA, m) {
  m.impl("layer_norm", &layer_norm_autocast);
  m.impl("add_layer_norm", &add_layer_norm_autocast);
}

}  // namespace addnorm
