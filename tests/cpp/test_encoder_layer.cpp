// addnorm::TransformerEncoderLayer from C++: Python's parameter names, options, forward and
// backward through the transformer_encoder_layer op.

#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <addnorm/addnorm.h>

namespace {

std::vector<std::string> names_of(const torch::nn::Module& m) {
  std::vector<std::string> names;
  for (const auto& p : m.named_parameters()) names.push_back(p.key());
  return names;
}

// The layer written out with ATen ops (post-LN, relu, no mask). With dropout p > 0 it draws
// from the default generator in the layer's order, each dropout's mask being that of a seed
// (addnorm::dropout_seed, addnorm::dropout_mask): the attention probabilities (x is a CPU
// float32 tensor), the first residual branch (fused in the layer), after the activation,
// the second residual branch (fused).
torch::Tensor reference_post_ln(
    addnorm::TransformerEncoderLayerImpl& l, const torch::Tensor& x, double p = 0.0) {
  const auto E = l.options.d_model(), H = l.options.nhead();
  const auto S = x.size(0), N = x.size(1);
  auto qkv = torch::nn::functional::linear(x, l.self_attn->in_proj_weight, l.self_attn->in_proj_bias)
                 .chunk(3, -1);
  auto heads = [&](const torch::Tensor& t) { return t.reshape({S, N, H, E / H}).permute({1, 2, 0, 3}); };
  auto dropout = [p](const torch::Tensor& t) {
    if (p == 0.0) return t;
    const auto mask = addnorm::dropout_mask(addnorm::dropout_seed(t.device()), t.sizes(), p);
    return t * mask / (1.0 - p);
  };
  const auto scores =
      at::matmul(heads(qkv[0]), heads(qkv[1]).transpose(-2, -1)) / std::sqrt(double(E / H));
  auto a = at::matmul(dropout(at::softmax(scores, -1)), heads(qkv[2]));
  a = l.self_attn->out_proj(a.permute({2, 0, 1, 3}).reshape({S, N, E}));
  auto h = at::layer_norm(x + dropout(a), {E}, l.norm1->weight, l.norm1->bias, l.norm1->options.eps());
  auto f = l.linear2(dropout(torch::relu(l.linear1(h))));
  return at::layer_norm(h + dropout(f), {E}, l.norm2->weight, l.norm2->bias, l.norm2->options.eps());
}

// The gradients of y and ref for the same cotangent, with respect to the layer's
// parameters and x, agree.
void expect_gradients_close(
    const torch::Tensor& y, const torch::Tensor& ref, const torch::nn::Module& layer,
    const torch::Tensor& x) {
  auto g = torch::randn_like(y);
  auto params = layer.parameters();
  std::vector<torch::Tensor> inputs(params.begin(), params.end());
  inputs.push_back(x);
  auto grads = torch::autograd::grad({y}, inputs, {g});
  auto ref_grads = torch::autograd::grad({ref}, inputs, {g});
  ASSERT_EQ(grads.size(), ref_grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    EXPECT_TRUE(torch::allclose(grads[i], ref_grads[i], 1e-4, 1e-5)) << "gradient " << i;
  }
}

TEST(TransformerEncoderLayer, ParameterNamesArePythons) {
  addnorm::TransformerEncoderLayer layer(addnorm::TransformerEncoderLayerOptions(16, 4));
  const std::vector<std::string> expected{
      "self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
      "self_attn.out_proj.bias",  "linear1.weight",         "linear1.bias",
      "linear2.weight",           "linear2.bias",           "norm1.weight",
      "norm1.bias",               "norm2.weight",           "norm2.bias"};
  EXPECT_EQ(names_of(*layer), expected);

  addnorm::TransformerEncoderLayer no_bias(
      addnorm::TransformerEncoderLayerOptions(16, 4).bias(false));
  const std::vector<std::string> expected_no_bias{
      "self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight",
      "linear2.weight", "norm1.weight", "norm2.weight"};
  EXPECT_EQ(names_of(*no_bias), expected_no_bias);

  // Python's submodules, in its order.
  std::vector<std::string> children;
  for (const auto& c : layer->named_children()) children.push_back(c.key());
  const std::vector<std::string> expected_children{
      "self_attn", "linear1", "dropout", "linear2", "norm1", "norm2", "dropout1", "dropout2"};
  EXPECT_EQ(children, expected_children);
}

// An archive (torch::save) of LibTorch's layer loads into addnorm's, and one of addnorm's into
// LibTorch's (its three Dropout submodules were missing from addnorm's archive); the loaded
// layers compute the same in eval mode.
TEST(TransformerEncoderLayer, ArchivesMoveBothWaysWithLibTorchsLayer) {
  torch::manual_seed(3);
  auto x = torch::randn({5, 2, 16});
  auto load = [](torch::nn::Module& from, torch::nn::Module& into) {
    std::stringstream archive;
    torch::serialize::OutputArchive out;
    from.save(out);
    out.save_to(archive);
    torch::serialize::InputArchive in;
    in.load_from(archive);
    into.load(in);
  };
  for (bool theirs_first : {true, false}) {
    torch::nn::TransformerEncoderLayer theirs(
        torch::nn::TransformerEncoderLayerOptions(16, 4).dim_feedforward(32).dropout(0.1));
    addnorm::TransformerEncoderLayer ours(
        addnorm::TransformerEncoderLayerOptions(16, 4).dim_feedforward(32).dropout(0.1));
    if (theirs_first) {
      load(*theirs, *ours);
    } else {
      load(*ours, *theirs);
    }
    theirs->eval();
    ours->eval();
    torch::NoGradGuard no_grad;
    EXPECT_TRUE(torch::allclose(ours(x), theirs(x), 1e-5, 1e-5)) << theirs_first;
  }
}

TEST(TransformerEncoderLayer, OptionsAreRespected) {
  auto opts = addnorm::TransformerEncoderLayerOptions(24, 3)
                  .dim_feedforward(40)
                  .dropout(0.0)
                  .activation("gelu")
                  .layer_norm_eps(1e-3)
                  .batch_first(true)
                  .norm_first(true);
  addnorm::TransformerEncoderLayer layer(opts);
  EXPECT_EQ(layer->linear1->weight.sizes(), (std::vector<int64_t>{40, 24}));
  EXPECT_EQ(layer->linear2->weight.sizes(), (std::vector<int64_t>{24, 40}));
  EXPECT_EQ(layer->self_attn->in_proj_weight.sizes(), (std::vector<int64_t>{72, 24}));
  EXPECT_EQ(layer->norm1->options.eps(), 1e-3);
  // Initialization as in Python: zero attention biases, LayerNorm ones/zeros.
  EXPECT_TRUE(layer->self_attn->in_proj_bias.eq(0).all().item<bool>());
  EXPECT_TRUE(layer->self_attn->out_proj->bias.eq(0).all().item<bool>());
  EXPECT_TRUE(layer->norm2->weight.eq(1).all().item<bool>());

  // batch_first: [N, S, E] in and out, equal to the seq-first layer on the transposed input.
  auto x = torch::randn({2, 5, 24});
  auto y = layer->forward(x);
  EXPECT_EQ(y.sizes(), x.sizes());
  auto seq_first = addnorm::TransformerEncoderLayer(opts.batch_first(false));
  for (auto& p : seq_first->named_parameters()) {
    torch::NoGradGuard g;
    p.value().copy_(layer->named_parameters()[p.key()]);
  }
  auto y2 = seq_first->forward(x.transpose(0, 1)).transpose(0, 1);
  EXPECT_TRUE(torch::allclose(y, y2, 1e-5, 1e-6));

  // A bad activation names the argument.
  try {
    addnorm::TransformerEncoderLayer bad(addnorm::TransformerEncoderLayerOptions(8, 2).activation("tanh"));
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("activation"), std::string::npos);
  }
  // So does a dim_feedforward of 0 (LibTorch's Linear failed with "from is out of bounds").
  try {
    addnorm::TransformerEncoderLayer bad(addnorm::TransformerEncoderLayerOptions(8, 2).dim_feedforward(0));
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("dim_feedforward must be positive, got 0"),
              std::string::npos);
  }
  // And a negative or NaN layer_norm_eps (the first forward refused it as the norm's "eps").
  for (double eps : {-1.0, std::nan("")}) {
    try {
      addnorm::TransformerEncoderLayer bad(addnorm::TransformerEncoderLayerOptions(8, 2).layer_norm_eps(eps));
      FAIL() << "expected an error";
    } catch (const c10::Error& e) {
      EXPECT_NE(std::string(e.what_without_backtrace()).find("layer_norm_eps must be a non-negative number"),
                std::string::npos);
    }
  }
}

TEST(TransformerEncoderLayer, ForwardBackwardMatchReference) {
  torch::manual_seed(0);
  addnorm::TransformerEncoderLayer layer(
      addnorm::TransformerEncoderLayerOptions(16, 4).dim_feedforward(32).dropout(0.0));
  auto x = torch::randn({6, 3, 16}, torch::requires_grad());
  auto y = layer->forward(x);
  auto ref = reference_post_ln(*layer, x);
  EXPECT_TRUE(torch::allclose(y, ref, 1e-4, 1e-5));

  expect_gradients_close(y, ref, *layer, x);

  // eval() and train() with dropout: the op follows the module's mode.
  addnorm::TransformerEncoderLayer drop(
      addnorm::TransformerEncoderLayerOptions(16, 4).dim_feedforward(32).dropout(0.5));
  drop->eval();
  EXPECT_TRUE(torch::equal(drop->forward(x), drop->forward(x)));
  drop->train();
  EXPECT_FALSE(torch::equal(drop->forward(x), drop->forward(x)));
}

// Second derivatives (a gradient penalty): the training-mode layer's norms keep no h and
// refuse them with a message that names the C++ way out; in eval mode, with the math
// attention backend, they are the reference's.
TEST(TransformerEncoderLayer, SecondDerivativesInEvalModeWithTheMathBackend) {
  torch::manual_seed(0);
  addnorm::TransformerEncoderLayer layer(
      addnorm::TransformerEncoderLayerOptions(16, 4).dim_feedforward(32).dropout(0.0));
  layer->to(torch::kFloat64);
  auto x = torch::randn({6, 3, 16}, torch::dtype(torch::kFloat64).requires_grad(true));
  auto penalty = [&](const torch::Tensor& y) {
    auto gx = torch::autograd::grad({y.pow(2).sum()}, {x}, {}, true, true)[0];
    return torch::autograd::grad({gx.pow(2).sum()}, {x, layer->linear1->weight});
  };
  try {
    penalty(layer->forward(x));
    FAIL() << "no error";
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    EXPECT_NE(msg.find("memory_efficient=True keeps no h"), std::string::npos) << msg;
    EXPECT_NE(msg.find("at::globalContext().setSDPUseFlash(false)"), std::string::npos) << msg;
  }
  layer->eval();
  const bool flash = at::globalContext().userEnabledFlashSDP();
  at::globalContext().setSDPUseFlash(false);
  const auto ours = penalty(layer->forward(x));
  const auto theirs = penalty(reference_post_ln(*layer, x));
  at::globalContext().setSDPUseFlash(flash);
  for (size_t i = 0; i < ours.size(); ++i) {
    EXPECT_TRUE(torch::allclose(ours[i], theirs[i], 1e-9, 1e-10)) << "gradient " << i;
  }
}

TEST(TransformerEncoderLayer, NormsEpsSetAfterConstructionCounts) {
  torch::manual_seed(0);
  addnorm::TransformerEncoderLayer layer(
      addnorm::TransformerEncoderLayerOptions(16, 4).dim_feedforward(32).dropout(0.0));
  auto x = torch::randn({6, 3, 16}) * 0.05;  // small rows: eps matters
  const auto before = layer->forward(x);
  layer->norm1->options.eps(0.5);
  layer->norm2->options.eps(0.5);
  const auto y = layer->forward(x);
  EXPECT_TRUE(torch::allclose(y, reference_post_ln(*layer, x), 1e-4, 1e-5));
  EXPECT_FALSE(torch::allclose(y, before, 1e-2, 1e-2));
  // The fused op has one eps: unequal ones are refused by name, not averaged or ignored.
  layer->norm2->options.eps(1e-5);
  try {
    layer->forward(x);
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("norm1 and norm2 must have the same eps"),
              std::string::npos);
  }
}

// What forward reads from the submodules and cannot follow is refused by name.
void expect_refused(addnorm::TransformerEncoderLayer& layer, const at::Tensor& x,
                    const std::string& what) {
  try {
    layer->forward(x);
    FAIL() << "expected an error: " << what;
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find(what), std::string::npos)
        << e.what_without_backtrace();
  }
}

TEST(TransformerEncoderLayer, SubmoduleSettingsCountOrAreRefused) {
  torch::manual_seed(0);
  auto x = torch::randn({6, 3, 16});
  addnorm::TransformerEncoderLayer layer(
      addnorm::TransformerEncoderLayerOptions(16, 4).dim_feedforward(32).dropout(0.5));
  // The attention's dropout follows self_attn's training mode, the layer's the layer's: the
  // fused op has one, so a self_attn in another mode is refused (either way)...
  layer->eval();
  layer->self_attn->train();
  expect_refused(layer, x, "self_attn must be in the layer's training mode");
  layer->train();
  layer->self_attn->eval();
  expect_refused(layer, x, "self_attn must be in the layer's training mode");
  layer->self_attn->train();
  // ... as is an attention dropout other than the layer's
  layer->self_attn->options.dropout(0.25);
  expect_refused(layer, x, "self_attn's dropout must be the layer's (0.5), got 0.25");
  layer->self_attn->options.dropout(0.5);
  // ... and so are the layer's own dropout submodules in another mode or with another p
  // (the fused op has one p and one mode for all).
  layer->dropout1->eval();
  expect_refused(layer, x, "dropout1 must be in the layer's training mode (1), got 0");
  layer->dropout1->train();
  layer->dropout2->options.p(0.25);
  expect_refused(layer, x, "dropout2's p must be the layer's dropout (0.5), got 0.25");
  layer->dropout2->options.p(0.5);
  EXPECT_NO_THROW(layer->forward(x));
  // ... as is attention the op does not run (it ignored these):
  layer->self_attn->options.add_zero_attn(true);
  expect_refused(layer, x, "self_attn must be plain self-attention");
  layer->self_attn->options.add_zero_attn(false);
  auto plain = layer->self_attn;
  layer->self_attn = layer->replace_module(
      "self_attn", torch::nn::MultiheadAttention(
                       torch::nn::MultiheadAttentionOptions(16, 4).dropout(0.5).add_bias_kv(true)));
  expect_refused(layer, x, "add_bias_kv=1, add_zero_attn=0");
  layer->self_attn = layer->replace_module("self_attn", plain);
  EXPECT_NO_THROW(layer->forward(x));
  // and a norm without a weight.
  layer->norm2 = layer->replace_module(
      "norm2", addnorm::LayerNorm(addnorm::LayerNormOptions({16}).elementwise_affine(false)));
  expect_refused(layer, x, "norm1 and norm2 must have a weight");

  // The head count is self_attn's (as torch's layer calls its self_attn).
  addnorm::TransformerEncoderLayer two(
      addnorm::TransformerEncoderLayerOptions(16, 2).dim_feedforward(32).dropout(0.0));
  addnorm::TransformerEncoderLayer four(
      addnorm::TransformerEncoderLayerOptions(16, 4).dim_feedforward(32).dropout(0.0));
  {
    torch::NoGradGuard no_grad;
    auto src = two->named_parameters();
    for (auto& p : four->named_parameters()) p.value().copy_(src[p.key()]);
  }
  four->self_attn->options.num_heads(2);
  four->self_attn->head_dim = 8;
  EXPECT_TRUE(torch::allclose(four->forward(x), two->forward(x), 1e-5, 1e-6));
}

TEST(TransformerEncoderLayer, TrainingDropoutMatchesReferenceFromItsMasks) {
  // Every dropout's mask is that of a seed the layer draws from torch's generator, so
  // torch's layer does not give the same masks for the same seed; the reference that
  // replays the generator in the layer's order and applies those seeds' masks does.
  torch::manual_seed(3);
  const double p = 0.3;
  addnorm::TransformerEncoderLayer layer(
      addnorm::TransformerEncoderLayerOptions(16, 4).dim_feedforward(32).dropout(p));
  layer->train();
  auto x = torch::randn({6, 3, 16}, torch::requires_grad());
  torch::manual_seed(11);
  auto y = layer->forward(x);
  torch::manual_seed(11);
  auto ref = reference_post_ln(*layer, x, p);
  EXPECT_TRUE(torch::allclose(y, ref, 1e-4, 1e-5));
  torch::manual_seed(11);
  EXPECT_TRUE(torch::equal(layer->forward(x), y));  // the seed reproduces the output

  // Backward regenerates the masks of the forward's seeds.
  expect_gradients_close(y, ref, *layer, x);
}

TEST(TransformerEncoderLayer, CloneAndMasks) {
  torch::manual_seed(1);
  addnorm::TransformerEncoderLayer layer(
      addnorm::TransformerEncoderLayerOptions(16, 2).dim_feedforward(16).dropout(0.0));
  auto copy = std::dynamic_pointer_cast<addnorm::TransformerEncoderLayerImpl>(layer->clone());
  ASSERT_TRUE(copy);
  EXPECT_EQ(names_of(*copy), names_of(*layer));
  auto x = torch::randn({5, 2, 16});
  EXPECT_TRUE(torch::equal(copy->forward(x), layer->forward(x)));

  // A bool causal mask equals its float form and the is_causal hint.
  auto causal = torch::ones({5, 5}, torch::kBool).triu(1);
  auto float_mask = torch::zeros({5, 5}).masked_fill(causal, -INFINITY);
  auto a = layer->forward(x, causal);
  EXPECT_TRUE(torch::allclose(a, layer->forward(x, float_mask), 1e-6, 1e-6));
  EXPECT_TRUE(torch::allclose(a, layer->forward(x, causal, {}, true), 1e-5, 1e-6));
  // Padding mask: [N, S].
  auto kpm = torch::zeros({2, 5}, torch::kBool);
  kpm.index_put_({1, 4}, true);
  EXPECT_EQ(layer->forward(x, {}, kpm).sizes(), x.sizes());
}

// bfloat16 inference on the CPU is torch's fused inference kernel (its fast path), bit for
// bit; fast_path = false, or a gradient, keeps addnorm's ops.
TEST(TransformerEncoderLayer, BFloat16InferenceIsTorchsFusedKernel) {
  torch::manual_seed(2);
  addnorm::TransformerEncoderLayer layer(addnorm::TransformerEncoderLayerOptions(16, 2)
                                             .dim_feedforward(32)
                                             .batch_first(true));
  layer->to(torch::kBFloat16);
  layer->eval();
  auto& l = *layer;
  auto x = torch::randn({2, 5, 16}).to(torch::kBFloat16);
  const auto& sa = *l.self_attn;
  auto ops = [&](bool fast_path) {
    return addnorm::transformer_encoder_layer(
        x, {}, {}, false, sa.in_proj_weight, sa.in_proj_bias, sa.out_proj->weight,
        sa.out_proj->bias, l.linear1->weight, l.linear1->bias, l.linear2->weight,
        l.linear2->bias, l.norm1->weight, l.norm1->bias, l.norm2->weight, l.norm2->bias, 2,
        0.1, "relu", 1e-5, true, false, false, fast_path);
  };
  const auto own = layer->forward(x).detach();  // (parameters require grad: addnorm's ops)
  torch::NoGradGuard no_grad;
  const auto fused = at::_transformer_encoder_layer_fwd(
      x, 16, 2, sa.in_proj_weight, sa.in_proj_bias, sa.out_proj->weight, sa.out_proj->bias,
      false, false, 1e-5, l.norm1->weight, l.norm1->bias, l.norm2->weight, l.norm2->bias,
      l.linear1->weight, l.linear1->bias, l.linear2->weight, l.linear2->bias);
  EXPECT_TRUE(torch::equal(layer->forward(x), fused));
  EXPECT_TRUE(torch::equal(ops(true), fused));
  EXPECT_TRUE(torch::equal(ops(false), own));
  EXPECT_FALSE(torch::equal(own, fused));
  // The option fast_path(false) keeps addnorm's ops (Python: torch.backends.mha's switch).
  layer->options.fast_path(false);
  EXPECT_TRUE(torch::equal(layer->forward(x), own));
}

// An undefined src or weight is refused by name (it read as an empty tensor: "got shape [0]").
TEST(TransformerEncoderLayer, UndefinedTensorsAreRefusedByName) {
  addnorm::TransformerEncoderLayer layer(
      addnorm::TransformerEncoderLayerOptions(16, 2).dim_feedforward(32));
  auto& l = *layer;
  const auto& sa = *l.self_attn;
  auto message = [&](const at::Tensor& src, const at::Tensor& in_proj_weight) {
    try {
      addnorm::transformer_encoder_layer(
          src, {}, {}, false, in_proj_weight, sa.in_proj_bias, sa.out_proj->weight,
          sa.out_proj->bias, l.linear1->weight, l.linear1->bias, l.linear2->weight,
          l.linear2->bias, l.norm1->weight, l.norm1->bias, l.norm2->weight, l.norm2->bias, 2,
          0.1, "relu", 1e-5, false, false, false);
    } catch (const c10::Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  auto msg = message(at::Tensor(), sa.in_proj_weight);
  EXPECT_NE(msg.find("src must be a tensor, got an undefined tensor"), std::string::npos) << msg;
  msg = message(torch::randn({5, 2, 16}), at::Tensor());
  EXPECT_NE(msg.find("in_proj_weight must be a tensor, got an undefined tensor"),
            std::string::npos)
      << msg;
}

// src or a parameter in another dtype: the parameter is named (matmul named neither).
TEST(TransformerEncoderLayer, DtypeMismatchNamesTheParameter) {
  addnorm::TransformerEncoderLayer layer(
      addnorm::TransformerEncoderLayerOptions(16, 2).dim_feedforward(32));
  layer->eval();
  torch::NoGradGuard no_grad;
  auto message = [&](const at::Tensor& src) {
    try {
      layer->forward(src);
    } catch (const c10::Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const auto src = torch::randn({5, 2, 16});
  auto msg = message(src.to(torch::kDouble));
  EXPECT_NE(msg.find("in_proj_weight must have src's dtype (Double), got Float"),
            std::string::npos)
      << msg;
  layer->linear2->bias.set_data(layer->linear2->bias.to(torch::kDouble));
  msg = message(src);
  EXPECT_NE(msg.find("linear2_bias must have src's dtype (Float), got Double"), std::string::npos)
      << msg;
}

}  // namespace
