// deform_conv_igemm.cu: deformable convolution as implicit GEMMs on tensor cores
// (docs/semantics.md sections 2.3-2.6), with no columns buffer: the forward and both
// halves of the backward.
//
// Notation, per weight group gi: M = B*Ho*Wo output pixels, N = Cout/groups output
// channels, K = kh*kw*(C/groups) ordered tap-major (k = tap*Cg + c); S[m, k] = mask *
// bilinear(input) is the deformed sample of channel c at tap `tap` for pixel m (the
// im2col column). Every kernel is the same 64 x 64 output tile, 128 threads (4 warps,
// 2 x 2, warp w its 32 x 32 quarter: rows 32 (w % 2), columns 32 (w / 2), as 2 x 4 m16n8
// fragments; the weight gradient's tile is 128 rows, 8 warps), multiplying a_tile (64
// rows x 16) by b_tile (64 columns x 16) in steps of 16 along the reduction (`multiply`
// below):
// - float16 / bfloat16: mma.sync m16n8k16 on the storage type (fragments by ldmatrix),
//   f32 accumulation (operands rounded to the storage type once, in shared memory);
// - float32 with tf32 != 0 (forward only, the opt-in `implicit_gemm_tf32`): mma.sync
//   m16n8k8 on operands rounded to tf32, f32 accumulation;
// - float32, float64 (and every type before sm_80, which lacks these instructions):
//   SIMT FMAs in the accumulation type on the same fragment layout.
// Where a tile's K side is `taps` x `channels`, it is 4 chunks of 16 channels of one tap
// (channels past C/groups are zeros: K padded per tap to Cgp = 16 ceil(Cg / 16)).
//
// deform_conv_igemm (forward): out[m, n] = bias[n] + sum_k S[m, k] W[n, k]. Grid
// (ceil(M/64), ceil(N/64), groups). The K loop runs over taps, then chunks of 16
// channels; B (the weight, permuted by the caller to (Cout, kh, kw, C/groups)) is
// staged with cp.async, A built by the block: thread t owns pixel t % 64 and 8 channels
// (t / 64) of the chunk, computes its pixel's sampling position, corners and bilinear
// weights once per tap (again only when the offset group changes) and reuses them for
// every channel. The epilogue adds the bias and writes NCHW directly.
//
// deform_conv_igemm_grad_weight: grad_W[n, k] = sum_m grad_out[n, m] S[m, k], the
// reduction over pixels split across blocks. Its tile is 128 output channels x 64 k
// (256 threads, 8 warps, 4 x 2): S is re-made per tile of output channels, so the
// taller tile halves that work. Grid (ceil(Kp/64) * splits, ceil(N/128), groups),
// Kp = taps*Cgp: block x covers K tile x % ktiles and the pixels
// [split * per_split, (split + 1) * per_split), split = x / ktiles. Per step of 16
// pixels, a_tile[n][p] = grad_out (thread t: row t / 2, pixels 8 (t % 2) + [0, 8)) and
// b_tile[k][p] = S[p, k], built as the forward builds A (thread t: pixel t % 16, 4
// channels of chunk (t / 16) / 4). The epilogue adds the tile to grad_W (the
// accumulation type, (Cout, kh, kw, C/groups)) with atomics: memory independent of B.
//
// deform_conv_igemm_grad_data: per tile of 64 pixels x 64 k, grad_S[m, k] = sum_n
// grad_out[n, m] W[n, k] (a_tile[m][n] = grad_out^T, thread t: pixel t % 64, 8 channels
// (t / 64); b_tile[k][n] = the weight permuted to (groups, kh, kw, C/groups, Cout/groups),
// staged with cp.async), reduced over N; grid (ceil(M/64) * ceil(Kp/64), 1, groups), the
// K tile fastest. The epilogue never writes grad_S: it stages one half (32 columns) of
// the tile at a time in shared memory, and thread t takes pixel t % 64 and one chunk of
// 16 channels of one tap: it computes the sampling position, corner indices and bilinear
// weights once per (pixel, tap, offset group), scatters grad * mask * corner weight into
// grad_input with float atomics in the accumulation type (as deform_conv_fused.cu), and
// sums grad * d(bilinear)/dy, /dx and grad * bilinear over the chunk's channels, added
// (times the mask for the offset) with atomics to accumulation-type buffers of the
// offset and mask gradients (the caller converts them to the dtype).
// Integers are the index type I.

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define DCN_IGEMM_SM80 0  // no mma.m16n8k16 / cp.async / tf32: SIMT and plain copies
#else
#define DCN_IGEMM_SM80 1
#endif

// Fixed-count loops over fragments are unrolled, so that acc[][][] stays in registers.
#ifdef __CUDA_ARCH__
#define DCN_UNROLL _Pragma("unroll")
#else
#define DCN_UNROLL
#endif

namespace dcn_igemm {
constexpr int BM = 64, BN = 64, BK = 16;  // 128 threads (4 warps) per block
constexpr int LDS = BK + 8;  // shared row stride: 16-byte rows, fewer bank conflicts
constexpr int GLD = 32 + 1;  // row stride of the data gradient's staged half tile
// __launch_bounds__(128, 3 for the half types, else 1): the register budget with no
// spills (nvcc --resource-usage, sm_80 and sm_90): at most 170 registers for the half
// types (3+ blocks of 4 warps per SM), up to 255 for the float32/float64 SIMT tile. The
// weight gradient's 256 threads: (256, 1), up to 255 (its 64-bit half builds need 130).
template <typename T> struct is_half { static constexpr bool value = false; };
template <> struct is_half<dcn_half> { static constexpr bool value = true; };
template <> struct is_half<dcn_bfloat16> { static constexpr bool value = true; };
template <typename T> struct is_float { static constexpr bool value = false; };
template <> struct is_float<float> { static constexpr bool value = true; };

template <typename T>
__device__ __forceinline__ void mma16(float* d, const unsigned int* a, const unsigned int* b);
template <>
__device__ __forceinline__ void mma16<dcn_half>(float* d, const unsigned int* a,
                                                const unsigned int* b) {
  dcn_mma_m16n8k16_f16(d, a, b, d);
}
template <>
__device__ __forceinline__ void mma16<dcn_bfloat16>(float* d, const unsigned int* a,
                                                    const unsigned int* b) {
  dcn_mma_m16n8k16_bf16(d, a, b, d);
}

// The convolution's geometry, as every kernel of this file receives it.
template <typename I> struct Geometry {
  I C, H, W, kw, taps, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, Ho, Wo, offset_groups;
};

// One sample (pixel, tap, offset group): corners (offsets into a plane, -1 outside the
// image), bilinear weights {hy hx, hy lx, ly hx, ly lx}, the mask, and the two boxes:
// `inside` the forward's open box (docs/semantics.md section 2.4), `touch` the
// gradient's closed box (section 2.6). A NaN position fails both.
template <typename I, typename A> struct Tap {
  I corner[4];
  A wgt[4];
  A ly, lx, msk;
  bool inside, touch;
};

// The Tap of output pixel (b, oy, ox) (pp = oy*Wo + ox), tap `tap`, offset group og.
template <typename T, typename I, typename A>
__device__ __forceinline__ void tap_at(Tap<I, A>& s, const Geometry<I>& geo,
                                       const T* __restrict__ offset, const T* __restrict__ mask,
                                       I b, I og, I tap, I oy, I ox) {
  const I pixels = geo.Ho * geo.Wo, pp = oy * geo.Wo + ox;
  const T* off = offset + (b * geo.offset_groups + og) * 2 * geo.taps * pixels + pp;
  A y, x;
  dcn_conv_position(off, pixels, tap, tap / geo.kw, tap % geo.kw, oy, ox, geo.stride_h,
                    geo.stride_w, geo.pad_h, geo.pad_w, geo.dil_h, geo.dil_w, &y, &x);
  s.msk = mask ? dcn_load(mask[((b * geo.offset_groups + og) * geo.taps + tap) * pixels + pp])
               : (A)1;
  const I H = geo.H, W = geo.W;
  s.touch = y >= (A)-1 && y < (A)H && x >= (A)-1 && x < (A)W;
  s.inside = s.touch && y > (A)-1 && x > (A)-1;
  if (s.touch) {
    const A yf = dcn_floor(y), xf = dcn_floor(x);
    const I y0 = (I)yf, x0 = (I)xf;
    s.ly = y - yf;
    s.lx = x - xf;
    const A hy = (A)1 - s.ly, hx = (A)1 - s.lx;
    const bool top = y0 >= 0, bottom = y0 + 1 < H, left = x0 >= 0, right = x0 + 1 < W;
    s.corner[0] = top && left ? y0 * W + x0 : (I)-1;
    s.corner[1] = top && right ? y0 * W + x0 + 1 : (I)-1;
    s.corner[2] = bottom && left ? (y0 + 1) * W + x0 : (I)-1;
    s.corner[3] = bottom && right ? (y0 + 1) * W + x0 + 1 : (I)-1;
    s.wgt[0] = hy * hx;
    s.wgt[1] = hy * s.lx;
    s.wgt[2] = s.ly * hx;
    s.wgt[3] = s.ly * s.lx;
  }
}

// The four corners of plane `plane` at the Tap (zeros outside the image).
template <typename T, typename I, typename A>
__device__ __forceinline__ void corners(const Tap<I, A>& s, const T* __restrict__ plane,
                                        A v[4]) {
  DCN_UNROLL
  for (int q = 0; q < 4; ++q) v[q] = s.corner[q] >= 0 ? dcn_load(plane[s.corner[q]]) : (A)0;
}

// mask * bilinear sample of `plane` at the Tap: the im2col column's value. The mask
// multiplies after the sample, as im2col does: a NaN mask propagates.
template <typename T, typename I, typename A>
__device__ __forceinline__ A sample(const Tap<I, A>& s, const T* __restrict__ plane) {
  A v = (A)0;
  if (s.inside) {
    A c[4];
    corners(s, plane, c);
    v = s.wgt[0] * c[0] + s.wgt[1] * c[1] + s.wgt[2] * c[2] + s.wgt[3] * c[3];
  }
  return v * s.msk;
}

// Stage 8 values of one row of a tile: tile[row][col .. col+8) = src[0 .. 8), element
// e only where `valid` and e < left (else zero); 16-byte cp.async copies for the half
// types when `vec16` (16-byte aligned rows) and the 8 values are all there, element
// copies (cp.async for float32 / float64) otherwise. The caller commits and waits.
template <typename T, typename S, typename I>
__device__ __forceinline__ void stage_row(S& tile, int row, int col, const T* __restrict__ src,
                                          bool valid, I left, bool vec16) {
  typedef typename dcn_acc<T>::type A;
  constexpr bool kAsync = DCN_IGEMM_SM80 != 0;
  if constexpr (sizeof(T) == 2) {
    bool copied = false;
    if constexpr (kAsync) {
      if (vec16 && valid && left >= 8) {
        dcn_cp_async<16>(tile, row * LDS + col, src);
        copied = true;
      }
    }
    if (!copied) {
      for (int e = 0; e < 8; ++e)
        tile[row * LDS + col + e] = valid && e < left ? src[e] : dcn_store<T>((A)0);
    }
  } else {
    for (int e = 0; e < 8; ++e) {
      const bool in = valid && e < left;
      if constexpr (kAsync) {
        if (in) dcn_cp_async<(int)sizeof(T)>(tile, row * LDS + col + e, src + e);
        else tile[row * LDS + col + e] = (T)0;
      } else {
        tile[row * LDS + col + e] = in ? src[e] : (T)0;
      }
    }
  }
}

// acc[mi][ni] += a_tile[rows][0..16) . b_tile[columns][0..16) for this warp's quarter
// (rows wm + 16 mi + ..., columns wn + 8 ni + ...): the fragment layouts of common.cuh.
template <typename T, typename SA, typename SB, typename A>
__device__ __forceinline__ void multiply(A (&acc)[2][4][4], SA& a_tile, SB& b_tile, int wm,
                                         int wn, int lane, bool use_tf32) {
  constexpr bool kHalfMma = is_half<T>::value && DCN_IGEMM_SM80;
  constexpr bool kTf32 = is_float<T>::value && DCN_IGEMM_SM80;
  const int g = lane / 4, t = lane % 4;
  if constexpr (kHalfMma) {
    unsigned int a[2][4], b[4][2];
    DCN_UNROLL
    for (int mi = 0; mi < 2; ++mi)  // rows 0-15 at k 0 (lanes 0-15), at k 8 (lanes 16-31)
      dcn_ldmatrix<4, false>(a[mi], a_tile,
                             (wm + 16 * mi + lane % 16) * LDS + (lane / 16) * 8);
    DCN_UNROLL
    for (int pair = 0; pair < 2; ++pair) {  // n 0-7 at k 0, k 8; n 8-15 at k 0, k 8
      unsigned int r[4];
      const int q = lane / 8;
      dcn_ldmatrix<4, false>(r, b_tile,
                             (wn + 16 * pair + (q / 2) * 8 + lane % 8) * LDS + (q % 2) * 8);
      b[2 * pair][0] = r[0];
      b[2 * pair][1] = r[1];
      b[2 * pair + 1][0] = r[2];
      b[2 * pair + 1][1] = r[3];
    }
    DCN_UNROLL
    for (int mi = 0; mi < 2; ++mi)
      DCN_UNROLL
      for (int ni = 0; ni < 4; ++ni) mma16<T>(acc[mi][ni], a[mi], b[ni]);
  } else {
    bool done = false;
    if constexpr (kTf32) {
      if (use_tf32) {
        DCN_UNROLL
        for (int kk = 0; kk < BK; kk += 8) {
          unsigned int a[2][4], b[4][2];
          DCN_UNROLL
          for (int mi = 0; mi < 2; ++mi) {
            const int row = wm + 16 * mi + g;
            a[mi][0] = dcn_float_bits((float)a_tile[row * LDS + kk + t]);
            a[mi][1] = dcn_float_bits((float)a_tile[(row + 8) * LDS + kk + t]);
            a[mi][2] = dcn_float_bits((float)a_tile[row * LDS + kk + t + 4]);
            a[mi][3] = dcn_float_bits((float)a_tile[(row + 8) * LDS + kk + t + 4]);
          }
          DCN_UNROLL
          for (int ni = 0; ni < 4; ++ni) {
            const int col = wn + 8 * ni + g;
            b[ni][0] = dcn_float_bits(dcn_to_tf32((float)b_tile[col * LDS + kk + t]));
            b[ni][1] = dcn_float_bits(dcn_to_tf32((float)b_tile[col * LDS + kk + t + 4]));
          }
          DCN_UNROLL
          for (int mi = 0; mi < 2; ++mi)
            DCN_UNROLL
            for (int ni = 0; ni < 4; ++ni)
              dcn_mma_m16n8k8_tf32(acc[mi][ni], a[mi], b[ni], acc[mi][ni]);
        }
        done = true;
      }
    }
    if (!done) {  // SIMT on the fragment layout: rows g, g+8; columns 2t, 2t+1
      DCN_UNROLL
      for (int k = 0; k < BK; ++k) {
        A av[2][2], bv[4][2];
        DCN_UNROLL
        for (int mi = 0; mi < 2; ++mi)
          DCN_UNROLL
          for (int h = 0; h < 2; ++h)
            av[mi][h] = dcn_load((T)a_tile[(wm + 16 * mi + g + 8 * h) * LDS + k]);
        DCN_UNROLL
        for (int ni = 0; ni < 4; ++ni)
          DCN_UNROLL
          for (int h = 0; h < 2; ++h)
            bv[ni][h] = dcn_load((T)b_tile[(wn + 8 * ni + 2 * t + h) * LDS + k]);
        DCN_UNROLL
        for (int mi = 0; mi < 2; ++mi)
          DCN_UNROLL
          for (int ni = 0; ni < 4; ++ni) {
            acc[mi][ni][0] += av[mi][0] * bv[ni][0];
            acc[mi][ni][1] += av[mi][0] * bv[ni][1];
            acc[mi][ni][2] += av[mi][1] * bv[ni][0];
            acc[mi][ni][3] += av[mi][1] * bv[ni][1];
          }
      }
    }
  }
}

template <typename A> __device__ __forceinline__ void zero(A (&acc)[2][4][4]) {
  DCN_UNROLL
  for (int i = 0; i < 2; ++i)
    DCN_UNROLL
    for (int j = 0; j < 4; ++j)
      DCN_UNROLL
      for (int r = 0; r < 4; ++r) acc[i][j][r] = (A)0;
}

// Where column `kcol` of a K tile starting at k0 (padded tap-major, Cgp channels per
// tap) lies: its tap and channel; valid when both are in range.
template <typename I> struct KIndex {
  I tap, c;
  bool valid;
};
template <typename I>
__device__ __forceinline__ KIndex<I> k_index(I k0, int kcol, I Cgp, I Cg, I taps) {
  const I k = k0 + kcol;
  KIndex<I> r;
  r.tap = k / Cgp;
  r.c = k - r.tap * Cgp;
  r.valid = r.tap < taps && r.c < Cg;
  return r;
}

// Adds one (pixel, tap, offset group)'s sums over channels to the offset gradient (times
// the mask) and the mask gradient, accumulation-type buffers shaped as offset and mask;
// o = (b * offset_groups + og) * taps + tap, p the pixel in its image.
template <typename I, typename A>
__device__ __forceinline__ void add_coord(A* grad_offset, A* grad_mask, I o, I pixels, I p,
                                          A msk, A dy, A dx, A dm) {
  if (grad_offset) {
    atomicAdd(grad_offset + (2 * o) * pixels + p, dy * msk);
    atomicAdd(grad_offset + (2 * o + 1) * pixels + p, dx * msk);
  }
  if (grad_mask) atomicAdd(grad_mask + o * pixels + p, dm);
}
}  // namespace dcn_igemm

template <typename T, typename I>
__global__ void __launch_bounds__(128, dcn_igemm::is_half<T>::value ? 3 : 1)
deform_conv_igemm(const T* __restrict__ input, const T* __restrict__ offset,
                  const T* __restrict__ mask, const T* __restrict__ weight,
                  const T* __restrict__ bias, T* __restrict__ out, I B, I C, I H, I W,
                  I Cout, I groups, I kh, I kw, I stride_h, I stride_w, I pad_h, I pad_w,
                  I dil_h, I dil_w, I Ho, I Wo, I offset_groups, I tf32) {
  using namespace dcn_igemm;
  typedef typename dcn_acc<T>::type A;
  constexpr bool kTf32 = is_float<T>::value && DCN_IGEMM_SM80;
  constexpr bool kAsync = DCN_IGEMM_SM80 != 0;
  DCN_SHARED(T, a_tile, BM * LDS);  // A[m][k]: 64 pixels x 16 k
  DCN_SHARED(T, b_tile, BN * LDS);  // B[n][k]: 64 output channels x 16 k
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int wm = 32 * (warp % 2), wn = 32 * (warp / 2);
  const I taps = kh * kw;
  const Geometry<I> geo = {C, H, W, kw, taps, stride_h, stride_w, pad_h, pad_w,
                           dil_h, dil_w, Ho, Wo, offset_groups};
  const I pixels = Ho * Wo, M = B * pixels;
  const I Cg = C / groups, Coutg = Cout / groups;
  const I Kg = taps * Cg;  // the weight's row length
  const I cpg = C / offset_groups;  // channels per offset group
  const I gi = (I)blockIdx.z;
  const I m0 = (I)blockIdx.x * BM, n0 = (I)blockIdx.y * BN;
  const bool use_tf32 = kTf32 && tf32 != 0;

  // This thread's pixel of the A tile and its 8 channels of each chunk.
  const int am = tid % BM, ac = (tid / BM) * 8;
  const I pm = m0 + am;
  const bool pm_valid = pm < M;
  const I pb = pm_valid ? pm / pixels : 0, pp = pm_valid ? pm % pixels : 0;
  const I poy = pp / Wo, pox = pp % Wo;
  // Staging B: 64 rows of 16 k; thread t copies row t / 2, k (t % 2) * 8 + [0, 8).
  const int bn = tid / 2, bk = (tid % 2) * 8;
  const I wrow = n0 + bn;
  const bool wrow_valid = wrow < Coutg;
  const T* wptr = weight + (gi * Coutg + (wrow_valid ? wrow : 0)) * Kg;
  // 16-byte copies of 8 half values need 16-byte aligned rows.
  const bool vec16 = (Kg % 8 == 0) && (((unsigned long long)weight & 15ull) == 0);

  A acc[2][4][4];
  zero(acc);

  for (I tap = 0; tap < taps; ++tap) {
    I cached_og = -1;
    Tap<I, A> s;
    for (I c0 = 0; c0 < Cg; c0 += BK) {
      // ---- B: the weight chunk (n0..n0+64, tap, c0..c0+16) -> b_tile[n][k]
      stage_row(b_tile, bn, bk, wptr + tap * Cg + c0 + bk, wrow_valid, Cg - (c0 + bk), vec16);
      if constexpr (kAsync) dcn_cp_async_commit();
      // ---- A: mask * bilinear(input) for this thread's pixel and 8 channels
      for (int e = 0; e < 8; ++e) {
        const I c = c0 + ac + e;
        A v = (A)0;
        if (pm_valid && c < Cg) {
          const I cin = gi * Cg + c;
          const I og = cin / cpg;
          if (og != cached_og) {  // the sampling position of (pixel, tap, offset group)
            cached_og = og;
            tap_at(s, geo, offset, mask, pb, og, tap, poy, pox);
          }
          v = sample(s, input + (pb * C + cin) * H * W);
        }
        if constexpr (kTf32) {
          if (use_tf32) v = dcn_to_tf32(v);
        }
        a_tile[am * LDS + ac + e] = dcn_store<T>(v);
      }
      if constexpr (kAsync) dcn_cp_async_wait<0>();  // [mutation: wait]
      __syncthreads();  // [mutation: tiles landed]
      multiply<T>(acc, a_tile, b_tile, wm, wn, lane, use_tf32);
      __syncthreads();  // [mutation: tiles consumed]
    }
  }

  // ---- epilogue: bias, NCHW store
  DCN_UNROLL
  for (int mi = 0; mi < 2; ++mi) {
    DCN_UNROLL
    for (int h = 0; h < 2; ++h) {
      const I m = m0 + wm + 16 * mi + g + 8 * h;
      if (m >= M) continue;
      const I b = m / pixels, p = m % pixels;
      DCN_UNROLL
      for (int ni = 0; ni < 4; ++ni) {
        DCN_UNROLL
        for (int e = 0; e < 2; ++e) {
          const I n = n0 + wn + 8 * ni + 2 * t + e;
          if (n >= Coutg) continue;
          const I o = gi * Coutg + n;
          A v = acc[mi][ni][2 * h + e];
          if (bias) v += dcn_load(bias[o]);
          out[(b * Cout + o) * pixels + p] = dcn_store<T>(v);
        }
      }
    }
  }
}

template <typename T, typename I>
__global__ void __launch_bounds__(2 * 128, 1)
deform_conv_igemm_grad_weight(const T* __restrict__ grad_out, const T* __restrict__ input,
                              const T* __restrict__ offset, const T* __restrict__ mask,
                              typename dcn_acc<T>::type* __restrict__ grad_weight, I B, I C,
                              I H, I W, I Cout, I groups, I kh, I kw, I stride_h, I stride_w,
                              I pad_h, I pad_w, I dil_h, I dil_w, I Ho, I Wo, I offset_groups,
                              I Cgp, I per_split) {
  using namespace dcn_igemm;
  typedef typename dcn_acc<T>::type A;
  DCN_SHARED(T, a_tile, 2 * BM * LDS);  // grad_out[n][p]: 128 output channels x 16 pixels
  DCN_SHARED(T, b_tile, BN * LDS);  // S[k][p]: 64 k x 16 pixels
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int wm = 32 * (warp % 4), wn = 32 * (warp / 4);  // 8 warps, 4 x 2
  const I taps = kh * kw;
  const Geometry<I> geo = {C, H, W, kw, taps, stride_h, stride_w, pad_h, pad_w,
                           dil_h, dil_w, Ho, Wo, offset_groups};
  const I pixels = Ho * Wo, M = B * pixels;
  const I Cg = C / groups, Coutg = Cout / groups, Kg = taps * Cg;
  const I cpg = C / offset_groups;
  const I ktiles = (taps * Cgp + BN - 1) / BN;
  const I gi = (I)blockIdx.z;
  const I k0 = ((I)blockIdx.x % ktiles) * BN, n0 = (I)blockIdx.y * 2 * BM;
  const I p_begin = ((I)blockIdx.x / ktiles) * per_split;
  const I p_end = M - p_begin < per_split ? M : p_begin + per_split;

  // grad_out rows: thread t loads row t / 2, pixels 8 (t % 2) + [0, 8) of a step.
  const int an = tid / 2, ap = (tid % 2) * 8;
  const I arow = n0 + an;
  const bool arow_valid = arow < Coutg;
  const I ochannel = gi * Coutg + (arow_valid ? arow : 0);
  // Samples: thread t builds pixel t % 16 of 4 k columns (t / 16) * 4 + [0, 4), all in
  // one chunk of 16 channels of one tap.
  const int bp = tid % BK, bkc = (tid / BK) * 4;
  const KIndex<I> kb = k_index(k0, bkc, Cgp, Cg, taps);

  A acc[2][4][4];
  zero(acc);

  for (I p0 = p_begin; p0 < p_end; p0 += BK) {
    // ---- A: grad_out[n0 + an][p0 + ap .. + 8]
    {
      I m = p0 + ap;
      I b = m / pixels, pp = m - b * pixels;
      for (int e = 0; e < 8; ++e, ++m, ++pp) {
        if (pp == pixels) {
          pp = 0;
          ++b;
        }
        a_tile[an * LDS + ap + e] = arow_valid && m < p_end
                                        ? grad_out[(b * Cout + ochannel) * pixels + pp]
                                        : dcn_store<T>((A)0);
      }
    }
    // ---- B: S[p0 + bp][k0 + bkc .. + 4], the forward's A values
    {
      const I m = p0 + bp;
      const bool valid = kb.valid && m < p_end;
      const I b = valid ? m / pixels : 0, pp = valid ? m % pixels : 0;
      const I oy = pp / Wo, ox = pp % Wo;
      I cached_og = -1;
      Tap<I, A> s;
      for (int e = 0; e < 4; ++e) {
        const I c = kb.c + e;
        A v = (A)0;
        if (valid && c < Cg) {
          const I cin = gi * Cg + c;
          const I og = cin / cpg;
          if (og != cached_og) {
            cached_og = og;
            tap_at(s, geo, offset, mask, b, og, kb.tap, oy, ox);
          }
          v = sample(s, input + (b * C + cin) * H * W);
        }
        b_tile[(bkc + e) * LDS + bp] = dcn_store<T>(v);
      }
    }
    __syncthreads();  // [mutation: weight tiles landed]
    multiply<T>(acc, a_tile, b_tile, wm, wn, lane, false);
    __syncthreads();  // [mutation: weight tiles consumed]
  }

  // ---- epilogue: add the tile to grad_weight (Cout, kh, kw, C/groups)
  DCN_UNROLL
  for (int mi = 0; mi < 2; ++mi) {
    DCN_UNROLL
    for (int h = 0; h < 2; ++h) {
      const I n = n0 + wm + 16 * mi + g + 8 * h;
      if (n >= Coutg) continue;
      DCN_UNROLL
      for (int ni = 0; ni < 4; ++ni) {
        DCN_UNROLL
        for (int e = 0; e < 2; ++e) {
          const KIndex<I> k = k_index(k0, wn + 8 * ni + 2 * t + e, Cgp, Cg, taps);
          if (k.valid)
            atomicAdd(grad_weight + (gi * Coutg + n) * Kg + k.tap * Cg + k.c,
                      acc[mi][ni][2 * h + e]);
        }
      }
    }
  }
}

template <typename T, typename I>
__global__ void __launch_bounds__(128, dcn_igemm::is_half<T>::value ? 3 : 1)
deform_conv_igemm_grad_data(const T* __restrict__ grad_out, const T* __restrict__ input,
                            const T* __restrict__ offset, const T* __restrict__ mask,
                            const T* __restrict__ weight_t,
                            typename dcn_acc<T>::type* __restrict__ grad_input,
                            typename dcn_acc<T>::type* __restrict__ grad_offset,
                            typename dcn_acc<T>::type* __restrict__ grad_mask, I B, I C, I H,
                            I W, I Cout, I groups, I kh, I kw, I stride_h, I stride_w, I pad_h,
                            I pad_w, I dil_h, I dil_w, I Ho, I Wo, I offset_groups, I Cgp) {
  using namespace dcn_igemm;
  typedef typename dcn_acc<T>::type A;
  constexpr bool kAsync = DCN_IGEMM_SM80 != 0;
  DCN_SHARED(T, a_tile, BM * LDS);  // grad_out^T[p][n]: 64 pixels x 16 output channels
  DCN_SHARED(T, b_tile, BN * LDS);  // W^T[k][n]: 64 k x 16 output channels
  DCN_SHARED(A, g_tile, BM * GLD);  // grad_S[p][k] of 32 k columns, one half at a time
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int wm = 32 * (warp % 2), wn = 32 * (warp / 2);
  const I taps = kh * kw;
  const Geometry<I> geo = {C, H, W, kw, taps, stride_h, stride_w, pad_h, pad_w,
                           dil_h, dil_w, Ho, Wo, offset_groups};
  const I pixels = Ho * Wo, M = B * pixels;
  const I Cg = C / groups, Coutg = Cout / groups, Kg = taps * Cg;
  const I cpg = C / offset_groups;
  const I ktiles = (taps * Cgp + BN - 1) / BN;
  const I gi = (I)blockIdx.z;
  const I m0 = ((I)blockIdx.x / ktiles) * BM, k0 = ((I)blockIdx.x % ktiles) * BN;

  // grad_out^T: thread t loads pixel t % 64, output channels 8 (t / 64) + [0, 8).
  const int am = tid % BM, an = (tid / BM) * 8;
  const I pm = m0 + am;
  const bool pm_valid = pm < M;
  const I pb = pm_valid ? pm / pixels : 0, pp = pm_valid ? pm % pixels : 0;
  const T* go = grad_out + (pb * Cout + gi * Coutg) * pixels + pp;
  // W^T: thread t copies k row t / 2, output channels 8 (t % 2) + [0, 8).
  const int bk = tid / 2, bn = (tid % 2) * 8;
  const KIndex<I> kb = k_index(k0, bk, Cgp, Cg, taps);
  const T* wptr = weight_t + (gi * Kg + (kb.valid ? kb.tap * Cg + kb.c : 0)) * Coutg;
  const bool vec16 = (Coutg % 8 == 0) && (((unsigned long long)weight_t & 15ull) == 0);

  A acc[2][4][4];
  zero(acc);

  for (I n0 = 0; n0 < Coutg; n0 += BK) {
    stage_row(b_tile, bk, bn, wptr + n0 + bn, kb.valid, Coutg - (n0 + bn), vec16);
    if constexpr (kAsync) dcn_cp_async_commit();
    for (int e = 0; e < 8; ++e) {
      const I n = n0 + an + e;
      a_tile[am * LDS + an + e] =
          pm_valid && n < Coutg ? go[n * pixels] : dcn_store<T>((A)0);
    }
    if constexpr (kAsync) dcn_cp_async_wait<0>();  // [mutation: data wait]
    __syncthreads();  // [mutation: data tiles landed]
    multiply<T>(acc, a_tile, b_tile, wm, wn, lane, false);
    __syncthreads();  // [mutation: data tiles consumed]
  }

  // ---- epilogue, one half of the columns (two chunks) at a time: thread t takes
  // pixel t % 64 and chunk t / 64 of the half.
  const int ep = tid % BM, eq = tid / BM;
  const bool coord = grad_offset || grad_mask;
  for (int half = 0; half < 2; ++half) {
    if (wn == 32 * half) {
      DCN_UNROLL
      for (int mi = 0; mi < 2; ++mi)
        DCN_UNROLL
        for (int h = 0; h < 2; ++h)
          DCN_UNROLL
          for (int ni = 0; ni < 4; ++ni)
            DCN_UNROLL
            for (int e = 0; e < 2; ++e)
              g_tile[(wm + 16 * mi + g + 8 * h) * GLD + 8 * ni + 2 * t + e] =
                  acc[mi][ni][2 * h + e];
    }
    __syncthreads();  // [mutation: gradient tile written]
    const KIndex<I> kq = k_index(k0, 32 * half + 16 * eq, Cgp, Cg, taps);
    const I em = m0 + ep;
    if (kq.valid && em < M) {
      const I b = em / pixels, p = em % pixels;
      const I ey = p / Wo, ex = p % Wo;
      I cached_og = -1;
      Tap<I, A> s;
      A sum_dy = (A)0, sum_dx = (A)0, sum_mask = (A)0;
      const I c_end = kq.c + BK < Cg ? kq.c + BK : Cg;
      for (I c = kq.c; c < c_end; ++c) {
        const I cin = gi * Cg + c;
        const I og = cin / cpg;
        if (og != cached_og) {  // a new (pixel, tap, offset group): flush, then its Tap
          if (coord && cached_og >= 0 && s.touch)
            add_coord(grad_offset, grad_mask, (b * offset_groups + cached_og) * taps + kq.tap,
                      pixels, p, s.msk, sum_dy, sum_dx, sum_mask);
          sum_dy = sum_dx = sum_mask = (A)0;
          cached_og = og;
          tap_at(s, geo, offset, mask, b, og, kq.tap, ey, ex);
        }
        if (!s.touch) continue;
        const A grad = g_tile[ep * GLD + 16 * eq + (c - kq.c)];
        if (coord) {
          A v[4];
          corners(s, input + (b * C + cin) * H * W, v);
          const A hy = (A)1 - s.ly, hx = (A)1 - s.lx;
          const A value = s.inside ? s.wgt[0] * v[0] + s.wgt[1] * v[1] + s.wgt[2] * v[2] +
                                         s.wgt[3] * v[3]
                                   : (A)0;
          sum_dy += grad * (hx * (v[2] - v[0]) + s.lx * (v[3] - v[1]));
          sum_dx += grad * (hy * (v[1] - v[0]) + s.ly * (v[3] - v[2]));
          sum_mask += grad * value;
        }
        if (grad_input && s.inside) {
          const A gm = grad * s.msk;
          A* plane = grad_input + (b * C + cin) * H * W;
          DCN_UNROLL
          for (int q = 0; q < 4; ++q)
            if (s.corner[q] >= 0) atomicAdd(plane + s.corner[q], s.wgt[q] * gm);
        }
      }
      if (coord && cached_og >= 0 && s.touch)
        add_coord(grad_offset, grad_mask, (b * offset_groups + cached_og) * taps + kq.tap,
                  pixels, p, s.msk, sum_dy, sum_dx, sum_mask);
    }
    __syncthreads();  // [mutation: gradient tile read]
  }
}
