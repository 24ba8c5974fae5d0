// The transformer_encoder_layer op (CompositeImplicitAutograd: autograd, every backend and
// torch.compile come from the ops it is made of) and the C++ modules holding its
// parameters. The math follows torch.nn.TransformerEncoderLayer.forward (its non-fast
// path: _sa_block, _ff_block, norm_first) and F.multi_head_attention_forward with
// need_weights=False op for op; the Add & Norm steps run addnorm's fused kernels. The
// exception: inference in bfloat16 on the CPU (any dtype under CPU autocast), and in
// float16/bfloat16 on CUDA, calls torch's fused inference kernel, its fast path (see
// transformer_encoder_layer_impl).
//
// Dropout. In eval mode (and with dropout = 0) nothing is dropped and nothing is drawn:
// results match torch's. In training every dropout's keep-mask is addnorm's: a function of
// a seed drawn from torch's default generator (addnorm::dropout_seed) where torch's layer
// would draw its mask, regenerated in backward instead of kept. The residual-branch
// dropouts that an Add & Norm follows (post-LN: both, x + dropout(sa(x)) and
// x + dropout(ff(x)); pre-LN: the first) are fused into it (add_layer_norm's dropout); the
// others (between linear1 and linear2; pre-LN's second residual branch; on the CPU, for
// float32/float64, the attention probabilities) are _dropout_apply with a seed of their
// own (seeded_dropout). On CUDA, and for float16/bfloat16 q, k, v on the CPU (autocast
// included), the attention probabilities are dropped inside torch's
// scaled_dot_product_attention, as torch's layer does. Each element is kept with
// probability 1 - p and scaled by 1 / (1 - p), but for the same torch::manual_seed the
// masks differ from torch's.
//
// Memory. In training every float32/float64 norm runs with memory_efficient: its node
// keeps the norm's output, which the Linear after it keeps anyway (in_proj, linear1, or the
// next layer's), instead of h; a training step holds one [M, E] tensor fewer per norm
// (under autocast the Linears keep float16/bfloat16 copies and the saving is the
// difference). float16/bfloat16 norms keep h, and so do CPU norms whose output would give
// xhat inaccurately or whose weight cannot be read (see lean below).
// Second derivatives through a training-mode layer are therefore refused (the norms keep
// no h); eval mode keeps h and supports them.

#include <cmath>
#include <limits>
#include <string>
#include <utility>

#include <ATen/TensorSubclassLikeUtils.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/_safe_softmax.h>
#include <ATen/ops/_transformer_encoder_layer_fwd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/result_type.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include <addnorm/ops.h>
#include <addnorm/transformer_encoder_layer.h>

#include "ops/norm_public.h"

namespace addnorm {
namespace {

using OptTensor = std::optional<at::Tensor>;

// F._canonical_mask: a bool mask becomes an additive float mask of src's dtype
// (true -> -inf); a float mask is used as is, or cast to src's dtype where attention would
// refuse its dtype (neither float32 nor src's: numpy's float64, say), as torch's inference
// fast path takes it (its slow path refuses it).
OptTensor canonical_mask(
    const OptTensor& mask, const char* name, c10::ScalarType target, c10::Device device) {
  if (!mask.has_value()) return std::nullopt;
  const auto& m = *mask;
  // (attention takes a mask on another device, meta's too, without a word: its values are
  // then garbage)
  TORCH_CHECK(
      m.device() == device, "addnorm: transformer_encoder_layer: ", name,
      " must be on src's device ", device, ", got device ", m.device());
  if (m.scalar_type() == at::kBool) {
    return at::zeros_like(m, m.options().dtype(target))
        .masked_fill(m, -std::numeric_limits<double>::infinity());
  }
  TORCH_CHECK(
      c10::isFloatingType(m.scalar_type()), "addnorm: transformer_encoder_layer: ", name,
      " must be a bool or floating-point tensor, got ", m.scalar_type());
  return m.scalar_type() == target || m.scalar_type() == at::kFloat ? m : m.to(target);
}

// A parameter's shape and device (src's: the linears take a weight on another device,
// meta's too, without a word, and their values are then garbage).
void check_shape(const at::Tensor& t, c10::SymIntArrayRef expected, const char* name,
                 c10::Device device) {
  TORCH_CHECK(
      same_shape(t.sym_sizes(), expected), "addnorm: transformer_encoder_layer: ", name,
      " must have shape ", expected, ", got ", t.sym_sizes());
  TORCH_CHECK(
      t.device() == device, "addnorm: transformer_encoder_layer: ", name,
      " must be on src's device ", device, ", got device ", t.device());
}

void check_opt_shape(const OptTensor& t, c10::SymIntArrayRef expected, const char* name,
                     c10::Device device) {
  if (t.has_value()) check_shape(*t, expected, name, device);
}

// A parameter's dtype (the linears and norms would refuse a mismatch in words that name no
// parameter of the layer, or a norm's `weight`). A Linear's: src's, except under autocast
// on src's device, which casts the Linears' arguments (and where this layer leaves the
// dtypes to the ops). A norm's: what the norm ops take beside src (param_dtype_taken).
void check_dtype(const OptTensor& t, const char* name, c10::ScalarType src, bool norm) {
  if (!t.has_value()) return;
  const auto d = t->scalar_type();
  const bool half = src == at::kHalf || src == at::kBFloat16;
  const bool ok = norm ? param_dtype_taken(d, src) : d == src;
  TORCH_CHECK(ok, "addnorm: transformer_encoder_layer: ", name, " must have src's dtype (", src,
              norm ? (half ? "), float16, bfloat16 or float32" : ") or a narrower float dtype")
                   : ")",
              ", got ", d);
}

// torch's dropout (nothing drawn or dropped outside training or at p = 0) with addnorm's
// regenerated keep-mask (_dropout_apply, differentiable): the graph keeps the seed tensor
// instead of a mask, and backward regenerates the mask from it.
at::Tensor seeded_dropout(const at::Tensor& x, double p, bool training) {
  if (!training || p == 0.0) {
    return x;
  }
  return dropout_apply_op().call(x, addnorm::dropout_seed(x.device(), std::nullopt), p,
                                 std::nullopt);
}

// MultiheadAttention self-attention (F.multi_head_attention_forward with need_weights=False)
// on x [S, N, E], or [N, S, E] with batch_first, returned in x's layout. attn_mask and
// key_padding_mask are canonical (float) masks. The projections run on x as it is laid out
// (torch's layer transposes batch-first input first, so the in-projection copies it, and so
// does its split of q, k, v): q, k and v are strided views of the projection, and the
// attention output goes to the out-projection without a copy where its layout allows.
at::Tensor self_attention(
    const at::Tensor& x, bool batch_first, OptTensor attn_mask, OptTensor key_padding_mask,
    bool is_causal, const at::Tensor& in_proj_weight, const OptTensor& in_proj_bias,
    const at::Tensor& out_proj_weight, const OptTensor& out_proj_bias, int64_t nhead,
    double dropout_p, bool training) {
  const c10::SymInt S = x.sym_size(batch_first ? 1 : 0);
  const c10::SymInt N = x.sym_size(batch_first ? 0 : 1);
  const c10::SymInt E = x.sym_size(2);
  const c10::SymInt head_dim = E / nhead;
  const c10::SymInt NH = N * nhead;

  TORCH_CHECK(
      !is_causal || attn_mask.has_value(),
      "addnorm: transformer_encoder_layer: is_causal=True needs src_mask (the causal mask); "
      "nn.Transformer.generate_square_subsequent_mask makes one");
  // The masks' shapes, also where is_causal stands for src_mask below (a mask of another
  // shape, say a 4-D causal and padding mask, is refused, not dropped).
  if (attn_mask.has_value()) {
    if (attn_mask->dim() == 2) {
      check_shape(*attn_mask, {S, S}, "the 2-D src_mask", x.device());
    } else {
      TORCH_CHECK(
          attn_mask->dim() == 3, "addnorm: transformer_encoder_layer: src_mask must have 2 or 3 "
          "dimensions, got ", attn_mask->dim());
      check_shape(*attn_mask, {NH, S, S}, "the 3-D src_mask", x.device());
    }
  }
  if (key_padding_mask.has_value()) {
    check_shape(*key_padding_mask, {N, S}, "src_key_padding_mask", x.device());
  }
  if (is_causal && !key_padding_mask.has_value()) {
    attn_mask = std::nullopt;  // scaled_dot_product_attention applies the causal mask
  } else if (key_padding_mask.has_value()) {
    is_causal = false;
  }

  // In-projection as one linear (F._in_projection_packed); q, k, v as [N, nhead, S,
  // head_dim] views of it, unbound along the projection's q/k/v dimension: backward stacks
  // their gradients straight into the projection's layout (one pass; selecting them from a
  // permuted view instead costs a zero-filled projection-sized tensor per view, their sum,
  // and a copy back to the layout).
  const auto proj = at::linear(x, in_proj_weight, in_proj_bias);
  const c10::SymInt heads(nhead);
  const auto qkv = proj.view_symint({batch_first ? N : S, batch_first ? S : N, 3, heads, head_dim})
                       .unbind(2);
  auto to_heads = [&](const at::Tensor& t) {  // [N, nhead, S, head_dim]
    return batch_first ? t.transpose(1, 2) : t.permute({1, 2, 0, 3});
  };
  const auto q = to_heads(qkv[0]), k = to_heads(qkv[1]), v = to_heads(qkv[2]);

  if (attn_mask.has_value() && attn_mask->dim() == 2) {
    attn_mask = attn_mask->unsqueeze(0);
  }
  if (key_padding_mask.has_value()) {
    auto kpm = key_padding_mask->view_symint({N, 1, 1, S})
                   .expand_symint({-1, nhead, -1, -1})
                   .reshape_symint({NH, 1, S});
    attn_mask = attn_mask.has_value() ? attn_mask->add(kpm) : kpm;
  }
  if (!training) dropout_p = 0.0;
  if (attn_mask.has_value()) {
    if (attn_mask->sym_size(0) == 1 && attn_mask->dim() == 3) {
      attn_mask = attn_mask->unsqueeze(0);
    } else {
      attn_mask = attn_mask->view_symint({N, c10::SymInt(nhead), -1, S});
    }
  }
  at::Tensor out;
  // (q's dtype, not x's: under autocast the projection returns float16/bfloat16.)
  if (dropout_p > 0.0 && q.device().is_cpu() &&
      (q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble)) {
    // What scaled_dot_product_attention does here (its math path: the CPU kernels take no
    // dropout), op for op, with the regenerated-mask dropout for the attention
    // probabilities: torch's keeps a float mask as large as them and the dropped copy for
    // backward, this keeps neither.
    const double sqrt_scale = std::sqrt(1.0 / std::sqrt(static_cast<double>(
                                                  q.sym_size(3).guard_int(__FILE__, __LINE__))));
    auto scores = at::matmul(q * sqrt_scale, k.transpose(-2, -1) * sqrt_scale);
    if (is_causal) {
      const auto keep = at::ones_symint({S, S}, x.options().dtype(at::kBool)).tril();
      attn_mask = at::zeros_symint({S, S}, x.options())
                      .masked_fill(keep.logical_not(), -std::numeric_limits<double>::infinity());
    }
    if (attn_mask.has_value()) {
      scores = at::areAnyTensorSubclassLike({scores, *attn_mask}) ? scores.add(*attn_mask)
                                                                   : scores.add_(*attn_mask);
    }
    // Dropped probabilities times v in one op whose node keeps the probabilities (softmax's
    // node keeps them anyway), not the dropped copy: backward regenerates it.
    // (v contiguous, as matmul would copy it: the node then keeps that copy, not the whole
    // projection v is a view of. In the probabilities' dtype: under vmap and autocast the
    // projection is a matmul and a bias add, float32, while the scores' matmul is
    // float16/bfloat16, as the product's would be.)
    const auto probs = at::_safe_softmax(scores, -1);
    out = dropout_matmul_op().call(probs, v.to(probs.scalar_type()).contiguous(),
                                   addnorm::dropout_seed(x.device(), std::nullopt), dropout_p);
  } else {
    out = at::scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal);
  }
  // [N, nhead, S, head_dim] -> x's layout (a view when the kernel wrote it so).
  out = batch_first ? out.transpose(1, 2).reshape_symint({N, S, E})
                    : out.permute({2, 0, 1, 3}).reshape_symint({S, N, E});
  return at::linear(out, out_proj_weight, out_proj_bias);
}

at::Tensor transformer_encoder_layer_impl(
    const at::Tensor& src, const OptTensor& src_mask, const OptTensor& src_key_padding_mask,
    bool is_causal, const at::Tensor& in_proj_weight, const OptTensor& in_proj_bias,
    const at::Tensor& out_proj_weight, const OptTensor& out_proj_bias,
    const at::Tensor& linear1_weight, const OptTensor& linear1_bias,
    const at::Tensor& linear2_weight, const OptTensor& linear2_bias,
    const at::Tensor& norm1_weight, const OptTensor& norm1_bias, const at::Tensor& norm2_weight,
    const OptTensor& norm2_bias, int64_t nhead, double dropout, c10::string_view activation,
    double layer_norm_eps, bool batch_first, bool norm_first, bool training, bool fast_path) {
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{src, "src"},
                                {in_proj_weight, "in_proj_weight"},
                                {out_proj_weight, "out_proj_weight"},
                                {linear1_weight, "linear1_weight"},
                                {linear2_weight, "linear2_weight"},
                                {norm1_weight, "norm1_weight"},
                                {norm2_weight, "norm2_weight"}}) {
    TORCH_CHECK(t.defined(), "addnorm: transformer_encoder_layer: ", name,
                " must be a tensor, got an undefined tensor");
  }
  TORCH_CHECK(
      src.dim() == 3 || src.dim() == 2,
      "addnorm: transformer_encoder_layer: src must be 3-D ([S, N, E], or [N, S, E] with "
      "batch_first) or unbatched 2-D [S, E], got shape ", src.sym_sizes());
  // The layer's d_model comes from its weights; src must match it.
  TORCH_CHECK(
      in_proj_weight.dim() == 2, "addnorm: transformer_encoder_layer: in_proj_weight must be "
      "[3 * d_model, d_model], got shape ", in_proj_weight.sym_sizes());
  const c10::SymInt E = in_proj_weight.sym_size(1);
  TORCH_CHECK(
      src.sym_size(-1) == E, "addnorm: transformer_encoder_layer: was expecting embedding "
      "dimension of ", E, " (the layer's d_model), but got src of shape ", src.sym_sizes());
  if (src.dim() == 2) {
    // Unbatched, as MultiheadAttention does it: batch_first does not apply.
    OptTensor kpm;
    if (src_key_padding_mask.has_value()) {
      TORCH_CHECK(
          src_key_padding_mask->dim() == 1, "addnorm: transformer_encoder_layer: for unbatched "
          "src, src_key_padding_mask must be 1-D, got shape ", src_key_padding_mask->sym_sizes());
      kpm = src_key_padding_mask->unsqueeze(0);
    }
    return transformer_encoder_layer_impl(
               src.unsqueeze(1), src_mask, kpm, is_causal, in_proj_weight, in_proj_bias,
               out_proj_weight, out_proj_bias, linear1_weight, linear1_bias, linear2_weight,
               linear2_bias, norm1_weight, norm1_bias, norm2_weight, norm2_bias, nhead, dropout,
               activation, layer_norm_eps, /*batch_first=*/false, norm_first, training, fast_path)
        .squeeze(1);
  }
  TORCH_CHECK(
      c10::isFloatingType(src.scalar_type()),
      "addnorm: transformer_encoder_layer: src must be a floating-point tensor, got ",
      src.scalar_type());
  TORCH_CHECK(
      nhead > 0, "addnorm: transformer_encoder_layer: nhead must be positive, got ", nhead);
  TORCH_CHECK(
      E % nhead == 0, "addnorm: transformer_encoder_layer: d_model (", E,
      ") must be divisible by nhead (", nhead, ")");
  TORCH_CHECK(
      dropout >= 0.0 && dropout <= 1.0,
      "addnorm: transformer_encoder_layer: dropout must be in [0, 1], got ", dropout);
  TORCH_CHECK(
      layer_norm_eps >= 0.0,
      "addnorm: transformer_encoder_layer: layer_norm_eps must be a non-negative number, got ",
      layer_norm_eps);
  const bool gelu = activation == "gelu";
  TORCH_CHECK(
      gelu || activation == "relu",
      "addnorm: transformer_encoder_layer: activation must be \"relu\" or \"gelu\", got \"",
      std::string(activation), "\"");
  TORCH_CHECK(
      linear1_weight.dim() == 2, "addnorm: transformer_encoder_layer: linear1_weight must be "
      "[dim_feedforward, d_model], got shape ", linear1_weight.sym_sizes());
  const c10::SymInt FF = linear1_weight.sym_size(0);
  const c10::SymInt E3 = E * 3;
  const auto device = src.device();
  check_shape(in_proj_weight, {E3, E}, "in_proj_weight", device);
  check_opt_shape(in_proj_bias, {E3}, "in_proj_bias", device);
  check_shape(out_proj_weight, {E, E}, "out_proj_weight", device);
  check_opt_shape(out_proj_bias, {E}, "out_proj_bias", device);
  check_shape(linear1_weight, {FF, E}, "linear1_weight", device);
  check_opt_shape(linear1_bias, {FF}, "linear1_bias (dim_feedforward from linear1_weight)",
                  device);
  check_shape(linear2_weight, {E, FF}, "linear2_weight (dim_feedforward from linear1_weight)",
              device);
  check_opt_shape(linear2_bias, {E}, "linear2_bias", device);
  check_shape(norm1_weight, {E}, "norm1_weight", device);
  check_opt_shape(norm1_bias, {E}, "norm1_bias", device);
  check_shape(norm2_weight, {E}, "norm2_weight", device);
  check_opt_shape(norm2_bias, {E}, "norm2_bias", device);
  const auto dtype = src.scalar_type();
  if (!at::autocast::is_autocast_available(device.type()) ||
      !at::autocast::is_autocast_enabled(device.type())) {
    check_dtype(in_proj_weight, "in_proj_weight", dtype, false);
    check_dtype(in_proj_bias, "in_proj_bias", dtype, false);
    check_dtype(out_proj_weight, "out_proj_weight", dtype, false);
    check_dtype(out_proj_bias, "out_proj_bias", dtype, false);
    check_dtype(linear1_weight, "linear1_weight", dtype, false);
    check_dtype(linear1_bias, "linear1_bias", dtype, false);
    check_dtype(linear2_weight, "linear2_weight", dtype, false);
    check_dtype(linear2_bias, "linear2_bias", dtype, false);
  }
  check_dtype(norm1_weight, "norm1_weight", dtype, true);
  check_dtype(norm1_bias, "norm1_bias", dtype, true);
  check_dtype(norm2_weight, "norm2_weight", dtype, true);
  check_dtype(norm2_bias, "norm2_bias", dtype, true);

  // Inference in bfloat16 on the CPU, and in float16/bfloat16 on CUDA: torch's fused
  // inference kernel, which nn.TransformerEncoderLayer's fast path calls, so the result is
  // what the layer replaced gave. On the CPU its attention (one pass adding the projection's
  // bias and splitting the heads, then two batched matrix products around a softmax) took
  // less time than scaled_dot_product_attention's CPU kernel (d_model 1024, 16 heads, seq
  // 512, batch 8: the ops below were 0.92x the fast path in a benchmark run), though it
  // rounds the attention scores to bfloat16 and is less accurate than the ops below; in
  // float32 and float16 the ops below were faster there. On CUDA, where its attention runs
  // scaled_dot_product_attention too, an earlier revision of the ops below was slower than
  // it in bfloat16 on an H100. Its conditions are those of torch's fast path (fast_path,
  // which the Python layer takes from torch.backends.mha; no gradient, no CUDA autocast,
  // batch-first input, biases, an even nhead), without masks; tensor subclasses and
  // dispatch modes (tracing) take the ops below. torch's layer checks CUDA's autocast only:
  // under CPU autocast its fast path runs (the kernel's products then in the autocast
  // dtype, and so its result), and so does this one for CPU input of any dtype, also with
  // parameters of another dtype (a stack's second layer gets the first one's bfloat16).
  const bool cpu_autocast = device.is_cpu() && at::autocast::is_autocast_enabled(at::kCPU);
  const bool fast_dtype = device.is_cpu()
      ? dtype == at::kBFloat16 || cpu_autocast
      : device.is_cuda() && (dtype == at::kBFloat16 || dtype == at::kHalf);
  if (fast_path && !training && batch_first && fast_dtype && !src_mask.has_value() &&
      !src_key_padding_mask.has_value() && !is_causal && nhead % 2 == 0 &&
      !at::autocast::is_autocast_enabled(at::kCUDA)) {
    const std::vector<OptTensor> params{
        in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, linear1_weight,
        linear1_bias, linear2_weight, linear2_bias, norm1_weight, norm1_bias, norm2_weight,
        norm2_bias};
    bool usable = !(at::GradMode::is_enabled() && src.requires_grad());
    std::vector<at::Tensor> all{src};
    for (const auto& t : params) {
      usable = usable && t.has_value() && (t->scalar_type() == dtype || cpu_autocast) &&
               t->device() == device &&
               !(at::GradMode::is_enabled() && t->requires_grad());
      if (t.has_value()) all.push_back(*t);
    }
    if (usable && !at::areAnyTensorSubclassLike(all)) {
      return at::_transformer_encoder_layer_fwd(
          src, E.guard_int(__FILE__, __LINE__), nhead, in_proj_weight, *in_proj_bias,
          out_proj_weight, *out_proj_bias, gelu, norm_first, layer_norm_eps, norm1_weight,
          *norm1_bias, norm2_weight, *norm2_bias, linear1_weight, *linear1_bias, linear2_weight,
          *linear2_bias);
    }
  }

  // TransformerEncoderLayer.forward's mask canonicalization.
  const auto kpm = canonical_mask(
      src_key_padding_mask, "src_key_padding_mask", src.scalar_type(), src.device());
  const auto mask = canonical_mask(src_mask, "src_mask", src.scalar_type(), src.device());

  const std::vector<int64_t> d_model{E.guard_int(__FILE__, __LINE__)};
  auto sa_block = [&](const at::Tensor& x) {
    // its dropout (dropout1) is fused into the Add & Norm after it
    return self_attention(
        x, batch_first, mask, kpm, is_causal, in_proj_weight, in_proj_bias, out_proj_weight,
        out_proj_bias, nhead, dropout, training);
  };
  // linear2(dropout(activation(linear1(x)))), without the residual-branch dropout
  // (dropout2), which the caller applies.
  auto ff_block = [&](const at::Tensor& x) {
    // Without autograd, the activation in place on linear1's output: no second
    // [M, dim_feedforward] tensor is written. (With autograd an in-place change of that
    // view of the matrix product costs a copy of it in backward.)
    auto h = at::linear(x, linear1_weight, linear1_bias);
    if (h.requires_grad()) {
      h = gelu ? at::gelu(h) : at::relu(h);
    } else {
      h = gelu ? at::gelu_(h) : at::relu_(h);
    }
    return at::linear(seeded_dropout(h, dropout, training), linear2_weight, linear2_bias);
  };
  // The residual-branch dropouts fused into add_layer_norm: only in training (0 draws no
  // seed and drops nothing, the eval path). The norms keep their outputs, not h, in
  // training (see Memory above).
  const double residual_p = training ? dropout : 0.0;
  // memory_efficient for float32/float64 norms only: a float16/bfloat16 output carries too
  // little of xhat where |weight| is small for the weight gradient to stay within torch's
  // accuracy (under autocast the residual stream, and so the norms, are float32). On the
  // CPU, only for a weight it can read for free (not a tensor being traced, as under
  // torch.compile) with |bias| <= 4 |weight| everywhere (a zero: the op keeps h itself):
  // backward recovers xhat = (y - bias) / weight, whose rounding error grows with
  // |bias / weight| (at 16 the norm weight's gradient error was 2-4x torch's, at 4 within
  // it). Other devices' weights
  // are not read (a host synchronization): there the README's caveats apply.
  auto lean = [&](const at::Tensor& t, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias) {
    if (!training || !(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble)) {
      return false;
    }
    if (!weight.defined() || !weight.device().is_cpu()) return true;
    if (at::isTensorSubclassLike(weight) ||
        (bias.has_value() && at::isTensorSubclassLike(*bias))) {
      return false;
    }
    at::NoGradGuard no_grad;
    // (A zero, or a value whose float reciprocal overflows: the op itself keeps h for it.)
    return !bias.has_value() || bias->abs().le(weight.abs() * 4).all().item<bool>();
  };

  // Both operands of a residual add in the dtype eager `x + y` gives (they differ under
  // autocast, where the linears return float16/bfloat16): the fused op then computes
  // exactly torch's h and returns its norm in that dtype, as eager LayerNorm does.
  auto promoted = [](at::Tensor a, at::Tensor b) {
    const auto t = at::result_type(a, b);
    if (a.scalar_type() != t) a = a.to(t);
    if (b.scalar_type() != t) b = b.to(t);
    return std::make_pair(a, b);
  };

  if (norm_first) {
    // x = x + dropout(sa(norm1(x))); x = x + dropout(ff(norm2(x))): the first residual add,
    // its dropout and norm2 fused.
    // (Under autocast the projections keep a float16/bfloat16 copy of n1, not n1 itself:
    // keeping n1 would add a tensor where h is src, which its caller holds anyway and
    // torch's norm keeps too. norm2's h is a tensor of its own: there out costs the same.)
    const auto n1 = std::get<0>(addnorm::add_layer_norm(
        src, std::nullopt, d_model, norm1_weight, norm1_bias, layer_norm_eps,
        /*return_residual=*/false, /*residual_in_fp32=*/false, 0.0, std::nullopt,
        lean(src, norm1_weight, norm1_bias) &&
            !(at::autocast::is_autocast_available(src.device().type()) &&
              at::autocast::is_autocast_enabled(src.device().type()))));
    const auto [sa, x] = promoted(sa_block(n1), src);
    auto [n2, h] = addnorm::add_layer_norm(
        sa, x, d_model, norm2_weight, norm2_bias, layer_norm_eps, /*return_residual=*/true,
        /*residual_in_fp32=*/false, residual_p, std::nullopt,
        lean(sa, norm2_weight, norm2_bias));
    // No norm follows the second residual add inside the layer: nothing to fuse its
    // dropout with, so it is a pass of its own (seeded_dropout).
    return h.add(seeded_dropout(ff_block(n2), dropout, training));
  }
  // x = norm1(x + dropout(sa(x))); x = norm2(x + dropout(ff(x))).
  const auto [sa, x0] = promoted(sa_block(src), src);
  const auto x1 = std::get<0>(addnorm::add_layer_norm(
      sa, x0, d_model, norm1_weight, norm1_bias, layer_norm_eps, /*return_residual=*/false,
      /*residual_in_fp32=*/false, residual_p, std::nullopt,
      lean(sa, norm1_weight, norm1_bias)));
  const auto [ff, x2] = promoted(ff_block(x1), x1);
  return std::get<0>(addnorm::add_layer_norm(
      ff, x2, d_model, norm2_weight, norm2_bias, layer_norm_eps, /*return_residual=*/false,
      /*residual_in_fp32=*/false, residual_p, std::nullopt,
      lean(ff, norm2_weight, norm2_bias)));
}

}  // namespace

TORCH_LIBRARY_IMPL(addnorm, CompositeImplicitAutograd, m) {
  m.impl("transformer_encoder_layer", &transformer_encoder_layer_impl);
}

// Under vmap, the decomposition too (FuncTorchVmapMode, which every call under vmap meets
// first, batched arguments or not): its ops' vmap rules batch it, and its seed draws
// (at::randint) follow vmap's randomness. Without it, a call with a batched argument ran
// torch's fallback, entry by entry below vmap, each entry drawing seeds of its own whatever
// randomness asked for; one without ran outside the vmap, one draw for all entries.
TORCH_LIBRARY_IMPL(addnorm, FuncTorchVmapMode, m) {
  m.impl("transformer_encoder_layer", &transformer_encoder_layer_impl);
}

at::Tensor transformer_encoder_layer(
    const at::Tensor& src, const OptTensor& src_mask, const OptTensor& src_key_padding_mask,
    bool is_causal, const at::Tensor& in_proj_weight, const OptTensor& in_proj_bias,
    const at::Tensor& out_proj_weight, const OptTensor& out_proj_bias,
    const at::Tensor& linear1_weight, const OptTensor& linear1_bias,
    const at::Tensor& linear2_weight, const OptTensor& linear2_bias,
    const at::Tensor& norm1_weight, const OptTensor& norm1_bias, const at::Tensor& norm2_weight,
    const OptTensor& norm2_bias, int64_t nhead, double dropout, c10::string_view activation,
    double layer_norm_eps, bool batch_first, bool norm_first, bool training, bool fast_path) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("addnorm::transformer_encoder_layer", "")
          .typed<decltype(transformer_encoder_layer_impl)>();
  // An undefined tensor given for an optional argument (a bias=false module's bias) means
  // none, as for torch's own ops and the other entry points.
  auto opt = [](const OptTensor& t) { return t.has_value() && t->defined() ? t : std::nullopt; };
  return op.call(
      src, opt(src_mask), opt(src_key_padding_mask), is_causal, in_proj_weight,
      opt(in_proj_bias), out_proj_weight, opt(out_proj_bias), linear1_weight, opt(linear1_bias),
      linear2_weight, opt(linear2_bias), norm1_weight, opt(norm1_bias), norm2_weight,
      opt(norm2_bias), nhead, dropout, activation, layer_norm_eps, batch_first, norm_first,
      training, fast_path);
}

// ---------------------------------------------------------------------------------------
// Modules

namespace {
OptTensor opt(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }
}  // namespace

TransformerEncoderLayerImpl::TransformerEncoderLayerImpl(TransformerEncoderLayerOptions options_)
    : options(std::move(options_)) {
  reset();
}

void TransformerEncoderLayerImpl::reset() {
  const auto& o = options;
  TORCH_CHECK(
      o.d_model() > 0 && o.nhead() > 0 && o.d_model() % o.nhead() == 0,
      "addnorm::TransformerEncoderLayer: d_model (", o.d_model(),
      ") must be a positive multiple of nhead (", o.nhead(), ")");
  TORCH_CHECK(
      o.activation() == "relu" || o.activation() == "gelu",
      "addnorm::TransformerEncoderLayer: activation must be \"relu\" or \"gelu\", got \"",
      o.activation(), "\"");
  TORCH_CHECK(
      o.dropout() >= 0.0 && o.dropout() <= 1.0,
      "addnorm::TransformerEncoderLayer: dropout must be in [0, 1], got ", o.dropout());
  TORCH_CHECK(o.layer_norm_eps() >= 0.0,  // (NaN too)
              "addnorm::TransformerEncoderLayer: layer_norm_eps must be a non-negative number, "
              "got ", o.layer_norm_eps());
  // (LibTorch's Linear cannot initialize a layer of 0 inputs: linear2 would have them.)
  TORCH_CHECK(o.dim_feedforward() > 0,
              "addnorm::TransformerEncoderLayer: dim_feedforward must be positive, got ",
              o.dim_feedforward());
  // Registration order gives Python's parameter and submodule order.
  const auto drop = torch::nn::DropoutOptions(o.dropout());
  self_attn = register_module(
      "self_attn", torch::nn::MultiheadAttention(
                       torch::nn::MultiheadAttentionOptions(o.d_model(), o.nhead())
                           .dropout(o.dropout())
                           .bias(o.bias())));
  linear1 = register_module(
      "linear1",
      torch::nn::Linear(torch::nn::LinearOptions(o.d_model(), o.dim_feedforward()).bias(o.bias())));
  dropout = register_module("dropout", torch::nn::Dropout(drop));
  linear2 = register_module(
      "linear2",
      torch::nn::Linear(torch::nn::LinearOptions(o.dim_feedforward(), o.d_model()).bias(o.bias())));
  norm1 = register_module(
      "norm1", LayerNorm(LayerNormOptions({o.d_model()}).eps(o.layer_norm_eps()).bias(o.bias())));
  norm2 = register_module(
      "norm2", LayerNorm(LayerNormOptions({o.d_model()}).eps(o.layer_norm_eps()).bias(o.bias())));
  dropout1 = register_module("dropout1", torch::nn::Dropout(drop));
  dropout2 = register_module("dropout2", torch::nn::Dropout(drop));
}

void TransformerEncoderLayerImpl::reset_parameters() {
  // What the submodules' constructors do (as in Python): xavier_uniform_ in_proj_weight,
  // zero attention biases, Linear's default init, LayerNorm ones/zeros.
  self_attn->out_proj->reset_parameters();
  self_attn->_reset_parameters();
  linear1->reset_parameters();
  linear2->reset_parameters();
  norm1->reset_parameters();
  norm2->reset_parameters();
}

void TransformerEncoderLayerImpl::pretty_print(std::ostream& stream) const {
  const auto& o = options;
  // (nhead and eps as forward reads them: from the submodules)
  stream << "addnorm::TransformerEncoderLayer(d_model=" << o.d_model()
         << ", nhead=" << self_attn->options.num_heads()
         << ", dim_feedforward=" << o.dim_feedforward() << ", dropout=" << o.dropout()
         << ", activation=" << o.activation() << ", layer_norm_eps=" << norm1->options.eps()
         << ", batch_first=" << std::boolalpha << o.batch_first()
         << ", norm_first=" << o.norm_first() << ", bias=" << o.bias() << ")";
}

at::Tensor TransformerEncoderLayerImpl::forward(
    const at::Tensor& src, const at::Tensor& src_mask, const at::Tensor& src_key_padding_mask,
    bool is_causal) {
  // The submodules' own settings, as torch's layer, which calls its submodules, uses: one
  // changed after construction counts, and what the fused op cannot follow is refused. The
  // op takes one eps for both norms, one dropout probability and one training mode for
  // the attention's and the layer's dropouts.
  constexpr const char* kName = "addnorm::TransformerEncoderLayer: ";
  const double eps = norm1->options.eps();
  TORCH_CHECK(norm2->options.eps() == eps, kName, "norm1 and norm2 must have the same eps, got ",
              eps, " and ", norm2->options.eps());
  TORCH_CHECK(norm1->weight.defined() && norm2->weight.defined(), kName,
              "norm1 and norm2 must have a weight (elementwise_affine), got none for ",
              norm1->weight.defined() ? "norm2" : "norm1");
  const auto& sa = self_attn->options;
  TORCH_CHECK(self_attn->_qkv_same_embed_dim && !self_attn->bias_k.defined() &&
                  !self_attn->bias_v.defined() && !sa.add_zero_attn(),
              kName, "self_attn must be plain self-attention (no kdim/vdim, add_bias_kv, "
              "add_zero_attn), got kdim=", sa.kdim(), ", vdim=", sa.vdim(), ", add_bias_kv=",
              self_attn->bias_k.defined(), ", add_zero_attn=", sa.add_zero_attn());
  TORCH_CHECK(sa.dropout() == options.dropout(), kName,
              "self_attn's dropout must be the layer's (", options.dropout(), "), got ",
              sa.dropout());
  TORCH_CHECK(options.dropout() == 0.0 || self_attn->is_training() == is_training(), kName,
              "self_attn must be in the layer's training mode (", is_training(), "), got ",
              self_attn->is_training(), " (its attention dropout follows it)");
  // The dropout submodules (torch's layer calls them): one p and, with p > 0, one mode.
  using Named = std::pair<const char*, const torch::nn::Dropout*>;
  for (const auto& [name, d] :
       {Named{"dropout", &dropout}, Named{"dropout1", &dropout1}, Named{"dropout2", &dropout2}}) {
    TORCH_CHECK(!d->is_empty(), kName, name, " must be a Dropout, got an empty holder");
    TORCH_CHECK((*d)->options.p() == options.dropout(), kName, name,
                "'s p must be the layer's dropout (", options.dropout(), "), got ",
                (*d)->options.p());
    TORCH_CHECK(options.dropout() == 0.0 || (*d)->is_training() == is_training(), kName, name,
                " must be in the layer's training mode (", is_training(), "), got ",
                (*d)->is_training());
  }
  return transformer_encoder_layer(
      src, opt(src_mask), opt(src_key_padding_mask), is_causal, self_attn->in_proj_weight,
      opt(self_attn->in_proj_bias), self_attn->out_proj->weight, opt(self_attn->out_proj->bias),
      linear1->weight, opt(linear1->bias), linear2->weight, opt(linear2->bias), norm1->weight,
      opt(norm1->bias), norm2->weight, opt(norm2->bias), sa.num_heads(), options.dropout(),
      options.activation(), eps, options.batch_first(), options.norm_first(), is_training(),
      options.fast_path());
}

}  // namespace addnorm
