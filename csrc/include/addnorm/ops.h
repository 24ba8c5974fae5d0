#pragma once

// C++ entry points of the addnorm ops. Each call goes through the PyTorch dispatcher,
// so it gets autograd, every backend (CPU, CUDA) and works under tracing. An undefined
// tensor given for an optional tensor argument means none, as for torch's own ops.

#include <optional>
#include <tuple>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <addnorm/export.h>

namespace addnorm {

// F.layer_norm: normalizes the trailing normalized_shape dims of input.
ADDNORM_API at::Tensor layer_norm(
    const at::Tensor& input,                   // [..., *normalized_shape]
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight = std::nullopt,  // [*normalized_shape]
    const std::optional<at::Tensor>& bias = std::nullopt,    // [*normalized_shape]
    double eps = 1e-5);

// F.rms_norm: eps = nullopt means the machine epsilon of the type torch computes in
// (float32 for float16/bfloat16/float32 input, float64 for float64), as F.rms_norm does.
ADDNORM_API at::Tensor rms_norm(
    const at::Tensor& input,                   // [..., *normalized_shape]
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight = std::nullopt,  // [*normalized_shape]
    std::optional<double> eps = std::nullopt);

// h = dropout(input, dropout_p) + residual (residual may be absent); returns
// (layer_norm(h), h). h has the residual's dtype, or float32 with residual_in_fp32. With
// return_residual=false h is not written and the second result is an empty tensor.
// dropout_p > 0 drops elements of input with a keep-mask drawn from generator (default:
// the device's default generator) through dropout_seed(), never stored: backward
// regenerates it. (Apply it in training only, as torch::nn::functional::dropout's caller
// does.) memory_efficient: autograd keeps the output instead of h and backward recovers
// the normalized values from it (on the CPU in eager mode a weight with a zero, or a bias
// so far above its weight that out's rounding would leave them wrong, falls back to keeping
// h; elsewhere such a weight gives non-finite gradients or an error, such a bias inaccurate
// ones: see the README; no second derivatives).
ADDNORM_API std::tuple<at::Tensor, at::Tensor> add_layer_norm(
    const at::Tensor& input,                   // [..., *normalized_shape]
    const std::optional<at::Tensor>& residual, // same shape as input
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight = std::nullopt,
    const std::optional<at::Tensor>& bias = std::nullopt,
    double eps = 1e-5,
    bool return_residual = true,
    bool residual_in_fp32 = false,
    double dropout_p = 0.0,
    std::optional<at::Generator> generator = std::nullopt,
    bool memory_efficient = false);

// h = dropout(input, dropout_p) + residual; returns (rms_norm(h), h). Same conventions as
// add_layer_norm.
ADDNORM_API std::tuple<at::Tensor, at::Tensor> add_rms_norm(
    const at::Tensor& input,
    const std::optional<at::Tensor>& residual,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight = std::nullopt,
    std::optional<double> eps = std::nullopt,
    bool return_residual = true,
    bool residual_in_fp32 = false,
    double dropout_p = 0.0,
    std::optional<at::Generator> generator = std::nullopt,
    bool memory_efficient = false);

// The seed of one fused-dropout call: an int64 tensor [2] on device (two integers in
// [0, 2^63 - 1)), drawn from generator (default: the device's default generator, so it follows
// torch::manual_seed and CUDA graph replays draw a fresh one). The ops' dropout_seed
// argument; the mask is a function of it.
ADDNORM_API at::Tensor dropout_seed(
    c10::Device device, std::optional<at::Generator> generator = std::nullopt);

// The keep-mask (bool, shape size) that dropout_p and seed give (for tests and debugging).
ADDNORM_API at::Tensor dropout_mask(const at::Tensor& seed, at::IntArrayRef size, double dropout_p);

// Version string of the library, e.g. "0.1.0".
ADDNORM_API const char* version();

// The CPU instruction set the CPU kernels run with ("AVX512", "AVX2" or "DEFAULT").
ADDNORM_API const char* cpu_kernel_capability();

// True when libaddnorm was built with its CUDA kernels.
ADDNORM_API bool built_with_cuda();

namespace detail {
// Referenced from every translation unit that includes an addnorm header (all include
// this one), so that a linker using --as-needed keeps libaddnorm, whose static
// initializers register the ops, in an app that calls them only through the dispatcher.
// (The CMake package also links it with --no-as-needed.)
ADDNORM_API int ensure_ops_registered();
[[maybe_unused]] inline const int ops_registered = ensure_ops_registered();
}  // namespace detail

}  // namespace addnorm
