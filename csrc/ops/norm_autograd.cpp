// Autograd of the public norm ops, in C++ so that LibTorch programs get gradients too.
//
// One graph node per call (NormFunction) with three outputs: out; h, the returned residual
// stream (empty and non-differentiable unless return_residual); and h kept for backward
// when it exists but is not returned (post-LN with a residual; never handed to callers,
// empty otherwise). The node saves the tensor that was normalized (h, an output of the
// node, or the input when there is neither a residual nor dropout; backward from the
// output, memory_efficient where it applies (below): out), mean, rstd, the
// weight, the bias (memory_efficient) and the fused dropout's seed.
//
// - First order: backward calls _norm_bwd, which adds the gradient flowing into the
//   returned h in the same pass.
// - A gradient into h alone (out unused) passes straight to input and residual: no norm
//   backward runs, weight and bias get no gradient, and no saved tensor but the fused
//   dropout's seed is read. The saved tensors stay until the norm's backward has run, so
//   backpropagating h and then out works, as with torch's separate add and layer_norm.
// - Higher order: with create_graph (or forward-mode tangents in backward), backward
//   computes the same gradients with differentiable ATen ops from the saved h, for their
//   graph, and takes their values from _norm_bwd (with_values_of); since h is an output of
//   this node, second derivatives flow back through it to input and residual.
// - Forward mode: the tangents of out and h follow from those of input, residual, weight
//   and bias (set_tangents below). With a graph node as well (forward-over-reverse), h is
//   built from differentiable ops first, so that the h the node keeps carries its tangent
//   (norm_autograd).
// - Fused dropout (h = dropout(input) + residual): the node keeps the seed tensor, never a
//   mask; input's gradient (and tangent) is h's times the mask regenerated from the seed,
//   written by _norm_bwd in its pass (_dropout_apply where only h's gradient flows). h is
//   written whenever dropout runs (unless backward reads the output instead), the input no
//   longer being h.
// - memory_efficient: the node keeps the output (which the next layer usually keeps anyway)
//   instead of h, and backward recovers the normalized values from it, xhat = (out - bias) /
//   weight (_norm_bwd's from_output). A weight with a zero makes that impossible (the
//   output holds nothing of h there; on the CPU a value whose float reciprocal overflows
//   counts as a zero). Where the weight can be read for free (a CPU tensor, in eager mode)
//   the node then keeps h as without the flag, and so it does for a weight too small for
//   out to hold xhat accurately (min_recoverable_weight); elsewhere it is not read
//   (no device synchronization, nothing data-dependent in traced graphs) and backward
//   meets the zero: the CPU kernel raises an error, the CUDA kernels give NaN gradients
//   for the rows (see the README). Rows of up to three elements, and an h wider than the
//   output (a float32 h beside a 16-bit input with a residual or dropout), keep h too
//   (from_output below). Second derivatives need h and are refused;
//   forward-mode tangents are computed from h in the forward, which then runs as without
//   the flag.
// - The returned h comes out of a node of its own (ResidualOutFunction, an identity after the
//   norm's node): torch's h = x + r comes before the norm, so its gradient includes the
//   norm's; here h is the norm node's sibling output, which the fused backward needs (the
//   gradient of h's other uses, added in the norm's pass), and the gradient at h is only
//   that of its other uses. So backward raises where h's gradient is asked for
//   (retain_grad, or torch.autograd.grad / backward(inputs=) with h among the inputs;
//   checked by a hook on h's node and, when h got no gradient, one on the norm's) or where
//   a hook on h changed it. Hooks that only read it (FSDP's, which trigger on every module
//   output) pass; they see the partial gradient.
// Under torch.compile both internal ops land in the traced graphs.

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/FuncTorchTLS.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/where.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/accumulate.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>
#include <torch/version.h>

#include "ops/norm_checks.h"
#include "ops/norm_launch.h"
#include "ops/norm_public.h"

namespace addnorm {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::isFwGradDefined;
using torch::autograd::variable_list;

// While the engine runs a NormFunction node through its apply specialization (below), on
// this thread: last, when the node's saved tensors are released after it (not
// retain_graph) and the tensor that was normalized was saved without saved-tensor hooks
// (the node's backward is then the last reader of h, and the reference counts of
// held_by_node_alone hold); engine_grads, always there: the gradients reached the backward
// moved from the engine's buffer, which with the backward's own argument makes two
// references to each (held_by_backward_alone); seed, for a backward through h alone, the
// fused dropout's saved seed unpacked alone (see the apply specialization).
struct NodeCall {
  bool last = false;
  bool engine_grads = false;
  at::Tensor seed;
};
thread_local NodeCall node_call;

struct InNodeCall {
  InNodeCall(bool last, at::Tensor seed) : prev(node_call) {
    node_call = NodeCall{last, true, std::move(seed)};
  }
  ~InNodeCall() { node_call = prev; }
  InNodeCall(const InNodeCall&) = delete;
  InNodeCall& operator=(const InNodeCall&) = delete;
  const NodeCall prev;
};

// Whether the saved h, a forward output of the node, is held by the node alone: its saved
// copy and the unpacked one (torch 2.11's SavedVariable of an output keeps its own TensorImpl
// of the storage), no other tensor or view on its memory (a user's, another node's saved
// variable), no Python object of it or of its storage (Python's references are not all in
// these counts: a saved-tensor hook may keep the tensor it packs); a plain tensor, outside
// any dispatch mode.
bool held_by_node_alone(const at::Tensor& h) {
  if (at::isTensorSubclassLike(h) || !h.has_storage() || h.use_count() != 1 ||
      h.unsafeGetTensorImpl()->pyobj_slot()->load_pyobj() != nullptr) {
    return false;
  }
  const c10::StorageImpl* storage = h.storage().unsafeGetStorageImpl();
  return h.storage().use_count() == 2 && storage->pyobj_slot()->load_pyobj() == nullptr;
}

// Whether a gradient the node's backward received (engine_grads) is held by the backward
// alone: the engine's moved buffer and the backward's argument (two references; a hook that
// kept it, a capture for torch.autograd.grad, the same tensor reaching another output or
// node, add more), the only tensor on its memory (a view's base, or another view of it, is
// another), no Python object of either (a tensor made or seen in Python keeps one), a plain
// tensor (not batched, wrapped, or in a dispatch mode).
bool held_by_backward_alone(const at::Tensor& grad) {
  if (!grad.defined() || at::isTensorSubclassLike(grad) || !grad.has_storage() ||
      grad.use_count() != 2 ||
      grad.unsafeGetTensorImpl()->pyobj_slot()->load_pyobj() != nullptr) {
    return false;
  }
  const c10::StorageImpl* storage = grad.storage().unsafeGetStorageImpl();
  return grad.storage().use_count() == 1 && storage->pyobj_slot()->load_pyobj() == nullptr;
}

bool requires_grad(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() && t->requires_grad();
}

c10::ScalarType compute_dtype(c10::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The reduction dims of the norm (the trailing ndim dims) and the leading (row) dims.
std::vector<int64_t> norm_dims(int64_t ndim) {
  std::vector<int64_t> dims;
  for (int64_t d = 1; d <= ndim; ++d) {
    dims.push_back(-d);
  }
  return dims;
}

at::Tensor sum_rows(const at::Tensor& t, int64_t ndim) {
  const int64_t lead = t.dim() - ndim;
  if (lead == 0) {
    return t;
  }
  std::vector<int64_t> dims;
  for (int64_t d = 0; d < lead; ++d) {
    dims.push_back(d);
  }
  return t.sum(dims);
}

// xhat = (h - mean(h)) * rstd (RMSNorm: h * rstd) and rstd, recomputed from h with ATen ops
// in the compute type, differentiable in h.
std::pair<at::Tensor, at::Tensor> normalize_composite(const at::Tensor& hc, int64_t ndim,
                                                      bool is_rms, double eps) {
  const auto dims = norm_dims(ndim);
  if (is_rms) {
    const at::Tensor rstd = (hc * hc).mean(dims, /*keepdim=*/true).add(eps).rsqrt();
    return {hc * rstd, rstd};
  }
  const at::Tensor d = hc - hc.mean(dims, /*keepdim=*/true);
  const at::Tensor rstd = (d * d).mean(dims, /*keepdim=*/true).add(eps).rsqrt();
  return {d * rstd, rstd};
}

// (grad_h, grad_weight, grad_bias) of out = norm(h) * weight + bias with differentiable ATen
// ops in the compute type: the higher-order path. grad_weight / grad_bias are undefined
// unless wanted.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward_composite(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& weight, bool weight_grad,
    bool bias_grad, bool is_rms, double eps, int64_t ndim) {
  const auto acc = compute_dtype(h.scalar_type());
  const auto dims = norm_dims(ndim);
  const at::Tensor hc = h.to(acc);
  const at::Tensor dy = grad_out.to(acc);
  const auto [xhat, rstd] = normalize_composite(hc, ndim, is_rms, eps);
  const at::Tensor g = weight.defined() ? dy * weight.to(acc) : dy;
  const at::Tensor c_gx = (g * xhat).mean(dims, /*keepdim=*/true);
  at::Tensor dh = is_rms ? rstd * (g - xhat * c_gx)
                         : rstd * (g - g.mean(dims, /*keepdim=*/true) - xhat * c_gx);
  at::Tensor dw = weight_grad ? sum_rows(dy * xhat, ndim) : at::Tensor();
  at::Tensor db = bias_grad ? sum_rows(dy, ndim) : at::Tensor();
  return {std::move(dh), std::move(dw), std::move(db)};
}

// The smallest |weight| from which backward recovers xhat from out as accurately as out's
// rounding allows (for xhat of unit scale). out = xhat * weight (+ bias) loses what falls
// below the output dtype's normal range: with denormals flushed (torch.set_flush_denormal)
// a product below float's smallest normal number, 2^-126, becomes 0 (double's: 2^-1022),
// and float16's subnormals are 2^-24 apart; xhat then errs by up to that floor / |weight|.
// float32 and bfloat16: 2^-100 (an error of at most 2^-26); float16: 2^-14, its smallest
// normal number (at most float16's unit rounding); float64: 1 / FLT_MAX, whose reciprocal
// still fits in float, as the CPU backward needs (at most 2^-894).
double min_recoverable_weight(c10::ScalarType out_dtype) {
  switch (out_dtype) {
    case at::kDouble:
      return 1.0 / static_cast<double>(std::numeric_limits<float>::max());
    case at::kHalf:
      return 0x1p-14;
    default:
      return 0x1p-100;
  }
}

// The unit rounding of the output dtype: out = weight * xhat + bias is rounded to it.
double unit_roundoff(c10::ScalarType out_dtype) {
  switch (out_dtype) {
    case at::kDouble:
      return 0x1p-53;
    case at::kHalf:
      return 0x1p-11;
    case at::kBFloat16:
      return 0x1p-8;
    default:
      return 0x1p-24;
  }
}

// Whether backward is to recover xhat from the output: false for a weight with a zero, an
// inf or NaN, or a bias with an inf or NaN (out then holds no xhat: the gradients would be
// NaN where torch's are finite), that can be seen for free (CPU tensors holding data: not
// fake or functional tensors of a trace). A weight below min_recoverable_weight counts as
// a zero. So does a column whose bias would leave the rebuilt xhat = (out - bias) / weight
// an error above 1/16: out's rounding, unit * |bias|, over |weight| (no weight: 1), where
// |bias| > |weight| / (16 unit) (float32: 2^20 |weight|; bfloat16: 16 |weight|). Those
// columns' gradients would be wrong, not only less accurate (a float32 weight of 1e-30 under
// a bias of 1: a weight gradient of 0; bfloat16, 2^-20 under 0.3: an input gradient of -63
// for -0.03).
bool output_invertible(const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& bias, c10::ScalarType out_dtype) {
  auto readable = [](const std::optional<at::Tensor>& t) {
    // (isTensorSubclassLike: also any active dispatch mode, as a FakeTensorMode or make_fx
    // tracing real tensors, where reading data fails)
    return t.has_value() && t->device().is_cpu() && !at::isTensorSubclassLike(*t);
  };
  // The values in double, read in a loop (a chain of small ops cost about 15 us a call). In
  // double: the thresholds round to 0 in float16, and float32's subnormal ones compare as 0
  // where denormals are flushed, so a zero weight would pass. (|.|: a negative view's sign
  // bit is not in the data.)
  auto values = [](const at::Tensor& t) { return t.to(at::kDouble).contiguous(); };
  constexpr double kInf = std::numeric_limits<double>::infinity();
  const at::Tensor b = readable(bias) ? values(*bias) : at::Tensor();
  const int64_t nb = b.defined() ? b.numel() : 0;
  const double* bv = b.defined() ? b.const_data_ptr<double>() : nullptr;
  for (int64_t j = 0; j < nb; ++j) {
    if (!(std::abs(bv[j]) < kInf)) return false;  // (NaN fails the comparison)
  }
  if (weight.has_value() && !readable(weight)) return true;
  const at::Tensor a = weight.has_value() ? values(*weight) : at::Tensor();
  const int64_t na = a.defined() ? a.numel() : 0;
  const double* av = a.defined() ? a.const_data_ptr<double>() : nullptr;
  const double floor = min_recoverable_weight(out_dtype);
  for (int64_t j = 0; j < na; ++j) {
    if (!(std::abs(av[j]) >= floor && std::abs(av[j]) < kInf)) return false;
  }
  if (a.defined() && na != nb) return true;  // (no bias, or a shape the op refuses)
  const double k = 16 * unit_roundoff(out_dtype);  // (|bias| * k exact: a power of 2)
  for (int64_t j = 0; j < nb; ++j) {
    if (std::abs(bv[j]) * k > (av != nullptr ? std::abs(av[j]) : 1.0)) return false;
  }
  return true;
}

// values + (graph - graph.detach()): the values of `values` with the derivatives (graph node
// and forward-mode tangent) of `graph`, computed in another way (in `values`' dtype; where
// graph is not finite, values alone, with no derivative there).
at::Tensor with_values_of(const at::Tensor& values, const at::Tensor& graph) {
  const at::Tensor g = graph.to(values.scalar_type());
  const at::Tensor plain = g.detach();
  return values + at::where(plain.isfinite(), g - plain, 0);
}

// The first-order gradients (grad_h with grad_h_in added, grad_weight, grad_bias, and with
// dropout grad_input) of the fused backward kernel, as plain values (no graph, no tangents),
// for the higher-order path.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> exact_first_order(
    const at::Tensor& grad_out, const at::Tensor& grad_h_in, const at::Tensor& h,
    const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& weight, bool weight_grad,
    bool bias_grad, bool is_rms, double eps, double dropout_p, const at::Tensor& seed) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto opt = [](const at::Tensor& t) {
    return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
  };
  return norm_bwd_op().call(grad_out, opt(grad_h_in), h, mean, rstd, opt(weight), bias_grad,
                            is_rms, weight_grad, eps, false, std::nullopt, std::nullopt,
                            dropout_p, opt(seed), /*grad_h_wanted=*/true);
}

at::Tensor sum_defined(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined()) {
    return b;
  }
  return b.defined() ? a + b : a;
}

// The fused dropout's keep-mask scaled by 1 / (1 - p), as a tensor like t (in t's dtype):
// a constant for differentiable formulas (higher-order backward, tangents).
at::Tensor dropout_scale_like(const at::Tensor& t, const at::Tensor& seed, double p) {
  return dropout_apply_op().call(at::ones_like(t), seed, p, std::nullopt);
}

// The gradient of input in h = dropout(input) + residual, in dtype: grad_h times the
// regenerated mask and scale, one pass (differentiably when a higher-order graph is built).
at::Tensor dropout_input_grad(const at::Tensor& grad_h, const at::Tensor& seed, double p,
                              c10::ScalarType dtype) {
  if (p == 0.0) {
    return grad_h.to(dtype);
  }
  if (at::GradMode::is_enabled() || isFwGradDefined(grad_h)) {
    return (grad_h * dropout_scale_like(grad_h, seed, p)).to(dtype);
  }
  return dropout_apply_op().call(grad_h, seed, p, dtype);
}

// The node's flags, dtypes and normalized_shape's length, as one saved_data entry (each
// entry costs a string key, made, hashed and freed at every call).
struct NodeState {
  bool from_output = false;  // backward recovers xhat from out (memory_efficient)
  bool kept = false;         // h was written for backward alone (h_kept)
  bool has_residual = false;
  bool weight_grad = false;
  bool bias_grad = false;    // (LayerNorm with a bias that requires grad)
  bool is_rms = false;
  bool returned_h = false;
  c10::ScalarType h_dtype = at::kFloat;
  c10::ScalarType input_dtype = at::kFloat;
  c10::ScalarType residual_dtype = at::kFloat;
  c10::ScalarType bias_dtype = at::kFloat;
  int64_t ndim = 0;

  int64_t pack() const {
    const bool flags[] = {from_output, kept,   has_residual, weight_grad,
                          bias_grad,   is_rms, returned_h};
    const c10::ScalarType dtypes[] = {h_dtype, input_dtype, residual_dtype, bias_dtype};
    int64_t v = ndim << 40;
    for (int i = 0; i < 7; ++i) v |= int64_t{flags[i]} << i;
    for (int i = 0; i < 4; ++i) v |= int64_t{static_cast<uint8_t>(dtypes[i])} << (8 + 8 * i);
    return v;
  }
  static NodeState unpack(int64_t v) {
    NodeState s;
    bool* flags[] = {&s.from_output, &s.kept,   &s.has_residual, &s.weight_grad,
                     &s.bias_grad,   &s.is_rms, &s.returned_h};
    c10::ScalarType* dtypes[] = {&s.h_dtype, &s.input_dtype, &s.residual_dtype, &s.bias_dtype};
    for (int i = 0; i < 7; ++i) *flags[i] = (v >> i) & 1;
    for (int i = 0; i < 4; ++i) {
      *dtypes[i] = static_cast<c10::ScalarType>(static_cast<int8_t>((v >> (8 + 8 * i)) & 0xff));
    }
    s.ndim = v >> 40;
    return s;
  }
};

class NormFunction : public torch::autograd::Function<NormFunction> {
 public:
  // Returns {out, h, h_kept} (see the top of this file). Used only when a gradient can flow
  // (see norm_autograd).
  static variable_list forward(
      AutogradContext* ctx,
      const at::Tensor& input,                    // [..., *normalized_shape]
      const std::optional<at::Tensor>& residual,  // like input, or absent
      c10::SymIntArrayRef normalized_shape,
      const std::optional<at::Tensor>& weight,    // [*normalized_shape] or absent
      const std::optional<at::Tensor>& bias,      // [*normalized_shape] or absent
      double eps,
      bool is_rms,
      bool return_residual,
      bool residual_in_fp32,
      double dropout_p,
      const std::optional<at::Tensor>& dropout_seed,
      bool memory_efficient) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->set_materialize_grads(false);  // an unused output gets no [M, N] zero gradient
    const bool has_residual = residual.has_value();
    const bool drop = dropout_p > 0.0;
    // Rows of 1 to 3 elements keep h: their exact input gradient nearly cancels, so the
    // rounding of out would be most of it (up to 3x torch's error), for little memory. So
    // does an h wider than out (float32 beside float16/bfloat16 input: a float32 residual,
    // or residual_in_fp32 with a residual or dropout): xhat rebuilt from the rounded out
    // would give the float32 gradients of the residual and the weight 16-bit accuracy.
    // (Without either, h is the input widened exactly: nothing to gain.) A symbolic row
    // length counts as long only where its range says so: no guard (an unbacked size raised,
    // and an exported program's range of N was narrowed to N >= 4).
    const auto h_dtype = h_dtype_of(
        input.scalar_type(), has_residual ? std::optional(residual->scalar_type()) : std::nullopt,
        residual_in_fp32);
    const bool long_rows =
        TORCH_STATICALLY_KNOWN_TRUE(c10::multiply_integers(normalized_shape).sym_gt(3));
    const bool from_output = memory_efficient && long_rows &&
                             (h_dtype == input.scalar_type() || (!has_residual && !drop)) &&
                             output_invertible(weight, is_rms ? std::nullopt : bias,
                                               input.scalar_type());
    // Backward needs h (unless from_output); with a residual or dropout it exists only if
    // we write it.
    const bool kept = (has_residual || drop) && !return_residual && !from_output;
    const bool store_residual = return_residual || kept;
    auto [out, h, mean, rstd] = norm_fwd_op().call(
        input, residual, normalized_shape, weight, bias, eps, is_rms, store_residual,
        residual_in_fp32, dropout_p, dropout_seed);
    // (h is empty, [0], where it is not stored)
    at::Tensor h_returned = return_residual || !store_residual ? h : at::empty({0}, h.options());
    at::Tensor h_kept = kept ? h : at::empty({0}, h.options());
    // (No mark_non_differentiable, which compiled autograd refuses in C++ nodes: the caller
    // detaches a returned h that is not differentiable; an empty h_kept gets no gradient.)
    // What was normalized: h when it was written (an output of this node, so higher-order
    // gradients reach input and residual through it), else the input; from_output: out.
    const at::Tensor& normalized =
        from_output ? out : return_residual ? h_returned : (kept ? h_kept : input);
    const at::Tensor bias_kept = from_output && !is_rms ? bias.value_or(at::Tensor()) : at::Tensor();
    // The seed (int64 [2], never differentiated) is saved with them, so that whatever
    // replaces saved tensors (a non-reentrant checkpoint's recompute) replaces it with
    // them: backward's mask is always that of the h (or out) it reads. An inference tensor
    // has no version counter (and can still be changed in place under inference_mode): a
    // copy of it is kept instead.
    const at::Tensor seed_kept = !drop ? at::Tensor()
                                 : dropout_seed->is_inference() ? dropout_seed->clone()
                                                                : *dropout_seed;
    ctx->save_for_backward(
        {normalized, mean, rstd, weight.value_or(at::Tensor()), bias_kept, seed_kept});
    NodeState state;
    state.from_output = from_output;
    state.kept = kept;
    state.has_residual = has_residual;
    state.weight_grad = requires_grad(weight);
    state.bias_grad = !is_rms && requires_grad(bias);
    state.is_rms = is_rms;
    state.returned_h = return_residual;
    state.h_dtype = h.scalar_type();
    state.input_dtype = input.scalar_type();
    state.residual_dtype = has_residual ? residual->scalar_type() : input.scalar_type();
    state.bias_dtype = bias.has_value() ? bias->scalar_type() : input.scalar_type();
    state.ndim = static_cast<int64_t>(normalized_shape.size());
    ctx->saved_data["state"] = state.pack();
    ctx->saved_data["eps"] = eps;
    // The seed is also kept as data, with its version: backward refuses a seed changed in
    // place since (the mask it would regenerate is not the forward's), with a message that
    // names it, and the backward through h alone reads it where the saved one is not
    // at hand (see there).
    ctx->saved_data["dropout_p"] = drop ? dropout_p : 0.0;
    ctx->saved_data["seed"] = seed_kept;
    ctx->saved_data["seed_version"] = drop ? seed_kept._version() : int64_t{0};
    ctx->saved_data["bwd_done"] = false;  // (see release_variables below)
    ctx->saved_data["seed_used"] = false;  // (the input's dropout gradient computed)
    return {out, h_returned, h_kept};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const NodeState state = NodeState::unpack(ctx->saved_data["state"].toInt());
    const auto input_dtype = state.input_dtype;
    const auto residual_dtype = state.residual_dtype;
    const bool has_residual = state.has_residual;
    const bool is_rms = state.is_rms;
    const at::Tensor& grad_out = grad_outputs[0];
    // The gradient flowing into h: from its users (the returned h) and, in higher-order
    // backward, into the kept h. (The empty outputs' gradients, which a tracer may
    // materialize, are not gradients of h.)
    const at::Tensor grad_h_in =
        sum_defined(state.returned_h ? grad_outputs[1] : at::Tensor(),
                    state.kept ? grad_outputs[2] : at::Tensor());
    const double dropout_p = ctx->saved_data["dropout_p"].toDouble();
    at::Tensor dropout_seed = ctx->saved_data["seed"].toTensor();
    if (dropout_seed.defined()) {
      const int64_t saved_version = ctx->saved_data["seed_version"].toInt();
      TORCH_CHECK(dropout_seed._version() == saved_version,
                  "addnorm: dropout_seed was modified by an inplace operation after the forward "
                  "(it is at version ", dropout_seed._version(), "; expected version ",
                  saved_version, " instead): backward regenerates the dropout mask from it. "
                  "Draw a new seed tensor for each call (addnorm.dropout_seed) instead of "
                  "updating one in place.");
    }

    variable_list grads(12);  // one per forward argument after ctx
    // Only the input gradients this backward is asked for (the parameters' alone: the input
    // and residual frozen, torch.autograd.grad with the parameters, a pipeline schedule's
    // weight-gradient pass; the residual's alone: no dropout pass for the input's).
    const bool input_grad = ctx->needs_input_grad(0);
    const bool residual_grad = has_residual && ctx->needs_input_grad(1);
    auto set_input_grads = [&](const at::Tensor& grad_h, bool all = false) {
      if (all || input_grad) {
        grads[0] = dropout_input_grad(grad_h, dropout_seed, dropout_p, input_dtype);
      }
      if (has_residual && (all || residual_grad)) {
        grads[1] = grad_h.to(residual_dtype);
      }
    };
    if (!grad_out.defined()) {
      // out is unused: only h's gradient, straight through h = dropout(input) + residual,
      // with the saved seed alone (node_call.seed: a non-reentrant checkpoint's recompute
      // gives its own, as it does to the ops after h that saved it), else the one kept as
      // data (no apply specialization, or the saved tensors released). h, out and the
      // weight are not unpacked: one changed in place since does not concern this
      // gradient (torch's add node keeps nothing).
      if (grad_h_in.defined()) {
        if (node_call.seed.defined()) dropout_seed = node_call.seed;
        // (released after a norm backward that used it: torch's dropout node, its mask
        // freed, raises)
        TORCH_CHECK(dropout_p == 0.0 || !input_grad || dropout_seed.defined(),
                    torch::autograd::ERR_BACKWARD_TWICE);
        set_input_grads(grad_h_in);
      }
      return grads;
    }

    const auto saved = ctx->get_saved_variables();
    if (dropout_seed.defined()) {
      dropout_seed = saved[5];  // (see the forward: a recompute's seed beside its h)
    }
    const at::Tensor& h = saved[0];  // the tensor that was normalized
    const at::Tensor& mean = saved[1];
    const at::Tensor& rstd = saved[2];
    const at::Tensor& weight = saved[3];
    // Only the parameter gradients this backward is asked for (torch.autograd.grad with the
    // input alone, a pipeline schedule's input-gradient pass): the edges are the tensor
    // arguments present, in order (input, residual, weight, bias, seed).
    const size_t weight_edge = has_residual ? 2 : 1;
    const bool weight_grad = state.weight_grad && ctx->needs_input_grad(weight_edge);
    const bool bias_grad =
        state.bias_grad && ctx->needs_input_grad(weight_edge + (weight.defined() ? 1 : 0));
    const auto bias_dtype = state.bias_dtype;

    const bool higher_order = at::GradMode::is_enabled() || isFwGradDefined(grad_out) ||
                              isFwGradDefined(grad_h_in) || isFwGradDefined(h) ||
                              isFwGradDefined(weight);
    const bool from_output = state.from_output;
    TORCH_CHECK(
        !(higher_order && from_output),
        "addnorm: memory_efficient=True keeps no h, which second derivatives (create_graph=True, "
        "or forward-mode tangents in backward) need; call with memory_efficient=False "
        "(addnorm's TransformerEncoderLayer, Python's and C++'s, uses it for its float32 and "
        "float64 norms in training mode: run it in eval mode, where it keeps h; on the CPU its "
        "attention, as torch's layer's, is then twice differentiable with the math backend: "
        "Python's torch.nn.attention.sdpa_kernel(SDPBackend.MATH), C++'s "
        "at::globalContext().setSDPUseFlash(false))");
    if (higher_order) {
      const double eps = ctx->saved_data["eps"].toDouble();
      auto [dh, dw, db] = norm_backward_composite(grad_out, h, weight, weight_grad, bias_grad,
                                                  is_rms, eps, state.ndim);
      // The values are the fused kernel's, as without create_graph (the composite's, in the
      // compute type, were up to 9x torch's error); the graph and tangents are the composite's.
      const bool drop = dropout_p > 0.0;
      const auto [k_h, k_w, k_b, k_input] =
          exact_first_order(grad_out, grad_h_in, h, mean, rstd, weight, weight_grad, bias_grad,
                            is_rms, eps, dropout_p, drop ? dropout_seed : at::Tensor());
      set_input_grads(sum_defined(dh.to(h.scalar_type()), grad_h_in), /*all=*/true);
      grads[0] = with_values_of(drop ? k_input : k_h.to(input_dtype), grads[0]);
      if (has_residual) grads[1] = with_values_of(k_h.to(residual_dtype), grads[1]);
      if (weight_grad) grads[3] = with_values_of(k_w, dw);
      if (bias_grad) grads[4] = with_values_of(k_b, db).to(bias_dtype);
      ctx->saved_data["bwd_done"] = true;  // (only now: a backward that threw needs them)
      ctx->saved_data["seed_used"] = drop;
      return grads;
    }

    // With the parameters' gradients alone the kernel writes no [M, N] gradient, as torch's
    // layer_norm backward with its output mask. With the fused dropout, input's gradient
    // comes from the same pass (grad_h itself only for the residual); without the input's,
    // the kernel runs without the dropout (h is the same, the mask only scales that one).
    const bool drop = dropout_p > 0.0 && input_grad;
    const bool grad_h_wanted = drop ? residual_grad : input_grad || residual_grad;
    std::optional<at::Tensor> grad_h_out;
    if (grad_h_in.defined() && (grad_h_wanted || drop)) grad_h_out = grad_h_in;
    std::optional<at::Tensor> w;
    if (weight.defined()) w = weight;
    std::optional<at::Tensor> b;
    if (saved[4].defined()) b = saved[4];
    std::optional<at::Tensor> seed;
    if (drop) seed = dropout_seed;
    // (First order, no graph is built: straight to the backend kernel, as the forward.)
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    // Where this backward is the last reader of an h that the forward wrote and nothing else
    // holds, or of a grad_out that nothing else holds, the kernel's outputs take their
    // memory (where the backend's kernel allows it: the CPU's): fewer new [M, N] tensors,
    // and the kernel writes where it has just read.
    // Only where the call goes straight to the kernel: not when any argument is a tensor
    // subclass, batched or wrapped, or a dispatch mode is on (a batching fallback calls the
    // kernel once per slice, each reading h and grad_out; Python code around the kernel
    // would see, or call it again on, the overwritten tensors).
    const bool plain_call = !at::areAnyTensorSubclassLike(
        {grad_out, grad_h_in, h, mean, rstd, weight, saved[4], dropout_seed});
    const bool over_h = node_call.last && !from_output && (state.kept || state.returned_h) &&
                        plain_call && held_by_node_alone(h);
    const bool over_grad_out =
        node_call.engine_grads && plain_call && held_by_backward_alone(grad_out);
    std::optional<WriteOver> write_over;
    if (over_h || over_grad_out) {
      write_over.emplace(over_h ? &h : nullptr, over_grad_out ? &grad_out : nullptr);
    }
    auto [grad_h, grad_weight, grad_bias, grad_input] =
        from_output
            ? norm_bwd_op().call(grad_out, grad_h_out, h, mean, rstd, w, bias_grad, is_rms,
                                 weight_grad, std::nullopt, /*from_output=*/true, b,
                                 state.h_dtype, drop ? dropout_p : 0.0, seed, grad_h_wanted)
            : norm_bwd_op().call(grad_out, grad_h_out, h, mean, rstd, w, bias_grad, is_rms,
                                 weight_grad, ctx->saved_data["eps"].toDouble(), false,
                                 std::nullopt, std::nullopt, drop ? dropout_p : 0.0, seed,
                                 grad_h_wanted);
    if (over_h && grad_h.defined() && grad_h.is_alias_of(h)) {
      // h's memory holds the gradient now: a later unpack of h (a backward retried after an
      // exception in a hook, the node called by hand) raises autograd's in-place error
      // instead of reading it.
      h.unsafeGetTensorImpl()->bump_version();
    }
    if (drop) {
      grads[0] = grad_input;
      if (grad_h_wanted) grads[1] = grad_h.to(residual_dtype);
    } else if (grad_h_wanted) {
      set_input_grads(grad_h);
    }
    if (weight_grad) grads[3] = grad_weight;
    if (bias_grad) grads[4] = grad_bias.to(bias_dtype);
    ctx->saved_data["bwd_done"] = true;
    ctx->saved_data["seed_used"] = drop;
    return grads;
  }
};

// held_by_backward_alone counts the backward's own argument as one of the gradient's two
// references: backward must take its gradients by value.
static_assert(std::is_same_v<decltype(&NormFunction::backward),
                             variable_list (*)(AutogradContext*, variable_list)>,
              "NormFunction::backward takes its gradients by value");

}  // namespace
}  // namespace addnorm

namespace torch::autograd {

// As the template's apply, with the node's name (for error messages) made once:
// Node::name() demangles the type's name at every call, a microsecond or more of each
// backward. The body is torch 2.11's (the version requirements.txt pins), so only that
// version takes it; any other builds with the template's own (check its body before adding
// a version here).
// It also tells the node's backward whether the engine frees the graph after it (there h
// may give its memory to grad_h; see NormFunction::backward): only this version takes that.
#if TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR == 11
template <>
variable_list CppNode<addnorm::NormFunction>::apply(variable_list&& inputs) {
  static const std::string kName = name();
  std::lock_guard<std::mutex> lock(mutex_);
  // A backward through h alone (no gradient for out) with the fused dropout reads the saved
  // seed alone, unpacked here (the context's saved variables are private to it), unless
  // the seed was changed in place (backward then raises, naming it).
  at::Tensor seed;
  const auto kept = ctx_.saved_data.find("seed");
  if (!inputs.empty() && !inputs[0].defined() && ctx_.saved_variables_.size() > 5 &&
      kept != ctx_.saved_data.end() && kept->second.toTensor().defined() &&
      kept->second.toTensor()._version() == ctx_.saved_data.at("seed_version").toInt()) {
    seed = ctx_.saved_variables_[5].unpack();
  }
  const addnorm::InNodeCall call(!get_current_graph_task_keep_graph() &&
                                     !ctx_.saved_variables_.empty() &&
                                     !ctx_.saved_variables_[0].has_hooks(),
                                 std::move(seed));
  return CppNode_apply_functional<addnorm::NormFunction>(
      std::move(inputs), ctx_, is_variable_input_, output_info_, kName);
}

// Compiled autograd runs the backward on a copy of the context (apply_with_saved, on a
// cache miss; a hit runs the compiled graph), so the node's own never saw bwd_done and
// release_variables kept the saved tensors after every compiled backward (a step's h, mean
// and rstd alive beside the next step's; a second backward without retain_graph ran again).
// Compiled autograd calls compiled_args for every node of each backward it runs: the node is
// marked done there, first (the key then does not change after the first backward), unless
// that backward keeps the graph. So, there, a backward through h alone frees them too, and a
// later one through out raises, as for any node. The body is then the template's, torch
// 2.11's.
template <>
void CppNode<addnorm::NormFunction>::compiled_args(CompiledNodeArgs& args) const {
  if (!get_current_graph_task_keep_graph()) {
    const_cast<AutogradContext&>(ctx_).saved_data["bwd_done"] = true;
  }
  args.collect(static_cast<uint64_t>(typeid(addnorm::NormFunction).hash_code()));
  args.collect(std::string(typeid(addnorm::NormFunction).name()));
  args.collect(ctx_.saved_data);
  TORCH_INTERNAL_ASSERT(ctx_.non_differentiable_.empty());
  TORCH_INTERNAL_ASSERT(ctx_.dirty_inputs_.empty());
  args.collect(ctx_.saved_variables_, true);  // always unpacked as output in eager
  TORCH_INTERNAL_ASSERT(ctx_.to_save_.empty());
  args.collect(ctx_.materialize_grads_);
  args.collect(ctx_.has_freed_buffers_);
  args.collect(is_variable_input_);
  args.collect(input_info_);
  args.collect(output_info_);
}
#endif

// Where saving the node's tensors throws (a saved-tensor pack hook that raises:
// non-reentrant checkpointing's early stop does, from the last tensor its recompute
// needs), torch 2.11 leaves them in the context's to_save_; among them is an output of
// the node (h or out), whose grad_fn is the node: a reference cycle that kept the node and
// the recomputed graph behind it alive, every checkpointed step. They are dropped here.
template <>
void CppNode<addnorm::NormFunction>::save_variables_to_ctx() {
  try {
    ctx_.save_variables();
  } catch (...) {
    ctx_.to_save_.clear();
    ctx_.saved_variables_.clear();
    throw;
  }
}

// The saved tensors of a NormFunction node stay until its norm backward has run: a backward
// that reaches the node through h alone needs none of them but the seed, and a later
// backward through out must still find them (torch's separate add and layer_norm nodes
// behave so). Then they go, and the seed kept as data with them where the norm's backward
// computed the input's dropout gradient (a graph held after backward kept every fused
// dropout's seed): a later backward through h alone that asks for the input's gradient
// then raises, as torch's dropout node, whose mask is freed after its backward, does; one
// that did not compute it leaves the seed for a later one. (Under compiled autograd, which
// runs the backward on a copy of the context, the seed stays with the graph.)
template <>
void CppNode<addnorm::NormFunction>::release_variables() {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto done = ctx_.saved_data.find("bwd_done");
  if (done != ctx_.saved_data.end() && !done->second.toBool()) {
    return;
  }
  ctx_.saved_variables_.clear();
  const auto seed = ctx_.saved_data.find("seed");
  const auto used = ctx_.saved_data.find("seed_used");
  if (seed != ctx_.saved_data.end() && used != ctx_.saved_data.end() && used->second.toBool()) {
    seed->second = at::Tensor();
  }
  ctx_.has_freed_buffers_ = true;
}

}  // namespace torch::autograd

namespace addnorm {
namespace {

// The gradient as it reached h's node, noted by its first tensor pre-hook (ResidualGradCheck)
// for the node's backward, which the engine runs next on the same thread (a node's hooks and
// the node in one call), with user hooks in between: per thread, as backward passes over one
// graph may run in several threads at once, and per graph task (a hook may run a backward of
// its own). Weak: nothing is kept alive where backward never runs (a later hook raised);
// such records are left behind, at most kMaxArrived of them.
struct ArrivedGrad {
  const AutogradContext* ctx;
  int task;
  c10::weak_intrusive_ptr<c10::TensorImpl> grad;
  const c10::StorageImpl* storage;  // (`grad.data = ...` in a hook replaces it)
  int64_t version;
};
thread_local std::vector<ArrivedGrad> t_arrived;
constexpr size_t kMaxArrived = 64;

void forget_arrived(const AutogradContext* ctx, int task) {
  t_arrived.erase(std::remove_if(t_arrived.begin(), t_arrived.end(),
                                 [&](const ArrivedGrad& a) {
                                   return a.ctx == ctx && a.task == task;
                                 }),
                  t_arrived.end());
}

const c10::StorageImpl* storage_of(const at::Tensor& t) {
  return t.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl();
}

// The returned h as an output of its own node (see the top of this file): the same storage
// and version counter as the norm node's h (in-place changes of it are seen by that node's
// saved-tensor check), not a view. Backward passes the gradient on, unless a hook on h
// changed it (another tensor, other storage, or a change in place).
class ResidualOutFunction : public torch::autograd::Function<ResidualOutFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h) {
    ctx->set_materialize_grads(false);
    return h.detach();
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const int task = torch::autograd::get_current_graph_task_id();
    const auto it = std::find_if(t_arrived.rbegin(), t_arrived.rend(), [&](const ArrivedGrad& a) {
      return a.ctx == ctx && a.task == task;
    });
    if (it != t_arrived.rend()) {
      const ArrivedGrad arrived = std::move(*it);
      forget_arrived(ctx, task);
      const bool same = grads[0].defined() &&
                        arrived.grad.lock().get() == grads[0].unsafeGetTensorImpl() &&
                        storage_of(grads[0]) == arrived.storage &&
                        grads[0]._version() == arrived.version;
      TORCH_CHECK(same,
                  "addnorm: a hook on the h returned with return_residual=True changed its "
                  "gradient, which is not h's full gradient", kResidualGradNote);
    }
    return grads;
  }
  static constexpr const char* kResidualGradNote =
      ": h is the norm's sibling output (as flash-attn's prenorm), and the fused backward "
      "adds the norm's part of h's gradient in its own pass, so the gradient at h holds only "
      "that of h's other uses. Compute h = input + residual yourself (with torch's dropout "
      "if any) and normalize it with addnorm's layer_norm / rms_norm to change or look "
      "at h's gradient.";
};

// Raises where h's gradient is asked for (see the top of this file): h.retain_grad(), or h
// among the inputs of torch.autograd.grad or backward(inputs=) (a capture at h's node).
void check_residual_grad_not_asked_for(torch::autograd::Node& node) {
  bool captured = false;
  const auto* exec_info = torch::autograd::get_current_graph_task_exec_info();
  if (exec_info != nullptr && !exec_info->empty()) {
    const auto it = exec_info->find(&node);
    captured = it != exec_info->end() && it->second.captures_ != nullptr;
  }
  TORCH_CHECK(node.retains_grad_hooks().empty() && !captured,
              "addnorm: the gradient of the h returned with return_residual=True is asked for "
              "(h.retain_grad(), or h among the inputs of torch.autograd.grad / "
              "backward(inputs=...)), but it is not h's full gradient",
              ResidualOutFunction::kResidualGradNote);
}

// The first tensor pre-hook of h's node: runs whenever a gradient reaches h (also when it is
// captured and the node itself does not run); notes the gradient as it arrives, before the
// user's hooks. (Compiled autograd, which traces hooks into its graph, skips it.)
struct ResidualGradCheck final : torch::autograd::FunctionPreHook {
  explicit ResidualGradCheck(AutogradContext* ctx, torch::autograd::Node* node)
      : ctx_(ctx), node_(node) {}
  variable_list operator()(const variable_list& grads) override {
    check_residual_grad_not_asked_for(*node_);
    const int task = torch::autograd::get_current_graph_task_id();
    forget_arrived(ctx_, task);
    if (grads[0].defined()) {
      if (t_arrived.size() >= kMaxArrived) t_arrived.erase(t_arrived.begin());
      t_arrived.push_back({ctx_, task,
                           c10::weak_intrusive_ptr<c10::TensorImpl>(grads[0].getIntrusivePtr()),
                           storage_of(grads[0]), grads[0]._version()});
    }
    return grads;
  }
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& /*args*/) const override {}
  AutogradContext* ctx_;          // (of node_, which owns this hook)
  torch::autograd::Node* node_;
};

// A pre-hook of the norm's node: when h got no gradient (the loss does not use it), its full
// gradient is the norm's part, which its node never sees: it may not be asked for there
// either. (A hook on such an h is never called.)
struct UnusedResidualGradCheck final : torch::autograd::FunctionPreHook {
  explicit UnusedResidualGradCheck(std::weak_ptr<torch::autograd::Node> node)
      : node_(std::move(node)) {}
  variable_list operator()(const variable_list& grads) override {
    if (grads.size() > 1 && !grads[1].defined()) {
      if (const auto node = node_.lock()) {
        check_residual_grad_not_asked_for(*node);
      }
    }
    return grads;
  }
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& /*args*/) const override {}
  std::weak_ptr<torch::autograd::Node> node_;
};

// h returned with a gradient: out of its own node, with both checks.
at::Tensor residual_out(const at::Tensor& out, const at::Tensor& h) {
  at::Tensor returned = ResidualOutFunction::apply(h);
  const std::shared_ptr<torch::autograd::Node> node = returned.grad_fn();
  auto& ctx = static_cast<torch::autograd::CppNode<ResidualOutFunction>&>(*node).ctx_;
  node->add_tensor_pre_hook(std::make_unique<ResidualGradCheck>(&ctx, node.get()));
  if (const auto& norm_node = out.grad_fn()) {
    norm_node->add_pre_hook(std::make_unique<UnusedResidualGradCheck>(node));
  }
  return returned;
}

bool any_requires_grad(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  return at::GradMode::is_enabled() &&
         (input.requires_grad() || requires_grad(residual) || requires_grad(weight) ||
          requires_grad(bias));
}

bool any_tangent(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  return isFwGradDefined(input) || isFwGradDefined(residual) || isFwGradDefined(weight) ||
         isFwGradDefined(bias);
}

at::Tensor tangent_or_undefined(const std::optional<at::Tensor>& t) {
  return isFwGradDefined(t) ? t->_fw_grad(/*level=*/0) : at::Tensor();
}

// Forward-mode AD: sets the tangents of out (and of the returned h) from those of input,
// residual, weight and bias. h is the tensor that was normalized.
//   t_h = t_input + t_residual;  t_xhat = rstd * (t_h - mean(t_h) - xhat * mean(t_h * xhat))
//   (RMSNorm: no mean(t_h));  t_out = t_xhat * weight + xhat * t_weight + t_bias
void set_tangents(
    const at::Tensor& out, const at::Tensor& h_returned, const at::Tensor& h,
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    bool is_rms, int64_t ndim, double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  const at::Tensor t_input = tangent_or_undefined(input);
  const at::Tensor t_residual = tangent_or_undefined(residual);
  const at::Tensor t_weight = tangent_or_undefined(weight);
  const at::Tensor t_bias = is_rms ? at::Tensor() : tangent_or_undefined(bias);
  at::Tensor t_out, t_h;
  {
    // Plain values from here on: the primals' own tangents must not enter the tangents.
    c10::AutoFwGradMode no_fw_grad(false);
    const auto acc = compute_dtype(h.scalar_type());
    const auto dims = norm_dims(ndim);
    at::Tensor t_dropped = t_input.defined() ? t_input.to(acc) : t_input;
    if (t_dropped.defined() && dropout_p > 0.0) {
      t_dropped = t_dropped * dropout_scale_like(t_dropped, *dropout_seed, dropout_p);
    }
    t_h = sum_defined(t_dropped, t_residual.defined() ? t_residual.to(acc) : t_residual);
    const auto [xhat, rstd] = normalize_composite(h.to(acc), ndim, is_rms, eps);
    if (t_h.defined()) {
      const at::Tensor c_hx = (t_h * xhat).mean(dims, /*keepdim=*/true);
      at::Tensor t_xhat = is_rms ? rstd * (t_h - xhat * c_hx)
                                 : rstd * (t_h - t_h.mean(dims, /*keepdim=*/true) - xhat * c_hx);
      t_out = weight.has_value() ? t_xhat * weight->to(acc) : t_xhat;
    }
    if (t_weight.defined()) {
      t_out = sum_defined(t_out, xhat * t_weight.to(acc));
    }
    if (t_bias.defined()) {
      t_out = sum_defined(t_out, t_bias.to(acc).expand(out.sizes()));
    }
    if (t_out.defined()) {
      t_out = t_out.to(out.scalar_type());
    }
    if (t_h.defined() && h_returned.defined()) {
      t_h = t_h.to(h_returned.scalar_type());
    }
  }
  if (t_out.defined()) {
    out._set_fw_grad(t_out, /*level=*/0, /*is_inplace_op=*/false);
  }
  if (h_returned.defined() && t_h.defined()) {
    h_returned._set_fw_grad(t_h, /*level=*/0, /*is_inplace_op=*/false);
  }
}

// Inside functorch transforms (torch.func.grad, vjp, jacrev, jvp, ...), which cannot use a
// C++ autograd Function: true when the Function would refuse to run.
bool inside_functorch_transform() {
  const auto& tls = at::functorch::functorchTLSAccessor();
  if (!tls) {
    return false;
  }
  try {
    tls->checkSupportsCppAutogradFunction();
  } catch (const c10::Error&) {
    return true;
  }
  return false;
}

// The same math with ATen ops (differentiable, batchable), for functorch transforms: h rounded
// to its dtype as eager x + r is, the norm in the compute type, out in the input's dtype.
std::tuple<at::Tensor, at::Tensor> norm_composite(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    c10::SymIntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool is_rms, bool return_residual,
    bool residual_in_fp32, double dropout_p, const std::optional<at::Tensor>& dropout_seed,
    bool /*memory_efficient: what autograd keeps*/) {
  const NormPlan plan = check_norm_fwd_inputs(
      input, residual, normalized_shape, weight, bias, eps, residual_in_fp32, dropout_p,
      dropout_seed);
  TORCH_CHECK(dropout_p == 0.0,
              "addnorm: the fused dropout (dropout_p > 0) is not supported inside torch.func "
              "transforms that differentiate (grad, vjp, jacrev, jvp, ...); apply "
              "torch.nn.functional.dropout to the input and call addnorm with dropout_p=0 there");
  const auto acc = compute_dtype(input.scalar_type());
  const at::Tensor h = residual.has_value()
                           ? (input.to(acc) + residual->to(acc)).to(plan.dtypes.h)
                           : input.to(plan.dtypes.h);
  // The norm in double: the transforms' derivatives are those of these ops (in float, the
  // input gradient had up to 2.7x and the weight gradient up to 9x torch's error).
  at::Tensor y = normalize_composite(h.to(at::kDouble),
                                     static_cast<int64_t>(normalized_shape.size()), is_rms, eps)
                     .first;
  if (weight.has_value()) {
    y = y * weight->to(at::kDouble);
  }
  if (bias.has_value() && !is_rms) {
    y = y + bias->to(at::kDouble);
  }
  // out has the fused kernel's values (the composite's, in the compute type, were up to 1.8x
  // torch's error) and the composite's derivatives. (The kernel runs on the transforms' plain
  // or batched values, detached.)
  auto detached = [](const std::optional<at::Tensor>& t) {
    return t.has_value() ? std::optional<at::Tensor>(t->detach()) : std::nullopt;
  };
  const at::Tensor values = std::get<0>(norm_fwd_op().call(
      input.detach(), detached(residual), normalized_shape, detached(weight), detached(bias), eps,
      is_rms, /*store_residual=*/false, residual_in_fp32, 0.0, std::nullopt));
  at::Tensor out = with_values_of(values, y);
  if (!return_residual) return {out, at::empty({0}, h.options())};
  // The returned h is a tensor of its own (input.to(its own dtype) is input itself).
  return {out, h.is_same(input) ? input.clone() : h};
}

at::Tensor dropout_apply_autograd(const at::Tensor& input, const at::Tensor& seed, double p,
                                  std::optional<c10::ScalarType> dtype);

// The Autograd kernels: the graph node only when a gradient can flow; tangents when any
// input carries one; the ATen composite inside functorch transforms.
std::tuple<at::Tensor, at::Tensor> norm_autograd(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    c10::SymIntArrayRef normalized_shape, const std::optional<at::Tensor>& weight_arg,
    const std::optional<at::Tensor>& bias_arg, double eps, bool is_rms, bool return_residual,
    bool residual_in_fp32, double dropout_p, const std::optional<at::Tensor>& dropout_seed,
    bool memory_efficient) {
  check_tensor_args(input, {{residual, "residual"}, {weight_arg, "weight"}, {bias_arg, "bias"},
                            {dropout_seed, "dropout_seed"}});
  // (differentiably: the gradient of a narrower parameter returns to its dtype)
  const auto params = widened_params(weight_arg, bias_arg, input);
  const std::optional<at::Tensor>& weight = params.first;
  const std::optional<at::Tensor>& bias = params.second;
  if (inside_functorch_transform()) {
    return norm_composite(input, residual, normalized_shape, weight, bias, eps, is_rms,
                          return_residual, residual_in_fp32, dropout_p, dropout_seed,
                          memory_efficient);
  }
  const bool tangents = any_tangent(input, residual, weight, bias);
  const bool grad = any_requires_grad(input, residual, weight, bias);
  if (tangents && grad && (residual.has_value() || dropout_p > 0.0 || return_residual)) {
    // Tangents and a graph node (forward-over-reverse: a Hessian-vector product): the h the
    // node keeps must carry its tangent into a create_graph backward, which an output of the
    // node (h written by it) cannot get after the fact. So h = dropout(input) + residual from
    // differentiable ops (the same values as the fused kernel's: the product and the sum in
    // the compute type, rounded once to h's dtype), then the norm of that h.
    // Where h is wider than the input (a float32 residual or residual_in_fp32 with float16
    // / bfloat16 input), its norm is taken with the weight and bias in h's dtype (exact) and
    // rounded to the input's dtype: within one rounding of the fused op's output.
    const NormPlan plan = check_norm_fwd_inputs(
        input, residual, normalized_shape, weight, bias, eps, residual_in_fp32, dropout_p,
        dropout_seed);
    const auto acc = compute_dtype(input.scalar_type());
    const at::Tensor wide = input.to(acc);
    const at::Tensor dropped =
        dropout_p > 0.0 ? dropout_apply_autograd(wide, *dropout_seed, dropout_p, std::nullopt)
                        : wide;
    at::Tensor h =
        (residual.has_value() ? dropped + residual->to(acc) : dropped).to(plan.dtypes.h);
    if (h.is_same(input)) h = input.clone();  // the returned h is a tensor of its own
    const bool widened = plan.dtypes.h != input.scalar_type();
    auto in_h = [&](const std::optional<at::Tensor>& t) {
      return widened && t.has_value() ? std::optional<at::Tensor>(t->to(plan.dtypes.h)) : t;
    };
    auto [out, unused] = norm_autograd(h, std::nullopt, normalized_shape, in_h(weight),
                                       in_h(bias), eps, is_rms, /*return_residual=*/false,
                                       false, 0.0, std::nullopt, memory_efficient);
    return {widened ? out.to(input.scalar_type()) : out,
            return_residual ? h : at::empty({0}, h.options())};
  }
  at::Tensor out, h_returned, normalized;
  if (grad) {
    variable_list outs;
    {
      // The tangents are set below; a C++ Function would refuse inputs that carry them.
      c10::AutoFwGradMode no_fw_grad(false);
      // Tangents are computed from h: the node then keeps it (memory_efficient off).
      outs = NormFunction::apply(
          input, residual, normalized_shape, weight, bias, eps, is_rms, return_residual,
          residual_in_fp32, dropout_p, dropout_seed, memory_efficient && !tangents);
    }
    out = outs[0];
    // Without return_residual h_returned is empty; with it, h = input + residual depends on
    // neither weight nor bias, so, like eager's x + r, it requires grad only if they do.
    h_returned = return_residual && (input.requires_grad() || requires_grad(residual))
                     ? residual_out(out, outs[1])
                     : outs[1].detach();
    normalized = return_residual ? outs[1]
                 : (residual.has_value() || dropout_p > 0.0) ? outs[2]
                                                             : input;
  } else {
    // No gradient can flow: the forward below autograd, no graph node (h is written when
    // tangents need it).
    at::AutoDispatchBelowADInplaceOrView guard;
    const bool store_residual =
        return_residual || (tangents && (residual.has_value() || dropout_p > 0.0));
    auto outs = norm_fwd_op().call(
        input, residual, normalized_shape, weight, bias, eps, is_rms, store_residual,
        residual_in_fp32, dropout_p, dropout_seed);
    out = std::get<0>(outs);
    normalized = store_residual ? std::get<1>(outs) : input;
    h_returned = return_residual ? std::get<1>(outs) : at::empty({0}, std::get<1>(outs).options());
  }
  if (tangents) {
    set_tangents(out, return_residual ? h_returned : at::Tensor(), normalized, input, residual,
                 weight, bias, eps, is_rms, static_cast<int64_t>(normalized_shape.size()),
                 dropout_p, dropout_seed);
  }
  return {out, h_returned};
}

// _dropout_apply as a differentiable dropout (the encoder layer's attention and
// feed-forward dropouts): out = input * mask * scale is linear in input, so the node keeps
// only the seed tensor and its backward applies the regenerated mask to the gradient.
class DropoutFunction : public torch::autograd::Function<DropoutFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& seed,
                            double p, std::optional<c10::ScalarType> dtype) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({seed});
    ctx->saved_data["p"] = p;
    ctx->saved_data["input_dtype"] = static_cast<int64_t>(input.scalar_type());
    return dropout_apply_op().call(input, seed, p, dtype);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto dtype = static_cast<c10::ScalarType>(ctx->saved_data["input_dtype"].toInt());
    const at::Tensor& grad = grads[0];
    at::Tensor grad_input;
    if (grad.defined()) {
      // float16/bfloat16 output of float32 input: the gradient is widened first (the op
      // makes float16/bfloat16 only out of float32).
      grad_input = dropout_input_grad(grad.to(dtype), ctx->get_saved_variables()[0],
                                      ctx->saved_data["p"].toDouble(), dtype);
    }
    return {grad_input, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor dropout_apply_autograd(const at::Tensor& input, const at::Tensor& seed, double p,
                                  std::optional<c10::ScalarType> dtype) {
  check_tensor_args(input, {{std::optional<at::Tensor>(seed), "dropout_seed"}});
  TORCH_CHECK(!inside_functorch_transform(),
              "addnorm: the regenerated-mask dropout (_dropout_apply, which "
              "addnorm.TransformerEncoderLayer uses in training) is not supported inside "
              "torch.func transforms that differentiate (grad, vjp, jacrev, jvp, ...)");
  at::Tensor out;
  if (input.requires_grad()) {
    c10::AutoFwGradMode no_fw_grad(false);  // the tangent is set below
    out = DropoutFunction::apply(input, seed, p, dtype);
  } else {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = dropout_apply_op().call(input, seed, p, dtype);
  }
  if (isFwGradDefined(input)) {
    const at::Tensor t_input = input._fw_grad(/*level=*/0);
    out._set_fw_grad(dropout_apply_op().call(t_input, seed, p, dtype), /*level=*/0,
                     /*is_inplace_op=*/false);
  }
  return out;
}

// _dropout_matmul: out = dropped(probs) @ value, dropped(t) = _dropout_apply(t, seed, p).
// The node keeps the seed, probs (which softmax's node keeps anyway) when value's gradient
// is wanted and value when probs' is; backward regenerates dropped(probs) for value's
// gradient, and probs' gradient is dropped(grad @ value^T). Both with differentiable ops
// (second derivatives work).
class DropoutMatmulFunction : public torch::autograd::Function<DropoutMatmulFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& probs,
                            const at::Tensor& value, const at::Tensor& seed, double p) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({value.requires_grad() ? probs : at::Tensor(),
                            probs.requires_grad() ? value : at::Tensor(), seed});
    ctx->saved_data["p"] = p;
    return dropout_matmul_op().call(probs, value, seed, p);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &probs = saved[0], &value = saved[1], &seed = saved[2];
    const double p = ctx->saved_data["p"].toDouble();
    const at::Tensor& grad = grads[0];
    // (in the inputs' dtype, as the forward: no autocast here)
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    at::Tensor grad_probs, grad_value;
    if (grad.defined() && ctx->needs_input_grad(0)) {
      grad_probs = dropout_apply_op().call(at::matmul(grad, value.transpose(-2, -1)), seed, p,
                                           std::nullopt);
    }
    if (grad.defined() && ctx->needs_input_grad(1)) {
      grad_value = at::matmul(
          dropout_apply_op().call(probs, seed, p, std::nullopt).transpose(-2, -1), grad);
    }
    return {grad_probs, grad_value, at::Tensor(), at::Tensor()};
  }
};

at::Tensor dropout_matmul_autograd(const at::Tensor& probs, const at::Tensor& value,
                                   const at::Tensor& seed, double p) {
  check_tensor_args(probs, {{std::optional<at::Tensor>(value), "value"},
                            {std::optional<at::Tensor>(seed), "dropout_seed"}});
  TORCH_CHECK(!inside_functorch_transform(),
              "addnorm: the attention-probability dropout (_dropout_matmul, which "
              "addnorm.TransformerEncoderLayer uses in training) is not supported inside "
              "torch.func transforms that differentiate (grad, vjp, jacrev, jvp, ...)");
  at::Tensor out;
  {
    c10::AutoFwGradMode no_fw_grad(false);  // the tangent is set below
    if (probs.requires_grad() || value.requires_grad()) {
      out = DropoutMatmulFunction::apply(probs, value, seed, p);
    } else {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = dropout_matmul_op().call(probs, value, seed, p);
    }
  }
  const bool t_probs = isFwGradDefined(probs), t_value = isFwGradDefined(value);
  if (t_probs || t_value) {
    // d(dropped(P) @ V) = dropped(dP) @ V + dropped(P) @ dV, from the primal values
    const at::Tensor dp = t_probs ? probs._fw_grad(/*level=*/0) : at::Tensor();
    const at::Tensor dv = t_value ? value._fw_grad(/*level=*/0) : at::Tensor();
    at::Tensor tangent;
    {
      c10::AutoFwGradMode no_fw_grad(false);
      if (dp.defined()) {
        tangent = dropout_matmul_op().call(dp, value, seed, p);
      }
      if (dv.defined()) {
        const at::Tensor t =
            at::matmul(dropout_apply_op().call(probs, seed, p, std::nullopt), dv);
        tangent = tangent.defined() ? tangent + t : t;
      }
    }
    out._set_fw_grad(tangent, /*level=*/0, /*is_inplace_op=*/false);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(addnorm, Autograd, m) {
  register_public_norm_ops<&norm_autograd>(m);
  m.impl("_dropout_apply", &dropout_apply_autograd);
  m.impl("_dropout_matmul", &dropout_matmul_autograd);
  // The internal forward and backward have no derivative of their own (the public ops'
  // nodes call them below autograd). A graph recording them instead of the public ops (as
  // ExportedProgram.run_decompositions, which traces through the kernels above) then raises
  // in backward where it would have given no gradients.
  m.impl("_norm_fwd", torch::autograd::autogradNotImplementedFallback());
  m.impl("_norm_bwd", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace addnorm
