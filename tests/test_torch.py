"""The PyTorch bridge (cupydcn.torch): custom ops, autograd, modules.

CPU tier: CPU tensors run the NumPy reference through the registered ops:
float64 gradcheck of every op, torch.library.opcheck (schema, fake, autograd
registration, AOT dispatch), modules (shapes, state_dict keys, init identities),
torch.compile without graph breaks, autocast, deterministic mode, shared
validation messages, zero-copy interchange, dtypes, and that ``import
cupydcn`` leaves torch alone. The DDP test is in test_torch_ddp.py.
GPU tier (marker ``gpu``): against torchvision over a randomized sweep, CUDA
gradcheck, zero copy, roi_align, torch's current stream, deterministic mode
and autocast on CUDA.
"""

import inspect
import pathlib
import re
import subprocess
import sys

import numpy
import pytest

torch = pytest.importorskip("torch", reason="the torch bridge tests need torch")

import cupydcn
import cupydcn.torch as ct
from cupydcn import _dtypes, _ops
from helpers import TOLERANCE, rel_err

F64 = torch.float64


def generator(seed):
    return torch.Generator().manual_seed(seed)


def smooth_offset(shape, gen, dtype=F64):
    """Offsets whose fractional part lies in [0.2, 0.8]: with integer sample
    grids, every sample stays 0.2 away from the pixel lines where bilinear
    interpolation (and the image border rule) has a kink, so finite
    differences see a smooth function."""
    whole = torch.randint(-1, 2, shape, generator=gen).to(dtype)
    return whole + 0.2 + 0.6 * torch.rand(shape, generator=gen, dtype=dtype)


def conv_inputs(B=2, C=4, H=6, W=7, Cout=4, kh=3, kw=2, groups=2, dg=2, stride=(1, 2),
                padding=(1, 0), dilation=(2, 1), mask=True, bias=True, dtype=F64, seed=0,
                requires_grad=True):
    gen = generator(seed)
    Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    tensors = dict(
        input=torch.randn(B, C, H, W, generator=gen, dtype=dtype),
        offset=smooth_offset((B, 2 * dg * kh * kw, Ho, Wo), gen, dtype),
        weight=torch.randn(Cout, C // groups, kh, kw, generator=gen, dtype=dtype),
        bias=torch.randn(Cout, generator=gen, dtype=dtype) if bias else None,
        mask=torch.rand(B, dg * kh * kw, Ho, Wo, generator=gen, dtype=dtype) if mask else None,
    )
    for t in tensors.values():
        if t is not None:
            t.requires_grad_(requires_grad)
    return tensors, dict(stride=stride, padding=padding, dilation=dilation)


def roi_inputs(dtype=F64, seed=0, requires_grad=True):
    """RoIs whose bins are 1 pixel wide with 2 samples per bin and integer x1,
    y1: samples sit at k + 0.25 / k + 0.75, and offsets of at most 0.1 move
    them by at most gamma*roi*0.1 = 0.03, away from every kink."""
    gen = generator(seed)
    ph, pw = 3, 4
    input = torch.randn(2, 3, 8, 9, generator=gen, dtype=dtype)
    rois = torch.tensor([[0, 1, 2, 1 + pw, 2 + ph], [1, 3, 1, 3 + pw, 1 + ph],
                         [1, 0, 4, pw, 4 + ph]], dtype=dtype)
    offset = 0.1 * (2 * torch.rand(3, 2, ph, pw, generator=gen, dtype=dtype) - 1)
    mask = torch.rand(3, 1, ph, pw, generator=gen, dtype=dtype)
    for t in (input, offset, mask):
        t.requires_grad_(requires_grad)
    params = dict(output_size=(ph, pw), spatial_scale=1.0, sampling_ratio=2, gamma=0.1)
    return input, rois, offset, mask, params


def psroi_inputs(dtype=F64, seed=0, requires_grad=True):
    """RoI bins 1 pixel wide (x2 - x1 + 1 = pooled) with 2 samples per part:
    samples at k + 0.5 and k + 1, moved by trans_std*roi*trans = 0.3*trans with
    trans in [0.7, 0.9], so they sit 0.2 away from pixel lines and from the
    half-pixel count border."""
    gen = generator(seed)
    P, G, out_dim, classes = 3, 2, 4, 2
    input = torch.randn(2, out_dim * G * G, 8, 9, generator=gen, dtype=dtype)
    rois = torch.tensor([[0, 1, 2, 3, 4], [1, 4, 1, 6, 3]], dtype=dtype)
    trans = 0.7 + 0.2 * torch.rand(2, 2 * classes, P, P, generator=gen, dtype=dtype)
    for t in (input, trans):
        t.requires_grad_(requires_grad)
    params = dict(spatial_scale=1.0, output_dim=out_dim, group_size=G, pooled_size=P,
                  part_size=P, sample_per_part=2, trans_std=0.1)
    return input, rois, trans, params


def call_conv(t, params):
    return ct.deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], mask=t["mask"],
                            **params)


def numpy_of(t):
    return None if t is None else t.detach().numpy()


# --------------------------------------------------------------------------
# gradcheck and opcheck (CPU: the reference path)
# --------------------------------------------------------------------------

CONV_CASES = {
    "v2-groups-bias": dict(),
    "v1-nobias": dict(mask=False, bias=False, groups=1, dg=1, stride=(1, 1), padding=(1, 1),
                      dilation=(1, 1), kw=3),
    "v2-square-strided": dict(B=1, C=3, Cout=2, groups=1, dg=3, kh=2, kw=2, stride=(2, 2),
                              padding=(0, 1), dilation=(1, 2)),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_deform_conv2d_gradcheck(case):
    t, params = conv_inputs(**CONV_CASES[case])
    names = [n for n, v in t.items() if v is not None]

    def f(*args):
        return call_conv({**t, **dict(zip(names, args))}, params)

    assert torch.autograd.gradcheck(f, [t[n] for n in names])


def test_deform_roi_pool_gradcheck():
    input, rois, offset, mask, params = roi_inputs()

    def f(input, offset, mask):
        return ct.deform_roi_pool(input, rois, offset, mask=mask, **params)

    assert torch.autograd.gradcheck(f, (input, offset, mask))
    assert torch.autograd.gradcheck(lambda x: ct.deform_roi_pool(x, rois, **params), (input,))


def test_deform_psroi_pool_gradcheck():
    input, rois, trans, params = psroi_inputs()
    assert torch.autograd.gradcheck(
        lambda x, tr: ct.deform_psroi_pool(x, rois, tr, **params), (input, trans))
    assert torch.autograd.gradcheck(
        lambda x: ct.deform_psroi_pool(x, rois, None, **params), (input,))


def opcheck_args():
    torch.manual_seed(0)
    t, p = conv_inputs()
    conv = (t["input"], t["offset"], t["weight"], t["bias"], list(p["stride"]),
            list(p["padding"]), list(p["dilation"]), t["mask"])
    go = torch.randn(call_conv(t, p).shape, dtype=F64)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in conv]
    x, rois, offset, mask, _ = roi_inputs()
    roi = (x, rois, offset, [3, 4], 1.0, 2, 0.1, mask)
    xd, offd, maskd = x.detach(), offset.detach(), mask.detach()
    xp, prois, trans, _ = psroi_inputs()
    ps = (xp, prois, trans, 1.0, 4, 2, 3, 3, 2, 0.1)
    _, count = torch.ops.cupydcn.deform_psroi_pool(*ps)
    ops = torch.ops.cupydcn
    return {
        "deform_conv2d": (ops.deform_conv2d.default, conv),
        "deform_conv2d_backward": (ops.deform_conv2d_backward.default,
                                   (go, *detached, [True, True, False, True, True])),
        "deform_roi_pool": (ops.deform_roi_pool.default, roi),
        "deform_roi_pool_backward": (ops.deform_roi_pool_backward.default,
                                     (torch.randn(3, 3, 3, 4, dtype=F64), xd, rois, offd,
                                      [3, 4], 1.0, 2, 0.1, maskd, [True, True, True])),
        "deform_psroi_pool": (ops.deform_psroi_pool.default, ps),
        "deform_psroi_pool_backward": (ops.deform_psroi_pool_backward.default,
                                       (torch.randn(2, 4, 3, 3, dtype=F64), xp.detach(), prois,
                                        trans.detach(), count, 1.0, 4, 2, 3, 3, 2, 0.1,
                                        [True, True])),
    }


@pytest.mark.parametrize("name", ["deform_conv2d", "deform_conv2d_backward", "deform_roi_pool",
                                  "deform_roi_pool_backward", "deform_psroi_pool",
                                  "deform_psroi_pool_backward"])
def test_opcheck(name):
    """Schema, fake (meta) implementation, autograd registration and AOT
    dispatch with dynamic shapes, by torch's own checker."""
    op, args = opcheck_args()[name]
    result = torch.library.opcheck(op, args)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("wanted", [("offset",), ("weight", "bias"), ("input", "mask")])
def test_backward_computes_only_what_autograd_needs(monkeypatch, wanted):
    t, params = conv_inputs(requires_grad=False)
    for name in wanted:
        t[name].requires_grad_(True)
    seen = []
    core = cupydcn.deform_conv2d_backward

    def spy(*args, wrt, **kwargs):
        seen.append(tuple(wrt))
        return core(*args, wrt=wrt, **kwargs)

    monkeypatch.setattr(cupydcn, "deform_conv2d_backward", spy)
    call_conv(t, params).sum().backward()
    gradients = _ops.SPECS["deform_conv2d"].gradients
    assert seen == [tuple(n for n in gradients if n in wanted)]
    for name, value in t.items():
        assert (value.grad is not None) == (name in wanted), name


def test_roi_backward_computes_only_what_autograd_needs(monkeypatch):
    input, rois, offset, mask, params = roi_inputs()
    input.requires_grad_(False)
    mask.requires_grad_(False)
    seen = []
    core = cupydcn.deform_roi_pool_backward
    monkeypatch.setattr(cupydcn, "deform_roi_pool_backward",
                        lambda *a, wrt, **k: seen.append(tuple(wrt)) or core(*a, wrt=wrt, **k))
    ct.deform_roi_pool(input, rois, offset, mask=mask, **params).sum().backward()
    assert seen == [("offset",)]


# --------------------------------------------------------------------------
# Forward identities, dtypes, shapes, interchange
# --------------------------------------------------------------------------


def test_roi_signatures_are_the_cores():
    for name in ("deform_roi_pool", "deform_psroi_pool"):
        ours = inspect.signature(getattr(ct, name)).parameters
        core = inspect.signature(getattr(cupydcn, name)).parameters
        assert [(p.name, p.default) for p in ours.values()] == [
            (p.name, p.default) for p in core.values()], name


def test_psroi_count_is_the_cores():
    xp, prois, trans, pp = psroi_inputs()
    out, count = ct.deform_psroi_pool(xp, prois, trans, return_count=True, **pp)
    expected = cupydcn.deform_psroi_pool(numpy_of(xp), numpy_of(prois), numpy_of(trans),
                                         return_count=True, **pp)
    numpy.testing.assert_array_equal(out.detach().numpy(), expected[0])
    numpy.testing.assert_array_equal(count.numpy(), expected[1])
    assert not count.requires_grad


def test_signature_is_torchvisions():
    # torchvision.ops.deform_conv2d's parameters and defaults (stride, padding
    # and dilation also take ints here, as torchvision's do), then the core's
    # algorithm=None
    parameters = inspect.signature(ct.deform_conv2d).parameters
    assert list(parameters) == ["input", "offset", "weight", "bias", "stride", "padding",
                                "dilation", "mask", "algorithm"]
    assert parameters["bias"].default is None and parameters["mask"].default is None
    assert parameters["algorithm"].default is None


@pytest.mark.parametrize("groups,dg", [(1, 1), (2, 4)])
def test_zero_offset_is_conv2d(groups, dg):
    t, params = conv_inputs(C=4, Cout=6, groups=groups, dg=dg, requires_grad=False)
    t["offset"] = torch.zeros_like(t["offset"])
    t["mask"] = None
    expected = torch.nn.functional.conv2d(t["input"], t["weight"], t["bias"], groups=groups,
                                          **params)
    torch.testing.assert_close(call_conv(t, params), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cpu_results_are_cpu_tensors_of_the_input_dtype(dtype):
    t, params = conv_inputs(dtype=dtype, requires_grad=True)
    out = call_conv(t, params)
    assert out.device.type == "cpu" and out.dtype == dtype
    out.float().sum().backward()
    for name, value in t.items():
        assert value.grad.dtype == dtype and value.grad.shape == value.shape, name
    x, rois, offset, mask, rp = roi_inputs(dtype=dtype)
    assert ct.deform_roi_pool(x, rois, offset, mask=mask, **rp).dtype == dtype
    xp, prois, trans, pp = psroi_inputs(dtype=dtype)
    assert ct.deform_psroi_pool(xp, prois, trans, **pp).dtype == dtype


def test_matches_the_numpy_path():
    t, params = conv_inputs(dtype=torch.float32, requires_grad=False)
    expected = cupydcn.deform_conv2d(*(numpy_of(t[n]) for n in ("input", "offset", "weight",
                                                                "bias")),
                                     mask=numpy_of(t["mask"]), **params)
    numpy.testing.assert_array_equal(call_conv(t, params).numpy(), expected)


def non_contiguous(t):
    """The same values in a non-contiguous layout."""
    if t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return torch.stack([t, t], -1)[..., 0]


def test_empty_batch_and_non_contiguous_inputs():
    t, params = conv_inputs(B=0)
    out = call_conv(t, params)
    assert out.shape == (0, 4, 4, 3)
    out.sum().backward()
    assert t["input"].grad.shape == t["input"].shape
    t, params = conv_inputs(requires_grad=False)
    strided = {k: None if v is None else non_contiguous(v) for k, v in t.items()}
    assert not any(v.is_contiguous() for v in strided.values())
    torch.testing.assert_close(call_conv(strided, params), call_conv(t, params), rtol=0, atol=0)


class Spy:
    """Wraps a core entry point, keeping what it received and returned."""

    def __init__(self, function):
        self.function, self.args, self.result = function, None, None

    def __call__(self, *args, **kwargs):
        self.args = args
        self.result = self.function(*args, **kwargs)
        return self.result


def address(a):
    return a.__array_interface__["data"][0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_cpu_zero_copy(monkeypatch, dtype):
    """The core receives NumPy views of the tensors' own memory (a strided
    view too), and the output tensor is the core's result array."""
    t, params = conv_inputs(dtype=dtype, requires_grad=False)
    t["input"] = t["input"].transpose(2, 3).contiguous().transpose(2, 3)
    spy = Spy(cupydcn.deform_conv2d)
    monkeypatch.setattr(cupydcn, "deform_conv2d", spy)
    out = call_conv(t, params)
    received = dict(zip(("input", "offset", "weight", "bias"), spy.args[:4]),
                    mask=spy.args[7])
    for name, array in received.items():
        assert isinstance(array, numpy.ndarray), name
        assert address(array) == t[name].data_ptr(), name
        assert array.strides == tuple(s * t[name].element_size() for s in t[name].stride()), name
    assert address(spy.result) == out.data_ptr()


def test_import_cupydcn_does_not_import_torch():
    result = subprocess.run(
        [sys.executable, "-c", "import cupydcn, sys; assert 'torch' not in sys.modules"],
        cwd=pathlib.Path(__file__).resolve().parent.parent, capture_output=True, text=True,
        check=False)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------
# Validation: the shared messages, eagerly and under torch.compile
# --------------------------------------------------------------------------


def numpy_error(function, *args, **kwargs):
    with pytest.raises(Exception) as info:
        function(*args, **kwargs)
    return info.type, str(info.value)


def bad_calls():
    t, params = conv_inputs(requires_grad=False)
    x, rois, offset, _, rp = roi_inputs(requires_grad=False)
    xp, prois, trans, pp = psroi_inputs(requires_grad=False)
    return {
        "offset channels": ("deform_conv2d", (t["input"], t["offset"][:, :-2], t["weight"],
                                              t["bias"]), dict(params, mask=t["mask"])),
        "mask shape": ("deform_conv2d", (t["input"], t["offset"], t["weight"], t["bias"]),
                       dict(params, mask=t["mask"][:, :1])),
        "dtype": ("deform_conv2d", (t["input"], t["offset"].float(), t["weight"]), params),
        "stride": ("deform_conv2d", (t["input"], t["offset"], t["weight"]),
                   dict(params, stride=0)),
        "rois": ("deform_roi_pool", (x, rois[:, :4], offset), rp),
        "roi offset": ("deform_roi_pool", (x, rois, offset[:, :1]), rp),
        "batch index": ("deform_roi_pool", (x, rois + torch.tensor([5., 0, 0, 0, 0], dtype=F64)),
                        rp),
        "output_dim": ("deform_psroi_pool", (xp, prois, trans), dict(pp, output_dim=3)),
        "sample_per_part": ("deform_psroi_pool", (xp, prois, trans),
                            dict(pp, sample_per_part=0)),
    }


@pytest.mark.parametrize("case", list(bad_calls()))
def test_validation_messages_are_the_shared_ones(case):
    name, args, kwargs = bad_calls()[case]
    as_numpy = [numpy_of(a) if isinstance(a, torch.Tensor) else a for a in args]
    kw_numpy = {k: numpy_of(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    kind, message = numpy_error(getattr(cupydcn, name), *as_numpy, **kw_numpy)
    with pytest.raises(kind, match=re.escape(message)):
        getattr(ct, name)(*args, **kwargs)


@pytest.mark.parametrize("case", ["offset channels", "mask shape", "dtype", "rois",
                                  "output_dim"])
def test_validation_messages_under_compile(case):
    """Compiled, the fake implementations raise the shared message while tracing."""
    name, args, kwargs = bad_calls()[case]
    as_numpy = [numpy_of(a) if isinstance(a, torch.Tensor) else a for a in args]
    kw_numpy = {k: numpy_of(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    _, message = numpy_error(getattr(cupydcn, name), *as_numpy, **kw_numpy)
    torch._dynamo.reset()
    compiled = torch.compile(getattr(ct, name), backend="eager", fullgraph=True)
    with pytest.raises(Exception, match=re.escape(message)):
        compiled(*args, **kwargs)


# --------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------


def keys(module):
    return sorted(module.state_dict())


def test_deform_conv2d_module_is_torchvisions():
    torch.manual_seed(0)
    m = ct.DeformConv2d(4, 6, (3, 2), stride=(1, 2), padding=1, dilation=(2, 1), groups=2)
    # torchvision.ops.DeformConv2d's state_dict keys and parameter shapes
    assert keys(m) == ["bias", "weight"]
    assert m.weight.shape == (6, 2, 3, 2) and m.bias.shape == (6,)
    assert keys(ct.DeformConv2d(4, 6, 3, bias=False)) == ["weight"]
    assert ct.DeformConv2d(4, 6, 3, bias=False).bias is None
    # torchvision's init: kaiming-uniform(a=sqrt(5)) = uniform(+-1/sqrt(fan_in)), bias alike
    bound = 1 / (2 * 3 * 2) ** 0.5
    assert m.weight.abs().max() <= bound and m.bias.abs().max() <= bound
    x = torch.randn(2, 4, 7, 8)
    offset = torch.randn(2, 2 * 2 * 6, 5, 5)   # 2 offset groups; Ho = Wo = 5
    out = m(x, offset)
    assert out.shape == (2, 6, 5, 5)
    assert m(x, offset, torch.rand(2, 12, 5, 5)).shape == (2, 6, 5, 5)
    with pytest.raises(ValueError, match="in_channels = 3 must be divisible by groups = 2"):
        ct.DeformConv2d(3, 6, 3, groups=2)
    with pytest.raises(ValueError, match="out_channels = 5 must be divisible by groups = 2"):
        ct.ModulatedDeformConv2dPack(4, 5, 3, groups=2)


def test_deform_conv2d_pack_is_a_conv2d_at_init():
    torch.manual_seed(0)
    m = ct.DeformConv2dPack(4, 6, 3, stride=2, padding=1, dilation=1, groups=2,
                            deform_groups=2).double()
    # mmcv.ops.DeformConv2dPack's state_dict keys (mmcv's DeformConv2d has no bias)
    assert keys(m) == ["conv_offset.bias", "conv_offset.weight", "weight"]
    assert m.conv_offset.weight.shape == (2 * 2 * 9, 4, 3, 3)
    assert keys(ct.DeformConv2dPack(4, 6, 3, bias=True)) == [
        "bias", "conv_offset.bias", "conv_offset.weight", "weight"]
    x = torch.randn(2, 4, 9, 8, dtype=F64)
    expected = torch.nn.functional.conv2d(x, m.weight, None, stride=2, padding=1, groups=2)
    torch.testing.assert_close(m(x), expected, rtol=1e-12, atol=1e-12)


def test_modulated_deform_conv2d_pack_is_half_a_conv2d_at_init():
    torch.manual_seed(0)
    m = ct.ModulatedDeformConv2dPack(4, 6, (3, 1), padding=(1, 0), deform_groups=2).double()
    # mmcv.ops.ModulatedDeformConv2dPack's state_dict keys
    assert keys(m) == ["bias", "conv_offset.bias", "conv_offset.weight", "weight"]
    assert m.conv_offset.weight.shape == (2 * 3 * 3, 4, 3, 1)
    assert keys(ct.ModulatedDeformConv2dPack(4, 6, 3, bias=False)) == [
        "conv_offset.bias", "conv_offset.weight", "weight"]
    with torch.no_grad():
        m.bias.normal_()
    x = torch.randn(2, 4, 6, 5, dtype=F64)
    # zero offsets, mask sigmoid(0) = 0.5
    expected = 0.5 * torch.nn.functional.conv2d(x, m.weight, None, padding=(1, 0)) + m.bias[
        :, None, None]
    torch.testing.assert_close(m(x), expected, rtol=1e-12, atol=1e-12)


def test_modulated_pack_splits_offset_and_mask_as_mmcv():
    """conv_offset's output: the first two thirds are the offsets, the last third the mask."""
    torch.manual_seed(1)
    m = ct.ModulatedDeformConv2dPack(2, 3, 3, padding=1).double()
    with torch.no_grad():
        m.conv_offset.weight.normal_(0, 0.1)
        m.conv_offset.bias.normal_(0, 0.1)
    x = torch.randn(1, 2, 5, 5, dtype=F64)
    raw = m.conv_offset(x)
    expected = ct.deform_conv2d(x, raw[:, :18], m.weight, m.bias, padding=1,
                                mask=torch.sigmoid(raw[:, 18:]))
    torch.testing.assert_close(m(x), expected, rtol=0, atol=0)


def test_roi_pool_modules():
    torch.manual_seed(0)
    x, rois, offset, _, rp = roi_inputs(requires_grad=False)
    plain = ct.DeformRoIPool((3, 4), spatial_scale=1.0, sampling_ratio=2)
    assert keys(plain) == []
    pooled = plain(x, rois)
    assert pooled.shape == (3, 3, 3, 4)
    torch.testing.assert_close(plain(x, rois, offset),
                               ct.deform_roi_pool(x, rois, offset, **rp), rtol=0, atol=0)

    pack = ct.DeformRoIPoolPack((3, 4), 3, deform_fc_channels=16, sampling_ratio=2).double()
    # mmcv.ops.DeformRoIPoolPack's state_dict keys
    assert keys(pack) == ["offset_fc.0.bias", "offset_fc.0.weight", "offset_fc.2.bias",
                          "offset_fc.2.weight", "offset_fc.4.bias", "offset_fc.4.weight"]
    assert pack.offset_fc[4].weight.shape == (3 * 4 * 2, 16)
    # zero-initialised last layer: no offset at init
    torch.testing.assert_close(pack(x, rois), pooled, rtol=0, atol=0)

    mod = ct.ModulatedDeformRoIPoolPack((3, 4), 3, deform_fc_channels=16, sampling_ratio=2)
    mod = mod.double()
    # mmcv.ops.ModulatedDeformRoIPoolPack's state_dict keys
    assert keys(mod) == ["mask_fc.0.bias", "mask_fc.0.weight", "mask_fc.2.bias",
                         "mask_fc.2.weight", "offset_fc.0.bias", "offset_fc.0.weight",
                         "offset_fc.2.bias", "offset_fc.2.weight", "offset_fc.4.bias",
                         "offset_fc.4.weight"]
    assert isinstance(mod.mask_fc[3], torch.nn.Sigmoid)
    torch.testing.assert_close(mod(x, rois), 0.5 * pooled, rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="input.shape\\[1\\] must be output_channels = 3"):
        pack(x[:, :2], rois)


def test_psroi_pool_module_is_dcnv2s():
    x, rois, trans, pp = psroi_inputs(requires_grad=False)
    m = ct.DeformPSRoIPool(spatial_scale=1.0, pooled_size=3, output_dim=4, no_trans=False,
                           group_size=2, sample_per_part=2, trans_std=0.1)
    assert m.part_size == 3 and keys(m) == []
    torch.testing.assert_close(m(x, rois, trans), ct.deform_psroi_pool(x, rois, trans, **pp),
                               rtol=0, atol=0)
    no_trans = ct.DeformPSRoIPool(1.0, 3, 4, True, group_size=2, sample_per_part=2)
    assert no_trans(x, rois, trans).shape == (2, 4, 3, 3)
    torch.testing.assert_close(no_trans(x, rois), ct.deform_psroi_pool(x, rois, None, **pp))


# --------------------------------------------------------------------------
# torch.compile, autocast, deterministic mode
# --------------------------------------------------------------------------


class Net(torch.nn.Module):
    """Every op and every module, in one graph."""

    def __init__(self):
        super().__init__()
        self.dcn = ct.DeformConv2dPack(3, 4, 3, padding=1, deform_groups=1)
        self.dcn2 = ct.ModulatedDeformConv2dPack(4, 4, 3, padding=1, deform_groups=2)
        self.tv = ct.DeformConv2d(4, 4, 1)
        self.roi = ct.ModulatedDeformRoIPoolPack(2, 4, deform_fc_channels=8, sampling_ratio=2)
        self.ps = ct.DeformPSRoIPool(1.0, 2, 1, False, group_size=2, sample_per_part=2,
                                     trans_std=0.1)
        for conv in (self.dcn.conv_offset, self.dcn2.conv_offset):
            torch.nn.init.normal_(conv.weight, std=0.05)

    def forward(self, x, rois):
        y = self.dcn2(torch.relu(self.dcn(x)))
        y = self.tv(y, y.new_zeros(y.shape[0], 2, y.shape[2], y.shape[3]))
        pooled = self.roi(y, rois)
        trans = pooled.mean(1, keepdim=True).expand(-1, 2, -1, -1)
        return pooled.sum() + self.ps(y, rois, trans).sum()


def net_inputs(dtype=torch.float32):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, dtype=dtype, requires_grad=True)
    rois = torch.tensor([[0, 1.2, 0.7, 5.3, 6.1], [1, 2.1, 2.6, 7.4, 4.9]], dtype=dtype)
    return x, rois


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_matches_eager(backend):
    net = Net()
    x, rois = net_inputs()
    expected = net(x, rois)
    expected.backward()
    grads = [p.grad.clone() for p in net.parameters()] + [x.grad.clone()]
    net.zero_grad()
    x.grad = None
    torch._dynamo.reset()
    compiled = torch.compile(net, backend=backend, fullgraph=True)
    got = compiled(x, rois)
    got.backward()
    torch.testing.assert_close(got, expected)
    for a, b in zip([p.grad for p in net.parameters()] + [x.grad], grads):
        torch.testing.assert_close(a, b)


def test_no_graph_breaks():
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(Net())(*net_inputs())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_autocast_cpu_runs_in_bfloat16(monkeypatch):
    """Registered for AutocastCPU: float32 inputs reach the core as bfloat16
    (ml_dtypes.bfloat16 NumPy views) and the result is bfloat16; float32
    leaves get float32 gradients through autocast's casts."""
    t, params = conv_inputs(dtype=torch.float32)
    spy = Spy(cupydcn.deform_conv2d)
    monkeypatch.setattr(cupydcn, "deform_conv2d", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call_conv(t, params)
    assert out.dtype == torch.bfloat16
    assert {a.dtype for a in spy.args if isinstance(a, numpy.ndarray)} == {
        numpy.dtype(_dtypes.ml_dtypes.bfloat16)}
    out.float().sum().backward()
    assert all(v.grad.dtype == torch.float32 for v in t.values())
    exact = call_conv({k: v.detach().bfloat16().double() for k, v in t.items()}, params)
    assert rel_err(out.detach().double().numpy(), exact.numpy()) < TOLERANCE["bfloat16"]


def test_autocast_float16_and_float64():
    t, params = conv_inputs(dtype=torch.float32, requires_grad=False)
    with torch.autocast("cpu", dtype=torch.float16):
        assert call_conv(t, params).dtype == torch.float16
    t, params = conv_inputs(dtype=F64, requires_grad=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # as torch's own ops: float64 is not autocast
        assert call_conv(t, params).dtype == F64


@pytest.mark.parametrize("feature_dtype", [torch.float32, torch.bfloat16])
def test_autocast_runs_roi_pooling_in_float32(monkeypatch, feature_dtype):
    """torchvision's roi_align rule: float32 inside (RoI coordinates keep
    their precision), the result in the input's dtype. Features already in
    bfloat16 with float32 RoIs (usual under autocast) work too."""
    x, rois, offset, mask, rp = roi_inputs(dtype=torch.float32)
    xp, prois, trans, pp = psroi_inputs(dtype=torch.float32)
    x, xp = x.detach().to(feature_dtype).requires_grad_(), xp.detach().to(feature_dtype)
    seen = []
    for name in ("deform_roi_pool", "deform_psroi_pool"):
        core = getattr(cupydcn, name)
        monkeypatch.setattr(cupydcn, name, lambda *a, _core=core, **k: seen.append(
            {v.dtype for v in a if isinstance(v, numpy.ndarray)}) or _core(*a, **k))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ct.deform_roi_pool(x, rois, offset, mask=mask, **rp)
        ps = ct.deform_psroi_pool(xp, prois, trans, **pp)
    assert seen == [{numpy.dtype(numpy.float32)}] * 2
    assert out.dtype == feature_dtype and ps.dtype == feature_dtype
    out.float().sum().backward()
    assert x.grad.dtype == feature_dtype and offset.grad.dtype == torch.float32


def test_autocast_under_compile():
    net = Net()
    x, rois = net_inputs()
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = net(x, rois)
        got = compiled(x, rois)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected)


def test_autocast_registered_for_cuda_too():
    for name in ("deform_conv2d", "deform_roi_pool", "deform_psroi_pool"):
        op = getattr(torch.ops.cupydcn, name).default
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), key), (name, key)


@pytest.fixture
def deterministic():
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled())
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def test_deterministic_mode_reaches_the_core(monkeypatch, deterministic):
    """Under torch.use_deterministic_algorithms every backward asks the core
    for its deterministic path (no floating-point atomics), and only then."""
    seen = []
    for name in ("deform_conv2d_backward", "deform_roi_pool_backward",
                 "deform_psroi_pool_backward"):
        real = getattr(cupydcn, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen.append((_name, kwargs["deterministic"]))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cupydcn, name, spy)
    t, params = conv_inputs()
    x, rois, offset, _, rp = roi_inputs()
    xp, prois, trans, pp = psroi_inputs()
    losses = [lambda: call_conv(t, params).sum(),
              lambda: ct.deform_roi_pool(x, rois, offset, **rp).sum(),
              lambda: ct.deform_psroi_pool(xp, prois, trans, **pp).sum()]
    for mode in (True, False):
        torch.use_deterministic_algorithms(mode)
        for loss in losses:
            loss().backward()
    assert seen == [(n, mode) for mode in (True, False)
                    for n in ("deform_conv2d_backward", "deform_roi_pool_backward",
                              "deform_psroi_pool_backward")]


def test_deterministic_mode_on_the_cpu_path(deterministic):
    # The CPU path (the NumPy reference) is deterministic: it runs, twice the same.
    torch.use_deterministic_algorithms(True)
    grads = []
    for _ in range(2):
        t, params = conv_inputs()
        call_conv(t, params).sum().backward()
        grads.append(t["offset"].grad)
    assert torch.equal(*grads)


# --------------------------------------------------------------------------
# GPU tier
# --------------------------------------------------------------------------


def torchvision_ops():
    return pytest.importorskip(
        "torchvision.ops", reason="the comparison with torchvision needs torchvision")


def sweep_cases(count=24, seed=1234):
    """Random geometries over strides, paddings, dilations per axis, groups,
    offset groups, mask / no mask, bias / no bias, batch 1 / 3 / 33."""
    rng = numpy.random.default_rng(seed)
    cases = []
    for i in range(count):
        groups, dg = int(rng.choice([1, 2, 3])), int(rng.choice([1, 2, 3]))
        C = groups * dg * int(rng.integers(1, 3))
        cases.append(dict(
            B=[1, 3, 33][i % 3], C=C, H=int(rng.integers(5, 12)), W=int(rng.integers(5, 12)),
            Cout=groups * int(rng.integers(1, 4)), kh=int(rng.integers(1, 4)),
            kw=int(rng.integers(1, 4)), groups=groups, dg=dg,
            stride=tuple(int(v) for v in rng.integers(1, 3, 2)),
            padding=tuple(int(v) for v in rng.integers(0, 3, 2)),
            dilation=tuple(int(v) for v in rng.integers(1, 3, 2)),
            mask=bool(rng.integers(2)), bias=bool(rng.integers(2)), seed=i))
    return cases


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", sweep_cases(), ids=lambda c: f"seed{c['seed']}")
def test_gpu_matches_torchvision(gpu, case, dtype, record_error):
    tv = torchvision_ops()
    t, params = conv_inputs(dtype=dtype, requires_grad=False, **case)
    t = {k: None if v is None else v.cuda().requires_grad_() for k, v in t.items()}
    grad = torch.randn(call_conv(t, params).shape, generator=generator(case["seed"]),
                       dtype=dtype).cuda()
    results = []
    for function in (ct.deform_conv2d, tv.deform_conv2d):
        for v in t.values():
            if v is not None:
                v.grad = None
        out = function(t["input"], t["offset"], t["weight"], t["bias"], mask=t["mask"], **params)
        out.backward(grad)
        results.append([out.detach()] + [None if v is None else v.grad for v in t.values()])
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    names = ["output", *t]
    for name, got, expected in zip(names, *results):
        if expected is None:
            assert got is None, name
            continue
        err = rel_err(got.cpu().numpy(), expected.cpu().numpy())
        record_error(str(dtype).replace("torch.", ""), f"torch-vs-torchvision-{name}", err)
        assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e}"


@pytest.mark.gpu
def test_gpu_gradcheck(gpu):
    t, params = conv_inputs()
    t = {k: v.detach().cuda().requires_grad_() for k, v in t.items()}
    names = list(t)
    # atomic adds: the backward may differ in the last bits from run to run
    nondet = {"nondet_tol": 1e-10}
    assert torch.autograd.gradcheck(
        lambda *a: call_conv(dict(zip(names, a)), params), [t[n] for n in names], **nondet)
    x, rois, offset, mask, rp = (a.detach().cuda().requires_grad_(a.requires_grad)
                                 if isinstance(a, torch.Tensor) else a for a in roi_inputs())
    assert torch.autograd.gradcheck(
        lambda x, o, m: ct.deform_roi_pool(x, rois, o, mask=m, **rp), (x, offset, mask),
        **nondet)
    xp, prois, trans, pp = (a.detach().cuda().requires_grad_(a.requires_grad)
                            if isinstance(a, torch.Tensor) else a for a in psroi_inputs())
    assert torch.autograd.gradcheck(
        lambda x, tr: ct.deform_psroi_pool(x, prois, tr, **pp), (xp, trans), **nondet)


@pytest.mark.gpu
def test_gpu_zero_copy(gpu, monkeypatch):
    t, params = conv_inputs(requires_grad=False)
    t = {k: v.cuda() for k, v in t.items()}
    spy = Spy(cupydcn.deform_conv2d)
    monkeypatch.setattr(cupydcn, "deform_conv2d", spy)
    out = call_conv(t, params)
    received = dict(zip(("input", "offset", "weight", "bias"), spy.args[:4]), mask=spy.args[7])
    for name, array in received.items():
        assert type(array).__module__.startswith("cupy"), name
        assert array.data.ptr == t[name].data_ptr(), name
    assert spy.result.data.ptr == out.data_ptr()
    assert out.device == t["input"].device


@pytest.mark.gpu
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
def test_gpu_roi_pool_without_offset_is_roi_align(gpu, sampling_ratio):
    tv = torchvision_ops()
    gen = generator(5)
    x = torch.randn(2, 5, 13, 11, generator=gen, dtype=F64).cuda()
    boxes = torch.rand(9, 4, generator=gen, dtype=F64) * 10
    boxes[:, 2:] += boxes[:, :2]
    rois = torch.cat([torch.randint(0, 2, (9, 1), generator=gen).to(F64), boxes], 1).cuda()
    got = ct.deform_roi_pool(x, rois, None, (3, 4), 0.8, sampling_ratio)
    expected = tv.roi_align(x, rois, (3, 4), 0.8, sampling_ratio, aligned=True)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
def test_gpu_runs_on_torchs_current_stream(gpu, monkeypatch):
    import cupy

    t, params = conv_inputs(B=3, C=8, H=64, W=64, Cout=16, requires_grad=False)
    t = {k: v.cuda() for k, v in t.items()}
    expected = call_conv(t, params)
    streams = []
    core = cupydcn.deform_conv2d

    def spy(*args, **kwargs):
        streams.append(cupy.cuda.get_current_stream().ptr)
        return core(*args, **kwargs)

    monkeypatch.setattr(cupydcn, "deform_conv2d", spy)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # inputs written on the side stream just before the op reads them
        t2 = {k: v * 1 for k, v in t.items()}
        out = call_conv(t2, params)
        out2 = out * 1
    torch.cuda.current_stream().wait_stream(side)
    assert streams == [side.cuda_stream]
    torch.testing.assert_close(out2, expected, rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_deterministic_mode_is_bit_identical(gpu, deterministic):
    torch.use_deterministic_algorithms(True)
    grads = []
    for _ in range(3):
        t, params = conv_inputs()
        t = {k: v.detach().cuda().requires_grad_() for k, v in t.items()}
        call_conv(t, params).sum().backward()
        grads.append({k: v.grad for k, v in t.items()})
    for other in grads[1:]:
        for name, grad in other.items():
            assert torch.equal(grad, grads[0][name]), name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_autocast(gpu, dtype):
    t, params = conv_inputs(dtype=torch.float32)
    t = {k: v.detach().cuda().requires_grad_() for k, v in t.items()}
    with torch.autocast("cuda", dtype=dtype):
        out = call_conv(t, params)
    assert out.dtype == dtype
    out.float().sum().backward()
    assert all(v.grad.dtype == torch.float32 for v in t.values())
    exact = call_conv({k: v.detach().to(dtype).double() for k, v in t.items()}, params)
    name = str(dtype).replace("torch.", "")
    assert rel_err(out.detach().double().cpu().numpy(), exact.cpu().numpy()) < TOLERANCE[name]


@pytest.mark.gpu
def test_gpu_compile_fullgraph(gpu):
    net = Net().cuda()
    x, rois = (a.detach().cuda().requires_grad_(a.requires_grad) for a in net_inputs())
    expected = net(x, rois)
    torch._dynamo.reset()
    got = torch.compile(net, backend="aot_eager", fullgraph=True)(x, rois)
    torch.testing.assert_close(got, expected)


# --------------------------------------------------------------------------
# Issue 10: clear errors for wrong argument types; results allocated by torch
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["input", "offset", "weight"])
@pytest.mark.parametrize("kind", ["None", "list", "numpy"])
def test_conv_arguments_must_be_tensors(name, kind):
    t, params = conv_inputs(requires_grad=False)
    args = {"input": t["input"], "offset": t["offset"], "weight": t["weight"]}
    bad = {"None": None, "list": t[name].tolist(), "numpy": t[name].numpy()}[kind]
    args[name] = bad
    got = {"None": "None", "list": "list", "numpy": "numpy.ndarray"}[kind]
    message = f"{name} must be a torch.Tensor, got {got}"
    with pytest.raises(cupydcn.ArgumentTypeError, match=re.escape(message)) as info:
        ct.deform_conv2d(args["input"], args["offset"], args["weight"], **params)
    assert isinstance(info.value, TypeError) and isinstance(info.value, RuntimeError)
    assert len(str(info.value)) < 200  # the arrays are not printed


def test_roi_arguments_must_be_tensors():
    x, rois, offset, mask, rp = roi_inputs(requires_grad=False)
    with pytest.raises(TypeError, match=r"rois must be a torch\.Tensor, got numpy\.ndarray"):
        ct.deform_roi_pool(x, rois.numpy(), offset, **rp)
    with pytest.raises(RuntimeError, match=r"offset must be a torch\.Tensor or None, got list"):
        ct.deform_roi_pool(x, rois, offset.tolist(), **rp)
    xp, prois, trans, pp = psroi_inputs(requires_grad=False)
    with pytest.raises(cupydcn.ArgumentTypeError, match=r"input must be a torch\.Tensor, got None"):
        ct.deform_psroi_pool(None, prois, trans, **pp)
    with pytest.raises(cupydcn.ArgumentTypeError, match=r"trans must be a torch\.Tensor or None"):
        ct.deform_psroi_pool(xp, prois, trans.numpy(), **pp)


def test_wrong_sizes_like_torchvision():
    """torchvision's TestDeformConv.test_wrong_sizes against cupydcn.torch:
    a wrong offset or mask raises RuntimeError (and ValueError)."""
    in_channels, out_channels, kernel_size, groups = 6, 2, (3, 2), 2
    stride, padding, dilation = (2, 1), (1, 0), (2, 1)
    x = torch.rand(10, in_channels, 5, 4)
    offset = torch.rand(10, 2 * 3 * kernel_size[0] * kernel_size[1], 2, 3)
    mask = torch.rand(10, 3 * kernel_size[0] * kernel_size[1], 2, 3)
    layer = ct.DeformConv2d(in_channels, out_channels, kernel_size, stride=stride,
                            padding=padding, dilation=dilation, groups=groups)
    layer(x, offset, mask)
    for error in (RuntimeError, ValueError):
        with pytest.raises(error, match=r"offset\.shape\[1\]"):
            layer(x, torch.rand_like(offset[:, :2]))
        with pytest.raises(error, match=r"mask\.shape"):
            layer(x, offset, torch.rand_like(mask[:, :2]))


def test_wrong_sizes_exactly_as_torchvision_writes_it():
    """torchvision's test_wrong_sizes word for word: float64 inputs to a float32
    layer, and its messages ("the shape of the offset", "mask.shape[1] is not
    valid"): the shape error comes before the dtype error, as in torchvision."""
    in_channels, out_channels, kernel_size, groups = 6, 2, (3, 2), 2
    x = torch.rand(10, in_channels, 5, 4, dtype=torch.float64)
    offset = torch.rand(10, 2 * 3 * kernel_size[0] * kernel_size[1], 2, 3, dtype=torch.float64)
    mask = torch.rand(10, 3 * kernel_size[0] * kernel_size[1], 2, 3, dtype=torch.float64)
    layer = ct.DeformConv2d(in_channels, out_channels, kernel_size, stride=(2, 1),
                            padding=(1, 0), dilation=(2, 1), groups=groups)
    with pytest.raises(RuntimeError, match="the shape of the offset"):
        layer(x, torch.rand_like(offset[:, :2]))
    with pytest.raises(RuntimeError, match=r"mask.shape\[1\] is not valid"):
        layer(x, offset, torch.rand_like(mask[:, :2]))
    with pytest.raises(TypeError, match=r"weight\.dtype must"):
        layer(x, offset, mask)  # the right shapes: now the dtypes are checked


def test_results_are_tensors_torch_allocated(monkeypatch):
    """The op outputs and gradients are tensors from torch.empty that the core
    wrote into (not foreign memory wrapped through DLPack)."""
    allocated = []
    empty = torch.empty

    def spy(*args, **kwargs):
        t = empty(*args, **kwargs)
        allocated.append(t)
        return t

    monkeypatch.setattr(torch, "empty", spy)
    t, params = conv_inputs(dtype=torch.float32)
    out = call_conv(t, params)
    assert out.data_ptr() in {a.data_ptr() for a in allocated}
    grads = torch.ops.cupydcn.deform_conv2d_backward(
        torch.ones_like(out), t["input"], t["offset"], t["weight"], t["bias"],
        list(params["stride"]), list(params["padding"]), list(params["dilation"]), t["mask"],
        [True] * 5)
    assert len(grads) == 5
    pointers = {a.data_ptr() for a in allocated}
    for grad in grads:
        assert grad.data_ptr() in pointers


@pytest.mark.gpu
def test_gpu_results_are_tensors_torch_allocated(gpu, monkeypatch):
    allocated = []
    empty = torch.empty

    def spy(*args, **kwargs):
        t = empty(*args, **kwargs)
        allocated.append(t)
        return t

    monkeypatch.setattr(torch, "empty", spy)
    t, params = conv_inputs(dtype=torch.float32)
    t = {k: v.detach().cuda().requires_grad_() for k, v in t.items()}
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        side.wait_stream(torch.cuda.default_stream())
        out = call_conv(t, params)
    torch.cuda.default_stream().wait_stream(side)
    assert out.data_ptr() in {a.data_ptr() for a in allocated}
    out.record_stream(torch.cuda.default_stream())  # a torch allocation: this protects it
    out.sum().backward()
    torch.cuda.synchronize()
