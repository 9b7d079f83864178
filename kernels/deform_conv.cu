// deform_conv.cu: deformable convolution v1/v2 (docs/semantics.md section 2).
//
// The convolution is computed as deformable im2col + GEMM (cuBLAS, on the
// Python side). The kernels work on a tile of the output: images
// [b0, b0 + nb) and output rows [oy0, oy0 + nrows) (nrows == Ho whenever
// nb > 1), so the columns buffer is bounded by the workspace limit whatever
// the batch and image size. The columns buffer is (C*kh*kw, nb*nrows*Wo) in
// the storage type T (half columns feed tensor-core GEMMs that accumulate in
// float32); its gradient, the output of a GEMM, is in the accumulation type A
// (float for the half types). Row c*kh*kw + k holds tap k = i*kw + j of
// channel c, column (bi*nrows + r)*Wo + ox holds output pixel
// (b0 + bi, oy0 + r, ox).
//
// - deform_im2col: one thread per (offset group, chunk of ``per_thread``
//   channels, bi, r, ox), looping over the kh*kw taps: the sampling position,
//   bilinear footprint and mask of a tap are computed once and applied to
//   every channel of the chunk; writes mask * bilinear(input), computed in A
//   and rounded once to T, into the columns. Consecutive threads take
//   consecutive output pixels (coalesced columns writes); ``per_thread`` is 1
//   on CUDA (one thread per channel, as many threads as there are column
//   elements per tap) and a whole offset group on the host (no position is
//   computed twice).
// - deform_col2im: one thread per columns element; scatters
//   grad_col * mask * corner weight into an A-typed input gradient with
//   atomicAdd (float atomics for the half types, never half atomics).
// - deform_col2im_coord: one thread per (bi, offset group, tap, r, ox),
//   looping over the group's channels in registers; writes the dy, dx and
//   mask gradients of that tap and pixel once, without atomics.
// Every integer parameter has the index type I (int or long long, chosen by
// the loader when an element count may pass 2^31), every pointer to an
// optional array (mask, grad_offset, grad_mask) may be null.

// dcn_conv_position (the sampling position of a tap) is in common.cuh, shared
// with deform_conv_igemm.cu and deform_conv_fused.cu.

template <typename T, typename I>
__global__ void deform_im2col(const T* __restrict__ input, const T* __restrict__ offset,
                              const T* __restrict__ mask,
                              T* __restrict__ columns, I per_thread,
                              I C, I H, I W, I kh, I kw, I stride_h, I stride_w, I pad_h,
                              I pad_w, I dil_h, I dil_w, I Ho, I Wo, I offset_groups,
                              I b0, I nb, I oy0, I nrows) {
  typedef typename dcn_acc<T>::type A;
  const I taps = kh * kw;
  const I ncols = nb * nrows * Wo;
  const I channels_per_group = C / offset_groups;
  const I chunks = (channels_per_group + per_thread - 1) / per_thread;  // per offset group
  const I n = offset_groups * chunks * ncols;
  const I pixels = Ho * Wo;
  DCN_KERNEL_LOOP(index, I, n) {
    const I ox = index % Wo;
    I t = index / Wo;
    const I r = t % nrows;
    t /= nrows;
    const I bi = t % nb;
    t /= nb;
    const I chunk = t % chunks;
    const I g = t / chunks;
    const I b = b0 + bi;
    const I oy = oy0 + r;
    const I c0 = g * channels_per_group + chunk * per_thread;
    const I left = g * channels_per_group + channels_per_group - c0;
    const I c1 = c0 + (per_thread < left ? per_thread : left);
    const T* off = offset + (b * offset_groups + g) * 2 * taps * pixels + oy * Wo + ox;
    const T* msk = mask ? mask + (b * offset_groups + g) * taps * pixels + oy * Wo + ox : 0;
    const I col = (bi * nrows + r) * Wo + ox;
    for (I i = 0; i < kh; ++i) {
      for (I j = 0; j < kw; ++j) {
        const I k = i * kw + j;
        A y, x;
        dcn_conv_position(off, pixels, k, i, j, oy, ox, stride_h, stride_w, pad_h,
                          pad_w, dil_h, dil_w, &y, &x);
        const dcn_footprint<I, A> f = dcn_conv_footprint(H, W, y, x);
        const A m = msk ? dcn_load(msk[k * pixels]) : (A)1;
        for (I c = c0; c < c1; ++c) {
          A v = dcn_conv_sample(input + (b * C + c) * H * W, W, f);
          if (msk) v *= m;
          columns[(c * taps + k) * ncols + col] = dcn_store<T>(v);
        }
      }
    }
  }
}

template <typename T, typename I>
__global__ void deform_col2im(const typename dcn_acc<T>::type* __restrict__ grad_columns,
                              const T* __restrict__ offset, const T* __restrict__ mask,
                              typename dcn_acc<T>::type* __restrict__ grad_input,
                              I C, I H, I W, I kh, I kw, I stride_h, I stride_w, I pad_h,
                              I pad_w, I dil_h, I dil_w, I Ho, I Wo, I offset_groups,
                              I b0, I nb, I oy0, I nrows) {
  typedef typename dcn_acc<T>::type A;
  const I taps = kh * kw;
  const I ncols = nb * nrows * Wo;
  const I n = C * taps * ncols;
  const I channels_per_group = C / offset_groups;
  DCN_KERNEL_LOOP(index, I, n) {
    const I col = index % ncols;
    const I row = index / ncols;
    const I k = row % taps;
    const I c = row / taps;
    const I i = k / kw, j = k % kw;
    const I ox = col % Wo;
    const I r = (col / Wo) % nrows;
    const I b = b0 + col / (Wo * nrows);
    const I oy = oy0 + r;
    const I g = c / channels_per_group;
    const I pixels = Ho * Wo;
    const T* off = offset + (b * offset_groups + g) * 2 * taps * pixels + oy * Wo + ox;
    A y, x;
    dcn_conv_position(off, pixels, k, i, j, oy, ox, stride_h, stride_w, pad_h,
                      pad_w, dil_h, dil_w, &y, &x);
    if (!(y > (A)-1 && y < (A)H && x > (A)-1 && x < (A)W)) continue;
    A grad = grad_columns[index];
    if (mask) grad *= dcn_load(mask[(b * offset_groups + g) * taps * pixels + k * pixels + oy * Wo + ox]);
    const A yf = dcn_floor(y), xf = dcn_floor(x);
    const I y0 = (I)yf, x0 = (I)xf;
    const A ly = y - yf, lx = x - xf, hy = (A)1 - ly, hx = (A)1 - lx;
    A* plane = grad_input + (b * C + c) * H * W;
    const bool top = y0 >= 0, bottom = y0 + 1 < H, left = x0 >= 0, right = x0 + 1 < W;
    if (top && left) atomicAdd(plane + y0 * W + x0, hy * hx * grad);
    if (top && right) atomicAdd(plane + y0 * W + x0 + 1, hy * lx * grad);
    if (bottom && left) atomicAdd(plane + (y0 + 1) * W + x0, ly * hx * grad);
    if (bottom && right) atomicAdd(plane + (y0 + 1) * W + x0 + 1, ly * lx * grad);
  }
}

template <typename T, typename I>
__global__ void deform_col2im_coord(const typename dcn_acc<T>::type* __restrict__ grad_columns,
                                    const T* __restrict__ input, const T* __restrict__ offset,
                                    const T* __restrict__ mask, T* __restrict__ grad_offset,
                                    T* __restrict__ grad_mask,
                                    I C, I H, I W, I kh, I kw, I stride_h, I stride_w, I pad_h,
                                    I pad_w, I dil_h, I dil_w, I Ho, I Wo, I offset_groups,
                                    I b0, I nb, I oy0, I nrows) {
  typedef typename dcn_acc<T>::type A;
  const I taps = kh * kw;
  const I ncols = nb * nrows * Wo;
  const I n = offset_groups * taps * ncols;
  const I channels_per_group = C / offset_groups;
  DCN_KERNEL_LOOP(index, I, n) {
    const I col = index % ncols;
    I t = index / ncols;
    const I k = t % taps;
    const I g = t / taps;
    const I i = k / kw, j = k % kw;
    const I ox = col % Wo;
    const I r = (col / Wo) % nrows;
    const I b = b0 + col / (Wo * nrows);
    const I oy = oy0 + r;
    const I pixels = Ho * Wo;
    const I pixel = oy * Wo + ox;
    const I off_base = (b * offset_groups + g) * 2 * taps * pixels + pixel;
    const I mask_index = (b * offset_groups + g) * taps * pixels + k * pixels + pixel;
    A y, x;
    dcn_conv_position(offset + off_base, pixels, k, i, j, oy, ox, stride_h, stride_w, pad_h,
                      pad_w, dil_h, dil_w, &y, &x);
    const A m = mask ? dcn_load(mask[mask_index]) : (A)1;
    A sum_dy = 0, sum_dx = 0, sum_mask = 0;
    for (I cg = 0; cg < channels_per_group; ++cg) {
      const I c = g * channels_per_group + cg;
      const A grad = grad_columns[(c * taps + k) * ncols + col];
      const T* plane = input + (b * C + c) * H * W;
      if (grad_offset) {
        A dy, dx;
        dcn_conv_bilinear_grad(plane, H, W, y, x, &dy, &dx);
        sum_dy += grad * dy;
        sum_dx += grad * dx;
      }
      if (grad_mask) sum_mask += grad * dcn_conv_bilinear(plane, H, W, y, x);
    }
    if (grad_offset) {
      grad_offset[off_base + 2 * k * pixels] = dcn_store<T>(sum_dy * m);
      grad_offset[off_base + (2 * k + 1) * pixels] = dcn_store<T>(sum_dx * m);
    }
    if (grad_mask) grad_mask[mask_index] = dcn_store<T>(sum_mask);
  }
}

// ---- deterministic input gradient (no floating-point atomics) ----
//
// deform_sample_keys: one thread per sample s = ((bi*offset_groups + g)*taps
// + k)*nrows*Wo + r*Wo + ox of the tile. A sample inside the open box
// contributes to the four corners of the cell whose top-left corner is
// (floor(y), floor(x)); cells are numbered (y0 + 1)*(W + 1) + (x0 + 1) in
// [0, (H+1)*(W+1)), and (H+1)*(W+1) means "no contribution". The key is
// ((bi*offset_groups + g)*cells + cell)*n + s, unique, so sorting the keys
// orders the samples by (image, group, cell) the same way on every run.
//
// deform_col2im_gather: one thread per input element (bi, c, yy, xx) of the
// tile's images. It visits the four cells that have (yy, xx) as a corner, and
// in each the samples of its offset group in key order (``order`` is the
// sorted sample list, ``starts[(bi*offset_groups + g)*cells + cell]`` the
// first entry of each cell), adding weight * grad_col * mask in registers,
// then adds the sum to grad_input once. The order of every sum is fixed, so
// the result is bit-identical from run to run.
template <typename T, typename I>
__global__ void deform_sample_keys(const T* __restrict__ offset, long long* __restrict__ keys,
                                   I C, I H, I W, I kh, I kw, I stride_h, I stride_w, I pad_h,
                                   I pad_w, I dil_h, I dil_w, I Ho, I Wo, I offset_groups,
                                   I b0, I nb, I oy0, I nrows) {
  typedef typename dcn_acc<T>::type A;
  const I taps = kh * kw;
  const I plane = nrows * Wo;
  const I n = nb * offset_groups * taps * plane;
  const long long cells = (long long)(H + 1) * (W + 1) + 1;
  DCN_KERNEL_LOOP(s, I, n) {
    const I ox = s % Wo;
    const I r = (s / Wo) % nrows;
    I t = s / plane;
    const I k = t % taps;
    t /= taps;  // bi * offset_groups + g
    const I g = t % offset_groups;
    const I b = b0 + t / offset_groups;
    const I oy = oy0 + r;
    const I i = k / kw, j = k % kw;
    const I pixels = Ho * Wo;
    const T* off = offset + (b * offset_groups + g) * 2 * taps * pixels + oy * Wo + ox;
    A y, x;
    dcn_conv_position(off, pixels, k, i, j, oy, ox, stride_h, stride_w, pad_h,
                      pad_w, dil_h, dil_w, &y, &x);
    long long cell = cells - 1;
    if (y > (A)-1 && y < (A)H && x > (A)-1 && x < (A)W) {
      cell = ((long long)dcn_floor(y) + 1) * (W + 1) + ((long long)dcn_floor(x) + 1);
    }
    keys[s] = ((long long)t * cells + cell) * (long long)n + s;
  }
}

template <typename T, typename I>
__global__ void deform_col2im_gather(const typename dcn_acc<T>::type* __restrict__ grad_columns,
                                     const T* __restrict__ offset, const T* __restrict__ mask,
                                     const long long* __restrict__ order,
                                     const long long* __restrict__ starts,
                                     typename dcn_acc<T>::type* __restrict__ grad_input,
                                     I C, I H, I W, I kh, I kw, I stride_h, I stride_w, I pad_h,
                                     I pad_w, I dil_h, I dil_w, I Ho, I Wo, I offset_groups,
                                     I b0, I nb, I oy0, I nrows) {
  typedef typename dcn_acc<T>::type A;
  const I taps = kh * kw;
  const I plane = nrows * Wo;
  const I ncols = nb * plane;
  const I n = nb * C * H * W;
  const I channels_per_group = C / offset_groups;
  const long long cells = (long long)(H + 1) * (W + 1) + 1;
  DCN_KERNEL_LOOP(index, I, n) {
    const I xx = index % W;
    const I yy = (index / W) % H;
    const I c = (index / (W * H)) % C;
    const I bi = index / (W * H * C);
    const I b = b0 + bi;
    const I g = c / channels_per_group;
    const I pixels = Ho * Wo;
    const long long base = (long long)(bi * offset_groups + g) * cells;
    const T* offset_bg = offset + (b * offset_groups + g) * 2 * taps * pixels;
    const T* mask_bg = mask ? mask + (b * offset_groups + g) * taps * pixels : 0;
    A sum = 0;
    for (int role = 0; role < 4; ++role) {
      const I cy = role >> 1, cx = role & 1;  // (yy, xx) is corner (cy, cx) of the cell
      const long long cell = (long long)(yy - cy + 1) * (W + 1) + (xx - cx + 1);
      const long long end = starts[base + cell + 1];
      for (long long e = starts[base + cell]; e < end; ++e) {
        I k, p;
        const A weight = dcn_gather_weight<T, I, A>(
            offset_bg, mask_bg, (I)order[e], yy, xx, cy, cx, Wo, nrows, taps, kw, pixels, oy0,
            stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, &k, &p);
        sum += weight * grad_columns[(c * taps + k) * ncols + bi * plane + p];
      }
    }
    grad_input[(b * C + c) * H * W + yy * W + xx] += sum;
  }
}
