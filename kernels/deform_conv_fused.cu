// deform_conv_fused.cu: the fused backward of deformable convolution v1/v2
// (docs/semantics.md section 2.6): ONE pass over the samples produces the
// input gradient (scatter), the offset gradient and the mask gradient (and
// the weight gradient's columns).
//
// The columns gradient comes from the GEMM grad_out^T @ W (Python side) in the
// layout (nb, groups, P, Kg), P = nrows*Wo output pixels of the tile, Kg =
// (C/groups)*kh*kw: element ((bi*groups + gw)*P + p)*Kg + cl*taps + k is tap k
// of channel gw*(C/groups) + cl at pixel p of image b0 + bi. That layout is
// the GEMM's natural output with grad_output read in place (no transpose), and
// it keeps every value of one pixel in one contiguous row, which the warp
// below walks tap after tap (the row stays in L1 across the taps).
//
// deform_col2im_fused: `lanes` (a power of two, 1..32) consecutive threads of
// a warp share one item (bi, offset group g, pixel p); the lanes take the
// group's channels cg = lane, lane + lanes, ... For each tap k the sampling
// position, the corner weights, the corner validity and the mask are computed
// once per lane; each lane then, for each of its channels, reads the columns
// gradient, scatters grad * mask * corner weight to the four in-image corners
// of grad_input (float atomics in the accumulation type: float for the half
// types, double for float64) and accumulates grad * d(bilinear)/dy, /dx and
// grad * bilinear in registers. The lanes' sums are reduced with
// __shfl_xor_sync (log2(lanes) butterfly steps; every lane ends with the
// total) and lane 0 writes grad_offset (dy, dx) times the mask and grad_mask
// once, without atomics. With ``columns`` (not null) the same pass also
// writes mask * bilinear sample in the storage type (deform_im2col's value,
// bit for bit) at the columns gradient's index: the weight gradient's columns, with no second
// im2col pass (grad_columns is null when only those are asked for).
// Lanes of one warp take different channels, i.e.
// different planes, so they never add to the same address in one step: there
// is nothing to aggregate within a warp.
//
// The loop runs over items*lanes threads rounded up to whole warps (the
// launch's block is a multiple of 32), so every lane of a warp runs the same
// iterations and reaches every shuffle with the full mask; a lane past the
// last item contributes zeros and writes nothing. With lanes = 1 (the host
// path: there a warp's lanes are fibers and a shuffle is a switch) there are
// no shuffles and the kernel runs as a plain loop. With grad_input null
// (the deterministic variant) nothing is scattered: deform_col2im_fused_gather
// below gathers the input gradient instead.

template <typename T, typename I>
__global__ void deform_col2im_fused(const typename dcn_acc<T>::type* __restrict__ grad_columns,
                                    const T* __restrict__ input, const T* __restrict__ offset,
                                    const T* __restrict__ mask,
                                    typename dcn_acc<T>::type* __restrict__ grad_input,
                                    T* __restrict__ grad_offset, T* __restrict__ grad_mask,
                                    T* __restrict__ columns,
                                    I groups, I lanes,
                                    I C, I H, I W, I kh, I kw, I stride_h, I stride_w, I pad_h,
                                    I pad_w, I dil_h, I dil_w, I Ho, I Wo, I offset_groups,
                                    I b0, I nb, I oy0, I nrows) {
  typedef typename dcn_acc<T>::type A;
  const I taps = kh * kw;
  const I P = nrows * Wo;
  const I pixels = Ho * Wo;
  const I channels_per_group = C / offset_groups;
  const I channels_per_weight_group = C / groups;
  const I Kg = channels_per_weight_group * taps;
  const I items = nb * offset_groups * P;
  const I threads = ((items * lanes + 31) / 32) * 32;  // whole warps
  const bool coord = grad_offset || grad_mask;
  DCN_KERNEL_LOOP(t, I, threads) {
    const I item = t / lanes;
    const I lane = t % lanes;
    const bool active = item < items;
    const I p = active ? item % P : 0;
    const I bg = active ? item / P : 0;  // bi * offset_groups + g
    const I g = bg % offset_groups;
    const I bi = bg / offset_groups;
    const I b = b0 + bi;
    const I ox = p % Wo;
    const I oy = oy0 + p / Wo;
    const I off_base = (b * offset_groups + g) * 2 * taps * pixels + oy * Wo + ox;
    const I mask_base = (b * offset_groups + g) * taps * pixels + oy * Wo + ox;
    for (I k = 0; k < taps; ++k) {
      const I i = k / kw, j = k % kw;
      A sum_dy = 0, sum_dx = 0, sum_mask = 0;
      A y = 0, x = 0;
      if (active) {
        dcn_conv_position(offset + off_base, pixels, k, i, j, oy, ox, stride_h, stride_w,
                          pad_h, pad_w, dil_h, dil_w, &y, &x);
      }
      const A m = active && mask ? dcn_load(mask[mask_base + k * pixels]) : (A)1;
      // The offset gradient's box (closed at -1, torchvision's rule) holds the
      // forward's open box; a NaN position fails both.
      const bool touch = active && y >= (A)-1 && y < (A)H && x >= (A)-1 && x < (A)W;
      if (touch || (active && columns)) {
        const bool inside = touch && y > (A)-1 && x > (A)-1;
        const A yf = touch ? dcn_floor(y) : (A)0, xf = touch ? dcn_floor(x) : (A)0;
        const I y0 = (I)yf, x0 = (I)xf;
        const A ly = y - yf, lx = x - xf, hy = (A)1 - ly, hx = (A)1 - lx;
        const bool top = y0 >= 0, bottom = y0 + 1 < H, left = x0 >= 0, right = x0 + 1 < W;
        const A w00 = hy * hx, w01 = hy * lx, w10 = ly * hx, w11 = ly * lx;
        // Channel c = g*channels_per_group + cg in weight group gw at cl,
        // stepped without a division per channel.
        I gw = (g * channels_per_group + lane) / channels_per_weight_group;
        I cl = g * channels_per_group + lane - gw * channels_per_weight_group;
        for (I cg = lane; cg < channels_per_group; cg += lanes) {
          const I c = g * channels_per_group + cg;
          const I index = ((bi * groups + gw) * P + p) * Kg + cl * taps + k;
          for (cl += lanes; cl >= channels_per_weight_group; ++gw) cl -= channels_per_weight_group;
          if (!touch) {  // outside: only the columns, a zero sample times the mask
            columns[index] = dcn_store<T>((A)0 * m);
            continue;
          }
          const A grad = grad_columns ? grad_columns[index] : (A)0;  // null: columns only
          if (coord || columns) {
            const T* plane = input + (b * C + c) * H * W;
            const A v00 = top && left ? dcn_load(plane[y0 * W + x0]) : (A)0;
            const A v01 = top && right ? dcn_load(plane[y0 * W + x0 + 1]) : (A)0;
            const A v10 = bottom && left ? dcn_load(plane[(y0 + 1) * W + x0]) : (A)0;
            const A v11 = bottom && right ? dcn_load(plane[(y0 + 1) * W + x0 + 1]) : (A)0;
            // The forward's sample (zero outside the open box), as deform_im2col has it.
            const A value = inside ? w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11 : (A)0;
            sum_dy += grad * (hx * (v10 - v00) + lx * (v11 - v01));
            sum_dx += grad * (hy * (v01 - v00) + ly * (v11 - v10));
            sum_mask += grad * value;
            if (columns) columns[index] = dcn_store<T>(value * m);
          }
          if (grad_input && inside) {
            const A gm = grad * m;
            A* gplane = grad_input + (b * C + c) * H * W;
            if (top && left) atomicAdd(gplane + y0 * W + x0, w00 * gm);
            if (top && right) atomicAdd(gplane + y0 * W + x0 + 1, w01 * gm);
            if (bottom && left) atomicAdd(gplane + (y0 + 1) * W + x0, w10 * gm);
            if (bottom && right) atomicAdd(gplane + (y0 + 1) * W + x0 + 1, w11 * gm);
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
            grad_offset[off_base + 2 * k * pixels] = dcn_store<T>(sum_dy * m);
            grad_offset[off_base + (2 * k + 1) * pixels] = dcn_store<T>(sum_dx * m);
          }
          if (grad_mask) grad_mask[mask_base + k * pixels] = dcn_store<T>(sum_mask);
        }
      }
    }
  }
}

// deform_col2im_fused_gather: the deterministic input gradient from the
// columns gradient in the fused layout above, with no atomics. One item per
// (bi, offset group g, input pixel yy, xx) of the tile's images; `lanes`
// consecutive threads share an item and take the group's channels
// cg = lane + j*lanes (j < DCN_GATHER_CHANNELS) of each chunk of
// lanes*DCN_GATHER_CHANNELS channels. For each chunk, the item visits the
// four cells having (yy, xx) as a corner and, in each, the samples of its
// offset group in key order (``order``/``starts`` from deform_sample_keys, as
// deform_col2im_gather has them); per sample the position, the corner weight
// and the mask are computed once and multiply every channel of the chunk,
// summed in registers; the sums are added to grad_input once per chunk. Every
// element of grad_input belongs to one thread and every sum has a fixed
// order, so the result is bit-identical from run to run. The lanes never
// exchange values: no shuffles, so the host runs it as a plain loop whatever
// `lanes` is.
#define DCN_GATHER_CHANNELS 8

template <typename T, typename I>
__global__ void deform_col2im_fused_gather(
    const typename dcn_acc<T>::type* __restrict__ grad_columns, const T* __restrict__ offset,
    const T* __restrict__ mask, const long long* __restrict__ order,
    const long long* __restrict__ starts, typename dcn_acc<T>::type* __restrict__ grad_input,
    I groups, I lanes, I C, I H, I W, I kh, I kw, I stride_h, I stride_w, I pad_h, I pad_w,
    I dil_h, I dil_w, I Ho, I Wo, I offset_groups, I b0, I nb, I oy0, I nrows) {
  typedef typename dcn_acc<T>::type A;
  const I taps = kh * kw;
  const I P = nrows * Wo;
  const I pixels = Ho * Wo;
  const I channels_per_group = C / offset_groups;
  const I channels_per_weight_group = C / groups;
  const I Kg = channels_per_weight_group * taps;
  const I items = nb * offset_groups * H * W;
  const long long cells = (long long)(H + 1) * (W + 1) + 1;
  DCN_KERNEL_LOOP(t, I, items * lanes) {
    const I item = t / lanes;
    const I lane = t % lanes;
    const I xx = item % W;
    const I yy = (item / W) % H;
    const I bg = item / (W * H);  // bi * offset_groups + g
    const I g = bg % offset_groups;
    const I bi = bg / offset_groups;
    const I b = b0 + bi;
    const long long base = (long long)bg * cells;
    const T* offset_bg = offset + (b * offset_groups + g) * 2 * taps * pixels;
    const T* mask_bg = mask ? mask + (b * offset_groups + g) * taps * pixels : 0;
    for (I c0 = 0; c0 < channels_per_group; c0 += lanes * DCN_GATHER_CHANNELS) {
      A sum[DCN_GATHER_CHANNELS];
      I column[DCN_GATHER_CHANNELS];  // of channel j in a columns row: (gw*P)*Kg + cl*taps
      for (int j = 0; j < DCN_GATHER_CHANNELS; ++j) {
        sum[j] = 0;
        const I cg = c0 + lane + j * lanes;
        const I c = g * channels_per_group + (cg < channels_per_group ? cg : 0);
        const I gw = c / channels_per_weight_group;
        column[j] = gw * P * Kg + (c - gw * channels_per_weight_group) * taps;
      }
      for (int role = 0; role < 4; ++role) {
        const I cy = role >> 1, cx = role & 1;  // (yy, xx) is corner (cy, cx) of the cell
        const long long cell = (long long)(yy - cy + 1) * (W + 1) + (xx - cx + 1);
        const long long end = starts[base + cell + 1];
        for (long long e = starts[base + cell]; e < end; ++e) {
          I k, p;
          const A weight = dcn_gather_weight<T, I, A>(
              offset_bg, mask_bg, (I)order[e], yy, xx, cy, cx, Wo, nrows, taps, kw, pixels, oy0,
              stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, &k, &p);
          const I row = (bi * groups * P + p) * Kg + k;
          for (int q = 0; q < DCN_GATHER_CHANNELS; ++q) {
            if (c0 + lane + q * lanes < channels_per_group)
              sum[q] += weight * grad_columns[row + column[q]];
          }
        }
      }
      for (int q = 0; q < DCN_GATHER_CHANNELS; ++q) {
        const I cg = c0 + lane + q * lanes;
        if (cg < channels_per_group)
          grad_input[((b * C + g * channels_per_group + cg) * H + yy) * W + xx] += sum[q];
      }
    }
  }
}
