// host_shim.h: runs cupydcn's CUDA C kernels on the CPU, for the test tier
// that has no GPU.
//
// The host build (cupydcn/_kernels.py, HostBackend) compiles
//     this file + common.cuh + <op>.cu + generated launch wrappers
// with a C++ compiler. The CUDA built-ins the kernels use are mapped here:
// __global__/__device__ vanish, threadIdx/blockIdx/blockDim/gridDim are
// thread-local variables, and dcn_host_launch runs every (block, thread) of
// the grid one after another. The kernels are grid-stride loops with no
// shared memory, no barriers and no warp intrinsics, so a serial run computes
// exactly what the GPU computes (atomic adds become plain adds; only the order
// of floating-point additions may differ). Kernel arguments arrive as an array
// of pointers to the values, the same convention as cuLaunchKernel.
#include <cmath>
#include <cstring>
#include <cstddef>
#include <utility>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

using std::floor;

struct dcn_host_dim3 { unsigned int x, y, z; };
static thread_local dcn_host_dim3 threadIdx, blockIdx, blockDim, gridDim;

template <typename T> inline T atomicAdd(T* address, T value) {
  T old = *address;
  *address = old + value;
  return old;
}

template <typename... Args, std::size_t... K>
inline void dcn_host_invoke(void (*kernel)(Args...), void** args, std::index_sequence<K...>) {
  kernel(*static_cast<typename std::remove_reference<Args>::type*>(args[K])...);
}

template <typename... Args>
inline void dcn_host_launch(void (*kernel)(Args...), unsigned int grid, unsigned int block,
                            void** args) {
  gridDim = {grid, 1, 1};
  blockDim = {block, 1, 1};
  for (unsigned int b = 0; b < grid; ++b) {
    for (unsigned int t = 0; t < block; ++t) {
      blockIdx = {b, 0, 0};
      threadIdx = {t, 0, 0};
      dcn_host_invoke(kernel, args, std::index_sequence_for<Args...>{});
    }
  }
}
