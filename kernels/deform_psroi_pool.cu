// deform_psroi_pool.cu: deformable position-sensitive RoI pooling, the
// official DCN operator (DeformablePSROIPooling; docs/semantics.md section 4).
// RoI r = [b, x1, y1, x2, y2] spans start = round(x1)*scale - 0.5 to
// end = (round(x2) + 1)*scale - 0.5 (C's round, half away from zero),
// roi_w = max(end - start, 0.1), bin = roi/pooled, sub_bin = bin/sample_per_part.
// Output channel c of bin (py, px) belongs to class cls = c / (output_dim /
// num_classes), reads input channel (c*G + gy)*G + gx with gy = py*G/pooled
// (integer division, clamped to [0, G-1]), and is moved by
// trans_std*trans[r, 2*cls (x) / 2*cls + 1 (y), part_y, part_x]*roi_w (roi_h)
// with part cell py*part_size/pooled (exact integer division; the official
// float expression can land one cell low). Samples at bin start + i*sub_bin,
// i < sample_per_part (left aligned); one outside [-0.5, W-0.5] x
// [-0.5, H-0.5] is skipped and not counted, the others are clamped into
// [0, W-1] x [0, H-1] and read from the floor/ceil corners (one pixel when the
// position is integral). Output = sum / count, 0 when count is 0.
//
// - deform_psroi_pool_forward: one thread per output element (r, c, py, px);
//   writes output (T) and count (the accumulation type A: exact integers up to
//   2^24 even for the half types).
// - deform_psroi_pool_backward_input: one thread per output element; scatters
//   grad / count * corner weight into an A-typed grad_input with atomicAdd.
// - deform_psroi_pool_backward_trans: a warp (or `lanes` threads of one, a
//   power of two, 1..32) per bin (r, cls, py, px): the lanes take the class's
//   channels c_begin + lane, c_begin + lane + lanes, ..., sum their terms in
//   registers, reduce them with __shfl_xor_sync, and lane 0 adds each
//   coordinate with one atomicAdd into the A-typed grad_trans (several bins
//   share a part cell). The loop covers whole warps (the launch's block is a
//   multiple of 32), so every lane reaches every shuffle with the full mask;
//   lanes = 1 (the host: a lane there is a fiber) runs no shuffle, a plain
//   loop.
//   The official rule: at the clamped position, d/dx = (1-dist_y)*(U[y0,x1] -
//   U[y0,x0]) + dist_y*(U[y1,x1] - U[y1,x0]) with floor/ceil corners, so a
//   clamped or integral coordinate gives 0; times trans_std*roi_w (roi_h for
//   y) times grad / count.
// - deform_psroi_pool_sample_keys + deform_psroi_pool_backward_input_gather,
//   deform_psroi_pool_backward_trans_gather: the same two gradients without
//   floating-point atomics, for deterministic=True (below).
//
// Deterministic gradients (deterministic=True). Input: the samples of bin
// (r, cls, py, px) do not depend on the output channel beyond its class cls,
// every bin has sample_per_part^2 of them (sample s = bin*spp^2 + ih*spp + iw,
// bins numbered k = ((r*num_classes + cls)*pooled + py)*pooled + px), and a
// sample feeds only input channels (c*G + gy)*G + gx of its position-sensitive
// group (gy, gx) of (py, px), c in class cls. After the clamp a sample reads
// the cell whose top-left corner is (y0, x0) = (floor(h), floor(w)), its other
// corners being the ceilings (y0 itself when h is integral, likewise x). The
// bins are processed in chunks [k0, k1) whose samples fit the workspace limit
// (at least one bin a chunk). deform_psroi_pool_sample_keys, one thread per
// sample of the chunk, writes the int64 key
// ((((b*num_classes + cls)*G*G + gy*G + gx)*H*W + y0*W + x0)*S + s_local), S
// the chunk's sample count, with N*num_classes*G*G*H*W as the cell of a
// skipped sample or a void bin. The keys are unique, so any correct sort gives
// the same order; ``searchsorted`` gives each cell's first entry (``starts``).
// deform_psroi_pool_backward_input_gather, one thread per input element
// (b, c_in, yy, xx), takes c_out = c_in / G^2, (gy, gx) from c_in % G^2 and
// cls = c_out / (output_dim / num_classes), visits the cells (yy-1, xx-1),
// (yy-1, xx), (yy, xx-1), (yy, xx) of segment (b, cls, gy, gx) and in each the
// samples in key order, recomputes each position with the forward's helpers
// and weighs it against the cell being visited, the one the key kernel chose
// (dcn_psroi_corners_at: no second range check or floor, so a position the
// two kernels round one ulp apart is never dropped), reads
// count and grad_output of output element (r, c_out, py, px), adds the sample's
// corner terms whose pixel is (yy, xx) in registers, then adds the sum to
// grad_input once. Memory: per chunk about 32 bytes per sample at the peak
// (keys, sorted keys, key // S and the order, all int64; the chunk is sized by
// that figure) and 8*(N*num_classes*G^2*H*W + 1) bytes for ``starts`` (at
// most 8 bytes per input element, as num_classes <= output_dim; twice that
// while ``searchsorted`` runs, for its query).
// Trans: deform_psroi_pool_backward_trans_gather, `lanes` threads of a warp
// per (r, cls, part_y, part_x), loops over the bins (py, px) whose part cell
// it is, in row-major order, each lane adding its channels' terms computed
// as deform_psroi_pool_backward_trans does (dcn_psroi_trans_bin); the lanes'
// sums are reduced with __shfl_xor_sync (a fixed butterfly order) and lane 0
// writes both coordinates once: every element of grad_trans is written, no
// extra memory.
// Every sum has a fixed order, so both gradients are bit-identical run after
// run (for the same workspace limit: it fixes the chunks).
// Robustness: the batch index rois[r, 0] is converted only when it is an
// integer in [0, N); otherwise, or when a RoI coordinate or the bin's trans is
// not finite, the bin counts no sample (output 0, count 0, no scatter).
// Sample positions are range-checked (NaN fails every check) before any
// float -> int conversion. Every integer parameter has the index type I,
// every float parameter the accumulation type A; trans may be null (no_trans,
// num_classes = 1).

// C's round (half away from zero), the official operator's.
__device__ __forceinline__ float dcn_psroi_round(float v) { return roundf(v); }
__device__ __forceinline__ double dcn_psroi_round(double v) { return round(v); }

// The samples of one bin (r, cls, py, px).
template <typename I, typename A>
struct dcn_psroi_bin {
  I b;                   // image index
  A wstart, hstart;      // first sample, trans applied
  A sub_w, sub_h;        // sample spacing
  A roi_w, roi_h;
  I trans_x;             // flat index of the bin's x trans (y: + part*part); -1 without trans
};

// Fills *bin; false when the bin counts no sample (invalid batch index, a
// non-finite RoI coordinate or trans value, an empty image).
template <typename T, typename I, typename A>
__device__ __forceinline__ bool dcn_psroi_bin_setup(const T* rois, const T* trans, I r, I cls,
                                                    I py, I px, I N, I H, I W, I pooled,
                                                    I part_size, I sample_per_part,
                                                    I num_classes, A spatial_scale,
                                                    A trans_std, dcn_psroi_bin<I, A>* bin) {
  if (H <= 0 || W <= 0) return false;
  const T* roi = rois + r * 5;
  const A batch = dcn_load(roi[0]);
  if (!(batch >= (A)0 && batch < (A)N && batch == dcn_floor(batch))) return false;
  const A x1 = dcn_load(roi[1]), y1 = dcn_load(roi[2]);
  const A x2 = dcn_load(roi[3]), y2 = dcn_load(roi[4]);
  if (!(dcn_finite(x1) && dcn_finite(y1) && dcn_finite(x2) &&
        dcn_finite(y2)))
    return false;
  bin->b = (I)batch;
  const A start_w = dcn_psroi_round(x1) * spatial_scale - (A)0.5;
  const A start_h = dcn_psroi_round(y1) * spatial_scale - (A)0.5;
  const A end_w = (dcn_psroi_round(x2) + (A)1) * spatial_scale - (A)0.5;
  const A end_h = (dcn_psroi_round(y2) + (A)1) * spatial_scale - (A)0.5;
  A roi_w = end_w - start_w, roi_h = end_h - start_h;
  if (!(roi_w > (A)0.1)) roi_w = (A)0.1;  // too small RoIs count as 0.1 wide
  if (!(roi_h > (A)0.1)) roi_h = (A)0.1;
  const A bin_w = roi_w / (A)pooled, bin_h = roi_h / (A)pooled;
  bin->roi_w = roi_w;
  bin->roi_h = roi_h;
  bin->sub_w = bin_w / (A)sample_per_part;
  bin->sub_h = bin_h / (A)sample_per_part;
  A wstart = (A)px * bin_w + start_w;
  A hstart = (A)py * bin_h + start_h;
  bin->trans_x = -1;
  if (trans) {
    const I part_y = py * part_size / pooled, part_x = px * part_size / pooled;
    bin->trans_x = ((r * num_classes + cls) * 2 * part_size + part_y) * part_size + part_x;
    const A tx = dcn_load(trans[bin->trans_x]);
    const A ty = dcn_load(trans[bin->trans_x + part_size * part_size]);
    if (!(dcn_finite(tx) && dcn_finite(ty))) return false;
    wstart += tx * trans_std * roi_w;
    hstart += ty * trans_std * roi_h;
  }
  // An overflow (huge coordinates or trans) leaves no sample inside anyway;
  // voiding the bin keeps inf * 0 out of the trans gradient.
  if (!(dcn_finite(wstart) && dcn_finite(hstart) && dcn_finite(roi_w) &&
        dcn_finite(roi_h)))
    return false;
  bin->wstart = wstart;
  bin->hstart = hstart;
  return true;
}

// The floor/ceil corners of one sample, after the clamp; false when the
// sample is skipped (outside [-0.5, W-0.5] x [-0.5, H-0.5], or not finite).
template <typename I, typename A>
struct dcn_psroi_corners {
  I i00, i01, i10, i11;  // (y0, x0), (y0, x1), (y1, x0), (y1, x1)
  A dist_x, dist_y;
};

// The corners of the sample (h, w), after the clamp, against the cell whose
// top-left corner is (y0, x0), y0 in [0, H-1], x0 in [0, W-1]: the
// deterministic gather passes the cell the key kernel chose, so a position
// that the two kernels round one ulp apart is still weighed, never dropped.
template <typename I, typename A>
__device__ __forceinline__ void dcn_psroi_corners_at(I H, I W, A h, A w, I y0, I x0,
                                                     dcn_psroi_corners<I, A>* s) {
  w = w < (A)0 ? (A)0 : (w > (A)(W - 1) ? (A)(W - 1) : w);
  h = h < (A)0 ? (A)0 : (h > (A)(H - 1) ? (A)(H - 1) : h);
  const I x1 = (A)x0 < w ? x0 + 1 : x0;  // ceil
  const I y1 = (A)y0 < h ? y0 + 1 : y0;
  s->dist_x = w - (A)x0;
  s->dist_y = h - (A)y0;
  s->i00 = y0 * W + x0;
  s->i01 = y0 * W + x1;
  s->i10 = y1 * W + x0;
  s->i11 = y1 * W + x1;
}

template <typename I, typename A>
__device__ __forceinline__ bool dcn_psroi_corners_setup(I H, I W, A h, A w,
                                                        dcn_psroi_corners<I, A>* s) {
  if (!(w >= (A)-0.5 && w <= (A)W - (A)0.5 && h >= (A)-0.5 && h <= (A)H - (A)0.5)) return false;
  const A wc = w < (A)0 ? (A)0 : (w > (A)(W - 1) ? (A)(W - 1) : w);
  const A hc = h < (A)0 ? (A)0 : (h > (A)(H - 1) ? (A)(H - 1) : h);
  dcn_psroi_corners_at(H, W, hc, wc, (I)dcn_floor(hc), (I)dcn_floor(wc), s);
  return true;
}

// The position-sensitive group of bin coordinate p: p*G/pooled in [0, G-1].
template <typename I>
__device__ __forceinline__ I dcn_psroi_group(I p, I group_size, I pooled) {
  const I g = p * group_size / pooled;
  return g < 0 ? 0 : (g > group_size - 1 ? group_size - 1 : g);
}

template <typename T, typename I>
__global__ void deform_psroi_pool_forward(
    const T* __restrict__ input, const T* __restrict__ rois, const T* __restrict__ trans,
    T* __restrict__ output, typename dcn_acc<T>::type* __restrict__ count, I N, I C, I H, I W,
    I R, I output_dim, I group_size, I pooled, I part_size, I sample_per_part, I num_classes,
    typename dcn_acc<T>::type spatial_scale, typename dcn_acc<T>::type trans_std) {
  typedef typename dcn_acc<T>::type A;
  const I n = R * output_dim * pooled * pooled;
  const I channels_each_class = output_dim / num_classes;
  DCN_KERNEL_LOOP(index, I, n) {
    const I px = index % pooled;
    I t = index / pooled;
    const I py = t % pooled;
    t /= pooled;
    const I c = t % output_dim;
    const I r = t / output_dim;
    A sum = 0, used = 0;
    dcn_psroi_bin<I, A> bin;
    if (dcn_psroi_bin_setup(rois, trans, r, c / channels_each_class, py, px, N, H, W, pooled,
                            part_size, sample_per_part, num_classes, spatial_scale, trans_std,
                            &bin)) {
      const I gy = dcn_psroi_group(py, group_size, pooled);
      const I gx = dcn_psroi_group(px, group_size, pooled);
      const T* plane = input + (bin.b * C + (c * group_size + gy) * group_size + gx) * H * W;
      for (I ih = 0; ih < sample_per_part; ++ih) {
        const A h = bin.hstart + (A)ih * bin.sub_h;
        for (I iw = 0; iw < sample_per_part; ++iw) {
          dcn_psroi_corners<I, A> s;
          if (!dcn_psroi_corners_setup(H, W, h, bin.wstart + (A)iw * bin.sub_w, &s)) continue;
          const A dx = s.dist_x, dy = s.dist_y;
          sum += ((A)1 - dx) * ((A)1 - dy) * dcn_load(plane[s.i00]) +
                 ((A)1 - dx) * dy * dcn_load(plane[s.i10]) +
                 dx * ((A)1 - dy) * dcn_load(plane[s.i01]) + dx * dy * dcn_load(plane[s.i11]);
          used += (A)1;
        }
      }
    }
    output[index] = dcn_store<T>(used > (A)0 ? sum / used : (A)0);
    count[index] = used;
  }
}

template <typename T, typename I>
__global__ void deform_psroi_pool_backward_input(
    const T* __restrict__ grad_output, const T* __restrict__ rois, const T* __restrict__ trans,
    const typename dcn_acc<T>::type* __restrict__ count,
    typename dcn_acc<T>::type* __restrict__ grad_input, I N, I C, I H, I W, I R, I output_dim,
    I group_size, I pooled, I part_size, I sample_per_part, I num_classes,
    typename dcn_acc<T>::type spatial_scale, typename dcn_acc<T>::type trans_std) {
  typedef typename dcn_acc<T>::type A;
  const I n = R * output_dim * pooled * pooled;
  const I channels_each_class = output_dim / num_classes;
  DCN_KERNEL_LOOP(index, I, n) {
    const A used = count[index];
    if (!(used > (A)0)) continue;
    const I px = index % pooled;
    I t = index / pooled;
    const I py = t % pooled;
    t /= pooled;
    const I c = t % output_dim;
    const I r = t / output_dim;
    dcn_psroi_bin<I, A> bin;
    if (!dcn_psroi_bin_setup(rois, trans, r, c / channels_each_class, py, px, N, H, W, pooled,
                             part_size, sample_per_part, num_classes, spatial_scale, trans_std,
                             &bin))
      continue;
    const A diff = dcn_load(grad_output[index]) / used;
    const I gy = dcn_psroi_group(py, group_size, pooled);
    const I gx = dcn_psroi_group(px, group_size, pooled);
    A* plane = grad_input + (bin.b * C + (c * group_size + gy) * group_size + gx) * H * W;
    for (I ih = 0; ih < sample_per_part; ++ih) {
      const A h = bin.hstart + (A)ih * bin.sub_h;
      for (I iw = 0; iw < sample_per_part; ++iw) {
        dcn_psroi_corners<I, A> s;
        if (!dcn_psroi_corners_setup(H, W, h, bin.wstart + (A)iw * bin.sub_w, &s)) continue;
        const A dx = s.dist_x, dy = s.dist_y;
        atomicAdd(plane + s.i00, ((A)1 - dx) * ((A)1 - dy) * diff);
        atomicAdd(plane + s.i10, ((A)1 - dx) * dy * diff);
        atomicAdd(plane + s.i01, dx * ((A)1 - dy) * diff);
        atomicAdd(plane + s.i11, dx * dy * diff);
      }
    }
  }
}

// One lane's trans gradient terms of bin (r, cls, py, px): summed over the
// class's channels c_begin + lane, c_begin + lane + lanes, ... and the bin's
// counted samples, times trans_std*roi_w (x) and trans_std*roi_h (y) (lanes =
// 1: the whole bin); false (and nothing) for a void bin. *bin gets the bin.
template <typename T, typename I, typename A>
__device__ __forceinline__ bool dcn_psroi_trans_bin(
    const T* grad_output, const T* input, const T* rois, const T* trans, const A* count, I r,
    I cls, I py, I px, I lane, I lanes, I N, I C, I H, I W, I output_dim, I group_size,
    I pooled, I part_size, I sample_per_part, I num_classes, A spatial_scale, A trans_std,
    dcn_psroi_bin<I, A>* bin, A* grad_x, A* grad_y) {
  if (!dcn_psroi_bin_setup(rois, trans, r, cls, py, px, N, H, W, pooled, part_size,
                           sample_per_part, num_classes, spatial_scale, trans_std, bin))
    return false;
  const I bins = pooled * pooled;
  const I pixel = py * pooled + px;
  const I channels_each_class = output_dim / num_classes;
  const I gy = dcn_psroi_group(py, group_size, pooled);
  const I gx = dcn_psroi_group(px, group_size, pooled);
  const I c_begin = cls * channels_each_class;
  const I plane_size = H * W;
  const T* image = input + bin->b * C * plane_size;
  A sum_x = 0, sum_y = 0;
  for (I ih = 0; ih < sample_per_part; ++ih) {
    const A h = bin->hstart + (A)ih * bin->sub_h;
    for (I iw = 0; iw < sample_per_part; ++iw) {
      dcn_psroi_corners<I, A> s;
      if (!dcn_psroi_corners_setup(H, W, h, bin->wstart + (A)iw * bin->sub_w, &s)) continue;
      const A dx = s.dist_x, dy = s.dist_y;
      for (I c = c_begin + lane; c < c_begin + channels_each_class; c += lanes) {
        const I out_index = (r * output_dim + c) * bins + pixel;
        const A used = count[out_index];
        if (!(used > (A)0)) continue;
        const A diff = dcn_load(grad_output[out_index]) / used;
        const T* plane = image + ((c * group_size + gy) * group_size + gx) * plane_size;
        const A u00 = dcn_load(plane[s.i00]), u01 = dcn_load(plane[s.i01]);
        const A u10 = dcn_load(plane[s.i10]), u11 = dcn_load(plane[s.i11]);
        sum_x += diff * (((A)1 - dy) * (u01 - u00) + dy * (u11 - u10));
        sum_y += diff * (((A)1 - dx) * (u10 - u00) + dx * (u11 - u01));
      }
    }
  }
  *grad_x = sum_x * trans_std * bin->roi_w;
  *grad_y = sum_y * trans_std * bin->roi_h;
  return true;
}

template <typename T, typename I>
__global__ void deform_psroi_pool_backward_trans(
    const T* __restrict__ grad_output, const T* __restrict__ input, const T* __restrict__ rois,
    const T* __restrict__ trans, const typename dcn_acc<T>::type* __restrict__ count,
    typename dcn_acc<T>::type* __restrict__ grad_trans, I lanes, I N, I C, I H, I W, I R,
    I output_dim, I group_size, I pooled, I part_size, I sample_per_part, I num_classes,
    typename dcn_acc<T>::type spatial_scale, typename dcn_acc<T>::type trans_std) {
  typedef typename dcn_acc<T>::type A;
  const I bins = pooled * pooled;
  const I items = R * num_classes * bins;
  const I threads = ((items * lanes + 31) / 32) * 32;  // whole warps
  DCN_KERNEL_LOOP(t, I, threads) {
    const I index = t / lanes;  // the bin (r*num_classes + cls)*bins + pixel
    const I lane = t % lanes;
    const bool active = index < items;
    const I pixel = active ? index % bins : 0;
    const I rc = active ? index / bins : 0;
    const I cls = rc % num_classes;
    const I r = rc / num_classes;
    dcn_psroi_bin<I, A> bin;
    A grad_x = 0, grad_y = 0;
    const bool ok =
        active && dcn_psroi_trans_bin(grad_output, input, rois, trans, count, r, cls,
                                      pixel / pooled, pixel % pooled, lane, lanes, N, C, H, W,
                                      output_dim, group_size, pooled, part_size,
                                      sample_per_part, num_classes, spatial_scale, trans_std,
                                      &bin, &grad_x, &grad_y);
    for (I s = lanes / 2; s > 0; s /= 2) {  // every lane of the warp is here
      grad_x += __shfl_xor_sync(0xffffffffu, grad_x, (int)s);
      grad_y += __shfl_xor_sync(0xffffffffu, grad_y, (int)s);
    }
    if (!ok || lane != 0) continue;
    atomicAdd(grad_trans + bin.trans_x, grad_x);
    atomicAdd(grad_trans + bin.trans_x + part_size * part_size, grad_y);
  }
}

// ---- deterministic gradients (no floating-point atomics) ----

// One thread per sample s of bins [k0, k1): its key (see the opening paragraph).
template <typename T, typename I>
__global__ void deform_psroi_pool_sample_keys(
    const T* __restrict__ rois, const T* __restrict__ trans, long long* __restrict__ keys, I N,
    I C, I H, I W, I R, I output_dim, I group_size, I pooled, I part_size, I sample_per_part,
    I num_classes, typename dcn_acc<T>::type spatial_scale,
    typename dcn_acc<T>::type trans_std, I k0, I k1) {
  typedef typename dcn_acc<T>::type A;
  const I spp2 = sample_per_part * sample_per_part;
  const I n = (k1 - k0) * spp2;
  const long long S = (long long)n;
  const long long groups = (long long)group_size * group_size;
  const long long plane = (long long)H * W;
  const long long none = (long long)N * num_classes * groups * plane;
  DCN_KERNEL_LOOP(s, I, n) {
    const I k = k0 + s / spp2, j = s % spp2;
    const I px = k % pooled;
    I t = k / pooled;
    const I py = t % pooled;
    t /= pooled;
    const I cls = t % num_classes;
    const I r = t / num_classes;
    long long cell = none;
    dcn_psroi_bin<I, A> bin;
    if (dcn_psroi_bin_setup(rois, trans, r, cls, py, px, N, H, W, pooled, part_size,
                            sample_per_part, num_classes, spatial_scale, trans_std, &bin)) {
      const I ih = j / sample_per_part, iw = j % sample_per_part;
      const A h = bin.hstart + (A)ih * bin.sub_h;
      dcn_psroi_corners<I, A> q;
      if (dcn_psroi_corners_setup(H, W, h, bin.wstart + (A)iw * bin.sub_w, &q)) {
        const I g = dcn_psroi_group(py, group_size, pooled) * group_size +
                    dcn_psroi_group(px, group_size, pooled);
        cell = (((long long)bin.b * num_classes + cls) * groups + g) * plane + (long long)q.i00;
      }
    }
    keys[s] = cell * S + (long long)s;
  }
}

// One thread per input element (b, c_in, yy, xx); order[e] is the chunk's
// e-th sample (relative to bin k0) in key order, starts[cell] the first entry
// of a cell.
template <typename T, typename I>
__global__ void deform_psroi_pool_backward_input_gather(
    const T* __restrict__ grad_output, const T* __restrict__ rois, const T* __restrict__ trans,
    const typename dcn_acc<T>::type* __restrict__ count, const long long* __restrict__ order,
    const long long* __restrict__ starts, typename dcn_acc<T>::type* __restrict__ grad_input,
    I N, I C, I H, I W, I R, I output_dim, I group_size, I pooled, I part_size,
    I sample_per_part, I num_classes, typename dcn_acc<T>::type spatial_scale,
    typename dcn_acc<T>::type trans_std, I k0, I k1) {
  typedef typename dcn_acc<T>::type A;
  const I n = N * C * H * W;
  const I spp2 = sample_per_part * sample_per_part;
  const I groups = group_size * group_size;
  const I channels_each_class = output_dim / num_classes;
  const long long plane = (long long)H * W;
  DCN_KERNEL_LOOP(index, I, n) {
    const I xx = index % W;
    const I yy = (index / W) % H;
    const I c_in = (index / (W * H)) % C;
    const I b = index / (W * H * C);
    const I c_out = c_in / groups;
    const I cls = c_out / channels_each_class;
    const I p = yy * W + xx;
    const long long segment = (((long long)b * num_classes + cls) * groups + c_in % groups) * plane;
    A sum = 0;
    for (I y0 = yy - 1; y0 <= yy; ++y0) {
      if (y0 < 0) continue;
      for (I x0 = xx - 1; x0 <= xx; ++x0) {
        if (x0 < 0) continue;
        const long long cell = segment + (long long)(y0 * W + x0);
        const long long end = starts[cell + 1];
        for (long long e = starts[cell]; e < end; ++e) {
          const I s = (I)order[e];
          const I k = k0 + s / spp2, j = s % spp2;
          const I px = k % pooled;
          const I py = (k / pooled) % pooled;
          const I r = k / (pooled * pooled * num_classes);
          const I out_index = ((r * output_dim + c_out) * pooled + py) * pooled + px;
          const A used = count[out_index];
          if (!(used > (A)0)) continue;
          dcn_psroi_bin<I, A> bin;
          if (!dcn_psroi_bin_setup(rois, trans, r, cls, py, px, N, H, W, pooled, part_size,
                                   sample_per_part, num_classes, spatial_scale, trans_std, &bin))
            continue;
          const A diff = dcn_load(grad_output[out_index]) / used;
          const I ih = j / sample_per_part, iw = j % sample_per_part;
          const A h = bin.hstart + (A)ih * bin.sub_h;
          // Against the cell the key kernel chose (no second range check or
          // floor, which one ulp of rounding could move): the sample counts.
          dcn_psroi_corners<I, A> q;
          dcn_psroi_corners_at(H, W, h, bin.wstart + (A)iw * bin.sub_w, y0, x0, &q);
          const A dx = q.dist_x, dy = q.dist_y;
          if (q.i00 == p) sum += ((A)1 - dx) * ((A)1 - dy) * diff;
          if (q.i10 == p) sum += ((A)1 - dx) * dy * diff;
          if (q.i01 == p) sum += dx * ((A)1 - dy) * diff;
          if (q.i11 == p) sum += dx * dy * diff;
        }
      }
    }
    grad_input[index] += sum;
  }
}

// `lanes` threads of a warp per trans cell (r, cls, part_y, part_x): each lane
// adds its channels' terms of the bins whose part cell it is, in row-major
// bin order; the lanes' sums are reduced with __shfl_xor_sync (a fixed
// order) and lane 0 writes both coordinates.
template <typename T, typename I>
__global__ void deform_psroi_pool_backward_trans_gather(
    const T* __restrict__ grad_output, const T* __restrict__ input, const T* __restrict__ rois,
    const T* __restrict__ trans, const typename dcn_acc<T>::type* __restrict__ count,
    typename dcn_acc<T>::type* __restrict__ grad_trans, I lanes, I N, I C, I H, I W, I R,
    I output_dim, I group_size, I pooled, I part_size, I sample_per_part, I num_classes,
    typename dcn_acc<T>::type spatial_scale, typename dcn_acc<T>::type trans_std) {
  typedef typename dcn_acc<T>::type A;
  const I cells = part_size * part_size;
  const I items = R * num_classes * cells;
  const I threads = ((items * lanes + 31) / 32) * 32;  // whole warps
  DCN_KERNEL_LOOP(t, I, threads) {
    const I index = t / lanes;  // the cell (r*num_classes + cls)*cells + part_y*part_size + part_x
    const I lane = t % lanes;
    const bool active = index < items;
    const I part_x = index % part_size;
    const I part_y = (index / part_size) % part_size;
    const I rc = index / cells;  // r*num_classes + cls
    const I cls = rc % num_classes;
    const I r = rc / num_classes;
    A sum_x = 0, sum_y = 0;
    for (I py = 0; active && py < pooled; ++py) {
      if (py * part_size / pooled != part_y) continue;
      for (I px = 0; px < pooled; ++px) {
        if (px * part_size / pooled != part_x) continue;
        dcn_psroi_bin<I, A> bin;
        A grad_x, grad_y;
        if (!dcn_psroi_trans_bin(grad_output, input, rois, trans, count, r, cls, py, px, lane,
                                 lanes, N, C, H, W, output_dim, group_size, pooled, part_size,
                                 sample_per_part, num_classes, spatial_scale, trans_std, &bin,
                                 &grad_x, &grad_y))
          continue;
        sum_x += grad_x;
        sum_y += grad_y;
      }
    }
    for (I s = lanes / 2; s > 0; s /= 2) {  // every lane of the warp is here
      sum_x += __shfl_xor_sync(0xffffffffu, sum_x, (int)s);
      sum_y += __shfl_xor_sync(0xffffffffu, sum_y, (int)s);
    }
    if (!active || lane != 0) continue;
    const I out = (rc * 2 * part_size + part_y) * part_size + part_x;
    grad_trans[out] = sum_x;
    grad_trans[out + cells] = sum_y;
  }
}
