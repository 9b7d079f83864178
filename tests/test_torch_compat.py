"""The compat namespaces of the torch bridge: cupydcn.torch.mmcv,
cupydcn.torch.dcnv2 and cupydcn.torch.detectron2, and torchvision's own
tests of its DeformConv2d that need more than its numbers (torch.fx leaf).

Each family's names take the foreign library's signatures (parameter names,
order and defaults, written out below from mmcv's ``mmcv/ops/deform_conv.py``,
``modulated_deform_conv.py``, ``deform_roi_pool.py``; DCNv2's ``dcn_v2.py``;
detectron2's ``detectron2/layers/deform_conv.py``), give its state_dict keys,
and compute exactly what cupydcn.torch's ops compute with the same parameters
(they are thin wrappers: outputs and gradients are compared bit for bit).
CPU tensors: the CPU path of the same ops. Every module scripts with
``torch.jit.script`` (the scripted module computes what the eager one does and
keeps its state_dict keys) and traces with ``torch.fx``.
"""

import collections
import inspect
import io
import pickle

import pytest

torch = pytest.importorskip("torch", reason="the torch bridge tests need torch")

import cupydcn.torch as ct  # noqa: E402
from cupydcn.torch import dcnv2, detectron2, mmcv  # noqa: E402
from test_torch_script import SCRIPT_DEPRECATED  # noqa: E402

F64 = torch.float64
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
EXACT = dict(rtol=0, atol=0)


def keys(module):
    return sorted(module.state_dict())


def parameters(fn):
    """(name, default) of each parameter, ``inspect.Parameter.empty`` for none."""
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


EMPTY = inspect.Parameter.empty


def conv_tensors(B=2, C=4, H=6, W=7, Cout=6, kh=3, kw=2, groups=2, dg=2, stride=(1, 2),
                 padding=(1, 0), dilation=(2, 1), dtype=F64, seed=0):
    """input, offset, mask, weight, bias of one deformable conv, requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    tensors = [
        torch.randn(B, C, H, W, generator=gen, dtype=F64),
        2 * torch.randn(B, 2 * dg * kh * kw, Ho, Wo, generator=gen, dtype=F64),
        torch.rand(B, dg * kh * kw, Ho, Wo, generator=gen, dtype=F64),
        torch.randn(Cout, C // groups, kh, kw, generator=gen, dtype=F64),
        torch.randn(Cout, generator=gen, dtype=F64),
    ]
    return [t.to(dtype).requires_grad_() for t in tensors]


def run(fn, tensors, seed=1):
    """fn's output and the gradients of a fixed random projection of it with
    respect to ``tensors`` (None where a tensor is not used)."""
    out = fn()
    gen = torch.Generator().manual_seed(seed)
    projection = torch.randn(out.shape, generator=gen, dtype=F64).to(out.dtype)
    grads = torch.autograd.grad((out * projection).sum(), tensors, allow_unused=True)
    return out, grads


def assert_same(got, expected):
    out, grads = got
    out_expected, grads_expected = expected
    torch.testing.assert_close(out, out_expected, **EXACT)
    for g, e in zip(grads, grads_expected):
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g, e, **EXACT)


# --------------------------------------------------------------------------
# mmcv
# --------------------------------------------------------------------------

MMCV_CONV = ["in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
             "groups", "deform_groups", "bias"]


def test_mmcv_signatures_are_mmcvs():
    assert parameters(mmcv.deform_conv2d) == [
        ("input", EMPTY), ("offset", EMPTY), ("weight", EMPTY), ("stride", 1), ("padding", 0),
        ("dilation", 1), ("groups", 1), ("deform_groups", 1), ("bias", False),
        ("im2col_step", 32)]
    assert parameters(mmcv.modulated_deform_conv2d) == [
        ("input", EMPTY), ("offset", EMPTY), ("mask", EMPTY), ("weight", EMPTY), ("bias", None),
        ("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1), ("deform_groups", 1)]
    assert parameters(mmcv.deform_roi_pool)[:7] == [
        ("input", EMPTY), ("rois", EMPTY), ("offset", None), ("output_size", 7),
        ("spatial_scale", 1.0), ("sampling_ratio", 0), ("gamma", 0.1)]
    # the conv modules, plus the keyword-only deformable_groups alias
    conv = [(n, d) for n, d in zip(MMCV_CONV, (EMPTY, EMPTY, EMPTY, 1, 0, 1, 1, 1))]
    assert parameters(mmcv.DeformConv2d) == conv + [
        ("bias", False), ("im2col_step", 32), ("deformable_groups", None)]
    assert parameters(mmcv.ModulatedDeformConv2d) == conv + [
        ("bias", True), ("deformable_groups", None)]
    assert parameters(mmcv.DeformConv2d.forward) == [("self", EMPTY), ("x", EMPTY),
                                                     ("offset", EMPTY)]
    assert parameters(mmcv.ModulatedDeformConv2d.forward) == [
        ("self", EMPTY), ("x", EMPTY), ("offset", EMPTY), ("mask", EMPTY)]
    # mmcv's class hierarchy: each Pack is a subclass of its conv
    assert issubclass(mmcv.DeformConv2dPack, mmcv.DeformConv2d)
    assert issubclass(mmcv.ModulatedDeformConv2dPack, mmcv.ModulatedDeformConv2d)
    assert issubclass(mmcv.DeformConv2dPack, ct.DeformConv2dPack)
    # mmcv's RoI pooling modules are cupydcn.torch's
    assert mmcv.DeformRoIPool is ct.DeformRoIPool
    assert mmcv.DeformRoIPoolPack is ct.DeformRoIPoolPack
    assert mmcv.ModulatedDeformRoIPoolPack is ct.ModulatedDeformRoIPoolPack
    assert mmcv.deform_roi_pool is ct.deform_roi_pool


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mmcv_functions_equal_cupydcn(dtype):
    x, offset, mask, weight, bias = conv_tensors(dtype=dtype)
    geometry = dict(stride=(1, 2), padding=(1, 0), dilation=(2, 1))
    v1 = run(lambda: ct.deform_conv2d(x, offset, weight, **geometry), (x, offset, weight))
    # positional, in mmcv's order, and by keyword
    assert_same(run(lambda: mmcv.deform_conv2d(x, offset, weight, (1, 2), (1, 0), (2, 1), 2, 2,
                                               False, 32), (x, offset, weight)), v1)
    assert_same(run(lambda: mmcv.deform_conv2d(x, offset, weight, groups=2, deform_groups=2,
                                               im2col_step=3, **geometry),
                    (x, offset, weight)), v1)
    tensors = (x, offset, mask, weight, bias)
    v2 = run(lambda: ct.deform_conv2d(x, offset, weight, bias, mask=mask, **geometry), tensors)
    assert_same(run(lambda: mmcv.modulated_deform_conv2d(x, offset, mask, weight, bias, (1, 2),
                                                         (1, 0), (2, 1), 2, 2), tensors), v2)
    assert_same(run(lambda: mmcv.modulated_deform_conv2d(
        input=x, offset=offset, mask=mask, weight=weight, bias=bias, groups=2, deform_groups=2,
        **geometry), tensors), v2)


def test_mmcv_functions_check_what_cupydcn_reads_from_shapes():
    x, offset, mask, weight, bias = conv_tensors()
    geometry = ((1, 2), (1, 0), (2, 1))
    with pytest.raises(ValueError, match=r"groups must be input.shape\[1\] / weight.shape\[1\] "
                                         r"= 4 / 2 = 2, got 1"):
        mmcv.deform_conv2d(x, offset, weight, *geometry, 1, 2)
    with pytest.raises(ValueError, match=r"deform_groups must be offset.shape\[1\] / "
                                         r"\(2\*kh\*kw\) = 24 / 12 = 2, got 1"):
        mmcv.modulated_deform_conv2d(x, offset, mask, weight, bias, *geometry, 2, 1)
    with pytest.raises(ValueError, match="bias must be False .*got True"):
        mmcv.deform_conv2d(x, offset, weight, *geometry, 2, 2, True)
    with pytest.raises(ValueError, match="im2col_step must be >= 1, got 0"):
        mmcv.deform_conv2d(x, offset, weight, *geometry, 2, 2, im2col_step=0)
    with pytest.raises(TypeError, match="groups must be an int, got 2.0"):
        mmcv.deform_conv2d(x, offset, weight, *geometry, 2.0, 2)
    with pytest.raises(TypeError, match="stride must be an int or a pair of ints"):
        mmcv.deform_conv2d(x, offset, weight, bias)   # torchvision's order: bias is not 4th


def test_mmcv_conv_modules():
    torch.manual_seed(0)
    x, offset, mask, _, _ = conv_tensors()
    positional = mmcv.DeformConv2d(4, 6, (3, 2), (1, 2), (1, 0), (2, 1), 2, 2, False, 32)
    keyword = mmcv.DeformConv2d(in_channels=4, out_channels=6, kernel_size=(3, 2),
                                stride=(1, 2), padding=(1, 0), dilation=(2, 1), groups=2,
                                deformable_groups=2, im2col_step=5)
    assert keyword.deform_groups == 2 and keyword.im2col_step == 5
    for m in (positional, keyword):
        m.double()
        # mmcv's DeformConv2d: weight only; kaiming-uniform, relu gain
        assert keys(m) == ["weight"] and m.weight.shape == (6, 2, 3, 2)
        assert m.weight.abs().max() <= (6 / (2 * 3 * 2)) ** 0.5
        assert m.transposed is False and m.output_padding == (0,)
        assert_same(run(lambda: m(x, offset), (x, offset, m.weight)),
                    run(lambda: mmcv.deform_conv2d(x, offset, m.weight, (1, 2), (1, 0), (2, 1),
                                                   2, 2), (x, offset, m.weight)))
    assert keys(mmcv.DeformConv2d(4, 6, 3, bias=True)) == ["bias", "weight"]

    mod = mmcv.ModulatedDeformConv2d(4, 6, (3, 2), stride=(1, 2), padding=(1, 0),
                                     dilation=(2, 1), groups=2, deform_groups=2).double()
    assert keys(mod) == ["bias", "weight"]
    # mmcv's init: uniform(+-1/sqrt(in_channels*kh*kw)), bias 0
    assert mod.weight.abs().max() <= 1 / (4 * 3 * 2) ** 0.5 and not mod.bias.any()
    with torch.no_grad():
        mod.bias.normal_()
    params = (x, offset, mask, mod.weight, mod.bias)
    assert_same(run(lambda: mod(x, offset, mask), params),
                run(lambda: ct.deform_conv2d(x, offset, mod.weight, mod.bias, (1, 2), (1, 0),
                                             (2, 1), mask), params))
    assert keys(mmcv.ModulatedDeformConv2d(4, 6, 3, bias=False)) == ["weight"]
    alias = mmcv.ModulatedDeformConv2d(4, 6, 3, 1, 1, 1, 1, deformable_groups=2)
    assert alias.deform_groups == 2
    with pytest.raises(ValueError, match="deformable_groups is mmcv's older name for "
                                         "deform_groups: give one, got deform_groups=2 and "
                                         "deformable_groups=4"):
        mmcv.DeformConv2d(4, 6, 3, deform_groups=2, deformable_groups=4)
    with pytest.raises(ValueError, match="deform_groups must be .* = 2, got 1"):
        mmcv.ModulatedDeformConv2d(4, 6, (3, 2), (1, 2), (1, 0), (2, 1), 2).double()(
            x, offset, mask)


def test_mmcv_packs():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 7, 6, dtype=F64, requires_grad=True)
    # positional (mmcv's order) and keyword, with the deformable_groups alias
    pack = mmcv.DeformConv2dPack(4, 6, 3, 2, 1, 1, 2, 2, False, 2).double()
    alias = mmcv.DeformConv2dPack(4, 6, 3, stride=2, padding=1, groups=2,
                                  deformable_groups=2).double()
    mpack = mmcv.ModulatedDeformConv2dPack(4, 6, 3, 1, 1, 1, 2, 2, True).double()
    malias = mmcv.ModulatedDeformConv2dPack(4, 6, 3, padding=1, groups=2,
                                            deformable_groups=2).double()
    for m in (pack, alias):
        # mmcv.ops.DeformConv2dPack's state_dict keys
        assert keys(m) == ["conv_offset.bias", "conv_offset.weight", "weight"]
        assert m.conv_offset.weight.shape == (2 * 2 * 9, 4, 3, 3) and m.deform_groups == 2
    for m in (mpack, malias):
        # mmcv.ops.ModulatedDeformConv2dPack's state_dict keys
        assert keys(m) == ["bias", "conv_offset.bias", "conv_offset.weight", "weight"]
        assert m.conv_offset.weight.shape == (3 * 2 * 9, 4, 3, 3) and m.deform_groups == 2
    assert pack.im2col_step == 2      # accepted; the batch of 3 is not a multiple: ignored
    for m in (pack, mpack):
        assert m._version == 2 and m.state_dict()._metadata[""]["version"] == 2
        torch.nn.init.normal_(m.conv_offset.weight, std=0.1)
        torch.nn.init.normal_(m.conv_offset.bias, std=0.1)
    # the Packs compute what cupydcn.torch's Packs compute with the same parameters
    for ours, theirs in ((pack, ct.DeformConv2dPack(4, 6, 3, 2, 1, 1, 2, 2)),
                         (mpack, ct.ModulatedDeformConv2dPack(4, 6, 3, 1, 1, 1, 2, 2))):
        theirs.double().load_state_dict(ours.state_dict())
        params = [x] + list(ours.parameters())
        assert_same(run(lambda: ours(x), params),
                    run(lambda: theirs(x), [x] + list(theirs.parameters())))
    # init_offset / init_weights as mmcv: zero the offset conv again
    pack.init_offset()
    mpack.init_weights()
    assert not pack.conv_offset.weight.any() and not mpack.conv_offset.weight.any()
    assert not mpack.bias.any()
    with pytest.raises(ValueError, match="im2col_step must be >= 1, got 0"):
        mmcv.DeformConv2dPack(4, 6, 3, im2col_step=0)


class MMDet1Block(torch.nn.Module):
    """A layer as in mmdetection: its DCN at ``conv2``."""

    def __init__(self, pack):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(4, 4, 1)
        self.conv2 = pack


def version1_checkpoint(block):
    """``block``'s state dict as mmcv version 1 saved it: the offset conv
    beside the layer (``conv2_offset.*``), the layer at version 1."""
    new = block.state_dict()
    old = collections.OrderedDict(
        (k.replace("conv2.conv_offset.", "conv2_offset."), v.clone()) for k, v in new.items())
    old._metadata = collections.OrderedDict(
        (k, dict(v)) for k, v in new._metadata.items() if not k.startswith("conv2.conv_offset"))
    old._metadata["conv2"]["version"] = 1
    return old


def load_like_mmcv1(module, state_dict):
    """mmcv 1.x's ``load_state_dict`` (mmcv/runner/checkpoint.py): every
    module's ``_load_from_state_dict`` sees the whole state dict. Returns the
    missing keys, the unexpected ones and the errors."""
    missing, unexpected, errors = [], [], []
    metadata = getattr(state_dict, "_metadata", None)
    state_dict = state_dict.copy()

    def load(m, prefix=""):
        local_metadata = {} if metadata is None else metadata.get(prefix[:-1], {})
        m._load_from_state_dict(state_dict, prefix, local_metadata, True, missing, unexpected,
                                errors)
        for name, child in m._modules.items():
            if child is not None:
                load(child, prefix + name + ".")

    load(module)
    return missing, unexpected, errors


@pytest.mark.parametrize("make", [
    lambda: mmcv.DeformConv2dPack(4, 6, 3, padding=1),
    lambda: mmcv.ModulatedDeformConv2dPack(4, 6, 3, padding=1, deform_groups=2),
], ids=["DeformConv2dPack", "ModulatedDeformConv2dPack"])
def test_mmcv_version1_checkpoint_loads(make):
    torch.manual_seed(0)
    source = MMDet1Block(make())
    for p in source.parameters():
        torch.nn.init.normal_(p)
    old = version1_checkpoint(source)
    assert "conv2_offset.weight" in old and "conv2.conv_offset.weight" not in old

    def check(target):
        for (k, v), (k2, v2) in zip(sorted(target.state_dict().items()),
                                    sorted(source.state_dict().items())):
            assert k == k2
            torch.testing.assert_close(v, v2, **EXACT)

    # mmcv's hook, under a loader that hands each module the whole dict (mmcv 1.x)
    # (the parent, loaded before its children, reports the old keys as
    # unexpected: mmcv 1.x logged that, non-strict, then conv2 took them)
    old_keys = ["conv2_offset.weight", "conv2_offset.bias"]
    target = MMDet1Block(make())
    missing, unexpected, errors = load_like_mmcv1(target, old)
    assert (missing, sorted(unexpected), errors) == ([], sorted(old_keys), [])
    check(target)
    without_metadata = collections.OrderedDict(old)   # version None: upgraded as well
    target = MMDet1Block(make())
    assert load_like_mmcv1(target, without_metadata)[0] == []
    check(target)
    # torch's load_state_dict hands conv2 only "conv2.*": upgrade_state_dict first
    target = MMDet1Block(make())
    with pytest.raises(RuntimeError, match="conv2.conv_offset.weight"):
        target.load_state_dict(old)
    upgraded = mmcv.upgrade_state_dict(target, old)
    assert "conv2_offset.weight" in old                   # the input is left alone
    assert sorted(upgraded) == sorted(source.state_dict())
    target.load_state_dict(upgraded)
    check(target)
    # a version-2 checkpoint is never renamed (mmcv's rule)
    current = source.state_dict()
    stray = collections.OrderedDict(current)
    stray._metadata = current._metadata
    stray["conv2_offset.weight"] = stray.pop("conv2.conv_offset.weight")
    assert "conv2.conv_offset.weight" not in mmcv.upgrade_state_dict(target, stray)


def test_mmcv_roi_pool_positional_order():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 9, generator=gen, dtype=F64, requires_grad=True)
    rois = torch.tensor([[0, 1, 2, 5, 5], [1, 3, 1, 7, 4]], dtype=F64)
    offset = (0.1 * torch.randn(2, 2, 3, 4, generator=gen, dtype=F64)).requires_grad_()
    assert_same(run(lambda: mmcv.deform_roi_pool(x, rois, offset, (3, 4), 0.5, 2, 0.2),
                    (x, offset)),
                run(lambda: ct.deform_roi_pool(x, rois, offset, output_size=(3, 4),
                                               spatial_scale=0.5, sampling_ratio=2, gamma=0.2),
                    (x, offset)))
    pack = mmcv.ModulatedDeformRoIPoolPack((3, 4), 3, 16, 0.5, 2, 0.2)
    # mmcv.ops.ModulatedDeformRoIPoolPack's state_dict keys
    assert keys(pack) == ["mask_fc.0.bias", "mask_fc.0.weight", "mask_fc.2.bias",
                          "mask_fc.2.weight", "offset_fc.0.bias", "offset_fc.0.weight",
                          "offset_fc.2.bias", "offset_fc.2.weight", "offset_fc.4.bias",
                          "offset_fc.4.weight"]
    assert pack.double()(x, rois).shape == (2, 3, 3, 4)


# --------------------------------------------------------------------------
# DCNv2 / CenterNet
# --------------------------------------------------------------------------


def test_dcnv2_signatures_are_dcnv2s():
    conv = [("in_channels", EMPTY), ("out_channels", EMPTY), ("kernel_size", EMPTY),
            ("stride", EMPTY), ("padding", EMPTY), ("dilation", 1), ("deformable_groups", 1)]
    assert parameters(dcnv2.DCNv2) == conv and parameters(dcnv2.DCN) == conv
    pool = [("spatial_scale", EMPTY), ("pooled_size", EMPTY), ("output_dim", EMPTY),
            ("no_trans", EMPTY), ("group_size", 1), ("part_size", None),
            ("sample_per_part", 4), ("trans_std", 0.0)]
    assert parameters(dcnv2.DCNv2Pooling) == pool
    assert parameters(dcnv2.DCNPooling) == pool + [("deform_fc_dim", 1024)]
    assert parameters(dcnv2.dcn_v2_conv) == [
        (n, EMPTY) for n in ("input", "offset", "mask", "weight", "bias", "stride", "padding",
                             "dilation", "deformable_groups")]
    assert parameters(dcnv2.dcn_v2_pooling) == [
        ("input", EMPTY), ("rois", EMPTY), ("offset", EMPTY)] + pool


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dcnv2_conv_equals_cupydcn(dtype):
    torch.manual_seed(0)
    x, offset, mask, _, _ = conv_tensors(groups=1, dtype=dtype)
    positional = dcnv2.DCNv2(4, 6, (3, 2), (1, 2), (1, 0), (2, 1), 2).to(dtype)
    keyword = dcnv2.DCNv2(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(1, 2),
                          padding=(1, 0), dilation=(2, 1), deformable_groups=2).to(dtype)
    for m in (positional, keyword):
        # DCNv2's keys; its init: weight uniform(+-1/sqrt(in*kh*kw)), bias 0
        assert keys(m) == ["bias", "weight"] and m.weight.shape == (6, 4, 3, 2)
        assert m.deformable_groups == 2 and not m.bias.any()
        assert m.weight.abs().max() <= 1 / (4 * 3 * 2) ** 0.5
        with torch.no_grad():
            m.bias.normal_()
        params = (x, offset, mask, m.weight, m.bias)
        expected = run(lambda: ct.deform_conv2d(x, offset, m.weight, m.bias, (1, 2), (1, 0),
                                                (2, 1), mask), params)
        assert_same(run(lambda: m(x, offset, mask), params), expected)
        assert_same(run(lambda: dcnv2.dcn_v2_conv(x, offset, mask, m.weight, m.bias, (1, 2),
                                                  (1, 0), (2, 1), 2), params), expected)
    with pytest.raises(ValueError, match="deformable_groups must be .* = 2, got 1"):
        dcnv2.DCNv2(4, 6, (3, 2), (1, 2), (1, 0), (2, 1)).to(dtype)(x, offset, mask)


class CenterNetDeformConv(torch.nn.Module):
    """CenterNet's ``DeformConv`` (src/lib/models/networks/pose_dla_dcn.py):
    BatchNorm + ReLU after a DCNv2 ``DCN``."""

    def __init__(self, chi, cho):
        super().__init__()
        self.actf = torch.nn.Sequential(torch.nn.BatchNorm2d(cho), torch.nn.ReLU(inplace=True))
        self.conv = dcnv2.DCN(chi, cho, kernel_size=(3, 3), stride=1, padding=1, dilation=1,
                              deformable_groups=1)

    def forward(self, x):
        return self.actf(self.conv(x))


def test_dcn_loads_a_centernet_state_dict():
    gen = torch.Generator().manual_seed(0)
    # CenterNet's checkpoint keys for the layer, shapes as DCNv2 makes them
    checkpoint = collections.OrderedDict([
        ("actf.0.weight", torch.rand(6, generator=gen) + 0.5),
        ("actf.0.bias", torch.randn(6, generator=gen)),
        ("actf.0.running_mean", torch.randn(6, generator=gen)),
        ("actf.0.running_var", torch.rand(6, generator=gen) + 0.5),
        ("actf.0.num_batches_tracked", torch.tensor(100)),
        ("conv.weight", torch.randn(6, 4, 3, 3, generator=gen)),
        ("conv.bias", torch.randn(6, generator=gen)),
        ("conv.conv_offset_mask.weight", 0.1 * torch.randn(27, 4, 3, 3, generator=gen)),
        ("conv.conv_offset_mask.bias", 0.1 * torch.randn(27, generator=gen)),
    ])
    layer = CenterNetDeformConv(4, 6)
    assert keys(layer) == sorted(checkpoint)
    layer.load_state_dict(checkpoint)      # strict
    layer = layer.double().eval()
    x = torch.randn(2, 4, 7, 8, generator=gen, dtype=F64)
    # conv_offset_mask's output: 18 offset channels, then 9 mask logits
    raw = torch.nn.functional.conv2d(x, checkpoint["conv.conv_offset_mask.weight"].double(),
                                     checkpoint["conv.conv_offset_mask.bias"].double(),
                                     padding=1)
    conv = ct.deform_conv2d(x, raw[:, :18], checkpoint["conv.weight"].double(),
                            checkpoint["conv.bias"].double(), padding=1,
                            mask=torch.sigmoid(raw[:, 18:]))
    with torch.no_grad():
        torch.testing.assert_close(layer.conv(x), conv, **EXACT)
        torch.testing.assert_close(layer(x), layer.actf(conv), **EXACT)


def test_dcn_module():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 8, dtype=F64, requires_grad=True)
    m = dcnv2.DCN(4, 6, 3, 2, 1, 1, 2).double()
    # DCNv2's keys; conv_offset_mask: 3*deformable_groups*kh*kw outputs, zero at init
    assert keys(m) == ["bias", "conv_offset_mask.bias", "conv_offset_mask.weight", "weight"]
    assert m.conv_offset_mask.weight.shape == (3 * 2 * 9, 4, 3, 3)
    assert not m.conv_offset_mask.weight.any() and not m.conv_offset_mask.bias.any()
    # at init: zero offsets, mask sigmoid(0) = 0.5
    expected = 0.5 * torch.nn.functional.conv2d(x, m.weight, None, stride=2, padding=1)
    torch.testing.assert_close(m(x), expected + m.bias[:, None, None], rtol=1e-12, atol=1e-12)
    torch.nn.init.normal_(m.conv_offset_mask.weight, std=0.1)
    m.init_offset()
    assert not m.conv_offset_mask.weight.any()
    # dilation: conv_offset_mask follows the layer's (DCNv2 leaves it at 1 and fails)
    dilated = dcnv2.DCN(4, 6, 3, 1, 2, dilation=2).double()
    torch.nn.init.normal_(dilated.conv_offset_mask.weight, std=0.1)
    params = [x] + list(dilated.parameters())
    raw = dilated.conv_offset_mask(x)
    assert raw.shape[2:] == (9, 8)

    def manual():
        raw = dilated.conv_offset_mask(x)
        return ct.deform_conv2d(x, raw[:, :18], dilated.weight, dilated.bias, padding=2,
                                dilation=2, mask=torch.sigmoid(raw[:, 18:]))

    assert_same(run(lambda: dilated(x), params), run(manual, params))


def psroi_tensors(R=3, rows=None, classes=2, dtype=F64):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 9, generator=gen, dtype=dtype).requires_grad_()
    rois = torch.tensor([[0, 1, 2, 3, 4], [1, 4, 1, 6, 3], [1, 0, 0, 8, 7]],
                        dtype=dtype)[:R]
    trans = (0.7 + 0.2 * torch.rand(rows or R, 2 * classes, 3, 3, generator=gen,
                                    dtype=dtype)).requires_grad_()
    return x, rois, trans


def test_dcnv2_pooling_takes_more_trans_rows_than_rois():
    x, rois, trans = psroi_tensors(R=2, rows=20)
    params = dict(spatial_scale=1.0, output_dim=4, group_size=1, pooled_size=3, part_size=3,
                  sample_per_part=2, trans_std=0.1)
    positional = dcnv2.DCNv2Pooling(1.0, 3, 4, False, 1, None, 2, 0.1)
    keyword = dcnv2.DCNv2Pooling(spatial_scale=1.0, pooled_size=3, output_dim=4, no_trans=False,
                                 sample_per_part=2, trans_std=0.1)
    expected_out = ct.deform_psroi_pool(x, rois, trans[:2], **params)
    for m in (positional, keyword):
        assert keys(m) == [] and m.part_size == 3
        out, (g_x, g_trans) = run(lambda: m(x, rois, trans), (x, trans))
        # RoI r uses trans row r; the rows past the RoIs are unused (gradient 0)
        torch.testing.assert_close(out, expected_out, **EXACT)
        expected = run(lambda: ct.deform_psroi_pool(x, rois, trans[:2], **params), (x, trans))
        assert_same((out, (g_x, g_trans)), expected)
        assert g_trans[:2].any() and not g_trans[2:].any()
        assert_same(run(lambda: dcnv2.dcn_v2_pooling(x, rois, trans, 1.0, 3, 4, False, 1, None,
                                                     2, 0.1), (x, trans)), expected)
    # fewer rows than RoIs: an error (DCNv2 reads past the end)
    with pytest.raises(ValueError, match=r"trans.shape\[0\] must be R = 2, got 1"):
        positional(x, rois, trans[:1])
    # no_trans: the offset DCNv2's tests pass (empty, or any) is ignored
    plain = dcnv2.DCNv2Pooling(1.0, 3, 4, True, sample_per_part=2)
    expected = ct.deform_psroi_pool(x, rois, None, **params)
    torch.testing.assert_close(plain(x, rois, x.new()), expected, **EXACT)
    torch.testing.assert_close(plain(x, rois, trans), expected, **EXACT)
    # group_size > 1 as in the official operator (DCNv2 needs group_size 1)
    grouped = dcnv2.DCNv2Pooling(1.0, 3, 1, False, group_size=2, sample_per_part=2,
                                 trans_std=0.1)
    torch.testing.assert_close(
        grouped(x, rois, trans[:, :2]),
        ct.deform_psroi_pool(x, rois, trans[:2, :2], **dict(params, output_dim=1, group_size=2)),
        **EXACT)


def test_dcn_pooling():
    torch.manual_seed(0)
    x, rois, _ = psroi_tensors()
    params = dict(spatial_scale=0.5, output_dim=4, group_size=1, pooled_size=3, part_size=3,
                  sample_per_part=2, trans_std=0.1)
    m = dcnv2.DCNPooling(0.5, 3, 4, False, 1, None, 2, 0.1, 16).double()
    # DCNv2's offset_mask_fc keys and shapes; the last layer zero-initialised
    assert keys(m) == ["offset_mask_fc.0.bias", "offset_mask_fc.0.weight",
                       "offset_mask_fc.2.bias", "offset_mask_fc.2.weight",
                       "offset_mask_fc.4.bias", "offset_mask_fc.4.weight"]
    assert m.offset_mask_fc[0].weight.shape == (16, 3 * 3 * 4)
    assert m.offset_mask_fc[4].weight.shape == (3 * 3 * 3, 16) and m.deform_fc_dim == 16
    plain = ct.deform_psroi_pool(x, rois, None, **params)
    # at init: no trans, mask sigmoid(0) = 0.5
    torch.testing.assert_close(m(x, rois), 0.5 * plain, rtol=1e-15, atol=0)
    torch.nn.init.normal_(m.offset_mask_fc[4].weight, std=0.1)

    def manual():
        head = m.offset_mask_fc(ct.deform_psroi_pool(x, rois, None, **params).reshape(3, -1))
        head = head.reshape(3, 3, 3, 3)
        return ct.deform_psroi_pool(x, rois, head[:, :2], **params) * torch.sigmoid(head[:, 2:])

    weights = [x] + list(m.parameters())
    assert_same(run(lambda: m(x, rois), weights), run(manual, weights))
    no_trans = dcnv2.DCNPooling(spatial_scale=0.5, pooled_size=3, output_dim=4, no_trans=True,
                                sample_per_part=2, trans_std=0.1)
    assert keys(no_trans) == []
    torch.testing.assert_close(no_trans(x, rois), plain, **EXACT)
    with pytest.raises(ValueError, match="part_size must be pooled_size = 3 when no_trans is "
                                         "False .*got 2"):
        dcnv2.DCNPooling(0.5, 3, 4, False, part_size=2)


# --------------------------------------------------------------------------
# detectron2
# --------------------------------------------------------------------------


def test_detectron2_signatures_are_detectron2s():
    common = [("in_channels", EMPTY), ("out_channels", EMPTY), ("kernel_size", EMPTY),
              ("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1),
              ("deformable_groups", 1)]
    tail = [("norm", None), ("activation", None)]
    assert parameters(detectron2.DeformConv) == common + [("bias", False)] + tail
    assert parameters(detectron2.ModulatedDeformConv) == common + [("bias", True)] + tail
    assert parameters(detectron2.DeformConv.forward) == [("self", EMPTY), ("x", EMPTY),
                                                         ("offset", EMPTY)]
    assert parameters(detectron2.ModulatedDeformConv.forward) == [
        ("self", EMPTY), ("x", EMPTY), ("offset", EMPTY), ("mask", EMPTY)]


def test_detectron2_golden_values_and_repr():
    """detectron2's tests/layers/test_deformable.py, test_forward_output and test_repr."""
    inputs = torch.arange(25, dtype=torch.float32).reshape(1, 1, 5, 5)
    offset = torch.full((1, 18, 5, 5), 0.5)
    deform = detectron2.DeformConv(1, 1, kernel_size=3, padding=1)
    deform.weight = torch.nn.Parameter(torch.ones_like(deform.weight))
    expected = torch.tensor([[30, 41.25, 48.75, 45, 28.75], [62.25, 81, 90, 80.25, 50.25],
                             [99.75, 126, 135, 117.75, 72.75], [105, 131.25, 138.75, 120, 73.75],
                             [71.75, 89.25, 93.75, 80.75, 49.5]]).reshape(1, 1, 5, 5)
    torch.testing.assert_close(deform(inputs, offset), expected)
    modulated = detectron2.ModulatedDeformConv(1, 1, 3, padding=1, bias=False)
    modulated.weight = deform.weight
    torch.testing.assert_close(modulated(inputs, offset, torch.full((1, 9, 5, 5), 0.5)),
                               0.5 * expected)
    assert repr(detectron2.DeformConv(3, 10, kernel_size=3, padding=1, deformable_groups=2)) == (
        "DeformConv(in_channels=3, out_channels=10, kernel_size=(3, 3), "
        "stride=(1, 1), padding=(1, 1), dilation=(1, 1), "
        "groups=1, deformable_groups=2, bias=False)")
    assert repr(detectron2.ModulatedDeformConv(3, 10, kernel_size=3, padding=1,
                                               deformable_groups=2)) == (
        "ModulatedDeformConv(in_channels=3, out_channels=10, kernel_size=(3, 3), "
        "stride=1, padding=1, dilation=1, groups=1, deformable_groups=2, bias=True)")


def test_detectron2_modules():
    torch.manual_seed(0)
    x, offset, mask, _, _ = conv_tensors()
    norm = torch.nn.GroupNorm(2, 6).double()
    positional = detectron2.DeformConv(4, 6, (3, 2), (1, 2), (1, 0), (2, 1), 2, 2, False, norm,
                                       torch.relu).double()
    keyword = detectron2.DeformConv(4, 6, kernel_size=(3, 2), stride=(1, 2), padding=(1, 0),
                                    dilation=(2, 1), groups=2, deformable_groups=2, norm=norm,
                                    activation=torch.relu).double()
    for m in (positional, keyword):
        # detectron2's keys: weight, and the norm's under norm.
        assert keys(m) == ["norm.bias", "norm.weight", "weight"] and m.bias is None
        params = (x, offset, m.weight, norm.weight)
        assert_same(run(lambda: m(x, offset), params),
                    run(lambda: torch.relu(norm(ct.deform_conv2d(
                        x, offset, m.weight, None, (1, 2), (1, 0), (2, 1)))), params))
    assert keys(detectron2.DeformConv(4, 6, 3)) == ["weight"]
    assert keys(detectron2.DeformConv(4, 6, 3, bias=True)) == ["bias", "weight"]

    mod = detectron2.ModulatedDeformConv(4, 6, (3, 2), (1, 2), (1, 0), (2, 1), 2, 2).double()
    assert keys(mod) == ["bias", "weight"] and mod.with_bias is True and not mod.bias.any()
    assert mod.stride == (1, 2) and mod.deformable_groups == 2
    with torch.no_grad():
        mod.bias.normal_()
    params = (x, offset, mask, mod.weight, mod.bias)
    assert_same(run(lambda: mod(x, offset, mask), params),
                run(lambda: ct.deform_conv2d(x, offset, mod.weight, mod.bias, (1, 2), (1, 0),
                                             (2, 1), mask), params))
    assert keys(detectron2.ModulatedDeformConv(4, 6, 3, bias=False)) == ["weight"]
    # detectron2's ResNet block: norm as a module (FrozenBN-like buffers appear too)
    block = detectron2.ModulatedDeformConv(4, 4, 3, padding=1, bias=False,
                                           norm=torch.nn.BatchNorm2d(4))
    assert keys(block) == ["norm.bias", "norm.num_batches_tracked", "norm.running_mean",
                           "norm.running_var", "norm.weight", "weight"]
    with pytest.raises(ValueError, match="deformable_groups must be .* = 2, got 1"):
        detectron2.DeformConv(4, 6, (3, 2), (1, 2), (1, 0), (2, 1), 2).double()(x, offset)


def test_detectron2_empty_input_skips_norm_and_activation():
    def fail(_):
        raise AssertionError("norm/activation called on an empty input")

    m = detectron2.DeformConv(4, 6, 3, padding=1, norm=fail, activation=fail)
    x = torch.zeros(0, 4, 5, 7, requires_grad=True)
    out = m(x, torch.zeros(0, 18, 5, 7))
    assert out.shape == (0, 6, 5, 7)
    out.sum().backward()
    assert x.grad.shape == x.shape


# --------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------


class CompatNet(torch.nn.Module):
    """One module of each family, with the groups checks, in one graph."""

    def __init__(self):
        super().__init__()
        self.mmcv = mmcv.ModulatedDeformConv2dPack(4, 4, 3, padding=1, deform_groups=2)
        self.dcn = dcnv2.DCN(4, 4, 3, 1, 1)
        self.d2_offset = torch.nn.Conv2d(4, 18, 3, padding=1)
        self.d2 = detectron2.DeformConv(4, 4, 3, padding=1, norm=torch.nn.GroupNorm(2, 4),
                                        activation=torch.relu)
        for conv in (self.mmcv.conv_offset, self.dcn.conv_offset_mask, self.d2_offset):
            torch.nn.init.normal_(conv.weight, std=0.05)

    def forward(self, x):
        y = self.dcn(self.mmcv(x))
        return self.d2(y, self.d2_offset(y))


def test_compat_modules_compile_fullgraph():
    torch.manual_seed(0)
    net = CompatNet()
    x = torch.randn(2, 4, 7, 6, requires_grad=True)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    params = [x] + list(net.parameters())
    out, grads = run(lambda: compiled(x), params)
    out_eager, grads_eager = run(lambda: net(x), params)
    torch.testing.assert_close(out, out_eager, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, grads_eager):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# torchvision's TestDeformConv: the torch.fx leaf
# --------------------------------------------------------------------------


class HoldsALayer(torch.nn.Module):
    """The module torchvision's test_is_leaf_node traces: a layer called on
    three inputs, its result unused."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.n_inputs = 3

    def forward(self, a, b, c):
        self.layer(a, b, c)


def torchvision_layer():
    """torchvision's TestDeformConv.make_obj, on cupydcn.torch."""
    return ct.DeformConv2d(6, 2, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1),
                           groups=2)


class RecordingTracer(torch.fx.Tracer):
    """A plain torch.fx tracer (no leaf modules given) that lists the nodes it
    creates through ``create_proxy``: the placeholders and the calls, which
    is what torchvision's get_graph_node_names lists."""

    def __init__(self):
        super().__init__()
        self.names = []

    def create_proxy(self, kind, target, args, kwargs, *rest, **options):
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **options)
        self.names.append((kind, proxy.node.target))
        return proxy


def test_deform_conv2d_is_a_leaf_of_a_plain_fx_tracer():
    """torchvision's test_is_leaf_node, with a plain torch.fx tracer standing
    for get_graph_node_names: in train and in eval mode, the inputs and one
    node for the layer (no weight or bias reads, no op inside)."""
    model = HoldsALayer(torchvision_layer())
    names = []
    for mode in (True, False):
        tracer = RecordingTracer()
        tracer.trace(model.train(mode))
        names.append(tracer.names)
    assert names[0] == names[1]
    assert len(names[0]) == 1 + model.n_inputs
    assert names[0] == [("placeholder", "a"), ("placeholder", "b"), ("placeholder", "c"),
                        ("call_module", "layer")]


def test_torchvision_is_leaf_node_unmodified():
    """torchvision's TestDeformConv.test_is_leaf_node as torchvision writes
    it (its get_graph_node_names, no tracer arguments), on cupydcn.torch."""
    feature_extraction = pytest.importorskip(
        "torchvision.models.feature_extraction",
        reason="torchvision is not installed (the plain-tracer test above stands for it)")
    op_obj = HoldsALayer(torchvision_layer())
    graph_node_names = feature_extraction.get_graph_node_names(op_obj)
    assert len(graph_node_names) == 2
    assert len(graph_node_names[0]) == len(graph_node_names[1])
    assert len(graph_node_names[0]) == 1 + op_obj.n_inputs


def test_deform_conv2d_leaf_runs_as_the_layer():
    """The traced model calls the layer itself: same numbers and gradients,
    with and without a mask, at any depth, pickled too."""
    torch.manual_seed(0)
    x, offset, mask, _, _ = conv_tensors(B=3, C=6, H=5, W=4, Cout=2, kh=3, kw=2, groups=2,
                                         dg=3, stride=(2, 1), padding=(1, 0), dilation=(2, 1))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = torch.nn.ModuleDict({"dcn": torchvision_layer()})

        def forward(self, x, offset, mask):
            return self.block["dcn"](x, offset, mask).relu() + self.block["dcn"](x, offset)

    net = Net().double()
    traced = torch.fx.symbolic_trace(net)
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["block.dcn"] * 2
    params = (x, offset, mask, net.block["dcn"].weight)
    assert_same(run(lambda: traced(x, offset, mask), params),
                run(lambda: net(x, offset, mask), params))
    torch.testing.assert_close(pickle.loads(pickle.dumps(traced))(x, offset, mask),
                               net(x, offset, mask), **EXACT)


# --------------------------------------------------------------------------
# TorchScript and torch.fx of every family's modules
# --------------------------------------------------------------------------


def randomize_offsets(module):
    """Offset (and mask) heads away from their zero init, so the offsets matter."""
    gen = torch.Generator().manual_seed(3)
    for name in ("conv_offset", "conv_offset_mask"):
        conv = getattr(module, name, None)
        if conv is not None:
            with torch.no_grad():
                conv.weight.copy_(0.1 * torch.randn(conv.weight.shape, generator=gen))
    fc = getattr(module, "offset_mask_fc", None)
    if fc is not None:
        with torch.no_grad():
            fc[4].weight.copy_(0.1 * torch.randn(fc[4].weight.shape, generator=gen))
    return module


def conv_case(name):
    """(module, its forward's inputs) for one family's conv module (float64)."""
    torch.manual_seed(0)
    x, offset, mask, _, _ = conv_tensors(B=3)
    x1, offset1, mask1, _, _ = conv_tensors(B=3, groups=1)
    geometry = ((1, 2), (1, 0), (2, 1))
    make = {
        "mmcv.DeformConv2d": lambda: (mmcv.DeformConv2d(4, 6, (3, 2), *geometry, 2, 2),
                                      (x, offset)),
        "mmcv.ModulatedDeformConv2d": lambda: (
            mmcv.ModulatedDeformConv2d(4, 6, (3, 2), *geometry, 2, 2), (x, offset, mask)),
        "mmcv.DeformConv2dPack": lambda: (
            mmcv.DeformConv2dPack(4, 6, 3, 2, 1, 1, 2, 2, False, 2), (x,)),
        "mmcv.ModulatedDeformConv2dPack": lambda: (
            mmcv.ModulatedDeformConv2dPack(4, 6, 3, 1, 1, 1, 2, deformable_groups=2), (x,)),
        "dcnv2.DCNv2": lambda: (dcnv2.DCNv2(4, 6, (3, 2), *geometry, 2), (x1, offset1, mask1)),
        "dcnv2.DCN": lambda: (dcnv2.DCN(4, 6, 3, 2, 1, 1, 2), (x,)),
        "detectron2.DeformConv": lambda: (
            detectron2.DeformConv(4, 6, (3, 2), *geometry, 2, 2, True,
                                  torch.nn.GroupNorm(2, 6), torch.relu), (x, offset)),
        "detectron2.ModulatedDeformConv": lambda: (
            detectron2.ModulatedDeformConv(4, 6, (3, 2), *geometry, 2, 2,
                                           activation=torch.nn.ReLU()), (x, offset, mask)),
    }[name]
    module, inputs = make()
    module = randomize_offsets(module.double())
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.normal_()   # biases (and norm affine) away from their init
    return module, inputs


def pool_case(name):
    """(module, its forward's inputs) for one position-sensitive RoI pooling module."""
    x, rois, trans = psroi_tensors(R=3, rows=4)
    make = {
        "cupydcn.torch.DeformPSRoIPool": lambda: (
            ct.DeformPSRoIPool(1, 3, 1, False, 2, 3, 2, 0.1), (x, rois, trans[:3, :2])),
        "dcnv2.DCNv2Pooling": lambda: (dcnv2.DCNv2Pooling(0.5, 3, 4, False, 1, None, 2, 0.1),
                                       (x, rois, trans)),
        "dcnv2.DCNPooling": lambda: (dcnv2.DCNPooling(0.5, 3, 4, False, 1, None, 2, 0.1, 16),
                                     (x, rois)),
        "dcnv2.DCNPooling(no_trans)": lambda: (dcnv2.DCNPooling(0.5, 3, 4, True), (x, rois)),
    }[name]
    module, inputs = make()
    return randomize_offsets(module.double()), inputs


CONV_CASES = ["mmcv.DeformConv2d", "mmcv.ModulatedDeformConv2d", "mmcv.DeformConv2dPack",
              "mmcv.ModulatedDeformConv2dPack", "dcnv2.DCNv2", "dcnv2.DCN",
              "detectron2.DeformConv", "detectron2.ModulatedDeformConv"]
POOL_CASES = ["cupydcn.torch.DeformPSRoIPool", "dcnv2.DCNv2Pooling", "dcnv2.DCNPooling",
              "dcnv2.DCNPooling(no_trans)"]


def roundtrip(scripted):
    """``scripted`` saved with torch.jit.save and loaded back."""
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


@SCRIPT_DEPRECATED
@pytest.mark.parametrize("name", CONV_CASES + POOL_CASES)
def test_modules_script_and_match_eager(name):
    module, inputs = conv_case(name) if name in CONV_CASES else pool_case(name)
    eager = module.state_dict()
    scripted = torch.jit.script(module)
    # the scripted module keeps the checkpoint's keys and values
    assert sorted(scripted.state_dict()) == sorted(eager)
    params = [t for t in inputs if t.requires_grad] + list(module.parameters())
    expected = run(lambda: module(*inputs), params)
    assert_same(run(lambda: scripted(*inputs), params), expected)
    torch.testing.assert_close(roundtrip(scripted)(*inputs), expected[0], **EXACT)
    # a checkpoint of the eager module loads into the scripted one
    fresh = torch.jit.script(conv_case(name)[0] if name in CONV_CASES else pool_case(name)[0])
    fresh.load_state_dict(eager)
    torch.testing.assert_close(fresh(*inputs), expected[0], **EXACT)


@SCRIPT_DEPRECATED
def test_scripted_modules_check_the_groups():
    """The groups the foreign API names are checked in TorchScript too (a
    compiled raise comes back as torch.jit.Error, message kept)."""
    x, offset, mask, _, _ = conv_tensors()
    wrong = torch.jit.script(mmcv.DeformConv2d(4, 6, (3, 2), (1, 2), (1, 0), (2, 1), 2).double())
    with pytest.raises(torch.jit.Error, match=r"deform_groups must be offset.shape\[1\] / "
                                              r"\(2\*kh\*kw\) = 24 / 12 = 2, got 1"):
        wrong(x, offset)
    wrong = torch.jit.script(detectron2.ModulatedDeformConv(4, 6, (3, 2), (1, 2), (1, 0),
                                                            (2, 1), 2, 1).double())
    with pytest.raises(torch.jit.Error, match=r"deformable_groups must be .* = 2, got 1"):
        wrong(x, offset, mask)
    # and the groups (a weight from another layer)
    wrong = torch.jit.script(dcnv2.DCNv2(4, 6, (3, 2), (1, 2), (1, 0), (2, 1), 2).double())
    with torch.no_grad():
        wrong.weight.set_(torch.randn(6, 2, 3, 2, dtype=F64))
    with pytest.raises(torch.jit.Error, match=r"groups must be input.shape\[1\] / "
                                              r"weight.shape\[1\] = 4 / 2 = 2, got 1"):
        wrong(x, offset, mask)


def test_psroi_pool_modules_hold_float_parameters():
    """spatial_scale and trans_std are held as floats (what TorchScript's
    typed op takes), checked when the module is built."""
    m = dcnv2.DCNv2Pooling(1, 3, 4, False, trans_std=0)
    assert (m.spatial_scale, m.trans_std) == (1.0, 0.0)
    assert type(m.spatial_scale) is float and type(m.trans_std) is float
    with pytest.raises(TypeError, match="spatial_scale must be a real number, got '1'"):
        dcnv2.DCNv2Pooling("1", 3, 4, False)
    with pytest.raises(TypeError, match="trans_std must be a real number, got None"):
        ct.DeformPSRoIPool(1.0, 3, 4, False, trans_std=None)


@SCRIPT_DEPRECATED
def test_functions_script_and_match_eager():
    """mmcv's and DCNv2's functions compile with torch.jit.script, in a
    module's forward as mmdetection's heads call them."""
    x, offset, mask, weight, bias = conv_tensors()
    geometry = ((1, 2), (1, 0), (2, 1))
    tensors = (x, offset, mask, weight, bias)
    v1 = torch.jit.script(mmcv.deform_conv2d)
    assert_same(run(lambda: v1(x, offset, weight, *geometry, 2, 2), tensors),
                run(lambda: mmcv.deform_conv2d(x, offset, weight, *geometry, 2, 2), tensors))
    v2 = torch.jit.script(mmcv.modulated_deform_conv2d)
    assert_same(run(lambda: v2(x, offset, mask, weight, bias, *geometry, 2, 2), tensors),
                run(lambda: mmcv.modulated_deform_conv2d(x, offset, mask, weight, bias,
                                                         *geometry, 2, 2), tensors))
    with pytest.raises(torch.jit.Error, match="bias must be False"):
        v1(x, offset, weight, *geometry, 2, 2, True)
    x1, offset1, mask1, weight1, bias1 = conv_tensors(groups=1)
    conv = torch.jit.script(dcnv2.dcn_v2_conv)
    tensors = (x1, offset1, mask1, weight1, bias1)
    assert_same(run(lambda: conv(*tensors, *geometry, 2), tensors),
                run(lambda: dcnv2.dcn_v2_conv(*tensors, *geometry, 2), tensors))
    xp, rois, trans = psroi_tensors(R=2, rows=3)
    pool = torch.jit.script(dcnv2.dcn_v2_pooling)
    torch.testing.assert_close(pool(xp, rois, trans, 1.0, 3, 4, False, 1, None, 2, 0.1),
                               dcnv2.dcn_v2_pooling(xp, rois, trans, 1.0, 3, 4, False, 1, None,
                                                    2, 0.1), **EXACT)


@SCRIPT_DEPRECATED
def test_scripted_detectron2_skips_norm_on_an_empty_batch():
    m = detectron2.DeformConv(4, 6, 3, padding=1, norm=torch.nn.BatchNorm2d(6),
                              activation=torch.relu)
    scripted = torch.jit.script(m)
    out = scripted(torch.zeros(0, 4, 5, 7), torch.zeros(0, 18, 5, 7))
    assert out.shape == (0, 6, 5, 7)
    assert int(m.norm.num_batches_tracked) == 0   # the norm did not run


@pytest.mark.parametrize("name", CONV_CASES + POOL_CASES)
def test_modules_trace_with_fx_and_match_eager(name):
    module, inputs = conv_case(name) if name in CONV_CASES else pool_case(name)
    traced = torch.fx.symbolic_trace(module)
    ops = {n.target for n in traced.graph.nodes if n.op == "call_function"}
    assert ops & {ct.deform_conv2d, ct.deform_psroi_pool}, ops
    params = [t for t in inputs if t.requires_grad] + list(module.parameters())
    assert_same(run(lambda: traced(*inputs), params), run(lambda: module(*inputs), params))


def test_fx_traced_detectron2_runs_norm_on_an_empty_batch():
    """A traced graph cannot branch on data: detectron2's empty-input
    shortcut is not recorded, and the (empty) result goes through norm and
    activation, which return it empty."""
    m = detectron2.DeformConv(4, 6, 3, padding=1, norm=torch.nn.GroupNorm(2, 6),
                              activation=torch.relu)
    traced = torch.fx.symbolic_trace(m)
    targets = [n.target for n in traced.graph.nodes if n.op in ("call_module", "call_function")]
    assert targets == [ct.deform_conv2d, "norm", torch.relu]
    x = torch.randn(0, 4, 5, 7)
    torch.testing.assert_close(traced(x, torch.zeros(0, 18, 5, 7)), m(x, torch.zeros(0, 18, 5, 7)))
