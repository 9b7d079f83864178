"""The roofline model behind benchmarks/NOTES.md: predicted, not measured.

``python benchmarks/roofline.py`` prints, for the suite's DCNv2 cases (3x3,
padding 1, Cin = Cout, mask and bias, one offset group unless given), the
predicted H200 time of each implementation in milliseconds, and the ratios to
the torchvision and cuDNN anchors measured on an H100 (/work/shared/ANCHORS.md,
copied into ``ANCHORS`` below). Every pass costs max(bytes / bandwidth,
FLOPs / rate) + float atomics / atomic rate + a launch overhead; the constants
are stated once, here, so a measurement can replace each one.
"""

import math

# H200 (device notes): 4.8 TB/s HBM, ~790 TFLOP/s dense bf16/f16, ~60 TFLOP/s f32 SIMT.
BW = 4.8e12 * 0.80                 # sustained fraction of peak bandwidth
TC = 790e12                        # dense f16/bf16 tensor-core peak
TC_EFF = {64: 0.30, 128: 0.40, 256: 0.50, 512: 0.55}   # cuBLAS efficiency by M = Cout
TF32 = TC / 2
SIMT = 60e12 * 0.75                # f32 SGEMM (and f32 FMA work) sustained
ATOMICS = 150e9                    # float atomicAdd/s to scattered addresses (the uncertain term)
LAUNCH = 4e-6                      # per kernel launch / cuBLAS call, host side included

# (B, C, H, W): torchvision fwd fp32, tv fwd+bwd fp32, cuDNN fwd+bwd fp32,
# tv fwd+bwd fp16, cuDNN fwd+bwd fp16 (ms, H100, ANCHORS.md)
ANCHORS = {
    (2, 128, 100, 152): (0.55, 3.87, 0.88, 4.12, 0.58),
    (2, 256, 50, 76): (0.40, 2.60, 1.92, 2.96, 0.55),
    (2, 512, 25, 38): (0.40, 2.21, 0.82, 2.17, 0.60),
    (16, 64, 128, 128): (1.71, 12.65, 2.12, 13.34, 0.67),
    (8, 256, 64, 64): (1.43, 8.14, 3.84, 7.98, 0.50),
}


SAMPLES = 150e9   # bilinear samples/s (4 gathers) of the NCHW kernels: calibrated on the
                  # torchvision forward anchors (tv fwd - GEMM at SIMT = 100-265 G samples/s)
SAMPLES_NHWC = 4 * SAMPLES   # one position per (pixel, tap), 16-byte channel vectors


def t(bytes_=0.0, flops=0.0, rate=SIMT, atomics=0.0, samples=0.0, launches=1, sample_rate=SAMPLES):
    """One pass: the slowest of memory, math and sampling, plus atomics and launches."""
    return (max(bytes_ / BW, flops / rate, samples / sample_rate) + atomics / ATOMICS
            + launches * LAUNCH)


def model(B, C, H, W, dtype, dg=1):
    """Predicted seconds per (implementation, pass) for one case, and the GEMM FLOPs."""
    s = 2 if dtype in ("float16", "bfloat16") else 4
    half = s == 2
    P, K, Cout = B * H * W, 9 * C, C
    S = K * P                                   # bilinear samples of one im2col pass
    gflop = 2.0 * Cout * K * P
    rate = TC * TC_EFF.get(min(Cout, 512), 0.5) if half else SIMT
    x, out = B * C * H * W * s, B * Cout * H * W * s
    offmask = 3 * 9 * dg * P * s
    cols, gcols = K * P * s, K * P * 4          # columns (storage type), their gradient (f32)
    atomics = 4 * K * P                         # col2im: four corners per sample and channel
    gin = x * 4 / s * 2 + x                     # f32 input gradient: zero, cast to the dtype
    r = {}
    # ---- im2col as landed before this change: f32 columns and SIMT GEMMs for the half
    # types, output transposed, weight and grad_output converted per call
    c32 = K * P * 4
    r["before", "fwd"] = (t(x + offmask + c32, samples=S) + t(2 * c32, gflop, SIMT)
                          + t(3 * out) + 2 * LAUNCH)
    r["before", "bwd"] = (t(3 * out) + t(out + c32, gflop, SIMT)
                          + t(c32 + x + offmask, samples=2 * S)          # col2im_coord
                          + t(c32, atomics=atomics) + t(gin)             # col2im
                          + t(x + offmask + c32, samples=S) + t(c32 + out, gflop, SIMT))
    # ---- im2col (this change): storage-type columns, tensor cores, GEMM into place
    r["im2col", "fwd"] = (t(x + offmask + cols, samples=S) + t(out)      # im2col, bias fill
                          + t(cols + 2 * out, gflop, rate))              # GEMM, beta = 1
    r["im2col", "bwd"] = (t(out + gcols, gflop, rate)                    # grad_columns GEMM
                          + t(gcols + x + offmask, samples=2 * S)        # col2im_coord
                          + t(gcols, atomics=atomics) + t(gin)           # col2im
                          + t(x + offmask + cols, samples=S)             # im2col again
                          + t(cols + out, gflop, rate, launches=B))      # dW, one GEMM per image
    # ---- im2col_fused backward: one sampling per (tap, pixel) gives the offset, mask and
    # input gradients; atomics aggregated where lanes hit one address (assumed half)
    r["im2col_fused", "bwd"] = (t(out + gcols, gflop, rate)
                                + t(gcols + x + offmask, atomics=atomics / 2, samples=S)
                                + t(gin) + t(x + offmask + cols, samples=S)
                                + t(cols + out, gflop, rate, launches=B))
    # ---- im2col_nhwc: the same passes on channels-last memory. im2col samples one
    # position per (pixel, tap) for a 16-byte vector of channels (SAMPLES_NHWC), its GEMMs
    # write the NHWC output in place; the fused backward's atomics from consecutive lanes
    # land on consecutive addresses of one pixel (a warp's 32 adds hit 1-2 lines: assumed
    # 4x cheaper than scattered ones); the weight gradient is one GEMM per group per tile
    r["im2col_nhwc", "fwd"] = (t(x + offmask + cols, samples=S, sample_rate=SAMPLES_NHWC)
                               + t(out) + t(cols + 2 * out, gflop, rate))
    r["im2col_nhwc", "bwd"] = (t(out + gcols, gflop, rate)
                               + t(gcols + x + offmask, atomics=atomics / 4, samples=S,
                                   sample_rate=SAMPLES_NHWC)
                               + t(gin) + t(x + offmask + cols, samples=S,
                                            sample_rate=SAMPLES_NHWC)
                               + t(cols + out, gflop, rate))
    # ---- implicit GEMM forward: the samples made in shared memory per tile of 64
    # output channels (the kernel's N tile: re-sampled per Cout tile), overlapped with
    # the MMAs
    tiles = math.ceil(Cout / 64)
    r["implicit_gemm", "fwd"] = t(x + offmask + out, gflop, rate if half else SIMT,
                                  samples=S * tiles) * 1.15
    r["implicit_gemm NHWC", "fwd"] = t(x + offmask + out, gflop, rate if half else SIMT,
                                       samples=S * math.ceil(Cout / 128),  # its planned tile
                                       sample_rate=SAMPLES_NHWC) * 1.15
    # ---- implicit GEMM backward (kernels/deform_conv_igemm.cu), two kernels:
    # dW = grad_out @ S over pixels split across blocks, the samples S re-made per
    # 128-channel Cout tile as the forward makes them, tiles added with atomics
    # (CUDA_BLOCKS x 128 x 64 of them: negligible); the data gradient grad_out^T @ W per
    # 64 x 64 tile of (pixels, K), reduced over Cout in the block, its epilogue one
    # sample (4 gathers) per (pixel, k) and 4 input atomics, not aggregated, plus 3
    # offset/mask atomics per (pixel, 16-channel chunk); the input gradient zeroed in
    # float32 and converted, as every kernel path.
    r["implicit_gemm", "bwd"] = (t(x + offmask + out, gflop, rate if half else SIMT,
                                   samples=S * math.ceil(Cout / 128)) * 1.15
                                 + t(out + x + offmask, gflop, rate if half else SIMT,
                                     samples=S, atomics=atomics + 3 * K * P / 16) * 1.15
                                 + t(gin))
    return r, gflop


def main():
    """Markdown tables: ms predicted on an H200 (fwd / fwd+bwd), ratios to the H100 anchors
    (tv = torchvision time / cupydcn time: above 1 is faster than torchvision; cuDNN =
    cupydcn time / cuDNN time: below 1.5 meets the forward target). cuDNN's forward
    alone is not an anchor: taken as a third of its forward+backward."""
    for dtype in ("float32", "float16", "bfloat16"):
        print(f"\n{dtype}\n")
        print("| case | GFLOP fwd | before fwd / f+b | im2col fwd / f+b | tv fwd x | tv f+b x "
              "| + im2col_fused f+b (tv x) | implicit_gemm fwd / f+b (tv f+b x) "
              "| implicit NHWC fwd (cuDNN fwd ratio) "
              "| im2col_nhwc fwd / f+b (cuDNN fwd ratio; tv f+b x) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        logs = {k: [] for k in ("tvf", "tvfb", "fused", "ig", "nhwc", "cl_fwd", "cl_fb")}
        for (B, C, H, W), anchor in ANCHORS.items():
            r, gflop = model(B, C, H, W, dtype)
            tv_fwd, tv_fb32, cudnn_fb32, tv_fb16, cudnn_fb16 = (a / 1e3 for a in anchor)
            tv_fb = tv_fb32 if dtype == "float32" else tv_fb16
            cudnn_fwd = (cudnn_fb32 if dtype == "float32" else cudnn_fb16) / 3
            before = (r["before", "fwd"], r["before", "fwd"] + r["before", "bwd"])
            new = (r["im2col", "fwd"], r["im2col", "fwd"] + r["im2col", "bwd"])
            fused = r["im2col", "fwd"] + r["im2col_fused", "bwd"]
            ig = (r["implicit_gemm", "fwd"], r["implicit_gemm", "fwd"] + r["implicit_gemm", "bwd"])
            nhwc = r["implicit_gemm NHWC", "fwd"]
            cl = (r["im2col_nhwc", "fwd"], r["im2col_nhwc", "fwd"] + r["im2col_nhwc", "bwd"])
            ratios = dict(tvf=tv_fwd / new[0], tvfb=tv_fb / new[1], fused=tv_fb / fused,
                          ig=tv_fb / ig[1], nhwc=nhwc / cudnn_fwd, cl_fwd=cl[0] / cudnn_fwd,
                          cl_fb=tv_fb / cl[1])
            for k, v in ratios.items():
                logs[k].append(math.log(v))
            ms = lambda v: f"{v * 1e3:.2f}"  # noqa: E731
            print(f"| B{B} C{C} {H}x{W} | {gflop / 1e9:.1f} | {ms(before[0])} / {ms(before[1])} "
                  f"| {ms(new[0])} / {ms(new[1])} | {ratios['tvf']:.1f} | {ratios['tvfb']:.1f} "
                  f"| {ms(fused)} ({ratios['fused']:.1f}) | {ms(ig[0])} / {ms(ig[1])} "
                  f"({ratios['ig']:.1f}) | {ms(nhwc)} ({ratios['nhwc']:.2f}) "
                  f"| {ms(cl[0])} / {ms(cl[1])} ({ratios['cl_fwd']:.2f}; {ratios['cl_fb']:.1f}) |")
        g = {k: math.exp(sum(v) / len(v)) for k, v in logs.items()}
        print(f"| geometric mean | | | | {g['tvf']:.1f} | {g['tvfb']:.1f} | ({g['fused']:.1f}) "
              f"| ({g['ig']:.1f}) | ({g['nhwc']:.2f}) | ({g['cl_fwd']:.2f}; {g['cl_fb']:.1f}) |")


def backward_table():
    """The backward alone (ms, H200) of each NCHW implementation, and the
    implicit GEMM's forward+backward against the anchors (tv x = torchvision
    time / cupydcn time; cuDNN ratio = cupydcn time / cuDNN time)."""
    for dtype in ("float32", "float16", "bfloat16"):
        print(f"\n{dtype}\n")
        print("| case | im2col bwd | im2col_fused bwd | implicit_gemm bwd (x im2col) "
              "| implicit_gemm f+b | tv f+b x | cuDNN f+b ratio |")
        print("|---|---|---|---|---|---|---|")
        logs = {k: [] for k in ("im2col", "tv", "cudnn")}
        for (B, C, H, W), anchor in ANCHORS.items():
            r, _ = model(B, C, H, W, dtype)
            _, tv_fb32, cudnn_fb32, tv_fb16, cudnn_fb16 = (a / 1e3 for a in anchor)
            tv_fb = tv_fb32 if dtype == "float32" else tv_fb16
            cudnn_fb = cudnn_fb32 if dtype == "float32" else cudnn_fb16
            bwd = r["implicit_gemm", "bwd"]
            fb = r["implicit_gemm", "fwd"] + bwd
            ratios = dict(im2col=r["im2col", "bwd"] / bwd, tv=tv_fb / fb, cudnn=fb / cudnn_fb)
            for k, v in ratios.items():
                logs[k].append(math.log(v))
            ms = lambda v: f"{v * 1e3:.2f}"  # noqa: E731
            print(f"| B{B} C{C} {H}x{W} | {ms(r['im2col', 'bwd'])} "
                  f"| {ms(r['im2col_fused', 'bwd'])} | {ms(bwd)} ({ratios['im2col']:.1f}) "
                  f"| {ms(fb)} | {ratios['tv']:.1f} | {ratios['cudnn']:.1f} |")
        g = {k: math.exp(sum(v) / len(v)) for k, v in logs.items()}
        print(f"| geometric mean | | | ({g['im2col']:.1f}) | | {g['tv']:.1f} "
              f"| {g['cudnn']:.1f} |")


if __name__ == "__main__":
    main()
    backward_table()
