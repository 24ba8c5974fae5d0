// addnorm::TransformerEncoder: clones of the layer run in turn, then the norm; Python's
// nn.TransformerEncoder parameter names.

#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <addnorm/addnorm.h>

namespace {

addnorm::TransformerEncoderLayerOptions small_layer() {
  return addnorm::TransformerEncoderLayerOptions(16, 2).dim_feedforward(32).dropout(0.1);
}

}  // namespace

TEST(TransformerEncoder, ParameterNamesArePythons) {
  torch::manual_seed(0);
  addnorm::TransformerEncoder enc(addnorm::TransformerEncoderOptions(small_layer(), 3).norm(
      torch::nn::AnyModule(addnorm::LayerNorm(addnorm::LayerNormOptions({16})))));
  const auto params = enc->named_parameters();
  const auto layer_params = addnorm::TransformerEncoderLayer(small_layer())->named_parameters();
  ASSERT_EQ(params.size(), 3 * layer_params.size() + 2);
  for (int i = 0; i < 3; ++i) {
    for (const auto& p : layer_params) {
      EXPECT_TRUE(params.contains("layers." + std::to_string(i) + "." + p.key())) << p.key();
    }
  }
  EXPECT_TRUE(params.contains("norm.weight") && params.contains("norm.bias"));
  std::ostringstream s;
  s << *enc;
  EXPECT_NE(s.str().find("addnorm::TransformerEncoder(num_layers=3)"), std::string::npos);
  // Without a norm, none.
  addnorm::TransformerEncoder bare(addnorm::TransformerEncoderLayer(small_layer()), 2);
  EXPECT_EQ(bare->named_parameters().size(), 2 * layer_params.size());
}

TEST(TransformerEncoder, LayersAreIndependentClonesOfTheLayer) {
  torch::manual_seed(0);
  addnorm::TransformerEncoderLayer layer(small_layer());
  addnorm::TransformerEncoder enc(layer, 2);
  const auto w0 = enc->layers->at<addnorm::TransformerEncoderLayerImpl>(0).linear1->weight;
  const auto w1 = enc->layers->at<addnorm::TransformerEncoderLayerImpl>(1).linear1->weight;
  // The values of the layer given (as Python's deepcopy), in storages of their own.
  EXPECT_TRUE(torch::equal(w0, layer->linear1->weight) && torch::equal(w1, layer->linear1->weight));
  {
    torch::NoGradGuard no_grad;
    w0.add_(1.0);
  }
  EXPECT_TRUE(torch::equal(w1, layer->linear1->weight));
  EXPECT_FALSE(torch::equal(w0, w1));
  // Options set on the layer carry over.
  EXPECT_EQ(enc->layers->at<addnorm::TransformerEncoderLayerImpl>(1).options.dim_feedforward(), 32);
}

TEST(TransformerEncoder, ForwardIsTheLayersInTurnThenTheNorm) {
  torch::manual_seed(0);
  addnorm::TransformerEncoder enc(addnorm::TransformerEncoderOptions(small_layer(), 3).norm(
      torch::nn::AnyModule(addnorm::RMSNorm(addnorm::RMSNormOptions({16})))));
  {  // distinct layers and a norm weight that is not ones
    torch::NoGradGuard no_grad;
    for (auto& p : enc->parameters()) p.add_(torch::randn_like(p), 0.1);
  }
  const auto x = torch::randn({5, 2, 16});
  const auto mask = torch::rand({5, 5}) > 0.7;
  const auto padding = torch::zeros({2, 5}, torch::kBool).index_put_({1, 4}, true);

  auto run_by_hand = [&] {
    auto y = x;
    for (size_t i = 0; i < enc->layers->size(); ++i) {
      y = enc->layers->at<addnorm::TransformerEncoderLayerImpl>(i).forward(y, mask, padding);
    }
    return enc->norm.forward<torch::Tensor>(y);
  };
  enc->eval();
  EXPECT_TRUE(torch::equal(enc->forward(x, mask, padding), run_by_hand()));
  // Training: the same draws in the same order (dropout 0.1), and gradients reach layer 0.
  enc->train();
  torch::manual_seed(1);
  const auto y = enc->forward(x, mask, padding);
  torch::manual_seed(1);
  EXPECT_TRUE(torch::equal(y, run_by_hand()));
  y.square().sum().backward();
  const auto& g = enc->layers->at<addnorm::TransformerEncoderLayerImpl>(0).self_attn->in_proj_weight.grad();
  ASSERT_TRUE(g.defined());
  EXPECT_GT(g.abs().sum().item<double>(), 0.0);
  // No layers: the norm of the input.
  addnorm::TransformerEncoder none(addnorm::TransformerEncoderOptions(small_layer(), 0).norm(
      torch::nn::AnyModule(addnorm::LayerNorm(addnorm::LayerNormOptions({16})))));
  EXPECT_TRUE(torch::allclose(none->forward(x), torch::layer_norm(x, {16})));
}

TEST(TransformerEncoder, CloneAndResetParameters) {
  torch::manual_seed(0);
  addnorm::TransformerEncoder enc(addnorm::TransformerEncoderOptions(small_layer(), 2).norm(
      torch::nn::AnyModule(addnorm::LayerNorm(addnorm::LayerNormOptions({16})))));
  auto copy = std::dynamic_pointer_cast<addnorm::TransformerEncoderImpl>(enc->clone());
  ASSERT_TRUE(copy);
  const auto a = enc->named_parameters(), b = copy->named_parameters();
  ASSERT_EQ(a.size(), b.size());
  for (const auto& p : a) {
    EXPECT_TRUE(torch::equal(p.value(), b[p.key()])) << p.key();
    EXPECT_NE(p.value().data_ptr(), b[p.key()].data_ptr()) << p.key();
  }
  // The clone runs as the original does, and stays so when the original changes.
  const auto x = torch::randn({5, 2, 16});
  enc->eval();
  copy->eval();
  const auto y_copy = copy->forward(x);
  EXPECT_TRUE(torch::equal(y_copy, enc->forward(x)));
  {
    torch::NoGradGuard no_grad;
    enc->named_parameters()["norm.weight"].fill_(3.0);
  }
  const auto before0 = enc->named_parameters()["layers.0.linear2.weight"].clone();
  const auto before = enc->named_parameters()["layers.1.linear2.weight"].clone();
  enc->reset_parameters();
  EXPECT_FALSE(torch::equal(enc->named_parameters()["layers.0.linear2.weight"], before0));
  EXPECT_FALSE(torch::equal(enc->named_parameters()["layers.1.linear2.weight"], before));
  EXPECT_TRUE(torch::equal(enc->named_parameters()["norm.weight"], torch::ones({16})));
  EXPECT_TRUE(torch::equal(copy->forward(x), y_copy));
  EXPECT_FALSE(torch::equal(enc->forward(x), y_copy));
  // reset_parameters after to(): the new norm has the stack's dtype.
  enc->to(torch::kDouble);
  enc->reset_parameters();
  for (const auto& p : enc->parameters()) EXPECT_EQ(p.scalar_type(), torch::kDouble);
  EXPECT_EQ(enc->forward(x.to(torch::kDouble)).scalar_type(), torch::kDouble);
  // A norm added after to(), or one with buffers alone: the stack's dtype too.
  addnorm::TransformerEncoder bn(small_layer(), 1);
  bn->to(torch::kDouble);
  bn->options.norm(torch::nn::AnyModule(
      torch::nn::BatchNorm1d(torch::nn::BatchNorm1dOptions(2).affine(false))));
  bn->reset_parameters();
  for (const auto& t : bn->buffers()) {
    if (t.is_floating_point()) EXPECT_EQ(t.scalar_type(), torch::kDouble);
  }
  // A norm of its own dtype beside the layers' (its parameters, or its buffers alone): its
  // dtype is kept, not the layers'.
  for (const bool buffers_alone : {false, true}) {
    addnorm::TransformerEncoder mixed(small_layer(), 1);
    mixed->options.norm(
        buffers_alone ? torch::nn::AnyModule(torch::nn::BatchNorm1d(
                            torch::nn::BatchNorm1dOptions(2).affine(false)))
                      : torch::nn::AnyModule(addnorm::LayerNorm(addnorm::LayerNormOptions({16}))));
    mixed->reset_parameters();
    mixed->norm.ptr()->to(torch::kDouble);
    mixed->reset_parameters();
    size_t floating = 0;
    for (const auto& t : mixed->norm.ptr()->named_parameters(/*recurse=*/true)) {
      EXPECT_EQ(t.value().scalar_type(), torch::kDouble) << t.key();
      ++floating;
    }
    for (const auto& t : mixed->norm.ptr()->named_buffers()) {
      if (!t.value().is_floating_point()) continue;
      EXPECT_EQ(t.value().scalar_type(), torch::kDouble) << t.key();
      ++floating;
    }
    EXPECT_GE(floating, 2u) << buffers_alone;  // (weight, bias; running mean, var)
    for (const auto& t : mixed->layers->parameters()) EXPECT_EQ(t.scalar_type(), torch::kFloat);
  }
  // Options of a layer, directly.
  addnorm::TransformerEncoder from_options(small_layer(), 2);
  EXPECT_EQ(from_options->layers->size(), 2u);
}

TEST(TransformerEncoder, BadOptionsAreRefusedByName) {
  try {
    addnorm::TransformerEncoder(addnorm::TransformerEncoderLayer(small_layer()), -1);
    FAIL() << "num_layers -1 was accepted";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find(
                  "addnorm::TransformerEncoder: num_layers must be non-negative, got -1"),
              std::string::npos)
        << e.what();
  }
  addnorm::TransformerEncoder enc(addnorm::TransformerEncoderLayer(small_layer()), 1);
  enc->layers->push_back(torch::nn::Identity());  // (layers is public)
  const auto before = enc->named_parameters()["layers.0.linear1.weight"].clone();
  EXPECT_THROW(enc->reset_parameters(), c10::Error);
  EXPECT_TRUE(torch::equal(enc->named_parameters()["layers.0.linear1.weight"], before));
  try {
    enc->forward(torch::randn({5, 2, 16}));
    FAIL() << "a layer of another type was accepted";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("addnorm::TransformerEncoder: layers[1] must be an "
                                         "addnorm::TransformerEncoderLayer, got torch::nn::Identity"),
              std::string::npos)
        << e.what();
  }
  addnorm::TransformerEncoder tuple_norm(
      addnorm::TransformerEncoderOptions(small_layer(), 1)
          .norm(torch::nn::AnyModule(addnorm::AddLayerNorm(std::vector<int64_t>{16}))));
  try {
    tuple_norm->forward(torch::randn({5, 2, 16}));
    FAIL() << "a norm returning a tuple was accepted";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("addnorm::TransformerEncoder: norm must return a "
                                         "Tensor, got std::tuple<at::Tensor, at::Tensor> from "
                                         "addnorm::AddLayerNormImpl"),
              std::string::npos)
        << e.what();
  }
  try {
    addnorm::TransformerEncoder(addnorm::TransformerEncoderLayer(nullptr), 2);
    FAIL() << "an empty layer holder was accepted";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("encoder_layer must be a layer"), std::string::npos)
        << e.what();
  }
}
