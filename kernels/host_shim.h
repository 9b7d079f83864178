// host_shim.h: the CUDA C keywords of cupydcn's kernels, for the host build.
//
// The host build (cupydcn/_kernels.py, HostBackend) compiles
//     host_runtime.h + this file + common.cuh + <kernel file> + launch wrappers
// as one C++ translation unit. host_runtime.h is the executor (grids, blocks,
// fibers, barriers, warp operations, shared memory, atomics, checks); this
// file maps the remaining CUDA keywords: the function qualifiers vanish, and
// `__shared__` is refused, because on the host a block's shared memory must
// be reached through DCN_SHARED / DCN_SHARED_DYNAMIC (common.cuh), which give
// one copy per block and record every access for the race checks.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ \
  static_assert(false, "declare shared memory with DCN_SHARED / DCN_SHARED_DYNAMIC (common.cuh)");

using std::floor;
