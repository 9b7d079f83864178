// host_primitives.cu: test kernels for the host executor (tests/test_host_runtime.py).
//
// Each kernel exercises one part of CUDA's execution model or one wrapper of
// common.cuh's block-cooperation section, so that the tests can compare what it
// moves or computes with NumPy. They follow the op files' conventions: templates
// <T, I, ...> over the storage and index types, arguments packed by
// cupydcn._kernels.pack (ints are I). `gemm` is the block-cooperative kernel that
// uses everything together; the mutation tests edit its marked lines.

// Every thread writes its (blockIdx, threadIdx, blockDim, gridDim) at its global rank.
template <typename T, typename I>
__global__ void indices(int* out) {
  const I block = (I)blockIdx.x + (I)gridDim.x * ((I)blockIdx.y + (I)gridDim.y * (I)blockIdx.z);
  const I inner = (I)threadIdx.x + (I)blockDim.x * ((I)threadIdx.y + (I)blockDim.y * (I)threadIdx.z);
  int* o = out + 12 * (block * (I)(blockDim.x * blockDim.y * blockDim.z) + inner);
  o[0] = blockIdx.x; o[1] = blockIdx.y; o[2] = blockIdx.z;
  o[3] = threadIdx.x; o[4] = threadIdx.y; o[5] = threadIdx.z;
  o[6] = blockDim.x; o[7] = blockDim.y; o[8] = blockDim.z;
  o[9] = gridDim.x; o[10] = gridDim.y; o[11] = gridDim.z;
}

// Every thread stores its global rank in out[0]: the last one to run wins, so
// the result shows the order in which threads and blocks ran.
template <typename T, typename I>
__global__ void last_writer(int* out) {
  out[0] = (int)(blockIdx.x * blockDim.x + threadIdx.x);
}

// out = in reversed within each block of 128, through static shared memory.
template <typename T, typename I, bool Sync>
__global__ void reverse(const float* in, float* out) {
  DCN_SHARED(float, buffer, 128);
  const I base = (I)blockIdx.x * 128;
  buffer[threadIdx.x] = in[base + threadIdx.x];
  if (Sync) __syncthreads();
  out[base + threadIdx.x] = buffer[127 - threadIdx.x];
}

// The same through dynamic shared memory of blockDim.x floats.
template <typename T, typename I>
__global__ void reverse_dynamic(const float* in, float* out) {
  DCN_SHARED_DYNAMIC(float, buffer);
  const unsigned int n = blockDim.x;
  const I base = (I)blockIdx.x * n;
  buffer[threadIdx.x] = in[base + threadIdx.x];
  __syncthreads();
  out[base + threadIdx.x] = buffer[n - 1 - threadIdx.x];
}

// A read of shared memory nobody wrote: the poison (NaN) on the host.
template <typename T, typename I>
__global__ void read_unwritten(float* out) {
  DCN_SHARED(float, buffer, 64);
  out[threadIdx.x] = buffer[threadIdx.x];
}

// __syncthreads_count / _and / _or of (in[t] != 0), written by every thread.
template <typename T, typename I>
__global__ void barrier_votes(const int* in, int* out) {
  const int t = threadIdx.x;
  const int p = in[t] != 0;
  out[3 * t] = __syncthreads_count(p);
  out[3 * t + 1] = __syncthreads_and(p);
  out[3 * t + 2] = __syncthreads_or(p);
}

// A barrier only half the block reaches.
template <typename T, typename I>
__global__ void divergent_barrier(float* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// A barrier at two different places.
template <typename T, typename I>
__global__ void split_barrier(float* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

// Histogram of `values` into 16 bins: shared atomics per block, then global atomics.
template <typename T, typename I>
__global__ void histogram(const int* values, I n, unsigned int* bins) {
  DCN_SHARED(unsigned int, local, 16);
  if (threadIdx.x < 16) local[threadIdx.x] = 0u;
  __syncthreads();
  for (I i = (I)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (I)blockDim.x * gridDim.x)
    atomicAdd(&local[values[i] & 15], 1u);
  __syncthreads();
  if (threadIdx.x < 16) atomicAdd(bins + threadIdx.x, (unsigned int)local[threadIdx.x]);
}

// One warp; out[k * 32 + lane] for k = shfl(src[lane]), shfl_up(delta), shfl_down(delta),
// shfl_xor(delta), each with `width`; votes[lane] = {ballot, any, all} of (in[lane] > 0).
template <typename T, typename I>
__global__ void shuffles(const float* in, const int* src, I delta, I width, float* out,
                         unsigned int* votes) {
  const unsigned int lane = threadIdx.x, full = 0xffffffffu;
  const float v = in[lane];
  const int w = (int)width;
  out[lane] = __shfl_sync(full, v, src[lane], w);
  out[32 + lane] = __shfl_up_sync(full, v, (unsigned int)delta, w);
  out[64 + lane] = __shfl_down_sync(full, v, (unsigned int)delta, w);
  out[96 + lane] = __shfl_xor_sync(full, v, (int)delta, w);
  const double dv = (double)v * 3.0;  // an 8-byte value
  out[128 + lane] = (float)__shfl_xor_sync(full, dv, 1);
  __syncwarp();
  votes[3 * lane] = __ballot_sync(full, v > 0.0f);
  votes[3 * lane + 1] = __any_sync(full, v > 0.0f);
  votes[3 * lane + 2] = __all_sync(full, v > 0.0f);
}

// Lanes 0..15 shuffle among themselves with mask 0xffff; lanes 16..31 do not.
template <typename T, typename I>
__global__ void half_warp(const float* in, float* out) {
  const unsigned int lane = threadIdx.x;
  float v = in[lane];
  if (lane < 16) v = __shfl_down_sync(0x0000ffffu, v, 1, 16);
  out[lane] = v;
}

// A lane calls a warp operation with a mask that leaves it out.
template <typename T, typename I>
__global__ void bad_mask(float* out) {
  out[threadIdx.x] = __shfl_sync(0x0000ffffu, 1.0f, 0);
}

// Lane 0 waits for lane 1, which has exited.
template <typename T, typename I>
__global__ void exited_lane(float* out) {
  if (threadIdx.x == 0) out[0] = __shfl_sync(0x3u, 1.0f, 0);
}

// One warp: d = mma(a, b, c) on fragments given per lane (a: 32 x 4, b: 32 x 2,
// c and d: 32 x 4 words). Type 0: m16n8k16 f16, 1: m16n8k16 bf16, 2: m16n8k8 tf32.
template <typename T, typename I, int Type>
__global__ void mma_fragments(const unsigned int* a, const unsigned int* b, const float* c,
                              float* d) {
  const unsigned int lane = threadIdx.x;
  unsigned int fa[4], fb[2];
  float fc[4], fd[4];
  for (int k = 0; k < 4; ++k) { fa[k] = a[4 * lane + k]; fc[k] = c[4 * lane + k]; }
  for (int k = 0; k < 2; ++k) fb[k] = b[2 * lane + k];
  if (Type == 0) dcn_mma_m16n8k16_f16(fd, fa, fb, fc);
  if (Type == 1) dcn_mma_m16n8k16_bf16(fd, fa, fb, fc);
  if (Type == 2) dcn_mma_m16n8k8_tf32(fd, fa, fb, fc);
  for (int k = 0; k < 4; ++k) d[4 * lane + k] = fd[k];
}

// out[i] = dcn_to_tf32(in[i]).
template <typename T, typename I>
__global__ void to_tf32(const float* in, float* out, I n) {
  DCN_KERNEL_LOOP(i, I, n) { out[i] = dcn_to_tf32(in[i]); }
}

// One warp: 32 rows of 8 b16 values in shared memory; lane l gives row rows[l]
// as its ldmatrix address; out[l * Count + m] = r[m].
template <typename T, typename I, int Count, bool Trans>
__global__ void ldmatrix_rows(const unsigned short* matrix, const int* rows, unsigned int* out) {
  DCN_SHARED(unsigned short, tile, 32 * 8);
  const unsigned int lane = threadIdx.x;
  for (int k = 0; k < 8; ++k) tile[lane * 8 + k] = matrix[lane * 8 + k];
  __syncwarp();
  unsigned int r[4];
  dcn_ldmatrix<Count, Trans>(r, tile, rows[lane] * 8);
  for (int m = 0; m < Count; ++m) out[lane * Count + m] = r[m];
}

// cp.async of 4 floats per thread into shared memory, in two groups (the even
// and the odd threads' halves); with Wait = 1 the thread waits for the older
// group only (wait_group 1), with 2 for both (wait_group 0), with 0 not at
// all; then each thread reads back its own four values.
template <typename T, typename I, int Wait>
__global__ void async_copy(const float* in, float* out) {
  DCN_SHARED(float, buffer, 4 * 32);
  const unsigned int t = threadIdx.x;
  dcn_cp_async<8>(buffer, 4 * t, in + 4 * t);
  dcn_cp_async_commit();
  dcn_cp_async<4>(buffer, 4 * t + 2, in + 4 * t + 2);
  dcn_cp_async<4>(buffer, 4 * t + 3, in + 4 * t + 3);
  dcn_cp_async_commit();
  if (Wait == 1) dcn_cp_async_wait<1>();
  if (Wait == 2) dcn_cp_async_wait<0>();
  for (int k = 0; k < 4; ++k) out[4 * t + k] = buffer[4 * t + k];
  if (Wait != 2) dcn_cp_async_wait<0>();
}

template <typename T> struct mma_for;
template <> struct mma_for<dcn_half> {
  static __device__ __forceinline__ void run(float* d, const unsigned int* a,
                                             const unsigned int* b) {
    dcn_mma_m16n8k16_f16(d, a, b, d);
  }
};
template <> struct mma_for<dcn_bfloat16> {
  static __device__ __forceinline__ void run(float* d, const unsigned int* a,
                                             const unsigned int* b) {
    dcn_mma_m16n8k16_bf16(d, a, b, d);
  }
};

// C[M, N] = A[M, K] B[K, N] (A, B row-major in T = dcn_half or dcn_bfloat16, C in
// f32) and rowsum[m] += sum_n C[m, n]. M, N multiples of 32, K of 16. Block
// (128): a 32x32 tile of C; warp w computes rows 16 (w / 2) + [0, 16) and
// columns 16 (w % 2) + [0, 16) as two m16n8k16 tiles. Per step of 16 along K the
// block stages A (32x16) and B (16x32) with 16-byte cp.async copies, waits,
// synchronises, loads the fragments with ldmatrix (B transposed) and multiplies.
template <typename T, typename I>
__global__ void __launch_bounds__(128) gemm(const T* A, const T* B, float* C, float* rowsum,
                                            I M, I N, I K) {
  DCN_SHARED(T, a_tile, 32 * 16);
  DCN_SHARED(T, b_tile, 16 * 32);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const I row0 = (I)blockIdx.y * 32, col0 = (I)blockIdx.x * 32;
  float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
  for (I k0 = 0; k0 < K; k0 += 16) {
    if (tid < 64) {  // A: 32 rows of two 8-element chunks
      const int r = tid / 2, c = (tid % 2) * 8;
      dcn_cp_async<16>(a_tile, r * 16 + c, A + (row0 + r) * K + k0 + c);
    } else {  // B: 16 rows of four 8-element chunks
      const int r = (tid - 64) / 4, c = ((tid - 64) % 4) * 8;
      dcn_cp_async<16>(b_tile, r * 32 + c, B + (k0 + r) * N + col0 + c);
    }
    dcn_cp_async_commit();
    dcn_cp_async_wait<0>();  // [mutation: wait]
    __syncthreads();  // [mutation: tiles landed]
    unsigned int a[4], b[4];
    // A rows 0-15 of the warp: lanes 0-15 at k 0, lanes 16-31 at k 8
    dcn_ldmatrix<4, false>(a, a_tile, (16 * (warp / 2) + lane % 16) * 16 + (lane / 16) * 8);
    // B rows k 0-15 (lanes 0-7, 8-15), columns +0 and +8 (lanes 16-31)
    dcn_ldmatrix<4, true>(b, b_tile, (lane % 16) * 32 + 16 * (warp % 2) + (lane / 16) * 8);
    mma_for<T>::run(acc[0], a, b);
    mma_for<T>::run(acc[1], a, b + 2);
    __syncthreads();  // [mutation: tiles consumed]
  }
  const int g = lane / 4, t = lane % 4;
  const I row = row0 + 16 * (warp / 2) + g;
  for (int j = 0; j < 2; ++j) {
    const I col = col0 + 16 * (warp % 2) + 8 * j + 2 * t;
    C[row * N + col] = acc[j][0];
    C[row * N + col + 1] = acc[j][1];
    C[(row + 8) * N + col] = acc[j][2];
    C[(row + 8) * N + col + 1] = acc[j][3];
  }
  // the row sums of this warp's 16 columns: over j in registers, over t by shuffles
  float top = acc[0][0] + acc[0][1] + acc[1][0] + acc[1][1];
  float bottom = acc[0][2] + acc[0][3] + acc[1][2] + acc[1][3];
  for (int m = 1; m < 4; m *= 2) {
    top += __shfl_xor_sync(0xffffffffu, top, m);
    bottom += __shfl_xor_sync(0xffffffffu, bottom, m);
  }
  if (t == 0) {
    atomicAdd(rowsum + row, top);
    atomicAdd(rowsum + row + 8, bottom);
  }
}
