// common.cuh: definitions shared by every cupydcn kernel file.
//
// The loader (cupydcn/_kernels.py) prepends this text to each kernel file, so a
// file never #includes it and the compile cache sees every byte. It holds the
// storage types for the half formats, their conversions to and from the
// accumulation type (float for float16/bfloat16, the type itself otherwise),
// and the two bilinear rules the ops share. It includes no header: it must
// compile under NVRTC, and as plain C++ through kernels/host_shim.h, where the
// CUDA built-ins (threadIdx, atomicAdd, ...) are mapped onto a serial loop.
// Under NVRTC __CUDA_ARCH__ is defined and the half conversions use the
// hardware instructions; on the host they are done in software, bit-exact
// (round to nearest even).

// 16-bit storage types. Plain structs, so no CUDA header is needed; a CuPy
// float16 or bfloat16 array is passed as a pointer to them.
struct dcn_half { unsigned short bits; };
struct dcn_bfloat16 { unsigned short bits; };

template <typename T> struct dcn_acc { typedef T type; };
template <> struct dcn_acc<dcn_half> { typedef float type; };
template <> struct dcn_acc<dcn_bfloat16> { typedef float type; };

__device__ __forceinline__ unsigned int dcn_float_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  unsigned int u; memcpy(&u, &f, sizeof u); return u;
#endif
}

__device__ __forceinline__ float dcn_bits_float(unsigned int u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f; memcpy(&f, &u, sizeof f); return f;
#endif
}

// Storage -> accumulation type.
__device__ __forceinline__ float dcn_load(float v) { return v; }
__device__ __forceinline__ double dcn_load(double v) { return v; }
__device__ __forceinline__ float dcn_load(dcn_bfloat16 v) {
  return dcn_bits_float(((unsigned int)v.bits) << 16);
}
__device__ __forceinline__ float dcn_load(dcn_half v) {
#ifdef __CUDA_ARCH__
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
  return f;
#else
  unsigned int sign = (v.bits & 0x8000u) << 16;
  unsigned int exp = (v.bits >> 10) & 0x1fu;
  unsigned int man = v.bits & 0x3ffu;
  if (exp == 0x1fu) return dcn_bits_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    if (man == 0) return dcn_bits_float(sign);
    // subnormal: man * 2^-24
    float f = (float)man * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  return dcn_bits_float(sign | ((exp + 112u) << 23) | (man << 13));
#endif
}

// Accumulation type -> storage (round to nearest even).
template <typename T> __device__ __forceinline__ T dcn_store(float v);
template <typename T> __device__ __forceinline__ T dcn_store(double v);
template <> __device__ __forceinline__ float dcn_store<float>(float v) { return v; }
template <> __device__ __forceinline__ double dcn_store<double>(double v) { return v; }
template <> __device__ __forceinline__ dcn_bfloat16 dcn_store<dcn_bfloat16>(float v) {
  unsigned int u = dcn_float_bits(v);
  dcn_bfloat16 r;
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a (quiet) NaN
    r.bits = (unsigned short)((u >> 16) | 0x40u);
    return r;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  r.bits = (unsigned short)(u >> 16);
  return r;
}
template <> __device__ __forceinline__ dcn_half dcn_store<dcn_half>(float v) {
  dcn_half r;
#ifdef __CUDA_ARCH__
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(v));
#else
  unsigned int u = dcn_float_bits(v);
  unsigned int sign = (u >> 16) & 0x8000u;
  unsigned int a = u & 0x7fffffffu;
  if (a > 0x7f800000u) { r.bits = (unsigned short)(sign | 0x7e00u); return r; }  // NaN
  if (a >= 0x477ff000u) { r.bits = (unsigned short)(sign | 0x7c00u); return r; }  // rounds to inf
  if (a < 0x38800000u) {
    // result is subnormal (or zero): scale to units of 2^-24 and round to even
    float f = dcn_bits_float(a) * 16777216.0f;  // exact: a power-of-two scale
    unsigned int m = (unsigned int)f;
    float rem = f - (float)m;
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) ++m;
    r.bits = (unsigned short)(sign | m);  // m == 0x400 is the smallest normal: still right
    return r;
  }
  unsigned int e = ((a >> 23) - 112u) << 10;
  unsigned int m = (a >> 13) & 0x3ffu;
  unsigned int rest = a & 0x1fffu;
  unsigned int h = e | m;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // carries into the exponent
  r.bits = (unsigned short)(sign | h);
#endif
  return r;
}

// True for a finite value (false for NaN and +-inf), with no math header.
__device__ __forceinline__ bool dcn_finite(float v) {
  return v >= -3.402823466e+38f && v <= 3.402823466e+38f;
}
__device__ __forceinline__ bool dcn_finite(double v) {
  return v >= -1.7976931348623157e+308 && v <= 1.7976931348623157e+308;
}

template <typename A> __device__ __forceinline__ A dcn_floor(A v);
template <> __device__ __forceinline__ float dcn_floor<float>(float v) { return floorf(v); }
template <> __device__ __forceinline__ double dcn_floor<double>(double v) { return floor(v); }

// The four pixels around (y, x) with the convolution's corner rule: a corner
// outside the image counts as 0 (docs/semantics.md section 2.4). v = {I(y0, x0),
// I(y0, x1), I(y1, x0), I(y1, x1)}; ly, lx the fractional parts. The callers
// have checked that y and x are finite and inside (-2, H) x (-2, W), so the
// conversions to integers are in range.
template <typename T, typename I, typename A>
__device__ __forceinline__ void dcn_conv_corners(const T* plane, I H, I W, A y, A x, A v[4],
                                                 A* ly, A* lx) {
  const A yf = dcn_floor(y), xf = dcn_floor(x);
  const I y0 = (I)yf, x0 = (I)xf;
  *ly = y - yf;
  *lx = x - xf;
  const bool top = y0 >= 0, bottom = y0 + 1 < H, left = x0 >= 0, right = x0 + 1 < W;
  v[0] = top && left ? dcn_load(plane[y0 * W + x0]) : (A)0;
  v[1] = top && right ? dcn_load(plane[y0 * W + x0 + 1]) : (A)0;
  v[2] = bottom && left ? dcn_load(plane[(y0 + 1) * W + x0]) : (A)0;
  v[3] = bottom && right ? dcn_load(plane[(y0 + 1) * W + x0 + 1]) : (A)0;
}

// Bilinear sample of one image plane with the convolution's rule
// (docs/semantics.md section 2.4): zero outside the open box (-1, H) x (-1, W). A NaN
// position fails every comparison, so it counts as outside; the check also
// bounds y and x before they are converted to integers.
template <typename T, typename I, typename A>
__device__ __forceinline__ A dcn_conv_bilinear(const T* plane, I H, I W, A y, A x) {
  if (!(y > (A)-1 && y < (A)H && x > (A)-1 && x < (A)W)) return (A)0;
  A v[4], ly, lx;
  dcn_conv_corners(plane, H, W, y, x, v, &ly, &lx);
  const A hy = (A)1 - ly, hx = (A)1 - lx;
  return hy * hx * v[0] + hy * lx * v[1] + ly * hx * v[2] + ly * lx * v[3];
}

// Derivatives of the convolution's bilinear sample with respect to y and x,
// with torchvision's rule (docs/semantics.md section 2.6): only the in-image corner
// rule, no open-box check, so it is nonzero for -1 <= y < H, -1 <= x < W.
template <typename T, typename I, typename A>
__device__ __forceinline__ void dcn_conv_bilinear_grad(const T* plane, I H, I W, A y, A x,
                                                        A* dy, A* dx) {
  *dy = (A)0;
  *dx = (A)0;
  if (!(y >= (A)-1 && y < (A)H && x >= (A)-1 && x < (A)W)) return;
  A v[4], ly, lx;
  dcn_conv_corners(plane, H, W, y, x, v, &ly, &lx);
  *dy = ((A)1 - lx) * (v[2] - v[0]) + lx * (v[3] - v[1]);
  *dx = ((A)1 - ly) * (v[1] - v[0]) + ly * (v[3] - v[2]);
}

// Grid-stride loop over [0, n): the launch helper picks the grid, kernels
// never assume one thread per item. The step cannot overflow the index type I:
// i advances by the stride only while n - i > stride (so i + stride < n),
// else it jumps to n and the loop ends. A plain i += stride would wrap for n
// within one stride of I's maximum (2^31 - 1 for int), e.g. n = 2^31 - 100.
#define DCN_KERNEL_LOOP(i, I, n)                                              \
  for (I i = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x,                  \
         i##_stride = (I)blockDim.x * (I)gridDim.x;                           \
       i < (n); i = ((n) - i > i##_stride) ? (I)(i + i##_stride) : (I)(n))
