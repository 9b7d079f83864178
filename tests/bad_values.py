"""Every op on NaN, +-inf and huge values: the memory-safety workload.

    python tests/bad_values.py host|cupy [mutated]

Runs the kernel paths of every op, forward and backward (the conv backward in
both modes, and every registered kernel implementation of the convolution, on
NCHW and channels-last inputs), on coordinates that are NaN, +-inf, +-1e30 and large finite
values, and on RoIs whose batch index is out of range or NaN (validation is
bypassed so that the kernels' own guards are what is tested); the backwards of
the RoI ops also run in both modes. With ``host`` the
kernels are built for the CPU with AddressSanitizer (test_robustness.py runs
this under libasan); with ``cupy`` they run on the GPU, under
``compute-sanitizer --tool memcheck`` in the GPU tier, with CuPy's memory pool
off. ``mutated`` plants an out-of-bounds write (one element past the columns
buffer), to show the checker catches one. Prints "clean" at the end.
"""

import sys
from types import SimpleNamespace

import numpy

from cupydcn import _deform_conv, _dispatch, _kernels, _roi_pool, _validation

BAD = (numpy.nan, numpy.inf, -numpy.inf, 1e30, -1e30, 3e9, -3e9)


def spoil(array, rng, fraction=0.3):
    """Put bad values at random places of ``array`` (a float64 NumPy array)."""
    flat = array.reshape(-1)
    where = rng.random(flat.size) < fraction
    flat[where] = rng.choice(BAD, int(where.sum()))
    return array


def run(backend, rng):
    xp = backend.xp
    dev = lambda a: xp.asarray(a)  # noqa: E731

    # deformable convolution
    x = rng.standard_normal((2, 4, 6, 7))
    w = rng.standard_normal((6, 2, 3, 3))
    offset = spoil(rng.uniform(-2, 2, (2, 2 * 2 * 9, 6, 7)), rng)
    mask = spoil(rng.uniform(0, 1, (2, 2 * 9, 6, 7)), rng, 0.05)
    grad = rng.standard_normal((2, 6, 6, 7))
    x, w, offset, mask, grad = map(dev, (x, w, offset, mask, grad))
    geo = _validation.check_deform_conv2d(x, offset, w, None, 1, 1, 1, mask)
    _deform_conv.forward(backend, geo, x, offset, w, None, mask)
    for deterministic in (False, True):
        _deform_conv.backward(backend, geo, grad, x, offset, w, mask,
                              frozenset({"input", "offset", "weight", "mask"}), deterministic)
    # every other kernel implementation of the convolution (fused, channels-last,
    # implicit GEMM, ...), forward and backward, with a channels-last input as well
    for layout in (x, x.transpose(0, 2, 3, 1).copy().transpose(0, 3, 1, 2)):
        geo = _validation.check_deform_conv2d(layout, offset, w, None, 1, 1, 1, mask)
        arrays = SimpleNamespace(input=layout, offset=offset, weight=w, bias=None, mask=mask,
                                 grad_output=grad)
        for implementation in _dispatch._registry["deform_conv2d"]:
            if (implementation.launch is None  # the reference
                    or implementation.name in ("im2col", "im2col_deterministic")  # above
                    or (implementation.dtypes is not None
                        and geo.dtype.name not in implementation.dtypes)
                    or (implementation.supports is not None
                        and implementation.supports(geo) is not None)):
                continue
            implementation.forward(backend, geo, arrays)
            implementation.backward(backend, geo, arrays,
                                    frozenset({"input", "offset", "weight", "mask"}))

    # deformable RoI pooling, plain and modulated
    feat = dev(rng.standard_normal((2, 3, 9, 11)))
    rois = rng.uniform(-5, 15, (12, 5))
    rois[:, 0] = [0, 1, 2, -1, numpy.nan, numpy.inf, 1e30, 0, 1, 0, 1, 0]
    spoil(rois[:, 1:], rng, 0.2)
    rois = dev(rois)
    roi_offset = dev(spoil(rng.uniform(-1, 1, (12, 2, 3, 3)), rng, 0.2))
    roi_mask = dev(spoil(rng.uniform(0, 1, (12, 1, 3, 3)), rng, 0.1))
    for sampling_ratio in (0, 2):
        geo = _validation.check_deform_roi_pool(feat, rois, roi_offset, 3, 0.5, sampling_ratio,
                                                0.1, roi_mask, check_batch=False)
        _roi_pool.roi_pool_forward(backend, geo, feat, rois, roi_offset, roi_mask)
        roi_grad = dev(rng.standard_normal((12, 3, 3, 3)))
        for deterministic in (False, True):
            _roi_pool.roi_pool_backward(backend, geo, roi_grad, feat, rois, roi_offset, roi_mask,
                                        _roi_pool.ROI_GRADIENTS, deterministic)

    # deformable position-sensitive RoI pooling, 2 classes
    ps_feat = dev(rng.standard_normal((2, 2 * 2 * 2, 9, 11)))
    trans = dev(spoil(rng.uniform(-1, 1, (12, 4, 2, 2)), rng, 0.2))
    geo = _validation.check_deform_psroi_pool(ps_feat, rois, trans, 0.5, 2, 2, 3, 2, 2, 0.1,
                                              check_batch=False)
    _, count = _roi_pool.psroi_pool_forward(backend, geo, ps_feat, rois, trans)
    ps_grad = dev(rng.standard_normal((12, 2, 3, 3)))
    for deterministic in (False, True):
        _roi_pool.psroi_pool_backward(backend, geo, ps_grad, ps_feat, rois, trans, count,
                                      _roi_pool.PSROI_GRADIENTS, deterministic)
    if xp is not numpy:
        xp.cuda.Device().synchronize()


def main(argv):
    if argv[:1] not in (["host"], ["cupy"]) or argv[1:] not in ([], ["mutated"]):
        raise SystemExit(f"usage: python tests/bad_values.py host|cupy [mutated], got {argv}")
    where, mutated = argv[0], argv[1:] == ["mutated"]
    sources = {}
    if mutated:  # one element past the columns buffer
        text = _kernels.source("deform_conv")
        sources["deform_conv"] = text.replace(
            "columns[(c * taps + k) * ncols + col] = dcn_store<T>(v);",
            "columns[(c * taps + k) * ncols + col + 1] = dcn_store<T>(v);")
        assert sources["deform_conv"] != text
    if where == "host":
        backend = _kernels.HostBackend(sources=sources,
                                       flags=("-fsanitize=address", "-fno-omit-frame-pointer"))
    else:
        import cupy

        # CuPy's pool rounds every allocation up (to 512 bytes) and carves arrays out of
        # larger blocks, so a write a few elements past an array lands in memory the pool
        # owns and memcheck stays silent. Without the pool each array is its own cudaMalloc,
        # whose exact size memcheck knows.
        cupy.cuda.set_allocator(None)
        if sources:  # the CuPy backend compiles what the loader gives it
            original = _kernels.source
            _kernels.source = lambda file: sources.get(file) or original(file)
        backend = _kernels.CupyBackend()
    run(backend, numpy.random.default_rng(0))
    print("clean")


if __name__ == "__main__":
    main(sys.argv[1:])
