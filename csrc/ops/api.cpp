// The C++ API (include/addnorm/ops.h): each entry calls its op through the dispatcher, so
// callers get autograd and every backend; and what the library says about itself.

#include <atomic>
#include <limits>

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/layer_norm.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/randint.h>
#include <ATen/ops/rms_norm.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <addnorm/ops.h>

#include "cpu/norm_cpu.h"
#include "ops/seed_draw.h"

namespace addnorm {

namespace {
template <typename Sig>
c10::TypedOperatorHandle<Sig> public_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// An undefined tensor given for an optional argument (e.g. a bias=false module's `bias`)
// means none, as for torch's own ops.
std::optional<at::Tensor> opt(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t : std::nullopt;
}
}  // namespace

at::Tensor layer_norm(
    const at::Tensor& input, at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps) {
  static const auto op = public_op<at::Tensor(
      const at::Tensor&, c10::SymIntArrayRef, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&, double)>("addnorm::layer_norm");
  if (input.is_nested()) {  // (torch's kernel takes nested tensors; the op does not)
    return at::layer_norm(input, normalized_shape, opt(weight), opt(bias), eps);
  }
  return op.call(input, c10::fromIntArrayRefSlow(normalized_shape), opt(weight), opt(bias),
                 eps);
}

at::Tensor rms_norm(
    const at::Tensor& input, at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight, std::optional<double> eps) {
  static const auto op = public_op<at::Tensor(
      const at::Tensor&, c10::SymIntArrayRef, const std::optional<at::Tensor>&,
      std::optional<double>)>("addnorm::rms_norm");
  auto w = opt(weight);
  if (input.is_nested()) {  // (as layer_norm)
    return at::rms_norm(input, normalized_shape, w, eps);
  }
  return op.call(input, c10::fromIntArrayRefSlow(normalized_shape), w, eps);
}

namespace detail {
namespace {
std::atomic<SeedDrawCheck> seed_draw_check{nullptr};
}  // namespace
void set_seed_draw_check(SeedDrawCheck check) { seed_draw_check.store(check); }
}  // namespace detail

at::Tensor dropout_seed(c10::Device device, std::optional<at::Generator> generator) {
  if (const auto check = detail::seed_draw_check.load();
      check != nullptr && c10::impl::TorchDispatchModeTLS::any_modes_set()) {
    check();  // (ops/seed_draw.h)
  }
  // Two integers in [0, 2^63 - 1), as addnorm.dropout_seed draws them (so the same
  // generator state gives the same seed from Python and from C++): one kernel, and every
  // bit random under inductor too (which draws a float64 uniform as a widened float32).
  return at::randint(0, std::numeric_limits<int64_t>::max(), {2}, generator,
                     at::TensorOptions().dtype(at::kLong).device(device));
}

at::Tensor dropout_mask(const at::Tensor& seed, at::IntArrayRef size, double dropout_p) {
  static const auto op = public_op<at::Tensor(
      const at::Tensor&, const at::Tensor&, double, std::optional<c10::ScalarType>)>(
      "addnorm::_dropout_apply");
  TORCH_CHECK(seed.defined(), "addnorm: dropout_mask: seed must be a tensor (int64 [2], from "
              "addnorm::dropout_seed), got an undefined tensor");
  const at::Tensor ones = at::ones(size, seed.options().dtype(at::kFloat));
  return op.call(ones, seed, dropout_p, std::nullopt).ne(0);
}

namespace {
// The seed tensor of a call with dropout, none without (nor for a dropout_p outside (0, 1],
// which the op refuses: nothing is drawn for it).
std::optional<at::Tensor> seed_for(
    const at::Tensor& input, double dropout_p, const std::optional<at::Generator>& generator) {
  if (!(dropout_p > 0.0 && dropout_p <= 1.0) || !input.defined()) {
    return std::nullopt;
  }
  return dropout_seed(input.device(), generator);
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> add_layer_norm(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool return_residual,
    bool residual_in_fp32, double dropout_p, std::optional<at::Generator> generator,
    bool memory_efficient) {
  static const auto op = public_op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const std::optional<at::Tensor>&, c10::SymIntArrayRef,
      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double, bool, bool,
      double, const std::optional<at::Tensor>&, bool)>("addnorm::add_layer_norm");
  return op.call(
      input, opt(residual), c10::fromIntArrayRefSlow(normalized_shape), opt(weight), opt(bias),
      eps, return_residual, residual_in_fp32, dropout_p, seed_for(input, dropout_p, generator),
      memory_efficient);
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    std::optional<double> eps, bool return_residual, bool residual_in_fp32, double dropout_p,
    std::optional<at::Generator> generator, bool memory_efficient) {
  static const auto op = public_op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const std::optional<at::Tensor>&, c10::SymIntArrayRef,
      const std::optional<at::Tensor>&, std::optional<double>, bool, bool, double,
      const std::optional<at::Tensor>&, bool)>("addnorm::add_rms_norm");
  return op.call(
      input, opt(residual), c10::fromIntArrayRefSlow(normalized_shape), opt(weight), eps,
      return_residual, residual_in_fp32, dropout_p, seed_for(input, dropout_p, generator),
      memory_efficient);
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
