// A host emulator of the part of CUDA that mean_field_cuda.cu uses, so that
// its kernels and launcher, unchanged, run on the CPU in tests (cuda_emu.cpp).
//
// A launch runs its blocks one after another on the calling thread.  The
// threads of a block are fibers (ucontext): each runs until its next
// __syncthreads() or its end, and the barrier opens when every thread of the
// block has reached it; a block where some threads end while others wait at a
// barrier fails the launch (CUDA leaves that undefined).  Successive rounds
// resume the threads in ascending, then descending order, so a missing
// barrier shows whichever way the dependency runs.  Dynamic shared memory is
// one buffer per block, filled with 0xff bytes (float NaN) when the block
// starts, so reading what no thread wrote shows.
//
// Device attributes are an H100's or an A100's (env MAL_CRF_EMU_GPU=h100|a100,
// default h100).  As on a GPU, a launch fails if its block has more than 1024
// threads or it asks for more than 48 KB of dynamic shared memory without a
// cudaFuncSetAttribute that allows it; C10_CUDA_KERNEL_LAUNCH_CHECK reports it.
// Every launch is logged (launch_log) for tests to see which kernels ran.
// __restrict__ needs nothing: GCC knows it.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <ucontext.h>

#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace cuda_emu {

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The running emulated thread's coordinates (set before each resume).
inline thread_local uint3 thread_idx, block_idx;
inline thread_local dim3 block_dim, grid_dim;

struct Gpu {
  int sms, smem_optin;
};
inline Gpu emulated_gpu() {
  const char* e = std::getenv("MAL_CRF_EMU_GPU");
  if (e == nullptr || std::strcmp(e, "h100") == 0) return {132, 227 * 1024};
  if (std::strcmp(e, "a100") == 0) return {108, 163 * 1024};
  TORCH_CHECK(false, "MAL_CRF_EMU_GPU must be h100 or a100, got '", e, "'");
}

constexpr size_t kDefaultSmemLimit = 48 * 1024;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr size_t kStackBytes = 64 * 1024;

inline std::map<const void*, int>& smem_attribute() {  // kernel -> allowed dynamic smem
  static std::map<const void*, int> m;
  return m;
}
inline thread_local std::string last_error;
inline thread_local std::vector<std::string> launch_log;

// The fibers of one block; reused for every block of a launch.
struct Block {
  enum State { kRunning, kAtBarrier, kDone };
  std::function<void()> body;
  std::unique_ptr<char[]> stacks;
  std::vector<ucontext_t> ctx;
  std::vector<State> state;
  std::vector<char> shared;
  ucontext_t scheduler;
  int current = 0;
};
inline thread_local Block* active = nullptr;

inline void fiber_main() {
  for (;;) {  // one pass per block
    Block& b = *active;
    b.body();
    b.state[b.current] = Block::kDone;
    swapcontext(&b.ctx[b.current], &b.scheduler);
  }
}

inline void syncthreads() {
  Block& b = *active;
  b.state[b.current] = Block::kAtBarrier;
  swapcontext(&b.ctx[b.current], &b.scheduler);
}

// Runs block `bid`; false if its threads did not all reach the same barriers.
inline bool run_block(Block& b, const uint3& bid) {
  const int n = static_cast<int>(b.state.size());
  block_idx = bid;
  std::memset(b.shared.data(), 0xff, b.shared.size());
  std::fill(b.state.begin(), b.state.end(), Block::kRunning);
  for (int round = 0;; ++round) {
    int waiting = 0;
    for (int k = 0; k < n; ++k) {
      const int i = round % 2 == 0 ? k : n - 1 - k;
      b.current = i;
      thread_idx = {i % block_dim.x, (i / block_dim.x) % block_dim.y,
                    i / (block_dim.x * block_dim.y)};
      swapcontext(&b.scheduler, &b.ctx[i]);
      waiting += b.state[i] == Block::kAtBarrier;
    }
    if (waiting == 0) return true;
    if (waiting != n) return false;
  }
}

inline void run(const char* name, const void* kernel, dim3 grid, dim3 block,
                size_t smem, std::function<void()> body) {
  launch_log.push_back(std::string(name) + " grid=" + std::to_string(grid.x) +
                       " block=" + std::to_string(block.x) +
                       " smem=" + std::to_string(smem));
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock || blocks == 0) {
    last_error = std::string("invalid configuration argument (") + name + ")";
    return;
  }
  const auto attr = smem_attribute().find(kernel);
  const size_t smem_limit =
      attr == smem_attribute().end() ? kDefaultSmemLimit : static_cast<size_t>(attr->second);
  if (smem > smem_limit) {
    last_error = std::string("too much dynamic shared memory (") + name + ": " +
                 std::to_string(smem) + " B > " + std::to_string(smem_limit) + " B)";
    return;
  }
  const int n = static_cast<int>(threads);
  Block b;
  b.body = std::move(body);
  b.stacks.reset(new char[n * kStackBytes]);
  b.ctx.resize(n);
  b.state.resize(n);
  b.shared.resize(smem);
  active = &b;
  block_dim = block;
  grid_dim = grid;
  for (int i = 0; i < n; ++i) {
    getcontext(&b.ctx[i]);
    b.ctx[i].uc_stack.ss_sp = b.stacks.get() + i * kStackBytes;
    b.ctx[i].uc_stack.ss_size = kStackBytes;
    b.ctx[i].uc_link = nullptr;  // fiber_main never returns
    makecontext(&b.ctx[i], fiber_main, 0);
  }
  for (uint64_t g = 0; g < blocks; ++g) {
    const uint3 bid{static_cast<unsigned>(g % grid.x), static_cast<unsigned>(g / grid.x % grid.y),
                    static_cast<unsigned>(g / grid.x / grid.y)};
    if (!run_block(b, bid)) {
      last_error = std::string("__syncthreads() not reached by every thread of a block (") +
                   name + ")";
      break;
    }
  }
  active = nullptr;
}

template <class T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(active->shared.data());
}

// kernel(args...) with the arguments converted to the parameter types once,
// as a launch does; every thread gets its own copy of them.
template <class... P>
struct Launch {
  void (*kernel)(P...);
  const char* name;
  dim3 grid, block;
  size_t smem;
  template <class... A>
  void operator()(A&&... args) const {
    const std::tuple<P...> params(std::forward<A>(args)...);
    run(name, reinterpret_cast<const void*>(kernel), grid, block, smem,
        [&] { std::apply(kernel, params); });
  }
};
template <class... P>
Launch<P...> launch(void (*kernel)(P...), const char* name, dim3 grid, dim3 block, size_t smem) {
  return {kernel, name, grid, block, smem};
}

// The single emulated device: nothing to switch, one stream.
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
struct CUDAStream {};
inline CUDAStream* getCurrentCUDAStream(c10::DeviceIndex) { return nullptr; }

inline void check_launch() {
  std::string err;
  std::swap(err, last_error);
  TORCH_CHECK(err.empty(), "CUDA kernel launch failed (emulated): ", err);
}

}  // namespace cuda_emu

// ---- the CUDA names the kernels and the launcher use ------------------------
#define threadIdx (::cuda_emu::thread_idx)
#define blockIdx (::cuda_emu::block_idx)
#define blockDim (::cuda_emu::block_dim)
#define gridDim (::cuda_emu::grid_dim)
#if defined(MAL_CRF_EMU_NO_BARRIER)  // the broken variant that shows the tests can fail
#define __syncthreads() ((void)0)
#else
#define __syncthreads() ::cuda_emu::syncthreads()
#endif
#define MF_DYNAMIC_SHARED(T, name) T* name = ::cuda_emu::dynamic_shared<T>()
#define MF_LAUNCH(kernel, grid, block, smem, stream) \
  ::cuda_emu::launch(&kernel, #kernel, grid, block, smem)

using cudaStream_t = ::cuda_emu::CUDAStream*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount,
  cudaDevAttrMaxSharedMemoryPerBlockOptin,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  const ::cuda_emu::Gpu gpu = ::cuda_emu::emulated_gpu();
  *value = attr == cudaDevAttrMultiProcessorCount ? gpu.sms : gpu.smem_optin;
  return cudaSuccess;
}
template <class... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute, int value) {
  if (value < 0 || value > ::cuda_emu::emulated_gpu().smem_optin) return cudaErrorInvalidValue;
  ::cuda_emu::smem_attribute()[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}

#define C10_CUDA_CHECK(expr)                                                  \
  do {                                                                        \
    const cudaError_t mf_err = (expr);                                        \
    TORCH_CHECK(mf_err == cudaSuccess, "CUDA error (emulated): ", #expr,     \
                " returned ", std::to_string(static_cast<int>(mf_err)));     \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ::cuda_emu::check_launch()
