// The LibTorch norm modules (addnorm/norm_modules.h): parameters and options as Python's
// modules have them, forward as the C++ functions with those options, dropout in training
// mode only, the errors for a bad dropout probability, and nested input.

#include <functional>
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

// Fills a module's parameters with random values (the defaults, ones and zeros, would hide
// a dropped weight or bias).
void randomize(torch::nn::Module& m) {
  torch::NoGradGuard no_grad;
  for (auto& p : m.parameters()) p.normal_();
}

TEST(NormModules, ForwardIsTheFunctionWithTheOptions) {
  torch::manual_seed(0);
  auto x = torch::randn({3, 5, 8});
  auto r = torch::randn({3, 5, 8});
  addnorm::LayerNorm ln(addnorm::LayerNormOptions({8}).eps(0.5));
  addnorm::RMSNorm rms(addnorm::RMSNormOptions({8}).eps(0.25));
  addnorm::AddLayerNorm add_ln(addnorm::AddLayerNormOptions({8}).eps(0.5).return_residual(true));
  addnorm::AddRMSNorm add_rms(addnorm::AddRMSNormOptions({8}).eps(0.25));
  for (torch::nn::Module* m : std::vector<torch::nn::Module*>{ln.get(), rms.get(), add_ln.get(),
                                                               add_rms.get()}) {
    randomize(*m);
  }
  // (ATen's own norms as the reference; eps large enough that a default one would show)
  auto close = [](const at::Tensor& a, const at::Tensor& b) {
    return torch::allclose(a, b, 1e-5, 1e-5);
  };
  EXPECT_TRUE(close(ln(x), at::layer_norm(x, {8}, ln->weight, ln->bias, 0.5)));
  EXPECT_TRUE(close(rms(x), at::rms_norm(x, {8}, rms->weight, 0.25)));
  auto [out, h] = add_ln(x, r);
  EXPECT_TRUE(close(out, at::layer_norm(x + r, {8}, add_ln->weight, add_ln->bias, 0.5)));
  EXPECT_TRUE(torch::equal(h, x + r));
  auto [out2, h2] = add_rms(x, r);
  EXPECT_TRUE(close(out2, at::rms_norm(x + r, {8}, add_rms->weight, 0.25)));
  EXPECT_EQ(h2.numel(), 0);  // (no return_residual)
  // eps None: the compute type's machine epsilon, as at::rms_norm's default
  addnorm::RMSNorm rms_default(addnorm::RMSNormOptions({8}));
  auto tiny = x * 1e-4;
  EXPECT_TRUE(close(rms_default(tiny), at::rms_norm(tiny, {8}, rms_default->weight, std::nullopt)));
  // no residual: the norm of the input; the parameters get gradients
  auto [alone, unused] = add_rms(x);
  EXPECT_TRUE(close(alone, at::rms_norm(x, {8}, add_rms->weight, 0.25)));
  std::get<0>(add_ln(x, r)).sum().backward();
  EXPECT_TRUE(add_ln->weight.grad().defined() && add_ln->bias.grad().defined());
  // without affine parameters, and residual_in_fp32: h in float32 for bfloat16 input
  addnorm::AddLayerNorm plain(addnorm::AddLayerNormOptions({8}).elementwise_affine(false));
  EXPECT_TRUE(plain->parameters().empty());
  EXPECT_TRUE(close(std::get<0>(plain(x, r)), at::layer_norm(x + r, {8}, {}, {}, 1e-5)));
  addnorm::AddRMSNorm wide(
      addnorm::AddRMSNormOptions({8}).residual_in_fp32(true).return_residual(true));
  auto xb = x.to(torch::kBFloat16), rb = r.to(torch::kBFloat16);
  auto [out_b, h_b] = wide(xb, rb);
  EXPECT_EQ(out_b.scalar_type(), torch::kBFloat16);
  EXPECT_EQ(h_b.scalar_type(), torch::kFloat);
  EXPECT_TRUE(torch::equal(h_b, xb.to(torch::kFloat) + rb.to(torch::kFloat)));
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
  rms->options.dropout(0.5);
  rms->eval();
  EXPECT_TRUE(torch::equal(std::get<1>(rms(x, r)), x + r));
}

TEST(NormModules, MemoryEfficientIsPassedOn) {
  // The module's gradients are bitwise those of the function called with the same flag (the
  // memory-efficient backward works from the output, so its bits differ from the other's).
  torch::manual_seed(3);
  auto x = torch::randn({6, 16}, torch::requires_grad());
  auto r = torch::randn({6, 16}, torch::requires_grad());
  for (bool memory_efficient : {false, true}) {
    addnorm::AddLayerNorm m(addnorm::AddLayerNormOptions({16}).memory_efficient(memory_efficient));
    randomize(*m);
    auto out = std::get<0>(m(x, r));
    auto ref = std::get<0>(addnorm::add_layer_norm(x, r, {16}, m->weight, m->bias, 1e-5, false,
                                                   false, 0.0, std::nullopt, memory_efficient));
    auto ours = torch::autograd::grad({out}, {x, r, m->weight, m->bias}, {torch::ones_like(out)});
    auto theirs =
        torch::autograd::grad({ref}, {x, r, m->weight, m->bias}, {torch::ones_like(ref)});
    for (size_t i = 0; i < ours.size(); ++i) {
      EXPECT_TRUE(torch::equal(ours[i], theirs[i])) << memory_efficient << " " << i;
    }
  }
}

TEST(NormModules, CloneAndLoadFromLibTorchsLayerNorm) {
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
  // Parameters saved from torch::nn::LayerNorm load into it, and into addnorm::LayerNorm
  torch::nn::LayerNorm theirs(torch::nn::LayerNormOptions({8}).eps(1e-3));
  randomize(*theirs);
  std::stringstream archive;
  torch::save(theirs, archive);
  addnorm::LayerNorm ours(addnorm::LayerNormOptions({8}).eps(1e-3));
  for (torch::nn::Module* into : std::vector<torch::nn::Module*>{m.get(), ours.get()}) {
    archive.seekg(0);
    torch::serialize::InputArchive in;
    in.load_from(archive);
    into->load(in);
  }
  auto x = torch::randn({4, 8});
  EXPECT_TRUE(torch::allclose(ours(x), theirs(x), 1e-5, 1e-5));
  EXPECT_TRUE(torch::equal(m->weight, theirs->weight) && torch::equal(m->bias, theirs->bias));
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

// A negative or NaN eps is refused at construction, naming the module (the ops refused it at
// the first call, naming neither the module nor the option); RMSNorm's unset eps is taken.
TEST(NormModules, BadEpsOrShapeIsRefusedByNameAtConstruction) {
  auto message = [](const std::function<void()>& make) {
    try {
      make();
    } catch (const c10::Error& e) {
      return std::string(e.what_without_backtrace());
    }
    return std::string("no error");
  };
  for (double eps : {-1.0, std::nan("")}) {
    auto expect = [&](const char* module, const std::function<void()>& make) {
      EXPECT_NE(message(make).find(std::string("addnorm::") + module +
                                   ": eps must be a non-negative number, got " + c10::str(eps)),
                std::string::npos)
          << module;
    };
    expect("LayerNorm", [&] { addnorm::LayerNorm(addnorm::LayerNormOptions({8}).eps(eps)); });
    expect("RMSNorm", [&] { addnorm::RMSNorm(addnorm::RMSNormOptions({8}).eps(eps)); });
    expect("AddLayerNorm",
           [&] { addnorm::AddLayerNorm(addnorm::AddLayerNormOptions({8}).eps(eps)); });
    expect("AddRMSNorm", [&] { addnorm::AddRMSNorm(addnorm::AddRMSNormOptions({8}).eps(eps)); });
  }
  EXPECT_EQ(message([] { addnorm::RMSNorm(addnorm::RMSNormOptions({8})); }), "no error");
  EXPECT_EQ(message([] { addnorm::AddLayerNorm(addnorm::AddLayerNormOptions({8}).eps(0.0)); }),
            "no error");
  // So is a negative size of normalized_shape (at::empty's message named neither), with or
  // without parameters.
  for (bool affine : {true, false}) {
    auto expect = [&](const char* module, const std::function<void()>& make) {
      EXPECT_NE(message(make).find(std::string("addnorm::") + module +
                                   ": normalized_shape must have no negative size, got [4, -3]"),
                std::string::npos)
          << module << " " << message(make);
    };
    expect("LayerNorm", [&] {
      addnorm::LayerNorm(addnorm::LayerNormOptions({4, -3}).elementwise_affine(affine));
    });
    expect("RMSNorm",
           [&] { addnorm::RMSNorm(addnorm::RMSNormOptions({4, -3}).elementwise_affine(affine)); });
    expect("AddLayerNorm", [&] {
      addnorm::AddLayerNorm(addnorm::AddLayerNormOptions({4, -3}).elementwise_affine(affine));
    });
    expect("AddRMSNorm", [&] {
      addnorm::AddRMSNorm(addnorm::AddRMSNormOptions({4, -3}).elementwise_affine(affine));
    });
  }
}

// Nested input: LayerNorm (module and function) gives ATen's layer_norm of it, as the Python
// drop-ins do; the add modules refuse it by name.
TEST(NormModules, NestedInputGoesToATensLayerNorm) {
  torch::manual_seed(0);
  const auto nt = torch::nested::nested_tensor({torch::randn({2, 8}), torch::randn({3, 8})});
  addnorm::LayerNorm ln(addnorm::LayerNormOptions({8}).eps(0.5));
  randomize(*ln);
  const auto expected = at::layer_norm(nt, {8}, ln->weight, ln->bias, 0.5).unbind();
  for (const auto& got : {ln(nt), addnorm::layer_norm(nt, {8}, ln->weight, ln->bias, 0.5)}) {
    ASSERT_TRUE(got.is_nested());
    const auto rows = got.unbind();
    ASSERT_EQ(rows.size(), expected.size());
    for (size_t i = 0; i < rows.size(); ++i) EXPECT_TRUE(torch::equal(rows[i], expected[i]));
  }
  addnorm::AddLayerNorm add_ln(addnorm::AddLayerNormOptions({8}));
  try {
    add_ln(nt, nt);
    FAIL() << "no error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("input must be a strided tensor, got "
                                                           "a nested tensor"),
              std::string::npos)
        << e.what_without_backtrace();
  }
}

}  // namespace
