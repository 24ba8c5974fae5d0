// The addnorm ops called from C++: results against ATen's own ops, gradients through the
// C++ autograd registration, and the error messages for bad input.

#include <string>

#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/forward_grad.h>
#include <torch/torch.h>

#include <addnorm/addnorm.h>

namespace {

// Runs f and returns the c10::Error message it throws ("" if it does not throw).
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

TEST(AddNormOps, LayerNormMatchesATen) {
  torch::manual_seed(0);
  for (int64_t n : {1, 7, 768, 1000}) {
    auto x = torch::randn({5, 3, n}) * 3 + 2;
    auto w = torch::randn({n});
    auto b = torch::randn({n});
    auto ours = addnorm::layer_norm(x, {n}, w, b, 1e-5);
    auto ref = at::layer_norm(x, {n}, w, b, 1e-5);
    EXPECT_TRUE(torch::allclose(ours, ref, 1e-5, 1e-5)) << "n=" << n;
  }
}

TEST(AddNormOps, UndefinedOptionalTensorsMeanNone) {
  // An undefined tensor for an optional argument (a bias=false module's `bias`) is none, as
  // for at::layer_norm; it was "tensor does not have a device".
  torch::manual_seed(3);
  auto x = torch::randn({4, 8});
  auto r = torch::randn({4, 8});
  auto w = torch::randn({8});
  const at::Tensor none;
  EXPECT_TRUE(torch::equal(addnorm::layer_norm(x, {8}, w, none, 1e-5),
                           addnorm::layer_norm(x, {8}, w, std::nullopt, 1e-5)));
  EXPECT_TRUE(torch::allclose(addnorm::layer_norm(x, {8}, none, none, 1e-5),
                              at::layer_norm(x, {8}, none, none, 1e-5), 1e-5, 1e-6));
  EXPECT_TRUE(torch::equal(addnorm::rms_norm(x, {8}, none), addnorm::rms_norm(x, {8})));
  EXPECT_TRUE(torch::equal(std::get<0>(addnorm::add_layer_norm(x, none, {8}, w, none, 1e-5)),
                           addnorm::layer_norm(x, {8}, w, std::nullopt, 1e-5)));
  EXPECT_TRUE(torch::equal(std::get<0>(addnorm::add_rms_norm(x, r, {8}, none)),
                           std::get<0>(addnorm::add_rms_norm(x, r, {8}, std::nullopt))));
}

TEST(AddNormOps, RmsNormMatchesATen) {
  torch::manual_seed(1);
  auto x = torch::randn({4, 96}, torch::kDouble);
  auto w = torch::randn({96}, torch::kDouble);
  auto ours = addnorm::rms_norm(x, {96}, w);
  auto ref = at::rms_norm(x, {96}, w, std::nullopt);
  EXPECT_TRUE(torch::allclose(ours, ref, 1e-12, 1e-12));
  // A float64 weight of float32 input, wider than the input, which rms_norm alone of the
  // ops takes, as torch's: torch's result (the norm, times the weight in float64, rounded),
  // float32, to float32's precision, as in Python; the module's too. The op's checks run
  // (torch's kernel computes a negative eps, or complex input).
  auto xf = x.to(torch::kFloat);
  const auto theirs = at::rms_norm(xf, {96}, w, std::nullopt);
  EXPECT_EQ(addnorm::rms_norm(xf, {96}, w).scalar_type(), torch::kFloat);
  EXPECT_TRUE(torch::allclose(addnorm::rms_norm(xf, {96}, w), theirs, 1.3e-6, 1e-5));
  addnorm::RMSNorm m(addnorm::RMSNormOptions({96}));
  m->to(torch::kDouble);
  m->weight.data().copy_(w);
  EXPECT_TRUE(torch::allclose(m->forward(xf), theirs, 1.3e-6, 1e-5));
  EXPECT_NE(error_of([&] { addnorm::rms_norm(xf, {96}, w, -1.0); })
                .find("eps must be a non-negative number"),
            std::string::npos);
  EXPECT_NE(error_of([&] { addnorm::rms_norm(xf.to(torch::kComplexFloat), {96}, w); })
                .find("input must be a float32, float64, float16 or bfloat16 tensor"),
            std::string::npos);
}

TEST(AddNormOps, AddLayerNormReturnsNormAndSum) {
  torch::manual_seed(2);
  auto x = torch::randn({8, 64}, torch::kBFloat16);
  auto r = torch::randn({8, 64}, torch::kBFloat16);
  auto w = torch::randn({64});  // float32 weight with bfloat16 input
  auto [out, h] = addnorm::add_layer_norm(x, r, {64}, w, std::nullopt, 1e-5);
  EXPECT_EQ(out.scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(torch::equal(h, x + r));
  auto ref = at::layer_norm((x + r).to(torch::kFloat), {64}, w, std::nullopt, 1e-5);
  EXPECT_TRUE(torch::allclose(out.to(torch::kFloat), ref, 1e-2, 1e-2));

  auto [out2, h2] = addnorm::add_layer_norm(
      x, r, {64}, w, std::nullopt, 1e-5, /*return_residual=*/false);
  EXPECT_EQ(h2.numel(), 0);
  EXPECT_TRUE(torch::equal(out2, out));
}

TEST(AddNormOps, SecondDerivativesAndTangentsFromCpp) {
  torch::manual_seed(4);
  const auto opts = torch::TensorOptions().dtype(torch::kDouble);
  auto x = torch::randn({3, 8}, opts).requires_grad_();
  auto r = torch::randn({3, 8}, opts);
  auto w = torch::randn({8}, opts).requires_grad_();
  auto c = torch::randn({3, 8}, opts);

  // A gradient penalty: d/dw of |d(out * c)/dx|^2, through the residual (only h is saved).
  auto [out, h] = addnorm::add_rms_norm(x, r, {8}, w, 1e-5);
  auto gx = torch::autograd::grad({(out * c).sum()}, {x}, {}, true, /*create_graph=*/true)[0];
  auto gw = torch::autograd::grad({gx.pow(2).sum()}, {w})[0];
  auto xr = x.detach().requires_grad_();
  auto wr = w.detach().requires_grad_();
  auto out_ref = at::rms_norm(xr + r, {8}, wr, 1e-5);
  auto gxr = torch::autograd::grad({(out_ref * c).sum()}, {xr}, {}, true, true)[0];
  auto gwr = torch::autograd::grad({gxr.pow(2).sum()}, {wr})[0];
  EXPECT_GT(gwr.abs().max().item<double>(), 1e-3);
  EXPECT_TRUE(torch::allclose(gw, gwr, 1e-10, 1e-12));

  // Forward mode: the tangent of out from the tangent of x.
  const uint64_t level = torch::autograd::ForwardADLevel::get_next_idx();
  ASSERT_EQ(level, 0u);
  auto t = torch::randn({3, 8}, opts);
  auto xd = x.detach().clone();
  xd._set_fw_grad(t, /*level=*/0, /*is_inplace_op=*/false);
  auto y = addnorm::layer_norm(xd, {8}, w.detach(), std::nullopt, 1e-5);
  auto yt = y._fw_grad(/*level=*/0);
  ASSERT_TRUE(yt.defined());
  auto xdr = x.detach().clone();
  xdr._set_fw_grad(t, 0, false);
  auto ytr = at::layer_norm(xdr, {8}, w.detach(), std::nullopt, 1e-5)._fw_grad(0);
  EXPECT_TRUE(torch::allclose(yt, ytr, 1e-10, 1e-12));
  torch::autograd::ForwardADLevel::release_idx(level);
}

TEST(AddNormOps, GradientsFromCpp) {
  torch::manual_seed(3);
  auto x = torch::randn({6, 32}, torch::requires_grad());
  auto r = torch::randn({6, 32}, torch::requires_grad());
  auto w = torch::randn({32}, torch::requires_grad());
  auto b = torch::randn({32}, torch::requires_grad());
  auto g = torch::randn({6, 32});
  auto gh = torch::randn({6, 32});

  auto [out, h] = addnorm::add_layer_norm(x, r, {32}, w, b, 1e-5);
  auto grads = torch::autograd::grad({(out * g).sum() + (h * gh).sum()}, {x, r, w, b});

  auto h_ref = x + r;
  auto out_ref = at::layer_norm(h_ref, {32}, w, b, 1e-5);
  auto ref = torch::autograd::grad({(out_ref * g).sum() + (h_ref * gh).sum()}, {x, r, w, b});
  for (size_t i = 0; i < grads.size(); ++i) {
    EXPECT_TRUE(torch::allclose(grads[i], ref[i], 1e-5, 1e-5)) << "gradient " << i;
  }
}

// Where the backward is the last reader of an h nothing else holds, the CPU backward
// writes grad_h over it: the same gradients, bitwise, as a backward that keeps the graph;
// an h the caller still holds is left as it was.
TEST(AddNormOps, GradientOverHFromCpp) {
  torch::manual_seed(4);
  auto x = torch::randn({6, 32}, torch::requires_grad());
  auto r = torch::randn({6, 32}, torch::requires_grad());
  auto w = torch::randn({32}, torch::requires_grad());
  auto b = torch::randn({32}, torch::requires_grad());
  auto g = torch::randn({6, 32});
  auto grads_of = [&](bool keep_h, bool retain) {
    auto [out, h] = addnorm::add_layer_norm(x, r, {32}, w, b, 1e-5, keep_h);
    const auto before = h.defined() && h.numel() > 0 ? h.detach().clone() : at::Tensor();
    auto grads = torch::autograd::grad({(out * g).sum()}, {x, r, w, b}, {}, retain);
    if (before.defined()) {
      EXPECT_TRUE(torch::equal(h.detach(), before));
    }
    return grads;
  };
  const auto kept = grads_of(false, true);
  for (bool keep_h : {false, true}) {
    const auto grads = grads_of(keep_h, false);
    for (size_t i = 0; i < grads.size(); ++i) {
      EXPECT_TRUE(torch::equal(grads[i], kept[i])) << "gradient " << i;
    }
  }
}

// A LibTorch program's backward: where the norm's incoming gradient is the engine's alone
// (here mul's backward makes it), the CPU kernel writes the input's gradient over it; the
// gradients are bitwise those of a backward whose incoming gradient the caller holds, and a
// gradient the caller holds is left as it was.
TEST(AddNormOps, GradientOverIncomingGradientFromCpp) {
  torch::manual_seed(6);
  for (auto dtype : {torch::kFloat, torch::kDouble}) {
    auto x = torch::randn({6, 32}, torch::dtype(dtype).requires_grad(true));
    auto w = torch::randn({32}, torch::dtype(dtype).requires_grad(true));
    auto b = torch::randn({32}, torch::dtype(dtype).requires_grad(true));
    auto c = torch::randn({6, 32}, dtype);
    const auto held = c.clone();
    const auto expected = torch::autograd::grad(
        {addnorm::layer_norm(x, {32}, w, b, 1e-5)}, {x, w, b}, {c});
    EXPECT_TRUE(torch::equal(c, held));
    const auto grads = torch::autograd::grad(
        {(addnorm::layer_norm(x, {32}, w, b, 1e-5) * c).sum()}, {x, w, b});
    for (size_t i = 0; i < grads.size(); ++i) {
      EXPECT_TRUE(torch::equal(grads[i], expected[i])) << "gradient " << i << " " << dtype;
    }
  }
}

// The returned h's gradient holds only that of its uses outside the norm (the fused
// backward adds the norm's part in its own pass): a hook changing it, retain_grad, or
// asking for h's gradient raises.
TEST(AddNormOps, LookingAtReturnedResidualGradientRaises) {
  torch::manual_seed(5);
  auto x = torch::randn({4, 16}, torch::requires_grad());
  auto r = torch::randn({4, 16}, torch::requires_grad());
  auto w = torch::randn({16}, torch::requires_grad());
  const std::string expected = "gradient of the h returned with return_residual=True";
  auto loss_of = [](const at::Tensor& out, const at::Tensor& h) {
    return out.pow(2).sum() + h.sum();
  };
  {
    auto [out, h] = addnorm::add_layer_norm(x, r, {16}, w, std::nullopt, 1e-5);
    h.register_hook([](const at::Tensor& g) { return g * 0; });
    EXPECT_NE(error_of([&] { loss_of(out, h).backward(); }).find("changed its gradient"),
              std::string::npos);
  }
  {
    auto [out, h] = addnorm::add_layer_norm(x, r, {16}, w, std::nullopt, 1e-5);
    h.retain_grad();
    EXPECT_NE(error_of([&] { loss_of(out, h).backward(); }).find(expected), std::string::npos);
  }
  {
    auto [out, h] = addnorm::add_rms_norm(x, r, {16}, w, 1e-6);
    EXPECT_NE(error_of([&] { torch::autograd::grad({loss_of(out, h)}, {h}); }).find(expected),
              std::string::npos);
  }
  {
    // Not looked at: a hook on out is fine, and the gradients are torch's.
    auto [out, h] = addnorm::add_layer_norm(x, r, {16}, w, std::nullopt, 1e-5);
    out.register_hook([](const at::Tensor& g) { return g * 2; });
    auto grads = torch::autograd::grad({loss_of(out, h)}, {x, w});
    auto h_ref = x + r;
    auto out_ref = at::layer_norm(h_ref, {16}, w, {}, 1e-5);
    out_ref.register_hook([](const at::Tensor& g) { return g * 2; });
    auto ref = torch::autograd::grad({loss_of(out_ref, h_ref)}, {x, w});
    EXPECT_TRUE(torch::allclose(grads[0], ref[0], 1e-5, 1e-5));
    EXPECT_TRUE(torch::allclose(grads[1], ref[1], 1e-5, 1e-5));
  }
}

TEST(AddNormOps, RmsGradientsFromCpp) {
  torch::manual_seed(4);
  auto x = torch::randn({3, 5, 16}, torch::dtype(torch::kDouble).requires_grad(true));
  auto w = torch::randn({16}, torch::dtype(torch::kDouble).requires_grad(true));
  auto out = addnorm::rms_norm(x, {16}, w, 1e-6);
  auto grads = torch::autograd::grad({out.pow(2).sum()}, {x, w});
  auto ref_out = at::rms_norm(x, {16}, w, 1e-6);
  auto ref = torch::autograd::grad({ref_out.pow(2).sum()}, {x, w});
  EXPECT_TRUE(torch::allclose(grads[0], ref[0], 1e-10, 1e-10));
  EXPECT_TRUE(torch::allclose(grads[1], ref[1], 1e-10, 1e-10));
}

TEST(AddNormOps, FusedDropoutFromCpp) {
  // h = dropout(x) + r with the mask of the seed the generator gave; the same generator
  // state gives the same result; x's gradient is h's times the mask and scale.
  const double p = 0.25;
  auto x = torch::randn({6, 40}, torch::kDouble).requires_grad_();
  auto r = torch::randn({6, 40}, torch::kDouble);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(17);
  auto [out, h] = addnorm::add_layer_norm(x, r, {40}, std::nullopt, std::nullopt, 1e-5, true,
                                          false, p, gen);
  auto gen2 = at::make_generator<at::CPUGeneratorImpl>(17);
  const auto seed = addnorm::dropout_seed(torch::kCPU, gen2);
  const auto mask = addnorm::dropout_mask(seed, {6, 40}, p);
  EXPECT_EQ(mask.scalar_type(), torch::kBool);
  const auto scale = 1.0 / (1.0 - p);
  EXPECT_TRUE(torch::allclose(h, x.detach() * mask * scale + r, 1e-14, 1e-14));
  auto gen3 = at::make_generator<at::CPUGeneratorImpl>(17);
  auto again = std::get<0>(addnorm::add_layer_norm(x.detach(), r, {40}, std::nullopt,
                                                   std::nullopt, 1e-5, true, false, p, gen3));
  EXPECT_TRUE(torch::equal(out.detach(), again));
  auto g = torch::randn_like(h);
  auto gx = torch::autograd::grad({h}, {x}, {g})[0];
  EXPECT_TRUE(torch::allclose(gx, g * mask * scale, 1e-14, 1e-14));
  // Refused before a seed is drawn: the generator does not advance (as torch's dropout).
  auto gen4 = at::make_generator<at::CPUGeneratorImpl>(23);
  const auto state = gen4.get_state();
  const auto bad_p = [&] {
    addnorm::add_layer_norm(x, r, {40}, std::nullopt, std::nullopt, 1e-5, true, false, 1.5,
                            gen4);
  };
  const auto msg = error_of(bad_p);
  EXPECT_NE(msg.find("dropout_p must be a probability in [0, 1], got 1.5"), std::string::npos)
      << msg;
  EXPECT_THROW(bad_p(), c10::ValueError);  // (Python's ValueError, as torch's dropout)
  EXPECT_TRUE(torch::equal(gen4.get_state(), state));
}

TEST(AddNormOps, MemoryEfficientFromCpp) {
  // memory_efficient: the node keeps out instead of h; the gradients are those of
  // at::layer_norm(x + r), and a second derivative is refused with a clear error.
  torch::manual_seed(5);
  const auto opts = torch::dtype(torch::kDouble).requires_grad(true);
  auto x = torch::randn({6, 24}, opts);
  auto r = torch::randn({6, 24}, opts);
  auto w = (torch::rand({24}, torch::kDouble) + 0.5).requires_grad_();
  auto b = torch::randn({24}, opts);
  auto g = torch::randn({6, 24}, torch::kDouble);
  auto out = std::get<0>(addnorm::add_layer_norm(x, r, {24}, w, b, 1e-5, false, false, 0.0,
                                                 std::nullopt, /*memory_efficient=*/true));
  auto grads = torch::autograd::grad({out}, {x, r, w, b}, {g});
  auto ref = torch::autograd::grad({at::layer_norm(x + r, {24}, w, b, 1e-5)}, {x, r, w, b}, {g});
  for (size_t i = 0; i < grads.size(); ++i) {
    EXPECT_TRUE(torch::allclose(grads[i], ref[i], 1e-10, 1e-10)) << "gradient " << i;
  }
  auto out2 = std::get<0>(addnorm::add_layer_norm(x, r, {24}, w, b, 1e-5, false, false, 0.0,
                                                  std::nullopt, true));
  const auto msg = error_of([&] {
    torch::autograd::grad({out2}, {x}, {g}, /*retain_graph=*/true, /*create_graph=*/true);
  });
  EXPECT_NE(msg.find("memory_efficient=True keeps no h"), std::string::npos) << msg;
}

TEST(AddNormOps, EmptyInput) {
  auto x = torch::randn({0, 16});
  auto out = addnorm::layer_norm(x, {16});
  EXPECT_EQ(out.sizes(), x.sizes());
}

TEST(AddNormErrors, ResidualShape) {
  auto msg = error_of([] {
    addnorm::add_layer_norm(torch::randn({4, 8}), torch::randn({4, 7}), {8});
  });
  EXPECT_NE(msg.find("residual must have the input's shape [4, 8], got [4, 7]"), std::string::npos)
      << msg;
}

TEST(AddNormErrors, ResidualDtype) {
  auto msg = error_of([] {
    addnorm::add_layer_norm(
        torch::randn({4, 8}, torch::kHalf), torch::randn({4, 8}, torch::kBFloat16), {8});
  });
  EXPECT_NE(msg.find("residual must have the input's dtype (Half)"), std::string::npos) << msg;
  EXPECT_NE(msg.find("got BFloat16"), std::string::npos) << msg;
}

TEST(AddNormErrors, WeightShape) {
  auto msg = error_of([] { addnorm::layer_norm(torch::randn({4, 8}), {8}, torch::randn({9})); });
  EXPECT_NE(msg.find("weight must have shape normalized_shape = [8], got [9]"), std::string::npos)
      << msg;
}

TEST(AddNormErrors, BiasDtype) {
  auto msg = error_of([] {
    addnorm::layer_norm(torch::randn({4, 8}), {8}, std::nullopt, torch::randn({8}, torch::kDouble));
  });
  EXPECT_NE(msg.find("bias must have the input's dtype (Float)"), std::string::npos) << msg;
}

TEST(AddNormErrors, NormalizedShape) {
  auto msg = error_of([] { addnorm::layer_norm(torch::randn({4, 8}), {4}); });
  EXPECT_NE(msg.find("normalized_shape [4] must equal the trailing dims"), std::string::npos)
      << msg;
  msg = error_of([] { addnorm::layer_norm(torch::randn({8}), {2, 8}); });
  EXPECT_NE(msg.find("has more dimensions than the input"), std::string::npos) << msg;
}

TEST(AddNormErrors, IntegerInput) {
  auto msg = error_of([] { addnorm::layer_norm(torch::ones({4, 8}, torch::kInt), {8}); });
  EXPECT_NE(msg.find("input must be a float32, float64, float16 or bfloat16 tensor, got Int"),
            std::string::npos)
      << msg;
}

TEST(AddNormErrors, DropoutMaskOfAnUndefinedSeed) {
  auto msg = error_of([] { addnorm::dropout_mask(at::Tensor(), {4, 8}, 0.5); });
  EXPECT_NE(msg.find("dropout_mask: seed must be a tensor"), std::string::npos) << msg;
}

TEST(AddNormErrors, UndefinedOrNonStridedTensorsThroughTheDispatcher) {
  // The op called through the dispatcher, which passes an undefined tensor in an optional as
  // it is (the C++ functions turn it into none): named, where it was "tensor does not have
  // a device"; a sparse weight is named too, where the dispatcher named an internal op.
  const auto op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("addnorm::add_layer_norm", "")
                      .typed<std::tuple<at::Tensor, at::Tensor>(
                          const at::Tensor&, const std::optional<at::Tensor>&,
                          c10::SymIntArrayRef, const std::optional<at::Tensor>&,
                          const std::optional<at::Tensor>&, double, bool, bool, double,
                          const std::optional<at::Tensor>&, bool)>();
  const auto x = torch::randn({4, 8});
  const std::optional<at::Tensor> undefined = at::Tensor();
  const std::optional<at::Tensor> sparse = torch::ones({8}).to_sparse();
  const c10::SymInt n(8);
  auto call = [&](const std::optional<at::Tensor>& r, const std::optional<at::Tensor>& w,
                  const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& seed) {
    return error_of([&] {
      op.call(x, r, c10::SymIntArrayRef(&n, 1), w, b, 1e-5, true, false, 0.0, seed, false);
    });
  };
  for (const auto& [msg, name] :
       {std::pair{call(undefined, {}, {}, {}), "residual"}, {call({}, undefined, {}, {}), "weight"},
        {call({}, {}, undefined, {}), "bias"}, {call({}, {}, {}, undefined), "dropout_seed"}}) {
    EXPECT_NE(msg.find(std::string(name) + " must be a tensor or None, got an undefined tensor"),
              std::string::npos)
        << msg;
  }
  const auto msg = call({}, sparse, {}, {});
  EXPECT_NE(msg.find("weight must be a strided tensor, got a tensor of layout Sparse"),
            std::string::npos)
      << msg;
}

TEST(AddNormErrors, NegativeOrNanEps) {
  auto msg = error_of([] { addnorm::layer_norm(torch::randn({4, 8}), {8}, {}, {}, -1.0); });
  EXPECT_NE(msg.find("eps must be a non-negative number"), std::string::npos) << msg;
  msg = error_of([] { addnorm::rms_norm(torch::randn({4, 8}), {8}, {}, std::nan("")); });
  EXPECT_NE(msg.find("eps must be a non-negative number"), std::string::npos) << msg;
}

}  // namespace
