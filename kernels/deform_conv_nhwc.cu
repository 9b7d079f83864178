// deform_conv_nhwc.cu: deformable convolution v1/v2 on channels-last (NHWC)
// memory (docs/semantics.md section 2), the kernels of the ``im2col_nhwc``
// implementation (cupydcn/_conv_nhwc.py).
//
// The input is NHWC: element (b, c, y, x) at ((b*H + y)*W + x)*C + c. The
// offset and mask are read through element strides (sb, sc, sp): image,
// channel and output pixel p = oy*Wo + ox, which covers NCHW-contiguous
// (C*Ho*Wo, Ho*Wo, 1) and channels-last (Ho*Wo*C, 1, C) arrays alike; the
// offset and mask gradients are written with the strides of their own arrays.
// A tile is npix consecutive output pixels q = pix0 + t (q = (b*Ho + oy)*Wo +
// ox: whole images, or rows of one image), so the output (q, Cout) of the
// GEMM (Python side) is the NHWC output itself.
//
// The columns are (npix, groups*Kg), Kg = kh*kw*(C/groups): row t holds pixel
// pix0 + t, column gw*Kg + k*Cg + cl tap k of channel c = gw*Cg + cl (Cg =
// C/groups): the weight permuted to (Cout, kh, kw, C/groups) multiplies them
// per weight group, and one tap's channels are contiguous in both.
//
// - deform_im2col_nhwc: one thread per (pixel t, tap k, vector of V channels);
//   consecutive threads take consecutive channel vectors of one sampling
//   position, so the four corner loads of a warp are contiguous (16-byte
//   vector loads when V*sizeof(T) == 16: the loader picks V only when C,
//   C/groups and C/offset_groups are multiples of V and the input is 16-byte
//   aligned; V = 1 otherwise). Writes mask * bilinear(input) (computed in the
//   accumulation type A, rounded once to T) into the columns.
// - deform_col2im_nhwc: the fused backward, one item per (pixel t, offset
//   group g, tap k); `lanes` consecutive threads of a warp share an item and
//   take its channels cg = lane, lane + lanes, ... (consecutive lanes,
//   consecutive addresses). Each lane reads the columns gradient, scatters
//   grad * mask * corner weight to the in-image corners of grad_input (NHWC,
//   float atomics in A: float for the half types, double for float64) and
//   sums grad * d(bilinear)/dy, /dx and grad * bilinear in registers; the
//   lanes' sums are reduced with __shfl_xor_sync and lane 0 writes the offset
//   (times the mask) and mask gradients once, without atomics. The loop runs
//   over whole warps (a lane past the last item adds zeros and writes
//   nothing), so every shuffle sees its full mask; with lanes = 1 (the host
//   path) no shuffle runs and the kernel is a plain loop.
// Every integer parameter has the index type I; mask, grad_offset, grad_mask
// and grad_input may be null.

// V values of T, loaded and stored as one access (16 bytes for the vector
// widths the loader picks).
template <typename T, int V>
struct alignas(sizeof(T) * V) dcn_nhwc_vec {
  T v[V];
};

// Stores V values at dst (aligned to the vector): one 16-byte store on the
// device when the vector is 16 bytes (the compiler splits a struct
// assignment into per-member stores), a struct copy otherwise.
template <typename T, int V>
__device__ __forceinline__ void dcn_nhwc_store(T* dst, const dcn_nhwc_vec<T, V>& value) {
#ifdef __CUDA_ARCH__
  if constexpr (sizeof(value) == 16) {
    unsigned int w[4];
    memcpy(w, &value, 16);
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};"
                 :: "l"(dst), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3]) : "memory");
    return;
  }
#endif
  *reinterpret_cast<dcn_nhwc_vec<T, V>*>(dst) = value;
}

// The pixel t of a tile as (image, output row, output column).
template <typename I>
__device__ __forceinline__ void dcn_nhwc_pixel(I pix0, I t, I Ho, I Wo, I* b, I* oy, I* ox) {
  const I q = pix0 + t;
  const I pixels = Ho * Wo;
  *b = q / pixels;
  const I p = q - *b * pixels;
  *oy = p / Wo;
  *ox = p - *oy * Wo;
}

template <typename T, typename I, int V>
__device__ __forceinline__ void dcn_im2col_nhwc(
    const T* __restrict__ input, const T* __restrict__ offset, const T* __restrict__ mask,
    T* __restrict__ columns, I osb, I osc, I osp, I msb, I msc, I msp, I C, I H, I W, I kh,
    I kw, I stride_h, I stride_w, I pad_h, I pad_w, I dil_h, I dil_w, I Ho, I Wo,
    I offset_groups, I groups, I pix0, I npix) {
  typedef typename dcn_acc<T>::type A;
  typedef dcn_nhwc_vec<T, V> Vec;
  const I taps = kh * kw;
  const I vectors = C / V;
  const I n = npix * taps * vectors;
  const I channels_per_group = C / offset_groups;
  const I Cg = C / groups;
  DCN_KERNEL_LOOP(index, I, n) {
    const I c = (index % vectors) * V;
    const I tk = index / vectors;
    const I k = tk % taps;
    const I t = tk / taps;
    I b, oy, ox;
    dcn_nhwc_pixel(pix0, t, Ho, Wo, &b, &oy, &ox);
    const I i = k / kw, j = k % kw;
    const I g = c / channels_per_group;
    const I p = oy * Wo + ox;
    A y, x;
    dcn_conv_position(offset + b * osb + g * 2 * taps * osc + p * osp, osc, k, i, j, oy, ox,
                      stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, &y, &x);
    const A m = mask ? dcn_load(mask[b * msb + (g * taps + k) * msc + p * msp]) : (A)1;
    A value[V];
    for (int e = 0; e < V; ++e) value[e] = (A)0;
    // The open box of docs/semantics.md section 2.4 (a NaN fails it).
    if (y > (A)-1 && y < (A)H && x > (A)-1 && x < (A)W) {
      const A yf = dcn_floor(y), xf = dcn_floor(x);
      const I y0 = (I)yf, x0 = (I)xf;
      const A ly = y - yf, lx = x - xf, hy = (A)1 - ly, hx = (A)1 - lx;
      const bool top = y0 >= 0, bottom = y0 + 1 < H, left = x0 >= 0, right = x0 + 1 < W;
      const A weights[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
      const bool valid[4] = {top && left, top && right, bottom && left, bottom && right};
      const T* image = input + b * H * W * C + c;
      for (int corner = 0; corner < 4; ++corner) {
        if (!valid[corner]) continue;
        const I yy = y0 + (corner >> 1), xx = x0 + (corner & 1);
        const Vec v = *reinterpret_cast<const Vec*>(image + (yy * W + xx) * C);
        for (int e = 0; e < V; ++e) value[e] += weights[corner] * dcn_load(v.v[e]);
      }
    }
    Vec out;
    for (int e = 0; e < V; ++e) out.v[e] = dcn_store<T>(value[e] * m);
    const I gw = c / Cg, cl = c - gw * Cg;
    dcn_nhwc_store(columns + t * taps * C + gw * taps * Cg + k * Cg + cl, out);
  }
}

// The columns of the tile: ``vec`` (1 or 16/sizeof(T)) channels per thread.
template <typename T, typename I>
__global__ void deform_im2col_nhwc(const T* __restrict__ input, const T* __restrict__ offset,
                                   const T* __restrict__ mask, T* __restrict__ columns,
                                   I vec, I osb, I osc, I osp, I msb, I msc, I msp,
                                   I C, I H, I W, I kh, I kw, I stride_h, I stride_w, I pad_h,
                                   I pad_w, I dil_h, I dil_w, I Ho, I Wo, I offset_groups,
                                   I groups, I pix0, I npix) {
  constexpr int V16 = sizeof(T) >= 16 ? 1 : (int)(16 / sizeof(T));
  if (vec == V16 && V16 > 1)
    dcn_im2col_nhwc<T, I, V16>(input, offset, mask, columns, osb, osc, osp, msb, msc, msp, C, H,
                               W, kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, Ho,
                               Wo, offset_groups, groups, pix0, npix);
  else
    dcn_im2col_nhwc<T, I, 1>(input, offset, mask, columns, osb, osc, osp, msb, msc, msp, C, H,
                             W, kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, Ho, Wo,
                             offset_groups, groups, pix0, npix);
}

template <typename T, typename I>
__global__ void deform_col2im_nhwc(const typename dcn_acc<T>::type* __restrict__ grad_columns,
                                   const T* __restrict__ input, const T* __restrict__ offset,
                                   const T* __restrict__ mask,
                                   typename dcn_acc<T>::type* __restrict__ grad_input,
                                   T* __restrict__ grad_offset, T* __restrict__ grad_mask,
                                   I lanes, I osb, I osc, I osp, I msb, I msc, I msp,
                                   I gosb, I gosc, I gosp, I gmsb, I gmsc, I gmsp,
                                   I C, I H, I W, I kh, I kw, I stride_h, I stride_w, I pad_h,
                                   I pad_w, I dil_h, I dil_w, I Ho, I Wo, I offset_groups,
                                   I groups, I pix0, I npix) {
  typedef typename dcn_acc<T>::type A;
  const I taps = kh * kw;
  const I channels_per_group = C / offset_groups;
  const I Cg = C / groups;
  const I items = npix * offset_groups * taps;
  const I threads = ((items * lanes + 31) / 32) * 32;  // whole warps
  const bool coord = grad_offset || grad_mask;
  DCN_KERNEL_LOOP(u, I, threads) {
    const I item = u / lanes;
    const I lane = u % lanes;
    const bool active = item < items;
    const I k = active ? item % taps : 0;
    const I tg = active ? item / taps : 0;  // t * offset_groups + g
    const I g = tg % offset_groups;
    const I t = tg / offset_groups;
    I b, oy, ox;
    dcn_nhwc_pixel(pix0, t, Ho, Wo, &b, &oy, &ox);
    const I i = k / kw, j = k % kw;
    const I p = oy * Wo + ox;
    A y = 0, x = 0, m = 1;
    if (active) {
      dcn_conv_position(offset + b * osb + g * 2 * taps * osc + p * osp, osc, k, i, j, oy, ox,
                        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, &y, &x);
      if (mask) m = dcn_load(mask[b * msb + (g * taps + k) * msc + p * msp]);
    }
    A sum_dy = 0, sum_dx = 0, sum_mask = 0;
    // The derivative's box (closed at -1, section 2.6) holds the forward's open box.
    if (active && y >= (A)-1 && y < (A)H && x >= (A)-1 && x < (A)W) {
      const bool inside = y > (A)-1 && x > (A)-1;
      const A yf = dcn_floor(y), xf = dcn_floor(x);
      const I y0 = (I)yf, x0 = (I)xf;
      const A ly = y - yf, lx = x - xf, hy = (A)1 - ly, hx = (A)1 - lx;
      const bool top = y0 >= 0, bottom = y0 + 1 < H, left = x0 >= 0, right = x0 + 1 < W;
      const A w00 = hy * hx, w01 = hy * lx, w10 = ly * hx, w11 = ly * lx;
      const I row = t * taps * C;
      const I corner00 = ((b * H + y0) * W + x0) * C;
      for (I cg = lane; cg < channels_per_group; cg += lanes) {
        const I c = g * channels_per_group + cg;
        const I gw = c / Cg;
        const A grad = grad_columns[row + gw * taps * Cg + k * Cg + (c - gw * Cg)];
        if (coord) {
          const A v00 = top && left ? dcn_load(input[corner00 + c]) : (A)0;
          const A v01 = top && right ? dcn_load(input[corner00 + C + c]) : (A)0;
          const A v10 = bottom && left ? dcn_load(input[corner00 + W * C + c]) : (A)0;
          const A v11 = bottom && right ? dcn_load(input[corner00 + (W + 1) * C + c]) : (A)0;
          const A value = inside ? w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11 : (A)0;
          sum_dy += grad * (hx * (v10 - v00) + lx * (v11 - v01));
          sum_dx += grad * (hy * (v01 - v00) + ly * (v11 - v10));
          sum_mask += grad * value;
        }
        if (grad_input && inside) {
          const A gm = grad * m;
          if (top && left) atomicAdd(grad_input + (corner00 + c), w00 * gm);
          if (top && right) atomicAdd(grad_input + (corner00 + C + c), w01 * gm);
          if (bottom && left) atomicAdd(grad_input + (corner00 + W * C + c), w10 * gm);
          if (bottom && right) atomicAdd(grad_input + (corner00 + (W + 1) * C + c), w11 * gm);
        }
      }
    }
    if (coord) {
      for (I s = lanes / 2; s > 0; s /= 2) {
        sum_dy += __shfl_xor_sync(0xffffffffu, sum_dy, (int)s);
        sum_dx += __shfl_xor_sync(0xffffffffu, sum_dx, (int)s);
        sum_mask += __shfl_xor_sync(0xffffffffu, sum_mask, (int)s);
      }
      if (active && lane == 0) {
        if (grad_offset) {
          T* go = grad_offset + b * gosb + g * 2 * taps * gosc + p * gosp;
          go[2 * k * gosc] = dcn_store<T>(sum_dy * m);
          go[(2 * k + 1) * gosc] = dcn_store<T>(sum_dx * m);
        }
        if (grad_mask)
          grad_mask[b * gmsb + (g * taps + k) * gmsc + p * gmsp] = dcn_store<T>(sum_mask);
      }
    }
  }
}
