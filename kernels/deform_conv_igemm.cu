// deform_conv_igemm.cu: the implicit-GEMM forward of deformable convolution
// (docs/semantics.md sections 2.3-2.5), with no columns buffer.
//
// Per weight group the output is the GEMM out[m, n] = bias[n] + sum_k A[m, k] B[k, n]
// over M = B*Ho*Wo output pixels, N = Cout/groups output channels and K =
// kh*kw*(C/groups), ordered tap-major (k = tap*Cg + c): A[m, k] = mask * bilinear(input)
// (the deformed sample of channel c at tap `tap` for pixel m) and B[k, n] = the weight,
// permuted by the caller to (Cout, kh, kw, C/groups) so that a K tile is contiguous.
// Grid (ceil(M/64), ceil(N/64), groups), block 128 threads (4 warps, 2 x 2): a block
// computes a 64 x 64 tile of out; warp w its 32 x 32 quarter (rows 32 (w % 2), columns
// 32 (w / 2)) as 2 x 4 m16n8 fragments. The K loop runs over taps, then over chunks of
// 16 channels of one tap (channels past C/groups are zeros in both operands). Per
// step the block stages B (64 x 16 of the weight) with cp.async, and builds A (64 x 16)
// itself: thread t owns pixel t % 64 and 8 channels (t / 64) of the chunk; it computes
// its pixel's sampling position, corner indices and bilinear weights once per tap
// (again only when the offset group changes) and reuses them for every channel.
// Then, after a barrier, each warp multiplies:
// - float16 / bfloat16: mma.sync m16n8k16 on the storage type (fragments by ldmatrix),
//   f32 accumulation (A rounded to the storage type once, in shared memory);
// - float32 with tf32 != 0 (the explicit opt-in `implicit_gemm_tf32`): mma.sync m16n8k8
//   on operands rounded to tf32, f32 accumulation;
// - float32, float64 (and every type before sm_80, which lacks these instructions):
//   SIMT FMAs in the accumulation type on the same fragment layout.
// The epilogue adds the bias and writes NCHW directly. Integers are the index type I.

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
// __launch_bounds__(128, 3 for the half types, else 1): the register budget with no
// spills (nvcc --resource-usage, sm_80 and sm_90): at most 170 registers for the half
// types (3+ blocks of 4 warps per SM), up to 255 for the float32/float64 SIMT tile.
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
  constexpr bool kHalfMma = is_half<T>::value && DCN_IGEMM_SM80;
  constexpr bool kTf32 = is_float<T>::value && DCN_IGEMM_SM80;
  constexpr bool kAsync = DCN_IGEMM_SM80 != 0;
  DCN_SHARED(T, a_tile, BM * LDS);  // A[m][k]: 64 pixels x 16 k
  DCN_SHARED(T, b_tile, BN * LDS);  // B[n][k]: 64 output channels x 16 k
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int wm = 32 * (warp % 2), wn = 32 * (warp / 2);
  const I pixels = Ho * Wo, M = B * pixels;
  const I Cg = C / groups, Coutg = Cout / groups, taps = kh * kw;
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
  DCN_UNROLL
  for (int i = 0; i < 2; ++i)
    DCN_UNROLL
    for (int j = 0; j < 4; ++j)
      DCN_UNROLL
      for (int r = 0; r < 4; ++r) acc[i][j][r] = (A)0;

  for (I tap = 0; tap < taps; ++tap) {
    const I ki = tap / kw, kj = tap % kw;
    I cached_og = -1;
    // The sample's corners (offsets into a plane; -1 outside) and weights, per offset group.
    I corner[4] = {-1, -1, -1, -1};
    A wgt[4] = {(A)0, (A)0, (A)0, (A)0};
    A msk = (A)1;
    bool inside = false;
    for (I c0 = 0; c0 < Cg; c0 += BK) {
      // ---- B: the weight chunk (n0..n0+64, tap, c0..c0+16) -> b_tile[n][k]
      {
        const I cbase = c0 + bk;
        const T* src = wptr + tap * Cg + cbase;
        if constexpr (sizeof(T) == 2) {
          bool copied = false;
          if constexpr (kAsync) {
            if (vec16 && wrow_valid && cbase + 8 <= Cg) {
              dcn_cp_async<16>(b_tile, bn * LDS + bk, src);
              copied = true;
            }
          }
          if (!copied) {
            for (int e = 0; e < 8; ++e)
              b_tile[bn * LDS + bk + e] =
                  wrow_valid && cbase + e < Cg ? src[e] : dcn_store<T>((A)0);
          }
        } else {
          for (int e = 0; e < 8; ++e) {
            const bool in = wrow_valid && cbase + e < Cg;
            if constexpr (kAsync) {
              if (in) dcn_cp_async<(int)sizeof(T)>(b_tile, bn * LDS + bk + e, src + e);
              else b_tile[bn * LDS + bk + e] = (T)0;
            } else {
              b_tile[bn * LDS + bk + e] = in ? src[e] : (T)0;
            }
          }
        }
        if constexpr (kAsync) dcn_cp_async_commit();
      }
      // ---- A: mask * bilinear(input) for this thread's pixel and 8 channels
      for (int e = 0; e < 8; ++e) {
        const I c = c0 + ac + e;
        A v = (A)0;
        if (pm_valid && c < Cg) {
          const I cin = gi * Cg + c;
          const I og = cin / cpg;
          if (og != cached_og) {  // the sampling position of (pixel, tap, offset group)
            cached_og = og;
            const T* off = offset + (pb * offset_groups + og) * 2 * taps * pixels + pp;
            A y, x;
            dcn_conv_position(off, pixels, tap, ki, kj, poy, pox, stride_h, stride_w, pad_h,
                              pad_w, dil_h, dil_w, &y, &x);
            msk = mask ? dcn_load(mask[((pb * offset_groups + og) * taps + tap) * pixels + pp])
                       : (A)1;
            inside = y > (A)-1 && y < (A)H && x > (A)-1 && x < (A)W;
            if (inside) {
              const A yf = dcn_floor(y), xf = dcn_floor(x);
              const I y0 = (I)yf, x0 = (I)xf;
              const A ly = y - yf, lx = x - xf, hy = (A)1 - ly, hx = (A)1 - lx;
              const bool top = y0 >= 0, bottom = y0 + 1 < H, left = x0 >= 0, right = x0 + 1 < W;
              corner[0] = top && left ? y0 * W + x0 : (I)-1;
              corner[1] = top && right ? y0 * W + x0 + 1 : (I)-1;
              corner[2] = bottom && left ? (y0 + 1) * W + x0 : (I)-1;
              corner[3] = bottom && right ? (y0 + 1) * W + x0 + 1 : (I)-1;
              wgt[0] = hy * hx;
              wgt[1] = hy * lx;
              wgt[2] = ly * hx;
              wgt[3] = ly * lx;
            }
          }
          if (inside) {
            const T* plane = input + (pb * C + cin) * H * W;
            A s[4];
            DCN_UNROLL
            for (int q = 0; q < 4; ++q) s[q] = corner[q] >= 0 ? dcn_load(plane[corner[q]]) : (A)0;
            v = wgt[0] * s[0] + wgt[1] * s[1] + wgt[2] * s[2] + wgt[3] * s[3];
          }
          v *= msk;  // after the sample, as im2col: a NaN mask propagates
        }
        if constexpr (kTf32) {
          if (use_tf32) v = dcn_to_tf32(v);
        }
        a_tile[am * LDS + ac + e] = dcn_store<T>(v);
      }
      if constexpr (kAsync) dcn_cp_async_wait<0>();  // [mutation: wait]
      __syncthreads();  // [mutation: tiles landed]

      // ---- multiply the tiles
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
