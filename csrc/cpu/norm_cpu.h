#pragma once

// The CPU backend (cpu/norm_cpu.cpp): registers the CPU kernels of the internal ops.

namespace addnorm::cpu {

// The instruction set the CPU kernels run with: "AVX512", "AVX2" or "DEFAULT" (ATen's choice, so
// ATEN_CPU_CAPABILITY=default selects the portable build).
const char* capability();

}  // namespace addnorm::cpu
