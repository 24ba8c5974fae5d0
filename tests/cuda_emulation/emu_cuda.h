// The CUDA device code of csrc/cuda/norm_kernels.cu, run on the CPU (see emulation.py): the
// blocks of a launch one after another, a block's threads as fibers of the calling thread.
// __syncthreads is a barrier of the block's threads, __shfl_xor_sync one of the warp's lanes
// (a warp: 32 consecutive linear thread indices); __shared__ arrays are statics (one block
// runs at a time), set to NaN bytes for each block; dynamic shared memory is a buffer of the
// launch's size, filled with a garbage pattern before each block. A barrier that not every
// thread reaches, threads at different __syncthreads, and lanes at different shuffles (or
// reading a lane past a partial warp) abort with a message; a block that writes past its
// dynamic shared memory fails the launch (a guard band checked after each block), and with
// AddressSanitizer any access past it is reported; so does a misaligned vector load or store.
//
// The order in which a block's threads run between barriers is set by set_schedule: thread
// index order (the default), reversed, or shuffled (seeded, per block); round robin (the
// threads advance together) or greedy (the first ones in the order run ahead as far as the
// barriers let them). A kernel whose results change with the schedule reads shared memory
// that another thread writes without a barrier in between, or overwrites what another has
// yet to read (a race, racecheck's finding on a GPU): the tests compare schedules bitwise.
//
// What it checks: the kernels' arithmetic, indexing, launch shapes, reductions and barriers,
// on CPU tensors. What it does not: the GPU's compiler, memory model, timing or memory
// errors beyond those above (compute-sanitizer's job on a GPU). Where the device differs:
// rsqrt is exact here (the kernels refine the hardware's approximation by a Newton step, so
// both are within an ulp), and __double2half / __double2bfloat16 round through float.
#pragma once

#include <driver_types.h>  // cudaStream_t
#include <vector_types.h>  // dim3, uint4, uint2 (their host definitions)

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <ucontext.h>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

// The fibers switch stacks with emu_switch_stack (harness.cpp: it saves the callee-saved
// general registers on the stack it leaves and restores them from the one it enters) on
// x86-64 Linux: swapcontext's switch without its system call for the signal mask, nor its
// saving of the floating-point control state (the kernels do not change it). swapcontext
// itself under AddressSanitizer (which follows the stacks it switches) and elsewhere.
#if defined(__SANITIZE_ADDRESS__)
#define EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)  // (clang's spelling)
#define EMU_ASAN 1
#endif
#endif
#ifndef EMU_ASAN
#define EMU_ASAN 0
#endif
#if defined(__x86_64__) && defined(__linux__) && !defined(__ILP32__) && !EMU_ASAN
#define EMU_FAST_SWITCH 1
extern "C" void emu_switch_stack(void** save_sp, void* load_sp);
#else
#define EMU_FAST_SWITCH 0
#endif

namespace emu {

// The threads of the block being run, as fibers of the calling thread. A fiber runs until
// it reaches a barrier, then the next one runs; a barrier opens when all the threads of its
// block (__syncthreads) or warp (a shuffle) have reached it.
struct Fiber {
#if EMU_FAST_SWITCH
  void* sp = nullptr;  // its stack pointer while it does not run
#else
  ucontext_t ctx;
#endif
  std::vector<char> stack;
  dim3 tid;
  bool done = false;
  uint64_t shuffles = 0;           // the shuffles it has made in this block
  const uint64_t* wait = nullptr;  // the generation of the barrier it waits at, if any
  uint64_t wait_gen = 0;           // (open once *wait differs from it)
};

struct Block {
#if EMU_FAST_SWITCH
  void* sched_sp = nullptr;  // the scheduler's, while a fiber runs
#else
  ucontext_t sched;
#endif
  std::vector<Fiber> fibers;
  int current = 0;
  int nt = 0;
  // Barriers: arrivals and generation, for the block and for each warp.
  int block_arrived = 0;
  uint64_t block_gen = 0;
  uint64_t opens = 0;  // barriers opened so far
  std::vector<int> warp_arrived;
  std::vector<uint64_t> warp_gen;
  std::vector<uint64_t> warp_slot;  // [warps * 32] shuffle values
  // Where the open barriers were reached first: every thread must wait at the same
  // __syncthreads (call site), every lane of a warp at the same shuffle (call site, count
  // of the lane's shuffles so far, offset). On a GPU, threads at different barriers are
  // undefined behaviour (a hang, or a barrier that opens for the wrong threads), which the
  // generations alone would take as one barrier.
  int barrier_line = 0;
  const char* barrier_file = nullptr;
  struct ShuffleSite {
    int line;
    uint64_t count;
    int offset;
  };
  std::vector<ShuffleSite> warp_site;
  uint64_t serial = 0;  // blocks run so far (static shared memory's poisoning)
  std::function<void()> body;
};

inline Block g_block;

enum class Schedule { kForward, kReverse, kShuffled };
inline Schedule g_schedule = Schedule::kForward;
inline bool g_greedy = false;
inline uint64_t g_schedule_seed = 0;
inline void set_schedule(Schedule s, bool greedy, uint64_t seed) {
  g_schedule = s;
  g_greedy = greedy;
  g_schedule_seed = seed;
}
// A launch's dynamic shared memory without cudaFuncSetAttribute's opt-in (the kernels never
// opt in; 227 KiB on an H100 with it).
constexpr size_t kMaxDynSmem = 48 * 1024;
inline unsigned char* g_dyn_smem = nullptr;  // the running launch's dynamic shared memory
inline unsigned char* dyn_smem() { return g_dyn_smem; }
// 132 (an H100's SMs), or ADDNORM_EMULATION_SMS (read at every launch): a smaller GPU
// gives the kernels that size their grid by it fewer CTAs, each walking more of the rows.
inline int sm_count() {
  const char* s = std::getenv("ADDNORM_EMULATION_SMS");
  const int n = s != nullptr ? std::atoi(s) : 0;
  return n > 0 ? n : 132;
}

// From the running fiber to the scheduler, and back.
inline void yield() {
  Fiber& f = g_block.fibers[g_block.current];
#if EMU_FAST_SWITCH
  emu_switch_stack(&f.sp, g_block.sched_sp);
#else
  swapcontext(&f.ctx, &g_block.sched);
#endif
}

// Waits at a barrier of n threads (arrived / gen: the block's or a warp's).
inline void barrier(int& arrived, uint64_t& gen, int n) {
  const uint64_t my = gen;
  if (++arrived == n) {
    arrived = 0;
    ++gen;
    ++g_block.opens;
    return;
  }
  Fiber& f = g_block.fibers[g_block.current];
  f.wait = &gen;
  f.wait_gen = my;
  while (gen == my) {
    yield();
  }
  f.wait = nullptr;
}

}  // namespace emu

inline dim3 threadIdx;  // of the fiber that runs (set by the scheduler)
inline dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

inline int emu_linear_tid() {
  return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}

// (The call site's line and file, as default arguments: those of the kernel's call.)
inline void __syncthreads(int line = __builtin_LINE(), const char* file = __builtin_FILE()) {
  emu::Block& b = emu::g_block;
  if (b.block_arrived == 0) {
    b.barrier_line = line;
    b.barrier_file = file;
  } else if (line != b.barrier_line || std::strcmp(file, b.barrier_file) != 0) {
    std::fprintf(stderr, "cuda emulation: divergent __syncthreads: thread %d of block %u at "
                 "%s:%d, others at %s:%d\n", emu_linear_tid(), blockIdx.x, file, line,
                 b.barrier_file, b.barrier_line);
    std::abort();
  }
  emu::barrier(b.block_arrived, b.block_gen, b.nt);
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int off, int width = 32,
                         int line = __builtin_LINE()) {
  static_assert(sizeof(T) <= 8, "shuffles of up to 8 bytes");
  if (mask != 0xffffffffu || width != 32) {
    std::fprintf(stderr, "cuda emulation: only full-warp shuffles are emulated\n");
    std::abort();
  }
  emu::Block& b = emu::g_block;
  const int t = emu_linear_tid();
  const int w = t / 32;
  const int lane = t % 32;
  const int n = std::min(32, b.nt - 32 * w);
  const uint64_t count = b.fibers[b.current].shuffles++;
  if ((lane ^ off) >= n) {  // (a lane past a partial warp's last: no value on a GPU)
    std::fprintf(stderr, "cuda emulation: lane %d of warp %d reads lane %d of %d at line %d\n",
                 lane, w, lane ^ off, n, line);
    std::abort();
  }
  emu::Block::ShuffleSite& site = b.warp_site[w];
  if (b.warp_arrived[w] == 0) {
    site = {line, count, off};
  } else if (line != site.line || count != site.count || off != site.offset) {
    std::fprintf(stderr, "cuda emulation: divergent shuffle in warp %d: lane %d at line %d "
                 "(shuffle %llu, offset %d), others at line %d (shuffle %llu, offset %d)\n",
                 w, lane, line, static_cast<unsigned long long>(count), off, site.line,
                 static_cast<unsigned long long>(site.count), site.offset);
    std::abort();
  }
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  b.warp_slot[w * 32 + lane] = bits;
  emu::barrier(b.warp_arrived[w], b.warp_gen[w], n);
  const uint64_t other = b.warp_slot[w * 32 + (lane ^ off)];
  emu::barrier(b.warp_arrived[w], b.warp_gen[w], n);
  T r;
  std::memcpy(&r, &other, sizeof(T));
  return r;
}

// A load's address must be aligned to its type's size on the GPU (a misaligned vector load
// faults): the first misaligned one fails the launch (read here with memcpy, which takes any
// address, so that the launch ends and says so).
inline const void* g_misaligned_load = nullptr;

template <typename T>
inline T __ldg(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0 && g_misaligned_load == nullptr) {
    g_misaligned_load = p;
  }
  T v;
  std::memcpy(&v, static_cast<const void*>(p), sizeof(T));
  return v;
}

// A vector store's address must be aligned to the vector's alignment (a misaligned store
// faults on the GPU): the first misaligned one fails the launch (written here with memcpy).
// emulation.py rewrites the kernels' `*reinterpret_cast<Vec<...>*>(ptr) = v;` into this.
inline const void* g_misaligned_store = nullptr;

namespace emu {
template <typename V>
inline void store_vector(V* p, const V& v) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(V) != 0 && g_misaligned_store == nullptr) {
    g_misaligned_store = p;
  }
  std::memcpy(static_cast<void*>(p), &v, sizeof(V));
}

// Static __shared__ arrays (emulation.py adds the call after each declaration): their bytes
// set to 0xFF (NaN in floating point) by the first thread of each block to reach the
// declaration, so that a read before the block's own write shows (a plain static keeps the
// previous block's values, which a GPU gives no block).
inline void poison_shared(void* p, size_t bytes) {
  static std::vector<std::pair<void*, uint64_t>> last;  // array -> block that poisoned it
  for (auto& [q, serial] : last) {
    if (q == p) {
      if (serial != g_block.serial) {
        serial = g_block.serial;
        std::memset(p, 0xFF, bytes);
      }
      return;
    }
  }
  last.emplace_back(p, g_block.serial);
  std::memset(p, 0xFF, bytes);
}

// The rounded intrinsics' results, hidden from the host compiler's contraction: nvcc never
// fuses __fmul_rn and its kind into an fma, so a build with contraction on
// (ADDNORM_EMULATION_CONTRACT=1, emulation.py) fuses only what nvcc may fuse.
template <typename F>
inline F opaque(F v) {
#if defined(__x86_64__)
  asm volatile("" : "+x"(v));
#elif defined(__aarch64__)
  asm volatile("" : "+w"(v));
#else
  volatile F keep = v;  // (elsewhere: through memory)
  v = keep;
#endif
  return v;
}
}  // namespace emu

// Rounded arithmetic (the emulated kernels are compiled with -ffp-contract=off unless
// ADDNORM_EMULATION_CONTRACT=1, so no operation fuses unless the code asks for an fma).
inline float __fmul_rn(float a, float b) { return emu::opaque(a * b); }
inline float __fsub_rn(float a, float b) { return emu::opaque(a - b); }
inline float __fdiv_rn(float a, float b) { return emu::opaque(a / b); }
inline float __fmaf_rn(float a, float b, float c) { return emu::opaque(std::fma(a, b, c)); }
inline double __dmul_rn(double a, double b) { return emu::opaque(a * b); }
inline double __dsub_rn(double a, double b) { return emu::opaque(a - b); }
inline double __ddiv_rn(double a, double b) { return emu::opaque(a / b); }
inline double __fma_rn(double a, double b, double c) { return emu::opaque(std::fma(a, b, c)); }
inline double rsqrt(double v) { return 1.0 / std::sqrt(v); }
using std::fma;
using std::isfinite;
using std::isinf;
inline c10::Half __double2half(double v) { return c10::Half(static_cast<float>(v)); }
inline c10::BFloat16 __double2bfloat16(double v) { return c10::BFloat16(static_cast<float>(v)); }

namespace emu {

[[noreturn]] inline void fiber_main() {
  g_block.body();
  g_block.fibers[g_block.current].done = true;
  yield();
  std::abort();  // (a finished fiber is never resumed)
}

// A fiber's stack, ready to enter fiber_main at the first switch to it.
inline void start_fiber(Fiber& f) {
  std::vector<char>& stack = f.stack;
#if EMU_FAST_SWITCH
  // Top down: a null return address for fiber_main (16-byte aligned below it, as after a
  // call), fiber_main's address for emu_switch_stack's ret, six callee-saved registers.
  auto top = reinterpret_cast<uintptr_t>(stack.data() + stack.size()) & ~uintptr_t{15};
  auto* words = reinterpret_cast<void**>(top);
  words[-1] = nullptr;
  words[-2] = reinterpret_cast<void*>(&fiber_main);
  for (int k = 3; k <= 8; ++k) words[-k] = nullptr;
  f.sp = words - 8;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = stack.data();
  f.ctx.uc_stack.ss_size = stack.size();
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, &fiber_main, 0);
#endif
}

// From the scheduler to fiber f, until it yields.
inline void resume(Fiber& f) {
#if EMU_FAST_SWITCH
  emu_switch_stack(&g_block.sched_sp, f.sp);
#else
  swapcontext(&g_block.sched, &f.ctx);
#endif
}

// The names of the kernels launched (as the launch wrote them, template arguments
// unresolved; the last 64), for tests of which path a call takes.
inline std::vector<std::string> g_launched;
inline void note_launch(const char* kernel) {
  if (g_launched.size() >= 64) g_launched.erase(g_launched.begin());
  g_launched.emplace_back(kernel);
}

// kernel<<<grid, block, smem>>>(args...): the blocks one after another.
template <typename K, typename... Args>
void launch(dim3 grid, dim3 block, size_t smem, K kernel, Args... args) {
  ::g_misaligned_load = nullptr;  // (one left by a launch that failed otherwise)
  ::g_misaligned_store = nullptr;
  if (smem > kMaxDynSmem) {
    throw std::runtime_error("cuda emulation: more than 48 KiB of dynamic shared memory");
  }
  // The hardware's grid and block limits (an invalid configuration fails the launch there).
  if (grid.x < 1 || grid.x > 0x7fffffffu || grid.y < 1 || grid.y > 65535 || grid.z < 1 ||
      grid.z > 65535 || block.x > 1024 || block.y > 1024 || block.z > 64) {
    throw std::runtime_error("cuda emulation: grid or block dimensions out of range");
  }
  // The buffer: smem bytes (aligned as the heap aligns), then a guard band; none with
  // AddressSanitizer, whose redzone right after the buffer reports reads as well as writes.
#if EMU_ASAN
  constexpr size_t kGuard = 0;
#else
  constexpr size_t kGuard = 256;
#endif
  const int nt = static_cast<int>(block.x * block.y * block.z);
  if (nt > 1024 || nt < 1) {
    throw std::runtime_error("cuda emulation: 1 to 1024 threads per block");
  }
  const std::unique_ptr<unsigned char[]> dyn(new unsigned char[smem + kGuard]);
  g_dyn_smem = dyn.get();
  constexpr size_t kStack = 256 * 1024;
  gridDim = grid;
  blockDim = block;
  Block& b = g_block;
  b.nt = nt;
  b.fibers.resize(nt);
  const int warps = (nt + 31) / 32;
  b.warp_slot.assign(warps * 32, 0);
  std::vector<int> order(nt);  // the threads' order in each round (set_schedule)
  std::mt19937_64 rng(g_schedule_seed);
  b.body = [&] { kernel(args...); };
  // The blocks: in index order (x fastest), reversed or shuffled as the schedule says (a
  // kernel whose blocks depend on one another's writes changes its results).
  std::vector<dim3> blocks;
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) blocks.emplace_back(bx, by, bz);
    }
  }
  if (g_schedule == Schedule::kReverse) {
    std::reverse(blocks.begin(), blocks.end());
  } else if (g_schedule == Schedule::kShuffled) {
    std::shuffle(blocks.begin(), blocks.end(), rng);
  }
  for (const dim3& block_idx : blocks) {
    const unsigned bx = block_idx.x, by = block_idx.y, bz = block_idx.z;
    std::fill(g_dyn_smem, g_dyn_smem + smem, 0xA5);  // garbage
    std::fill(g_dyn_smem + smem, g_dyn_smem + smem + kGuard, 0x5A);
    blockIdx = dim3(bx, by, bz);
    std::iota(order.begin(), order.end(), 0);
    if (g_schedule == Schedule::kReverse) {
      std::reverse(order.begin(), order.end());
    } else if (g_schedule == Schedule::kShuffled) {
      std::shuffle(order.begin(), order.end(), rng);
    }
    b.block_arrived = 0;
    b.warp_arrived.assign(warps, 0);
    b.warp_gen.assign(warps, 0);
    b.warp_site.assign(warps, {});
    ++b.serial;
    for (int t = 0; t < nt; ++t) {
      Fiber& f = b.fibers[t];
      f.tid = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      f.done = false;
      f.shuffles = 0;
      f.wait = nullptr;
      f.stack.resize(kStack);
      start_fiber(f);
    }
    // Until every thread is done, run the first runnable thread (not done, not waiting
    // at a closed barrier) in `order`: from after the last one run (round robin: the
    // threads advance together), or, greedy, from the start (the first threads run
    // ahead as far as the barriers let them). None runnable: a barrier that not all
    // threads reach.
    // (Greedy, the scan starts after the thread last run unless a barrier opened since:
    // the threads before it were not runnable then.)
    int left = nt;
    size_t pos = 0;
    uint64_t opens = b.opens;
    while (left > 0) {
      int pick = -1;
      const size_t start = g_greedy && b.opens != opens ? 0 : pos;
      opens = b.opens;
      for (size_t k = 0; k < order.size(); ++k) {
        const size_t i = (start + k) % order.size();
        const Fiber& f = b.fibers[order[i]];
        if (!f.done && (f.wait == nullptr || *f.wait != f.wait_gen)) {
          pick = order[i];
          pos = i + 1;
          break;
        }
      }
      if (pick < 0) {
        std::fprintf(stderr, "cuda emulation: a barrier that not all threads reach "
                             "(block %u,%u,%u)\n", bx, by, bz);
        std::abort();
      }
      Fiber& f = b.fibers[pick];
      b.current = pick;
      threadIdx = f.tid;
      resume(f);
      left -= f.done;
    }
    if (std::any_of(g_dyn_smem + smem, g_dyn_smem + smem + kGuard,
                    [](unsigned char c) { return c != 0x5A; })) {
      b.body = nullptr;
      g_dyn_smem = nullptr;
      throw std::runtime_error("cuda emulation: block " + std::to_string(bx) + "," +
                               std::to_string(by) + "," + std::to_string(bz) +
                               " wrote past the " + std::to_string(smem) +
                               " bytes of dynamic shared memory of its launch");
    }
  }
  b.body = nullptr;
  g_dyn_smem = nullptr;
  if (const void* at = ::g_misaligned_load) {
    ::g_misaligned_load = nullptr;
    throw std::runtime_error("cuda emulation: a misaligned load (__ldg) at " +
                             std::to_string(reinterpret_cast<uintptr_t>(at)));
  }
  if (const void* at = ::g_misaligned_store) {
    ::g_misaligned_store = nullptr;
    throw std::runtime_error("cuda emulation: a misaligned vector store at " +
                             std::to_string(reinterpret_cast<uintptr_t>(at)));
  }
}

}  // namespace emu
