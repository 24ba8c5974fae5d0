#pragma once

// The four public ops (layer_norm, rms_norm, add_layer_norm, add_rms_norm) are one
// computation, (input, residual, normalized_shape, weight, bias, eps, is_rms,
// return_residual, residual_in_fp32, dropout_p, dropout_seed, memory_efficient) -> (out, h),
// over the internal ops _norm_fwd and
// _norm_bwd. register_public_norm_ops<impl>(m) registers the four for one dispatch key,
// mapped onto impl: the CompositeExplicitAutograd kernels (ops/norm_composite.cpp) and the
// Autograd kernels (ops/norm_autograd.cpp) share the mapping.

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/SymIntArrayRef.h>
#include <torch/library.h>

#include "ops/norm_checks.h"

namespace addnorm {

using NormImpl = std::tuple<at::Tensor, at::Tensor> (*)(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    c10::SymIntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool is_rms, bool return_residual,
    bool residual_in_fp32, double dropout_p, const std::optional<at::Tensor>& dropout_seed,
    bool memory_efficient);

// rms_norm of a float64 weight beside narrower input, which torch's rms_norm takes (the
// ops refuse any other weight wider than the input): what torch computes, the norm in
// float32, times the weight in float64, rounded to the input's dtype. The weight is checked
// (strided, on the input's device); the norm is rms_norm's call of float32 input (input of
// any dtype but float16, bfloat16 and float32 as it is, which that call refuses) with a
// weight of ones, by which it multiplies exactly, so that its checks run on the weight's
// shape.
at::Tensor rms_norm_float64_weight(const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
                                   const at::Tensor& weight, std::optional<double> eps);

template <NormImpl impl>
void register_public_norm_ops(torch::Library& m) {
  m.impl("layer_norm",
         [](const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
            const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
            double eps) {
           return std::get<0>(impl(input, std::nullopt, normalized_shape, weight, bias, eps,
                                   /*is_rms=*/false, false, false, 0.0, std::nullopt, false));
         });
  m.impl("rms_norm",
         [](const at::Tensor& input, c10::SymIntArrayRef normalized_shape,
            const std::optional<at::Tensor>& weight, std::optional<double> eps) {
           check_input_tensor(input);
           if (weight.has_value() && weight->defined() &&
               weight->scalar_type() == at::kDouble && input.scalar_type() != at::kDouble) {
             return rms_norm_float64_weight(input, normalized_shape, *weight, eps);
           }
           return std::get<0>(impl(input, std::nullopt, normalized_shape, weight, std::nullopt,
                                   eps.value_or(default_rms_eps(input.scalar_type())),
                                   /*is_rms=*/true, false, false, 0.0, std::nullopt, false));
         });
  m.impl("add_layer_norm",
         [](const at::Tensor& input, const std::optional<at::Tensor>& residual,
            c10::SymIntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
            const std::optional<at::Tensor>& bias, double eps, bool return_residual,
            bool residual_in_fp32, double dropout_p,
            const std::optional<at::Tensor>& dropout_seed, bool memory_efficient) {
           return impl(input, residual, normalized_shape, weight, bias, eps, /*is_rms=*/false,
                       return_residual, residual_in_fp32, dropout_p, dropout_seed,
                       memory_efficient);
         });
  m.impl("add_rms_norm",
         [](const at::Tensor& input, const std::optional<at::Tensor>& residual,
            c10::SymIntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
            std::optional<double> eps, bool return_residual, bool residual_in_fp32,
            double dropout_p, const std::optional<at::Tensor>& dropout_seed,
            bool memory_efficient) {
           check_input_tensor(input);
           return impl(input, residual, normalized_shape, weight, std::nullopt,
                       eps.value_or(default_rms_eps(input.scalar_type())), /*is_rms=*/true,
                       return_residual, residual_in_fp32, dropout_p, dropout_seed,
                       memory_efficient);
         });
}

// Typed handles of the internal ops, for calls through the dispatcher.
using NormFwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, c10::SymIntArrayRef,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double, bool, bool, bool,
    double, const std::optional<at::Tensor>&);
using DropoutApplySig = at::Tensor(const at::Tensor&, const at::Tensor&, double,
                                   std::optional<c10::ScalarType>);
using NormBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const std::optional<at::Tensor>&, bool, bool, bool,
    std::optional<double>, bool, const std::optional<at::Tensor>&,
    std::optional<c10::ScalarType>, double, const std::optional<at::Tensor>&, bool);

inline c10::TypedOperatorHandle<NormFwdSig> norm_fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("addnorm::_norm_fwd", "").typed<NormFwdSig>();
  return op;
}

inline c10::TypedOperatorHandle<DropoutApplySig> dropout_apply_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("addnorm::_dropout_apply", "")
                             .typed<DropoutApplySig>();
  return op;
}

using DropoutMatmulSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    double);

inline c10::TypedOperatorHandle<DropoutMatmulSig> dropout_matmul_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("addnorm::_dropout_matmul", "")
                             .typed<DropoutMatmulSig>();
  return op;
}

inline c10::TypedOperatorHandle<NormBwdSig> norm_bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("addnorm::_norm_bwd", "").typed<NormBwdSig>();
  return op;
}

}  // namespace addnorm
