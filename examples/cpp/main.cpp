// A LibTorch application using the installed addnorm package (find_package(addnorm)).
//
//   app INPUTS.pt
//
// INPUTS.pt comes from make_inputs.py (torch.save of a flat dict, read here with
// torch::pickle_load). The app
//   1. builds a stack of addnorm::TransformerEncoderLayer with the options in the file,
//      loads torch's weights into it by their Python names, runs it in eval mode and
//      checks the result against the output torch's nn.TransformerEncoderLayer gave in
//      Python (exit status 1 on a mismatch);
//   2. loads the TorchScript model saved next to INPUTS.pt (torch.jit.save of a torch model
//      converted with addnorm.replace_modules, whose code calls addnorm's ops: linking
//      libaddnorm registers them) with torch::jit::load, runs it and checks its output and
//      input gradient against those of the unconverted torch model in Python;
//   3. trains the stack (plus a linear head) with torch::optim::Adam on a small
//      classification task and checks that the loss falls (exit status 1 otherwise).

#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include <torch/script.h>
#include <torch/torch.h>

#include <addnorm/addnorm.h>

namespace {

class Inputs {
 public:
  explicit Inputs(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw std::runtime_error("cannot open " + path);
    std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    dict_ = torch::pickle_load(bytes).toGenericDict();
  }
  c10::IValue get(const std::string& key) const {
    if (!dict_.contains(key)) throw std::runtime_error("inputs file has no entry " + key);
    return dict_.at(key);
  }
  torch::Tensor tensor(const std::string& key) const { return get(key).toTensor(); }
  size_t count_tensors(const std::string& prefix) const {
    size_t n = 0;
    for (const auto& item : dict_) {
      n += item.key().toStringRef().rfind(prefix, 0) == 0 && item.value().isTensor();
    }
    return n;
  }
  int64_t integer(const std::string& key) const { return get(key).toInt(); }
  double real(const std::string& key) const { return get(key).toDouble(); }
  bool boolean(const std::string& key) const { return get(key).toBool(); }
  std::string string(const std::string& key) const { return get(key).toStringRef(); }

 private:
  c10::impl::GenericDict dict_{c10::StringType::get(), c10::AnyType::get()};
};

// The model: the encoder layers, mean pooling over the sequence, a linear head.
struct ModelImpl : torch::nn::Module {
  explicit ModelImpl(const Inputs& in) {
    const int64_t n = in.integer("num_layers");
    for (int64_t i = 0; i < n; ++i) {
      const std::string p = "layers." + std::to_string(i) + ".";
      auto options = addnorm::TransformerEncoderLayerOptions(in.integer("d_model"), in.integer("nhead"))
                         .dim_feedforward(in.integer("dim_feedforward"))
                         .dropout(in.real("dropout"))
                         .activation(in.string(p + "activation"))
                         .layer_norm_eps(in.real("layer_norm_eps"))
                         .batch_first(in.boolean("batch_first"))
                         .norm_first(in.boolean(p + "norm_first"));
      layers.push_back(register_module("layers" + std::to_string(i), addnorm::TransformerEncoderLayer(options)));
    }
    head = register_module("head", torch::nn::Linear(in.integer("d_model"), in.integer("num_classes")));
  }

  torch::Tensor encode(torch::Tensor x, const torch::Tensor& padding = {}) {
    for (auto& layer : layers) x = layer->forward(x, /*src_mask=*/{}, padding);
    return x;
  }
  torch::Tensor forward(const torch::Tensor& x) { return head->forward(encode(x).mean(1)); }

  std::vector<addnorm::TransformerEncoderLayer> layers;
  torch::nn::Linear head = nullptr;
};
TORCH_MODULE(Model);

// Copies every parameter from the file, by Python's names; every parameter must be there
// with the same shape, and the file must hold no parameter the model lacks.
void load_weights(Model& model, const Inputs& in) {
  torch::NoGradGuard no_grad;
  size_t loaded = 0;
  for (size_t i = 0; i < model->layers.size(); ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    for (const auto& item : model->layers[i]->named_parameters()) {
      const auto src = in.tensor(p + item.key());
      TORCH_CHECK(src.sizes() == item.value().sizes(), p, item.key(), ": shape ", src.sizes(),
                  " in the file, ", item.value().sizes(), " in the model");
      item.value().copy_(src);
      ++loaded;
    }
  }
  model->head->weight.copy_(in.tensor("head.weight"));
  model->head->bias.copy_(in.tensor("head.bias"));
  loaded += 2;
  // The file must hold no parameter the model lacks (a name the mapping would miss).
  size_t tensors_in_file = in.count_tensors("layers.");
  TORCH_CHECK(tensors_in_file == loaded - 2, "the file holds ", tensors_in_file,
              " layer tensors, the model has ", loaded - 2, " layer parameters");
  std::printf("loaded %zu parameter tensors\n", loaded);
}

// Checks a result against the one Python wrote; prints the comparison.
bool check_close(const char* what, const torch::Tensor& actual, const torch::Tensor& expected) {
  const double atol = 1e-4, rtol = 1e-4;
  const bool close =
      actual.sizes() == expected.sizes() && torch::allclose(actual, expected, rtol, atol);
  const double max_err = actual.sizes() == expected.sizes()
                             ? (actual - expected).abs().max().item<double>()
                             : std::nan("");
  std::printf("%s: %s, max |addnorm - torch| = %.3g (atol %.0e, rtol %.0e): %s\n", what,
              c10::str(actual.sizes()).c_str(), max_err, atol, rtol, close ? "OK" : "MISMATCH");
  return close;
}

// The folder of a file path, with its trailing separator ("" for a bare file name).
std::string folder_of(const std::string& path) {
  const auto slash = path.find_last_of('/');
  return slash == std::string::npos ? "" : path.substr(0, slash + 1);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s INPUTS.pt (written by examples/cpp/make_inputs.py)\n", argv[0]);
    return 2;
  }
  try {
    torch::manual_seed(0);
    const Inputs in(argv[1]);
    Model model(in);
    load_weights(model, in);
    std::cout << *model->layers[0] << "\n";

    // 1. Inference against torch's result.
    model->eval();
    const auto src = in.tensor("input");
    const auto expected = in.tensor("expected");
    torch::Tensor out;
    {
      torch::NoGradGuard no_grad;
      out = model->encode(src, in.tensor("src_key_padding_mask"));
    }
    if (!check_close("inference: output", out, expected)) return 1;

    // 2. The TorchScript model saved from Python.
    const std::string scripted_path = folder_of(argv[1]) + in.string("scripted_model");
    torch::jit::Module scripted = torch::jit::load(scripted_path);
    scripted.eval();
    size_t addnorm_modules = 0;
    for (const auto& sub : scripted.named_modules()) {
      addnorm_modules += sub.value.type()->name()->qualifiedName().rfind("__torch__.addnorm.", 0) == 0;
    }
    std::printf("TorchScript model %s: %zu addnorm modules\n", scripted_path.c_str(), addnorm_modules);
    TORCH_CHECK(addnorm_modules > 0, "the TorchScript model holds no addnorm module");
    const auto scripted_src = src.clone().requires_grad_();
    const auto scripted_out =
        scripted.forward({scripted_src, in.tensor("src_key_padding_mask")}).toTensor();
    scripted_out.backward(in.tensor("scripted_grad_output"));
    const bool out_ok = check_close("TorchScript model: output", scripted_out.detach(),
                                    in.tensor("scripted_expected"));
    const bool grad_ok = check_close("TorchScript model: input gradient", scripted_src.grad(),
                                     in.tensor("scripted_grad_input"));
    if (!out_ok || !grad_ok) return 1;

    // 3. Training.
    model->train();
    const auto x = in.tensor("train_x");
    const auto y = in.tensor("train_y");
    const int64_t steps = in.integer("train_steps");
    torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(in.real("lr")));
    std::vector<double> losses;
    for (int64_t step = 0; step < steps; ++step) {
      opt.zero_grad();
      auto loss = torch::nn::functional::cross_entropy(model->forward(x), y);
      loss.backward();
      if (step == 0) {  // gradients reach every parameter through the C++ autograd
        for (const auto& item : model->named_parameters()) {
          const auto& g = item.value().grad();
          TORCH_CHECK(g.defined() && g.abs().sum().item<double>() > 0, "no gradient for ", item.key());
        }
      }
      opt.step();
      losses.push_back(loss.item<double>());
      if (step % 5 == 0 || step == steps - 1) {
        std::printf("train step %3lld  loss %.4f\n", static_cast<long long>(step), losses.back());
      }
    }
    const bool fell = std::isfinite(losses.back()) && losses.back() < 0.7 * losses.front();
    std::printf("training: loss %.4f -> %.4f: %s\n", losses.front(), losses.back(),
                fell ? "OK (falls)" : "FAILED (does not fall)");
    if (!fell) return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}
