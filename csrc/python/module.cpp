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
#include <torch/csrc/Size.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/python.h>

#include <addnorm/addnorm.h>

#include "ops/seed_draw.h"

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
// dispatch modes), as torch.ops calls them. The Python wrappers try this path only where
// nothing at the Python level could see the call (not compiling, no __torch_function__;
// see functional.py). It takes the call where every argument has a plain type: the tensor
// arguments tensors (without names; the input not nested) or None, normalized_shape an int
// or a list, tuple or torch.Size of ints, eps a float or int, the flags bools, dropout_p a
// float. For anything else (symbolic sizes of a fake-tensor trace, numpy scalars, named or
// nested tensors, a wrong type) it returns NotImplemented, and the wrapper calls torch.ops
// (or torch's function, for nested tensors), which converts or refuses the argument as it
// always did. (The tensors' names and nesting are read here, in C++: a subclass overriding
// them in Python without __torch_function__ is read as what it is.) C++ warnings go to
// c10's handler, and errors become torch's Python errors, as from torch.ops.

// Runs op (with the GIL released) and raises a C++ exception as the Python error torch
// gives for it (c10::TypeError a TypeError, ...).
template <typename F>
py::object call_op(const F& op) {
  try {
    return py::cast([&] {
      py::gil_scoped_release no_gil;
      return op();
    }());
  } catch (py::error_already_set&) {
    throw;
  } catch (const std::exception&) {
    torch::translate_exception_to_python(std::current_exception());
    throw py::error_already_set();
  }
}

py::object not_plain() { return py::reinterpret_borrow<py::object>(Py_NotImplemented); }

// A tensor argument: a tensor without names, or None (absent, unless required).
bool plain_tensor(const py::handle& obj, std::optional<at::Tensor>& t, bool required = false) {
  if (obj.is_none()) return !required;
  if (!THPVariable_Check(obj.ptr())) return false;
  t = THPVariable_Unpack(obj.ptr());
  return !t->has_names();
}

// The input: a plain tensor, not nested.
bool plain_input(const py::handle& obj, std::optional<at::Tensor>& t) {
  return plain_tensor(obj, t, /*required=*/true) && !t->is_nested();
}

// normalized_shape as ints, if it is an int or a list, tuple or torch.Size of ints (exactly
// those types: a subclass may iterate differently).
bool plain_shape(const py::handle& obj, std::vector<int64_t>& shape) {
  PyObject* seq = obj.ptr();
  int overflow = 0;
  if (PyLong_CheckExact(seq)) {
    shape.assign(1, PyLong_AsLongLongAndOverflow(seq, &overflow));
    return overflow == 0;
  }
  const bool list = PyList_CheckExact(seq);
  if (!list && !PyTuple_CheckExact(seq) && !THPSize_Check(seq)) return false;
  shape.resize(list ? PyList_GET_SIZE(seq) : PyTuple_GET_SIZE(seq));
  for (size_t i = 0; i < shape.size(); ++i) {
    PyObject* item = list ? PyList_GET_ITEM(seq, i) : PyTuple_GET_ITEM(seq, i);
    if (!PyLong_CheckExact(item)) return false;
    shape[i] = PyLong_AsLongLongAndOverflow(item, &overflow);
    if (overflow != 0) return false;
  }
  return true;
}

// A float or int as a double.
bool plain_float(const py::handle& obj, double& value) {
  if (PyFloat_CheckExact(obj.ptr())) {
    value = PyFloat_AS_DOUBLE(obj.ptr());
    return true;
  }
  if (!PyLong_CheckExact(obj.ptr())) return false;
  value = PyLong_AsDouble(obj.ptr());
  if (value == -1.0 && PyErr_Occurred()) {  // (too large: torch.ops says so)
    PyErr_Clear();
    return false;
  }
  return true;
}

// eps of the RMSNorm ops: None (absent) or a float or int.
bool plain_opt_float(const py::handle& obj, std::optional<double>& value) {
  double v = 0.0;
  if (obj.is_none()) return true;
  if (!plain_float(obj, v)) return false;
  value = v;
  return true;
}

bool plain_bool(const py::handle& obj, bool& value) {
  value = obj.ptr() == Py_True;
  return PyBool_Check(obj.ptr());
}

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using Opt = std::optional<at::Tensor>;
using Pair = std::tuple<at::Tensor, at::Tensor>;

py::object layer_norm(const py::handle& input, const py::handle& normalized_shape,
                      const py::handle& weight, const py::handle& bias, const py::handle& eps) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, c10::SymIntArrayRef, const Opt&,
                                              const Opt&, double)>("addnorm::layer_norm");
  Opt x, w, b;
  std::vector<int64_t> shape;
  double e = 0.0;
  if (!plain_input(input, x) || !plain_tensor(weight, w) || !plain_tensor(bias, b) ||
      !plain_shape(normalized_shape, shape) || !plain_float(eps, e)) {
    return not_plain();
  }
  return call_op([&] { return op.call(*x, c10::fromIntArrayRefSlow(shape), w, b, e); });
}

py::object rms_norm(const py::handle& input, const py::handle& normalized_shape,
                    const py::handle& weight, const py::handle& eps) {
  Opt x, w;
  std::vector<int64_t> shape;
  std::optional<double> e;
  if (!plain_input(input, x) || !plain_tensor(weight, w) ||
      !plain_shape(normalized_shape, shape) || !plain_opt_float(eps, e)) {
    return not_plain();
  }
  return call_op([&] { return addnorm::rms_norm(*x, shape, w, e); });
}

// The arguments add_layer_norm and add_rms_norm share, read if they are plain.
struct AddNormArgs {
  Opt x, r, w, seed;
  std::vector<int64_t> shape;
  bool rr = false, fp32 = false, me = false;
  double p = 0.0;
  bool read(const py::handle& input, const py::handle& residual,
            const py::handle& normalized_shape, const py::handle& weight,
            const py::handle& return_residual, const py::handle& residual_in_fp32,
            const py::handle& dropout_p, const py::handle& dropout_seed,
            const py::handle& memory_efficient) {
    return plain_input(input, x) && plain_tensor(residual, r) && plain_tensor(weight, w) &&
           plain_tensor(dropout_seed, seed) && plain_shape(normalized_shape, shape) &&
           plain_bool(return_residual, rr) && plain_bool(residual_in_fp32, fp32) &&
           plain_bool(memory_efficient, me) && plain_float(dropout_p, p);
  }
};

py::object add_layer_norm(const py::handle& input, const py::handle& residual,
                          const py::handle& normalized_shape, const py::handle& weight,
                          const py::handle& bias, const py::handle& eps,
                          const py::handle& return_residual, const py::handle& residual_in_fp32,
                          const py::handle& dropout_p, const py::handle& dropout_seed,
                          const py::handle& memory_efficient) {
  static const auto op = op_handle<Pair(const at::Tensor&, const Opt&, c10::SymIntArrayRef,
                                        const Opt&, const Opt&, double, bool, bool, double,
                                        const Opt&, bool)>("addnorm::add_layer_norm");
  AddNormArgs a;
  Opt b;
  double e = 0.0;
  if (!a.read(input, residual, normalized_shape, weight, return_residual, residual_in_fp32,
              dropout_p, dropout_seed, memory_efficient) ||
      !plain_tensor(bias, b) || !plain_float(eps, e)) {
    return not_plain();
  }
  return call_op([&] {
    return op.call(*a.x, a.r, c10::fromIntArrayRefSlow(a.shape), a.w, b, e, a.rr, a.fp32, a.p,
                   a.seed, a.me);
  });
}

py::object add_rms_norm(const py::handle& input, const py::handle& residual,
                        const py::handle& normalized_shape, const py::handle& weight,
                        const py::handle& eps, const py::handle& return_residual,
                        const py::handle& residual_in_fp32, const py::handle& dropout_p,
                        const py::handle& dropout_seed, const py::handle& memory_efficient) {
  static const auto op = op_handle<Pair(const at::Tensor&, const Opt&, c10::SymIntArrayRef,
                                        const Opt&, std::optional<double>, bool, bool, double,
                                        const Opt&, bool)>("addnorm::add_rms_norm");
  AddNormArgs a;
  std::optional<double> e;
  if (!a.read(input, residual, normalized_shape, weight, return_residual, residual_in_fp32,
              dropout_p, dropout_seed, memory_efficient) ||
      !plain_opt_float(eps, e)) {
    return not_plain();
  }
  return call_op([&] {
    return op.call(*a.x, a.r, c10::fromIntArrayRefSlow(a.shape), a.w, e, a.rr, a.fp32, a.p,
                   a.seed, a.me);
  });
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "addnorm native module: fused residual-add + LayerNorm/RMSNorm ops";
  // The C++ code's seed draws under tracing (the encoder layer op's, in its decomposition)
  // pass addnorm.functional's check, as the Python draws do.
  addnorm::detail::set_seed_draw_check([] {
    py::gil_scoped_acquire gil;
    try {
      py::module_::import("addnorm.functional")
          .attr("_check_seed_can_be_drawn")(
              "the dropout seeds of addnorm's C++ code (the encoder layer op's)",
              "Keep the budget at 1.");
    } catch (py::error_already_set& e) {
      TORCH_CHECK(false, py::str(e.value()).cast<std::string>());
    }
  });
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
        py::arg("return_residual"), py::arg("residual_in_fp32"),
        py::arg("dropout_p"), py::arg("dropout_seed"), py::arg("memory_efficient"));
  m.def("add_rms_norm", &add_rms_norm, py::arg("input"), py::arg("residual"),
        py::arg("normalized_shape"), py::arg("weight"), py::arg("eps"),
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
