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

// The bilinear footprint of one sampling position (the convolution's rule, as
// dcn_conv_bilinear): which of the four corners lie in the image, the offset
// of corner (y0, x0) in a plane, and the fractions. Computed once per (pixel,
// tap) and applied to every channel of the offset group by dcn_conv_sample,
// which gives dcn_conv_bilinear's value bit for bit (the same expression).
template <typename I, typename A> struct dcn_footprint {
  bool inside;                 // the open box (-1, H) x (-1, W); false for NaN
  bool c00, c01, c10, c11;     // corner in the image
  I at;                        // y0 * W + x0 (read only through an in-image corner)
  A ly, lx;
};

template <typename I, typename A>
__device__ __forceinline__ dcn_footprint<I, A> dcn_conv_footprint(I H, I W, A y, A x) {
  dcn_footprint<I, A> f;
  f.inside = y > (A)-1 && y < (A)H && x > (A)-1 && x < (A)W;
  f.c00 = f.c01 = f.c10 = f.c11 = false;
  f.at = 0;
  f.ly = f.lx = (A)0;
  if (!f.inside) return f;
  const A yf = dcn_floor(y), xf = dcn_floor(x);
  const I y0 = (I)yf, x0 = (I)xf;
  f.ly = y - yf;
  f.lx = x - xf;
  const bool top = y0 >= 0, bottom = y0 + 1 < H, left = x0 >= 0, right = x0 + 1 < W;
  f.c00 = top && left;
  f.c01 = top && right;
  f.c10 = bottom && left;
  f.c11 = bottom && right;
  f.at = y0 * W + x0;
  return f;
}

template <typename T, typename I, typename A>
__device__ __forceinline__ A dcn_conv_sample(const T* plane, I W, const dcn_footprint<I, A>& f) {
  if (!f.inside) return (A)0;
  const A v0 = f.c00 ? dcn_load(plane[f.at]) : (A)0;
  const A v1 = f.c01 ? dcn_load(plane[f.at + 1]) : (A)0;
  const A v2 = f.c10 ? dcn_load(plane[f.at + W]) : (A)0;
  const A v3 = f.c11 ? dcn_load(plane[f.at + W + 1]) : (A)0;
  const A hy = (A)1 - f.ly, hx = (A)1 - f.lx;
  return hy * hx * v0 + hy * f.lx * v1 + f.ly * hx * v2 + f.ly * f.lx * v3;
}

// Bilinear sample of one image plane with the convolution's rule
// (docs/semantics.md section 2.4): zero outside the open box (-1, H) x (-1, W). A NaN
// position fails every comparison, so it counts as outside; the check also
// bounds y and x before they are converted to integers.
template <typename T, typename I, typename A>
__device__ __forceinline__ A dcn_conv_bilinear(const T* plane, I H, I W, A y, A x) {
  return dcn_conv_sample(plane, W, dcn_conv_footprint(H, W, y, x));
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

// The sampling position of tap k = (i, j) for output pixel (oy, ox)
// (docs/semantics.md section 2.3); ``off`` points at that pixel in offset channel 0 of
// its image and offset group. Every convolution kernel (deform_conv.cu,
// deform_conv_igemm.cu, deform_conv_fused.cu) uses this one function, so the key
// and gather kernels of the deterministic backward see identical positions.
template <typename T, typename I, typename A>
__device__ __forceinline__ void dcn_conv_position(const T* off, I pixels, I k, I i, I j, I oy,
                                                  I ox, I stride_h, I stride_w, I pad_h,
                                                  I pad_w, I dil_h, I dil_w, A* y, A* x) {
  *y = (A)(oy * stride_h - pad_h + i * dil_h) + dcn_load(off[2 * k * pixels]);
  *x = (A)(ox * stride_w - pad_w + j * dil_w) + dcn_load(off[(2 * k + 1) * pixels]);
}

// One sample of a gathering input gradient (deform_col2im_gather,
// deform_col2im_fused_gather), seen from input pixel (yy, xx) as corner
// (cy, cx) of the cell the key kernel put it in. ``s`` numbers the tile's
// samples as deform_sample_keys does: ((bi*offset_groups + g)*taps + k)*P +
// r*Wo + ox with P = nrows*Wo; ``offset_bg`` and ``mask_bg`` (null: no mask)
// point at image b0 + bi, offset group g. Gives the tap k, the tile pixel
// p = r*Wo + ox, and the corner's bilinear weight times the mask. The
// fractions are taken against the visited cell, not a second floor(): the
// weight stays right even if the two kernels rounded the position differently.
template <typename T, typename I, typename A>
__device__ __forceinline__ A dcn_gather_weight(const T* offset_bg, const T* mask_bg, I s, I yy,
                                               I xx, I cy, I cx, I Wo, I nrows, I taps, I kw,
                                               I pixels, I oy0, I stride_h, I stride_w,
                                               I pad_h, I pad_w, I dil_h, I dil_w, I* k_out,
                                               I* p_out) {
  const I ox = s % Wo;
  const I r = (s / Wo) % nrows;
  const I k = (s / (nrows * Wo)) % taps;
  const I oy = oy0 + r;
  const I at = oy * Wo + ox;
  A y, x;
  dcn_conv_position(offset_bg + at, pixels, k, k / kw, k % kw, oy, ox, stride_h, stride_w,
                    pad_h, pad_w, dil_h, dil_w, &y, &x);
  const A ly = y - (A)(yy - cy), lx = x - (A)(xx - cx);
  A weight = (cy ? ly : (A)1 - ly) * (cx ? lx : (A)1 - lx);
  if (mask_bg) weight *= dcn_load(mask_bg[k * pixels + at]);
  *k_out = k;
  *p_out = r * Wo + ox;
  return weight;
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

// ---- block cooperation: shared memory, tensor cores, async copies ----
//
// Block-cooperative kernels declare shared memory with these macros and reach
// it by subscript (s[i]), so that the host build (host_runtime.h) can give
// each block its own copy and record every access for its race check. On the
// device they are plain __shared__ declarations.
//   DCN_SHARED(T, name, count)   a static shared array of `count` T
//   DCN_SHARED_DYNAMIC(T, name)  the dynamic shared memory (the launch's
//                                shared bytes) as an array of T
// The wrappers below are one PTX instruction each on the device and an
// emulation on the host. Fragment layouts are the PTX ISA's ("Matrix Fragments
// for mma.m16n8k16 with floating point type", "... mma.m16n8k8" for .tf32,
// "Warp-level matrix load instruction: ldmatrix"). With g = lane / 4 and
// t = lane % 4 (row-major A, column-major B, f32 C and D):
//   m16n8k16 f16/bf16: a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..],
//     a[3] = A[g+8][2t+8..]; b[0] = B[2t..2t+1][g], b[1] = B[2t+8..][g] (two 16-bit
//     values per register, the lower column/row in the low half)
//   m16n8k8 tf32: a[0] = A[g][t], a[1] = A[g+8][t], a[2] = A[g][t+4], a[3] = A[g+8][t+4];
//     b[0] = B[t][g], b[1] = B[t+4][g]
//   c, d: [0] = C[g][2t], [1] = C[g][2t+1], [2] = C[g+8][2t], [3] = C[g+8][2t+1]
// Products of the rounded inputs are exact and accumulated in f32.
#ifdef __CUDA_ARCH__
#define DCN_SHARED(T, name, count) __shared__ T name[count]
#define DCN_SHARED_DYNAMIC(T, name)                                  \
  extern __shared__ __align__(16) unsigned char dcn_dynamic_shared_[]; \
  T* name = reinterpret_cast<T*>(dcn_dynamic_shared_)
typedef long long dcn_shared_index;  // a subscript of a shared array
#define DCN_CALLER
#define DCN_CALLER_ARGS
#else
#define DCN_SHARED(T, name, count)                                            \
  static char dcn_shared_site_##name;                                         \
  dcn_shared_array<T> name =                                                  \
      dcn_host_shared_static<T>(&dcn_shared_site_##name, #name, (count), __FILE__, __LINE__)
#define DCN_SHARED_DYNAMIC(T, name) \
  dcn_shared_array<T> name = dcn_host_shared_dynamic<T>(__FILE__, __LINE__)
typedef dcn_host_index dcn_shared_index;  // carries the subscript's file:line
#define DCN_CALLER , const char* dcn_file = __builtin_FILE(), int dcn_line = __builtin_LINE()
#define DCN_CALLER_ARGS dcn_file, dcn_line
#endif

#ifdef __CUDA_ARCH__
__device__ __forceinline__ unsigned int dcn_shared_address(const void* p) {
  unsigned int a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}
#endif

// d = a * b + c, m16n8k16, f16 inputs (two per 32-bit register), f32 accumulate.
__device__ __forceinline__ void dcn_mma_m16n8k16_f16(float* d, const unsigned int* a,
                                                     const unsigned int* b,
                                                     const float* c DCN_CALLER) {
#ifdef __CUDA_ARCH__
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%10,%11,%12,%13};"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
        "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#else
  dcn_host_mma<0>(d, a, b, c, DCN_CALLER_ARGS);
#endif
}

// d = a * b + c, m16n8k16, bf16 inputs (two per 32-bit register), f32 accumulate.
__device__ __forceinline__ void dcn_mma_m16n8k16_bf16(float* d, const unsigned int* a,
                                                      const unsigned int* b,
                                                      const float* c DCN_CALLER) {
#ifdef __CUDA_ARCH__
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%10,%11,%12,%13};"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
        "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#else
  dcn_host_mma<1>(d, a, b, c, DCN_CALLER_ARGS);
#endif
}

// d = a * b + c, m16n8k8, tf32 inputs (f32 bit patterns; the hardware reads the
// top 19 bits: round with dcn_to_tf32 first), f32 accumulate.
__device__ __forceinline__ void dcn_mma_m16n8k8_tf32(float* d, const unsigned int* a,
                                                     const unsigned int* b,
                                                     const float* c DCN_CALLER) {
#ifdef __CUDA_ARCH__
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%10,%11,%12,%13};"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
        "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#else
  dcn_host_mma<2>(d, a, b, c, DCN_CALLER_ARGS);
#endif
}

// f32 -> tf32 (cvt.rna: to nearest, ties away from zero), as an f32 value.
__device__ __forceinline__ float dcn_to_tf32(float v) {
#ifdef __CUDA_ARCH__
  unsigned int r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
  return __uint_as_float(r);
#else
  return dcn_host_to_tf32(v);
#endif
}

// ldmatrix.sync.aligned.m8n8.x{Count}[.trans].shared.b16: lanes 8m..8m+7 give the
// rows of 8x8 matrix m (&s[i], 16 bytes each, 16-byte aligned); lane l receives
// in r[m] the elements (l/4, 2(l%4)) and (l/4, 2(l%4)+1) of matrix m, or with
// Trans the elements (2(l%4), l/4) and (2(l%4)+1, l/4).
template <int Count, bool Trans, typename S>
__device__ __forceinline__ void dcn_ldmatrix(unsigned int* r, S& s, dcn_shared_index i) {
  static_assert(Count == 1 || Count == 2 || Count == 4, "ldmatrix loads 1, 2 or 4 matrices");
#ifdef __CUDA_ARCH__
  const unsigned int a = dcn_shared_address(&s[i]);
  if constexpr (Count == 1 && !Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(a));
  if constexpr (Count == 1 && Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];"
                 : "=r"(r[0]) : "r"(a));
  if constexpr (Count == 2 && !Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(a));
  if constexpr (Count == 2 && Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(a));
  if constexpr (Count == 4 && !Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  if constexpr (Count == 4 && Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
#else
  dcn_host_ldmatrix<Count, Trans>(r, s, i);
#endif
}

// cp.async.ca.shared.global: copy Bytes (4, 8 or 16, both addresses aligned to
// it) from global src to &s[i], asynchronously: the data is there only after
// the dcn_cp_async_wait that covers the copy's group (and, for other threads,
// a barrier after it).
template <int Bytes, typename S>
__device__ __forceinline__ void dcn_cp_async(S& s, dcn_shared_index i, const void* src) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
#ifdef __CUDA_ARCH__
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2;"
               :: "r"(dcn_shared_address(&s[i])), "l"(src), "n"(Bytes) : "memory");
#else
  dcn_host_cp_async<Bytes>(s, i, src);
#endif
}

// cp.async.commit_group: the copies issued since the last commit form a group.
__device__ __forceinline__ void dcn_cp_async_commit() {
#ifdef __CUDA_ARCH__
  asm volatile("cp.async.commit_group;" ::: "memory");
#else
  dcn_host_cp_async_commit();
#endif
}

// cp.async.wait_group Pending: wait until at most Pending committed groups
// (the newest) are still in flight.
template <int Pending> __device__ __forceinline__ void dcn_cp_async_wait() {
#ifdef __CUDA_ARCH__
  asm volatile("cp.async.wait_group %0;" :: "n"(Pending) : "memory");
#else
  dcn_host_cp_async_wait(Pending);
#endif
}
