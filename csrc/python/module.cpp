// addnorm._C: Python glue only. Importing it loads libaddnorm (RPATH $ORIGIN), whose
// static initializers register the ops in torch.ops.addnorm.

#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <iomanip>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/python.h>

#include <addnorm/addnorm.h>

namespace py = pybind11;

namespace {

// torch.compile's caches (FX graph and AOTAutograd) key a graph on its text and on torch's
// own code, not on the code of the custom ops in it: after a rebuild or an upgrade of
// libaddnorm they would serve graphs compiled with the previous one (the encoder layer's op
// is traced through its implementation, so that code is baked into them). Their keys
// include torch.compiler.config.cache_key_tag: append this library's identity (a hash of
// its file's bytes, so the same build keys the same on every machine) to it, keeping
// whatever tag the user set. Any failure here warns and leaves the tag alone.
std::string library_identity() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&addnorm::version), &info) == 0 ||
      info.dli_fname == nullptr) {
    return "";
  }
  std::ifstream file(info.dli_fname, std::ios::binary);
  if (!file) {
    return "";
  }
  uint64_t hash = 1469598103934665603ULL;  // 64-bit FNV-1a over the file
  std::vector<char> buf(1 << 16);
  while (file.read(buf.data(), static_cast<std::streamsize>(buf.size())) || file.gcount() > 0) {
    for (std::streamsize i = 0; i < file.gcount(); ++i) {
      hash = (hash ^ static_cast<unsigned char>(buf[i])) * 1099511628211ULL;
    }
  }
  std::ostringstream id;
  id << "addnorm:" << std::hex << std::setw(16) << std::setfill('0') << hash;
  return id.str();
}

void tag_compile_caches() {
  try {
    const std::string id = library_identity();
    if (id.empty()) {
      return;
    }
    auto config = py::module_::import("torch.compiler.config");
    const auto tag = config.attr("cache_key_tag").cast<std::string>();
    std::vector<std::string> parts;  // the tag's ";"-separated tokens
    std::istringstream tokens(tag);
    for (std::string t; std::getline(tokens, t, ';');) parts.push_back(t);
    if (std::find(parts.begin(), parts.end(), id) == parts.end()) {
      config.attr("cache_key_tag") = tag.empty() ? id : tag + ";" + id;
    }
  } catch (const std::exception& e) {
    const std::string message =
        std::string("addnorm: could not add the library's identity to "
                    "torch.compiler.config.cache_key_tag (torch.compile's caches may serve "
                    "graphs of another addnorm build): ") + e.what();
    if (PyErr_WarnEx(PyExc_RuntimeWarning, message.c_str(), 1) < 0) {
      throw py::error_already_set();  // warnings turned into errors
    }
  }
}

// The public ops called from pybind11 instead of torch.ops, whose Python call path
// matches every argument against the schema (a few microseconds a call, as much as the
// kernel of a small tensor): the same ops through the dispatcher (autograd, every backend,
// dispatch modes), with torch's error types and warnings. The Python wrappers take this
// path only where nothing at the Python level could see the call (no __torch_function__,
// not tracing: see functional.py's _check_unnamed).
template <typename F>
auto without_gil(const F& f) {
  py::gil_scoped_release no_gil;
  return f();
}

// normalized_shape as a list of ints, or a TypeError that names it (pybind11's own, for a
// std::vector argument, would print every argument, tensors included).
std::vector<int64_t> shape_of(const py::handle& normalized_shape) {
  py::detail::make_caster<std::vector<int64_t>> caster;
  TORCH_CHECK_TYPE(caster.load(normalized_shape, /*convert=*/true),
                   "addnorm: normalized_shape must be a sequence of ints, got ",
                   py::str(normalized_shape).cast<std::string>());
  return py::detail::cast_op<std::vector<int64_t>>(std::move(caster));
}

// LayerNorm's eps is a float (None: torch.ops' error).
void check_eps(const std::optional<double>& eps, const char* op) {
  TORCH_CHECK(eps.has_value(), "addnorm::", op, "() Expected a value of type 'float' for "
              "argument 'eps' but instead found type 'NoneType'.");
}

py::object layer_norm(const at::Tensor& input, const py::handle& normalized_shape,
                      const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias, std::optional<double> eps) {
  HANDLE_TH_ERRORS
  check_eps(eps, "layer_norm");
  const auto shape = shape_of(normalized_shape);
  return py::cast(without_gil([&] {
    return addnorm::layer_norm(input, shape, weight, bias, *eps);
  }));
  END_HANDLE_TH_ERRORS_PYBIND
}

py::object rms_norm(const at::Tensor& input, const py::handle& normalized_shape,
                    const std::optional<at::Tensor>& weight, std::optional<double> eps) {
  HANDLE_TH_ERRORS
  const auto shape = shape_of(normalized_shape);
  return py::cast(without_gil([&] {
    return addnorm::rms_norm(input, shape, weight, eps);
  }));
  END_HANDLE_TH_ERRORS_PYBIND
}

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

py::object add_layer_norm(const at::Tensor& input, const std::optional<at::Tensor>& residual,
                          const py::handle& normalized_shape,
                          const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, std::optional<double> eps,
                          bool return_residual, bool residual_in_fp32, double dropout_p,
                          const std::optional<at::Tensor>& dropout_seed, bool memory_efficient) {
  HANDLE_TH_ERRORS
  check_eps(eps, "add_layer_norm");
  static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const std::optional<at::Tensor>&, c10::SymIntArrayRef,
      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double, bool, bool,
      double, const std::optional<at::Tensor>&, bool)>("addnorm::add_layer_norm");
  const auto shape = shape_of(normalized_shape);
  return py::cast(without_gil([&] {
    return op.call(input, residual, c10::fromIntArrayRefSlow(shape), weight, bias,
                   *eps, return_residual, residual_in_fp32, dropout_p, dropout_seed,
                   memory_efficient);
  }));
  END_HANDLE_TH_ERRORS_PYBIND
}

py::object add_rms_norm(const at::Tensor& input, const std::optional<at::Tensor>& residual,
                        const py::handle& normalized_shape,
                        const std::optional<at::Tensor>& weight, std::optional<double> eps,
                        bool return_residual, bool residual_in_fp32, double dropout_p,
                        const std::optional<at::Tensor>& dropout_seed, bool memory_efficient) {
  HANDLE_TH_ERRORS
  static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const std::optional<at::Tensor>&, c10::SymIntArrayRef,
      const std::optional<at::Tensor>&, std::optional<double>, bool, bool, double,
      const std::optional<at::Tensor>&, bool)>("addnorm::add_rms_norm");
  const auto shape = shape_of(normalized_shape);
  return py::cast(without_gil([&] {
    return op.call(input, residual, c10::fromIntArrayRefSlow(shape), weight, eps,
                   return_residual, residual_in_fp32, dropout_p, dropout_seed,
                   memory_efficient);
  }));
  END_HANDLE_TH_ERRORS_PYBIND
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "addnorm native module: fused residual-add + LayerNorm/RMSNorm ops";
  m.def("version", &addnorm::version, "Version of libaddnorm");
  m.def("cpu_capability", &addnorm::cpu_kernel_capability,
        "Instruction set the CPU kernels run with: AVX512, AVX2 or DEFAULT");
  m.def("built_with_cuda", &addnorm::built_with_cuda, "True when built with CUDA kernels");
  tag_compile_caches();
  // The public ops (see above), called as torch.ops.addnorm.* is.
  m.def("layer_norm", &layer_norm, py::arg("input"), py::arg("normalized_shape"),
        py::arg("weight"), py::arg("bias"), py::arg("eps"));
  m.def("rms_norm", &rms_norm, py::arg("input"), py::arg("normalized_shape"),
        py::arg("weight"), py::arg("eps"));
  m.def("add_layer_norm", &add_layer_norm, py::arg("input"), py::arg("residual"),
        py::arg("normalized_shape"), py::arg("weight"), py::arg("bias"), py::arg("eps"),
        py::kw_only(), py::arg("return_residual"), py::arg("residual_in_fp32"),
        py::arg("dropout_p"), py::arg("dropout_seed"), py::arg("memory_efficient"));
  m.def("add_rms_norm", &add_rms_norm, py::arg("input"), py::arg("residual"),
        py::arg("normalized_shape"), py::arg("weight"), py::arg("eps"), py::kw_only(),
        py::arg("return_residual"), py::arg("residual_in_fp32"), py::arg("dropout_p"),
        py::arg("dropout_seed"), py::arg("memory_efficient"));

  // The C++ module addnorm::TransformerEncoderLayer, for tests comparing it with the
  // Python module (addnorm.TransformerEncoderLayer).
  using Layer = addnorm::TransformerEncoderLayerImpl;
  py::class_<Layer, std::shared_ptr<Layer>>(m, "CppTransformerEncoderLayer")
      .def(py::init([](int64_t d_model, int64_t nhead, int64_t dim_feedforward, double dropout,
                       std::string activation, double layer_norm_eps, bool batch_first,
                       bool norm_first, bool bias) {
             return std::make_shared<Layer>(
                 addnorm::TransformerEncoderLayerOptions(d_model, nhead)
                     .dim_feedforward(dim_feedforward)
                     .dropout(dropout)
                     .activation(std::move(activation))
                     .layer_norm_eps(layer_norm_eps)
                     .batch_first(batch_first)
                     .norm_first(norm_first)
                     .bias(bias));
           }),
           py::arg("d_model"), py::arg("nhead"), py::arg("dim_feedforward") = 2048,
           py::arg("dropout") = 0.1, py::arg("activation") = "relu",
           py::arg("layer_norm_eps") = 1e-5, py::arg("batch_first") = false,
           py::arg("norm_first") = false, py::arg("bias") = true)
      .def("forward",
           [](Layer& self, const at::Tensor& src, const std::optional<at::Tensor>& src_mask,
              const std::optional<at::Tensor>& src_key_padding_mask, bool is_causal) {
             return self.forward(
                 src, src_mask.value_or(at::Tensor()),
                 src_key_padding_mask.value_or(at::Tensor()), is_causal);
           },
           py::arg("src"), py::arg("src_mask") = py::none(),
           py::arg("src_key_padding_mask") = py::none(), py::arg("is_causal") = false)
      .def("named_parameters",
           [](Layer& self) {
             std::vector<std::pair<std::string, at::Tensor>> out;
             for (const auto& p : self.named_parameters()) out.emplace_back(p.key(), p.value());
             return out;
           })
      .def("load_state_dict",
           [](Layer& self, const std::map<std::string, at::Tensor>& state) {
             torch::NoGradGuard no_grad;
             auto params = self.named_parameters();
             TORCH_CHECK(
                 state.size() == params.size(), "load_state_dict: expected ", params.size(),
                 " tensors, got ", state.size());
             for (auto& p : params) {
               const auto it = state.find(p.key());
               TORCH_CHECK(it != state.end(), "load_state_dict: missing ", p.key());
               p.value().copy_(it->second);
             }
           })
      .def("train", [](Layer& self, bool on) { self.train(on); }, py::arg("mode") = true)
      .def_property_readonly("training", [](const Layer& self) { return self.is_training(); })
      .def("__repr__", [](const Layer& self) {
        std::ostringstream s;
        self.pretty_print(s);
        return s.str();
      });
}
