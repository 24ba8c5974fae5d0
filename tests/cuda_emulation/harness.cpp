// Python bindings of the emulated CUDA kernels (emu_cuda.h): _norm_fwd / _norm_bwd with the
// internal ops' arguments, through the same checks, allocation and args structs as the ops
// (ops/norm_launch.cpp), on CPU tensors.

#include <torch/csrc/Dtype.h>
#include <torch/extension.h>

#include "emu_cuda.h"
#include "ops/norm_launch.h"

#if EMU_FAST_SWITCH
// emu_switch_stack(save_sp, load_sp): pushes the callee-saved registers, stores the stack
// pointer in *save_sp, takes load_sp as the stack pointer, pops the registers saved there
// and returns to the address above them (where a fiber's stack starts: emu::start_fiber).
asm(R"(
  .text
  .globl emu_switch_stack
  .type emu_switch_stack, @function
emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch_stack, .-emu_switch_stack
)");
#endif

namespace addnorm::cuda {
void emu_norm_fwd(const NormFwdArgs& args);
void emu_norm_bwd(const NormBwdArgs& args);
void emu_dropout_apply(const DropoutApplyArgs& args);
}  // namespace addnorm::cuda

namespace {

using OptTensor = std::optional<at::Tensor>;

std::vector<at::Tensor> norm_fwd(const at::Tensor& input, const OptTensor& residual,
                                 std::vector<int64_t> normalized_shape, const OptTensor& weight,
                                 const OptTensor& bias, double eps, bool is_rms,
                                 bool store_residual, bool residual_in_fp32, double dropout_p,
                                 const OptTensor& dropout_seed) {
  auto [out, residual_out, mean, rstd] = addnorm::launch_norm_fwd(
      &addnorm::cuda::emu_norm_fwd, input, residual, c10::fromIntArrayRefSlow(normalized_shape),
      weight, bias, eps, is_rms, store_residual, residual_in_fp32, dropout_p, dropout_seed);
  return {out, residual_out, mean, rstd};
}

std::vector<at::Tensor> norm_bwd(const at::Tensor& grad_out, const OptTensor& grad_residual_out,
                                 const at::Tensor& h, const at::Tensor& mean,
                                 const at::Tensor& rstd, const OptTensor& weight, bool has_bias,
                                 bool is_rms, bool weight_grad, std::optional<double> eps,
                                 bool from_output, const OptTensor& bias, double dropout_p,
                                 const OptTensor& dropout_seed, bool grad_h_wanted,
                                 const py::object& h_dtype) {
  std::optional<c10::ScalarType> hd;
  if (!h_dtype.is_none()) {
    TORCH_CHECK(THPDtype_Check(h_dtype.ptr()), "h_dtype must be a torch.dtype or None");
    hd = reinterpret_cast<THPDtype*>(h_dtype.ptr())->scalar_type;
  }
  auto [grad_h, grad_weight, grad_bias, grad_input] = addnorm::launch_norm_bwd(
      &addnorm::cuda::emu_norm_bwd, grad_out, grad_residual_out, h, mean, rstd, weight, has_bias,
      is_rms, weight_grad, eps, from_output, bias, hd, dropout_p, dropout_seed, grad_h_wanted);
  return {grad_h, grad_weight, grad_bias, grad_input};
}

// _dropout_apply on the emulated kernel: input times the regenerated mask and scale, in
// dtype (None: the input's; float16/bfloat16 of a float32 input), with the op's checks.
at::Tensor dropout_apply(const at::Tensor& input, const at::Tensor& seed, double p,
                         const py::object& dtype) {
  std::optional<c10::ScalarType> d;
  if (!dtype.is_none()) {
    TORCH_CHECK(THPDtype_Check(dtype.ptr()), "dtype must be a torch.dtype or None");
    d = reinterpret_cast<THPDtype*>(dtype.ptr())->scalar_type;
  }
  return addnorm::launch_dropout_apply(&addnorm::cuda::emu_dropout_apply, input, seed, p, d);
}

// A launch of one block whose thread 0 writes byte `at` of its `smem` bytes of dynamic shared
// memory: the emulator's own check (past the end must fail the launch).
void smem_write_probe(int64_t smem, int64_t at) {
  emu::launch(dim3(1), dim3(32), static_cast<size_t>(smem), [at] {
    if (threadIdx.x == 0) emu::dyn_smem()[at] = 1;
  });
}

// An empty launch of the given configuration: the emulator's check of the hardware's limits.
void launch_probe(std::vector<int64_t> grid, std::vector<int64_t> block, int64_t smem) {
  TORCH_CHECK(grid.size() == 3 && block.size() == 3, "grid and block: three dimensions each");
  auto dims = [](const std::vector<int64_t>& d) {
    return dim3(static_cast<unsigned>(d[0]), static_cast<unsigned>(d[1]),
                static_cast<unsigned>(d[2]));
  };
  emu::launch(dims(grid), dims(block), static_cast<size_t>(smem), [] {});
}

// A kernel that breaks one of the GPU's rules, which the emulator must catch: "barrier"
// (the threads of a block at two different __syncthreads: aborts), "shuffle" (the lanes of a
// warp at shuffles of different offsets: aborts), "partial_warp" (a lane reading one past a
// partial warp's last: aborts), "store" (a 16-byte vector stored 8 bytes off its alignment:
// the launch fails); "none": the same kernels keeping the rules. "shared": a static
// __shared__ array read before the block writes it (declared as emulation.py rewrites the
// kernels' ones) gives NaN in every block, not the previous block's values; returns the sum
// block 1 read.
double rule_probe(const std::string& rule) {
  const bool ok = rule == "none";
  if (rule == "barrier" || ok) {
    emu::launch(dim3(2), dim3(64), 0, [ok] {
      if (ok || threadIdx.x < 32) {
        __syncthreads();
      } else {
        __syncthreads();  // (another call site)
      }
    });
  }
  if (rule == "shuffle" || ok) {
    emu::launch(dim3(1), dim3(64), 0, [ok] {
      (void)__shfl_xor_sync(0xffffffffu, 1.0f, ok || threadIdx.x < 16 ? 1 : 2);
    });
  }
  if (rule == "partial_warp" || ok) {
    emu::launch(dim3(1), dim3(40), 0, [ok] {  // (the second warp: 8 lanes)
      (void)__shfl_xor_sync(0xffffffffu, 1.0f, ok ? 4 : 8);
    });
  }
  if (rule == "store" || ok) {
    struct alignas(16) V16 {
      float v[4];
    };
    alignas(16) unsigned char buf[64] = {};
    emu::launch(dim3(1), dim3(1), 0, [ok, &buf] {
      emu::store_vector(reinterpret_cast<V16*>(buf + (ok ? 16 : 8)), V16{{1, 2, 3, 4}});
    });
  }
  double read = 0.0;
  if (rule == "shared") {
    emu::launch(dim3(2), dim3(32), 0, [&read] {
      __shared__ float s[32]; emu::poison_shared(s, sizeof(s));
      if (blockIdx.x == 1) read += s[threadIdx.x];
      s[threadIdx.x] = 1.0f;
    });
  }
  return read;
}

// The order of a block's threads between barriers: "forward", "reverse" or "shuffled";
// round robin or greedy (emu_cuda.h).
void set_schedule(const std::string& order, bool greedy, int64_t seed) {
  const auto s = order == "forward"  ? emu::Schedule::kForward
                 : order == "reverse" ? emu::Schedule::kReverse
                 : order == "shuffled" ? emu::Schedule::kShuffled
                                       : throw std::invalid_argument("schedule: " + order);
  emu::set_schedule(s, greedy, static_cast<uint64_t>(seed));
}

// The kernels launched since the last call (their names as the launches wrote them).
std::vector<std::string> launched() {
  std::vector<std::string> names;
  names.swap(emu::g_launched);
  return names;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("norm_fwd", &norm_fwd, "_norm_fwd on the emulated CUDA kernels");
  m.def("norm_bwd", &norm_bwd, "_norm_bwd on the emulated CUDA kernels", py::arg("grad_out"),
        py::arg("grad_residual_out"), py::arg("h"), py::arg("mean"), py::arg("rstd"),
        py::arg("weight"), py::arg("has_bias"), py::arg("is_rms"), py::arg("weight_grad"),
        py::arg("eps"), py::arg("from_output"), py::arg("bias"), py::arg("dropout_p"),
        py::arg("dropout_seed"), py::arg("grad_h_wanted"), py::arg("h_dtype") = py::none());
  m.def("dropout_apply", &dropout_apply, "_dropout_apply on the emulated CUDA kernel",
        py::arg("input"), py::arg("dropout_seed"), py::arg("p"), py::arg("dtype") = py::none());
  m.def("set_schedule", &set_schedule, "the order of a block's threads between barriers");
  m.def("smem_write_probe", &smem_write_probe, "the emulator's shared-memory guard, probed");
  m.def("launch_probe", &launch_probe, "the emulator's launch-configuration check, probed");
  m.def("launched", &launched, "the kernels launched since the last call, by name");
  m.def("rule_probe", &rule_probe, "a kernel breaking a GPU rule, which the emulator catches");
}
