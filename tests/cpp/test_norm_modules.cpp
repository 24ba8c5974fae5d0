// The LibTorch norm modules (addnorm/norm_modules.h): parameters and options as Python's
// modules have them, forward as the C++ functions with those options, dropout in training
// mode only, and the errors for a bad dropout probability.

#include <sstream>
#include <string>
#include <vector>

#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <addnorm/addnorm.h>

namespace {

std::vector<std::string> parameter_names(const torch::nn::Module& m) {
  std::vector<std::string> names;
  for (const auto& item : m.named_parameters()) names.push_back(item.key());
  return names;
}

std::string printed(const torch::nn::Module& m) {
  std::ostringstream s;
  m.pretty_print(s);
  return s.str();
}

using Names = std::vector<std::string>;

TEST(NormModules, ParametersAsPythonsModules) {
  EXPECT_EQ(parameter_names(*addnorm::RMSNorm(addnorm::RMSNormOptions({4, 8}))), Names{"weight"});
  EXPECT_TRUE(parameter_names(*addnorm::RMSNorm(
      addnorm::RMSNormOptions({8}).elementwise_affine(false))).empty());
  EXPECT_EQ(parameter_names(*addnorm::AddLayerNorm(addnorm::AddLayerNormOptions({8}))),
            (Names{"weight", "bias"}));
  EXPECT_EQ(parameter_names(*addnorm::AddLayerNorm(addnorm::AddLayerNormOptions({8}).bias(false))),
            Names{"weight"});
  EXPECT_EQ(parameter_names(*addnorm::AddRMSNorm(addnorm::AddRMSNormOptions({8}))),
            Names{"weight"});
  addnorm::AddLayerNorm ln(addnorm::AddLayerNormOptions({2, 3}));
  EXPECT_TRUE(torch::equal(ln->weight, torch::ones({2, 3})));
  EXPECT_TRUE(torch::equal(ln->bias, torch::zeros({2, 3})));
  EXPECT_EQ(printed(*addnorm::RMSNorm(addnorm::RMSNormOptions({8}))),
            "addnorm::RMSNorm([8], eps=None, elementwise_affine=true)");
  EXPECT_EQ(printed(*addnorm::AddRMSNorm(addnorm::AddRMSNormOptions({8}).eps(1e-6).dropout(0.5))),
            "addnorm::AddRMSNorm([8], eps=1e-06, elementwise_affine=true, return_residual=false, "
            "residual_in_fp32=false, dropout=0.5, memory_efficient=false)");
}

TEST(NormModules, ForwardIsTheFunctionWithTheOptions) {
  torch::manual_seed(0);
  auto x = torch::randn({3, 5, 8});
  auto r = torch::randn({3, 5, 8});
  addnorm::RMSNorm rms(addnorm::RMSNormOptions({8}).eps(1e-3));
  addnorm::AddLayerNorm add_ln(addnorm::AddLayerNormOptions({8}).eps(1e-3).return_residual(true));
  addnorm::AddRMSNorm add_rms(addnorm::AddRMSNormOptions({8}));
  for (auto* w : {&rms->weight, &add_ln->weight, &add_rms->weight}) {
    torch::NoGradGuard no_grad;
    w->normal_();
  }
  {
    torch::NoGradGuard no_grad;
    add_ln->bias.normal_();
  }
  EXPECT_TRUE(torch::equal(rms(x), addnorm::rms_norm(x, {8}, rms->weight, 1e-3)));
  auto [out, h] = add_ln(x, r);
  EXPECT_TRUE(torch::allclose(out, at::layer_norm(x + r, {8}, add_ln->weight, add_ln->bias, 1e-3),
                              1e-5, 1e-5));
  EXPECT_TRUE(torch::equal(h, x + r));
  auto [out2, h2] = add_rms(x, r);
  EXPECT_TRUE(torch::equal(out2, std::get<0>(addnorm::add_rms_norm(x, r, {8}, add_rms->weight))));
  EXPECT_EQ(h2.numel(), 0);  // (no return_residual)
  // no residual: the norm of the input; the parameters get gradients
  auto [alone, unused] = add_rms(x);
  EXPECT_TRUE(torch::equal(alone, addnorm::rms_norm(x, {8}, add_rms->weight)));
  std::get<0>(add_ln(x, r)).sum().backward();
  EXPECT_TRUE(add_ln->weight.grad().defined() && add_ln->bias.grad().defined());
}

TEST(NormModules, DropoutInTrainingModeOnly) {
  torch::manual_seed(1);
  auto x = torch::randn({64, 32});
  auto r = torch::randn({64, 32});
  addnorm::AddLayerNorm m(addnorm::AddLayerNormOptions({32}).dropout(0.5).return_residual(true));
  const auto plain = std::get<1>(addnorm::add_layer_norm(x, r, {32}, m->weight, m->bias));
  // training (the default): h = x * mask / (1 - p) + r, the mask that the seed drawn from
  // the default generator gives
  torch::manual_seed(2);
  auto [out, h] = m(x, r);
  torch::manual_seed(2);
  const auto seed = addnorm::dropout_seed(x.device());
  const auto mask = addnorm::dropout_mask(seed, {64, 32}, 0.5);
  EXPECT_TRUE(torch::allclose(h, x * mask * 2.0 + r));
  const double kept = mask.to(torch::kDouble).mean().item<double>();
  EXPECT_GT(kept, 0.4);
  EXPECT_LT(kept, 0.6);
  // eval: no dropout, nothing drawn
  m->eval();
  auto gen = at::detail::getDefaultCPUGenerator();
  const auto state = gen.get_state();
  auto [out_eval, h_eval] = m(x, r);
  EXPECT_TRUE(torch::equal(h_eval, plain));
  EXPECT_TRUE(torch::equal(gen.get_state(), state));
  addnorm::AddRMSNorm rms(addnorm::AddRMSNormOptions({32}).dropout(1.0).return_residual(true));
  EXPECT_TRUE(torch::equal(std::get<1>(rms(x, r)), r));  // p = 1: h = r
}

TEST(NormModules, MemoryEfficientGivesTheSameGradients) {
  torch::manual_seed(3);
  auto x = torch::randn({6, 16}, torch::requires_grad());
  auto r = torch::randn({6, 16}, torch::requires_grad());
  std::vector<std::vector<at::Tensor>> grads;
  for (bool memory_efficient : {false, true}) {
    addnorm::AddLayerNorm m(addnorm::AddLayerNormOptions({16}).memory_efficient(memory_efficient));
    auto out = std::get<0>(m(x, r));
    grads.push_back(torch::autograd::grad({out}, {x, r, m->weight, m->bias},
                                          {torch::ones_like(out)}));
  }
  for (size_t i = 0; i < grads[0].size(); ++i) {
    EXPECT_TRUE(torch::allclose(grads[0][i], grads[1][i], 1e-5, 1e-5)) << i;
  }
}

TEST(NormModules, CloneAndStateDictNames) {
  addnorm::AddLayerNorm m(addnorm::AddLayerNormOptions({8}).dropout(0.1));
  {
    torch::NoGradGuard no_grad;
    m->weight.fill_(2.0);
  }
  auto copy = std::dynamic_pointer_cast<addnorm::AddLayerNormImpl>(m->clone());
  ASSERT_TRUE(copy);
  EXPECT_TRUE(torch::equal(copy->weight, m->weight));
  EXPECT_NE(copy->weight.data_ptr(), m->weight.data_ptr());
  EXPECT_EQ(copy->options.dropout(), 0.1);
  // torch::nn::LayerNorm's parameters load into it (same names and shapes)
  torch::nn::LayerNorm theirs(torch::nn::LayerNormOptions({8}));
  EXPECT_EQ(parameter_names(*theirs), parameter_names(*m));
}

TEST(NormModules, BadDropoutIsRefusedByName) {
  for (double p : {-0.1, 1.5, std::nan("")}) {
    EXPECT_THROW(addnorm::AddLayerNorm(addnorm::AddLayerNormOptions({8}).dropout(p)), c10::Error);
    EXPECT_THROW(addnorm::AddRMSNorm(addnorm::AddRMSNormOptions({8}).dropout(p)), c10::Error);
  }
  addnorm::AddRMSNorm m(addnorm::AddRMSNormOptions({8}));
  m->options.dropout(2.0);  // set after construction: refused at the call
  try {
    m(torch::randn({2, 8}), torch::randn({2, 8}));
    FAIL() << "no error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what_without_backtrace())
                  .find("addnorm::AddRMSNorm: dropout must be in [0, 1], got 2"),
              std::string::npos)
        << e.what_without_backtrace();
  }
}

}  // namespace
