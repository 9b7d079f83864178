// deform_psroi_pool.cu: deformable position-sensitive RoI pooling, the
// official DCN operator (DeformablePSROIPooling; SEMANTICS.md section 3).
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
// - deform_psroi_pool_backward_trans: one thread per (r, cls, py, px),
//   reducing over the class's channels in registers, then one atomicAdd per
//   coordinate into the A-typed grad_trans (several bins share a part cell).
//   The official rule: at the clamped position, d/dx = (1-dist_y)*(U[y0,x1] -
//   U[y0,x0]) + dist_y*(U[y1,x1] - U[y1,x0]) with floor/ceil corners, so a
//   clamped or integral coordinate gives 0; times trans_std*roi_w (roi_h for
//   y) times grad / count.
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

template <typename I, typename A>
__device__ __forceinline__ bool dcn_psroi_corners_setup(I H, I W, A h, A w,
                                                        dcn_psroi_corners<I, A>* s) {
  if (!(w >= (A)-0.5 && w <= (A)W - (A)0.5 && h >= (A)-0.5 && h <= (A)H - (A)0.5)) return false;
  w = w < (A)0 ? (A)0 : (w > (A)(W - 1) ? (A)(W - 1) : w);
  h = h < (A)0 ? (A)0 : (h > (A)(H - 1) ? (A)(H - 1) : h);
  const A xf = dcn_floor(w), yf = dcn_floor(h);
  const I x0 = (I)xf, y0 = (I)yf;
  const I x1 = xf < w ? x0 + 1 : x0;  // ceil
  const I y1 = yf < h ? y0 + 1 : y0;
  s->dist_x = w - xf;
  s->dist_y = h - yf;
  s->i00 = y0 * W + x0;
  s->i01 = y0 * W + x1;
  s->i10 = y1 * W + x0;
  s->i11 = y1 * W + x1;
  return true;
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
      I gy = py * group_size / pooled, gx = px * group_size / pooled;
      gy = gy < 0 ? 0 : (gy > group_size - 1 ? group_size - 1 : gy);
      gx = gx < 0 ? 0 : (gx > group_size - 1 ? group_size - 1 : gx);
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
    I gy = py * group_size / pooled, gx = px * group_size / pooled;
    gy = gy < 0 ? 0 : (gy > group_size - 1 ? group_size - 1 : gy);
    gx = gx < 0 ? 0 : (gx > group_size - 1 ? group_size - 1 : gx);
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

template <typename T, typename I>
__global__ void deform_psroi_pool_backward_trans(
    const T* __restrict__ grad_output, const T* __restrict__ input, const T* __restrict__ rois,
    const T* __restrict__ trans, const typename dcn_acc<T>::type* __restrict__ count,
    typename dcn_acc<T>::type* __restrict__ grad_trans, I N, I C, I H, I W, I R, I output_dim,
    I group_size, I pooled, I part_size, I sample_per_part, I num_classes,
    typename dcn_acc<T>::type spatial_scale, typename dcn_acc<T>::type trans_std) {
  typedef typename dcn_acc<T>::type A;
  const I bins = pooled * pooled;
  const I n = R * num_classes * bins;
  const I channels_each_class = output_dim / num_classes;
  DCN_KERNEL_LOOP(index, I, n) {
    const I pixel = index % bins;
    const I t = index / bins;
    const I cls = t % num_classes;
    const I r = t / num_classes;
    const I py = pixel / pooled, px = pixel % pooled;
    dcn_psroi_bin<I, A> bin;
    if (!dcn_psroi_bin_setup(rois, trans, r, cls, py, px, N, H, W, pooled, part_size,
                             sample_per_part, num_classes, spatial_scale, trans_std, &bin))
      continue;
    I gy = py * group_size / pooled, gx = px * group_size / pooled;
    gy = gy < 0 ? 0 : (gy > group_size - 1 ? group_size - 1 : gy);
    gx = gx < 0 ? 0 : (gx > group_size - 1 ? group_size - 1 : gx);
    const I c_begin = cls * channels_each_class;
    const I plane_size = H * W;
    const T* image = input + bin.b * C * plane_size;
    A sum_x = 0, sum_y = 0;
    for (I ih = 0; ih < sample_per_part; ++ih) {
      const A h = bin.hstart + (A)ih * bin.sub_h;
      for (I iw = 0; iw < sample_per_part; ++iw) {
        dcn_psroi_corners<I, A> s;
        if (!dcn_psroi_corners_setup(H, W, h, bin.wstart + (A)iw * bin.sub_w, &s)) continue;
        const A dx = s.dist_x, dy = s.dist_y;
        for (I c = c_begin; c < c_begin + channels_each_class; ++c) {
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
    atomicAdd(grad_trans + bin.trans_x, sum_x * trans_std * bin.roi_w);
    atomicAdd(grad_trans + bin.trans_x + part_size * part_size, sum_y * trans_std * bin.roi_h);
  }
}
