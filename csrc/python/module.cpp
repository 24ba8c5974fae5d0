// addnorm._C: Python glue only. Importing it loads libaddnorm (RPATH $ORIGIN), whose
// static initializers register the ops in torch.ops.addnorm.

#include <pybind11/pybind11.h>

#include <addnorm/addnorm.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "addnorm native module: fused residual-add + LayerNorm/RMSNorm ops";
  m.def("version", &addnorm::version, "Version of libaddnorm");
  m.def("cpu_capability", &addnorm::cpu_kernel_capability,
        "Instruction set the CPU kernels run with (AVX2 or DEFAULT)");
  m.def("built_with_cuda", &addnorm::built_with_cuda, "True when built with CUDA kernels");
}
