"""ONNX export of the torch bridge (cupydcn/torch/_onnx.py), both exporters.

``torch.onnx.export`` with ``dynamo=True`` and ``dynamo=False``, no extra
argument: deformable convolution becomes the standard ``DeformConv`` (opset
19; bfloat16 native at opset 22, float32 between Casts below), checked node by
node (inputs, attributes, pads ``[ph, pw, ph, pw]``) and run in onnxruntime on
the CPU against cupydcn's own result: groups, offset groups, stride, dilation,
ph != pw, with and without bias and mask, the mmcv modules, an asymmetric
``F.pad`` before the conv, float64/32/16 and bfloat16; an ExportedProgram made
beforehand by ``torch.export`` exports the same ``DeformConv``. The RoI poolings export
to the ``cupydcn`` domain; their nodes run in ONNX's reference evaluator with
cupydcn's NumPy ops as the kernels, which checks that the attributes carry
every argument. CPU tier only: export traces on the CPU.
"""

import pathlib
import re
import subprocess
import sys

import numpy
import pytest

torch = pytest.importorskip("torch", reason="ONNX export tests need torch")
onnx = pytest.importorskip("onnx", reason="ONNX export tests need onnx (pip install onnx)")
pytest.importorskip("onnxscript", reason="torch.onnx's dynamo exporter needs onnxscript")
ort = pytest.importorskip("onnxruntime", reason="ONNX export tests run models in onnxruntime")

import torch.nn.functional as F  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402
from onnx.reference.op_run import OpRun  # noqa: E402

import cupydcn  # noqa: E402
import cupydcn.torch as ct  # noqa: E402
from cupydcn.torch import _onnx as _torch_onnx  # noqa: E402
from helpers import TOLERANCE, rel_err  # noqa: E402

pytestmark = [
    # torch's own warnings while exporting, not cupydcn's
    pytest.mark.filterwarnings(
        "ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning"),
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Constant folding - Only steps=1:UserWarning"),
]

EXPORTERS = [pytest.param(True, id="dynamo"), pytest.param(False, id="torchscript")]
F32_TOLERANCE = 1e-5


def export(model, args, path, dynamo, opset_version=None):
    """The ONNX model of ``model(*args)`` (inputs named in0, in1, ...)."""
    names = [f"in{i}" for i in range(len(args))]
    kwargs = {"verbose": False} if dynamo else {}
    torch.onnx.export(model.eval(), tuple(args), path, dynamo=dynamo, input_names=names,
                      opset_version=opset_version, **kwargs)
    model_proto = onnx.load(path)
    onnx.checker.check_model(model_proto, full_check=True)
    return model_proto


def export_program(model, args, path, opset_version=None):
    """The ONNX model of an ExportedProgram of ``model(*args)`` made beforehand
    by ``torch.export`` (inputs named in0, in1, ...), the dynamo exporter."""
    program = torch.export.export(model.eval(), tuple(args))
    names = [f"in{i}" for i in range(len(args))]
    torch.onnx.export(program, tuple(args), path, dynamo=True, input_names=names,
                      opset_version=opset_version, verbose=False)
    model_proto = onnx.load(path)
    onnx.checker.check_model(model_proto, full_check=True)
    return model_proto


def run_ort(model_proto, args):
    session = ort.InferenceSession(model_proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    feeds = {f"in{i}": a.numpy() for i, a in enumerate(args)}
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})


def nodes(model_proto, op_type, domain=""):
    return [n for n in model_proto.graph.node if n.op_type == op_type and n.domain == domain]


def attributes(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def opset_of(model_proto, domain=""):
    return {o.domain: o.version for o in model_proto.opset_import}[domain]


def conv_case(dtype=torch.float32, B=2, C=4, H=9, W=11, Cout=6, kh=3, kw=2, groups=2, dg=2,
              stride=(2, 1), padding=(2, 1), dilation=(1, 2), seed=0):
    """Inputs with groups, offset groups, stride, dilation and ph != pw."""
    gen = torch.Generator().manual_seed(seed)
    Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    x = torch.randn(B, C, H, W, generator=gen)
    offset = 2 * torch.randn(B, 2 * dg * kh * kw, Ho, Wo, generator=gen)
    mask = torch.rand(B, dg * kh * kw, Ho, Wo, generator=gen)
    layer = ct.DeformConv2d(C, Cout, (kh, kw), stride, padding, dilation, groups)
    return layer.to(dtype), x.to(dtype), offset.to(dtype), mask.to(dtype)


class Conv(torch.nn.Module):
    """cupydcn.torch.deform_conv2d on the inputs, with or without mask and bias."""

    def __init__(self, layer, bias, mask):
        super().__init__()
        self.layer, self.bias, self.mask = layer, bias, mask

    def forward(self, x, offset, *mask):
        layer = self.layer
        return ct.deform_conv2d(x, offset, layer.weight, layer.bias if self.bias else None,
                                layer.stride, layer.padding, layer.dilation,
                                mask[0] if self.mask else None)


def check_deform_conv_node(model_proto, layer, bias, mask, dg=2, version=19):
    (node,) = nodes(model_proto, "DeformConv")
    assert opset_of(model_proto) >= version
    (sh, sw), (ph, pw), (dh, dw) = layer.stride, layer.padding, layer.dilation
    assert attributes(node) == {
        "dilations": [dh, dw], "group": layer.groups, "kernel_shape": list(layer.kernel_size),
        "offset_group": dg, "pads": [ph, pw, ph, pw], "strides": [sh, sw]}
    inputs = list(node.input)
    assert len(inputs) == (5 if mask else 4 if bias else 3), inputs
    assert all(inputs[:3])
    if len(inputs) > 3:
        assert bool(inputs[3]) == bias, inputs  # an absent bias before the mask: ""
    return node


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("bias,mask", [(True, True), (False, True), (True, False),
                                       (False, False)])
def test_deform_conv_exports_and_matches_onnxruntime(tmp_path, dynamo, bias, mask):
    layer, x, offset, m = conv_case()
    model = Conv(layer, bias, mask)
    args = (x, offset, m) if mask else (x, offset)
    model_proto = export(model, args, tmp_path / "m.onnx", dynamo)
    check_deform_conv_node(model_proto, layer, bias, mask)
    (got,) = run_ort(model_proto, args)
    with torch.no_grad():
        want = model(*args)
    assert rel_err(got, want.numpy()) <= F32_TOLERANCE


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("geometry", [
    dict(groups=1, dg=1, stride=(1, 1), padding=(0, 0), dilation=(1, 1), kh=1, kw=1),
    dict(groups=4, dg=4, stride=(1, 3), padding=(0, 3), dilation=(2, 1), kh=2, kw=3, Cout=8),
    dict(groups=1, dg=4, stride=(3, 2), padding=(1, 0), dilation=(2, 2), kh=3, kw=3),
], ids=["1x1", "depthwise", "dg4"])
def test_deform_conv_geometries(tmp_path, dynamo, geometry):
    dg = geometry["dg"]
    layer, x, offset, m = conv_case(**geometry, seed=1)
    model = Conv(layer, True, True)
    model_proto = export(model, (x, offset, m), tmp_path / "m.onnx", dynamo)
    check_deform_conv_node(model_proto, layer, True, True, dg=dg)
    (got,) = run_ort(model_proto, (x, offset, m))
    with torch.no_grad():
        want = model(x, offset, m)
    assert rel_err(got, want.numpy()) <= F32_TOLERANCE


def randomize(module, seed):
    """Non-zero offset branches, so the exported offsets and masks vary."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return module


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("make,mask", [
    (lambda: ct.DeformConv2dPack(4, 6, (3, 2), stride=(2, 1), padding=(2, 1), dilation=(1, 2),
                                 groups=2, deform_groups=2), False),
    (lambda: ct.ModulatedDeformConv2dPack(4, 6, 3, stride=(1, 2), padding=(1, 2), dilation=2,
                                          groups=2, deform_groups=2), True),
    (lambda: ct.DeformConv2d(4, 6, 3, padding=(2, 1), groups=2), False),
], ids=["DeformConv2dPack", "ModulatedDeformConv2dPack", "DeformConv2d"])
def test_modules_export(tmp_path, dynamo, make, mask):
    module = randomize(make(), seed=2)
    x = torch.randn(2, 4, 10, 9, generator=torch.Generator().manual_seed(3))
    if isinstance(module, ct.DeformConv2d):
        model = module
        kh, kw = module.kernel_size
        offset = torch.randn(2, 2 * kh * kw, 12, 9, generator=torch.Generator().manual_seed(4))
        args = (x, offset)
    else:
        model, args = module, (x,)
    model_proto = export(model, args, tmp_path / "m.onnx", dynamo)
    (node,) = nodes(model_proto, "DeformConv")
    ph, pw = module.padding
    assert attributes(node)["pads"] == [ph, pw, ph, pw]
    assert len(node.input) == (5 if mask else 4 if module.bias is not None else 3)
    (got,) = run_ort(model_proto, args)
    with torch.no_grad():
        want = model(*args)
    assert rel_err(got, want.numpy()) <= F32_TOLERANCE


class PaddedConv(torch.nn.Module):
    """Asymmetric padding (left 1, right 2, top 0, bottom 3) by F.pad, then a
    DCNv2 layer without padding of its own."""

    def __init__(self):
        super().__init__()
        self.dcn = randomize(ct.ModulatedDeformConv2dPack(3, 5, 3, deform_groups=1), seed=5)

    def forward(self, x):
        return self.dcn(F.pad(x, (1, 2, 0, 3)))


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_asymmetric_padding_by_pad_node(tmp_path, dynamo):
    model = PaddedConv()
    x = torch.randn(1, 3, 8, 7, generator=torch.Generator().manual_seed(6))
    model_proto = export(model, (x,), tmp_path / "m.onnx", dynamo)
    assert nodes(model_proto, "Pad")
    (node,) = nodes(model_proto, "DeformConv")
    assert attributes(node)["pads"] == [0, 0, 0, 0]
    (got,) = run_ort(model_proto, (x,))
    with torch.no_grad():
        want = model(x)
    assert got.shape == (1, 5, 9, 8)
    assert rel_err(got, want.numpy()) <= F32_TOLERANCE


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=["float64", "float16"])
def test_deform_conv_dtypes(tmp_path, dynamo, dtype):
    layer, x, offset, m = conv_case(dtype)
    model = Conv(layer, True, True)
    model_proto = export(model, (x, offset, m), tmp_path / "m.onnx", dynamo)
    check_deform_conv_node(model_proto, layer, True, True)
    assert not nodes(model_proto, "Cast")
    (got,) = run_ort(model_proto, (x, offset, m))
    name = str(dtype).split(".")[1]
    assert got.dtype == numpy.dtype(name)
    with torch.no_grad():
        want = model(x, offset, m)
    assert rel_err(got, want.numpy()) <= TOLERANCE[name]


class BFloat16Conv(torch.nn.Module):
    """A bfloat16 DCNv2 conv between float32 inputs and output (onnxruntime's
    Python API takes no bfloat16 arrays)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer.to(torch.bfloat16)

    def forward(self, x, offset, mask):
        bf16 = torch.bfloat16
        return self.layer(x.to(bf16), offset.to(bf16), mask.to(bf16)).to(torch.float32)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_bfloat16_below_opset_22_runs_in_float32_between_casts(tmp_path, dynamo):
    layer, x, offset, m = conv_case()
    model = BFloat16Conv(layer)
    model_proto = export(model, (x, offset, m), tmp_path / "m.onnx", dynamo)
    assert opset_of(model_proto) < 22
    node = check_deform_conv_node(model_proto, layer, True, True)
    produced_by = {o: n for n in model_proto.graph.node for o in n.output}
    folded = {i.name: i.data_type for i in model_proto.graph.initializer}
    for name in node.input:  # a Cast to float32, or one folded into a float32 initializer
        if name in folded:
            assert folded[name] == onnx.TensorProto.FLOAT, name
        else:
            assert produced_by[name].op_type == "Cast"
            assert attributes(produced_by[name])["to"] == onnx.TensorProto.FLOAT
    (out,) = (n for n in model_proto.graph.node if node.output[0] in n.input)
    assert out.op_type == "Cast" and attributes(out)["to"] == onnx.TensorProto.BFLOAT16
    (got,) = run_ort(model_proto, (x, offset, m))
    with torch.no_grad():
        want = model(x, offset, m)
    assert rel_err(got, want.numpy()) <= TOLERANCE["bfloat16"]


def test_bfloat16_at_opset_22_is_native(tmp_path):
    layer, x, offset, m = conv_case(torch.bfloat16)
    model = Conv(layer, True, True)
    model_proto = export(model, (x, offset, m), tmp_path / "m.onnx", True, opset_version=22)
    assert opset_of(model_proto) == 22
    check_deform_conv_node(model_proto, layer, True, True, version=22)
    assert not nodes(model_proto, "Cast")
    bf16 = onnx.TensorProto.BFLOAT16
    assert [i.type.tensor_type.elem_type for i in model_proto.graph.input] == [bf16] * 3
    assert model_proto.graph.output[0].type.tensor_type.elem_type == bf16


@pytest.mark.parametrize("dynamo,opset", [(True, 18), (False, 17)], ids=["dynamo", "torchscript"])
def test_opset_below_19_is_refused(tmp_path, dynamo, opset):
    layer, x, offset, _ = conv_case()
    with pytest.raises(Exception, match="DeformConv needs opset_version >= 19, got "
                                        f"{opset}") as error:
        export(layer, (x, offset), tmp_path / "m.onnx", dynamo, opset_version=opset)
    assert isinstance(error.value, ValueError) or "ArgumentError" in str(error.value)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_bad_input_is_refused_with_the_shared_message(tmp_path, dynamo):
    layer = ct.DeformConv2d(4, 6, 3, padding=1)
    x, offset = torch.randn(1, 4, 5, 5), torch.zeros(1, 16, 5, 5)
    with pytest.raises(Exception, match=re.escape(
            "offset.shape[1] must be a positive multiple of 2*kh*kw = 18, got 16")):
        export(layer, (x, offset), tmp_path / "m.onnx", dynamo)


def test_import_leaves_onnx_alone():
    """cupydcn.torch registers its TorchScript symbolics without importing
    onnx or onnxscript (seconds of import time)."""
    code = ("import sys, cupydcn.torch; "
            "print(sorted(m for m in ('onnx', 'onnxscript', 'onnxruntime') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=pathlib.Path(__file__).parents[1], check=True)
    assert result.stdout.strip() == "[]", result.stderr


def test_eager_calls_after_export_run_the_op(tmp_path):
    layer, x, offset, m = conv_case()
    export(Conv(layer, True, True), (x, offset, m), tmp_path / "m.onnx", True)
    assert not _torch_onnx.exporting()
    with torch.no_grad():
        got = layer(x, offset, m)
    want = cupydcn.deform_conv2d(x.numpy(), offset.numpy(), layer.weight.detach().numpy(),
                                 layer.bias.detach().numpy(), layer.stride, layer.padding,
                                 layer.dilation, m.numpy())
    assert rel_err(got.numpy(), want) == 0


@pytest.mark.filterwarnings("ignore:# The axis name. batch will not be used:UserWarning")
@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_dynamic_batch(tmp_path, dynamo):
    layer, x, offset, m = conv_case()
    model = layer
    path = tmp_path / "m.onnx"
    names = ["in0", "in1", "in2"]
    if dynamo:
        batch = torch.export.Dim("batch")
        torch.onnx.export(model.eval(), (x, offset, m), path, dynamo=True, verbose=False,
                          input_names=names, dynamic_shapes=({0: batch},) * 3)
    else:
        torch.onnx.export(model.eval(), (x, offset, m), path, dynamo=False, input_names=names,
                          dynamic_axes={name: {0: "batch"} for name in names})
    model_proto = onnx.load(path)
    layer3, x3, offset3, m3 = conv_case(B=3, seed=7)
    (got,) = run_ort(model_proto, (x3, offset3, m3))
    with torch.no_grad():
        want = model(x3, offset3, m3)
    assert got.shape[0] == 3
    assert rel_err(got, want.numpy()) <= F32_TOLERANCE


# --------------------------------------------------------------------------
# RoI pooling: the cupydcn domain
# --------------------------------------------------------------------------


class DeformRoIPool(OpRun):
    """cupydcn::DeformRoIPool for ONNX's reference evaluator: cupydcn's NumPy op."""

    op_domain = "cupydcn"

    def _run(self, x, rois, offset=None, mask=None, output_size=None, spatial_scale=None,
             sampling_ratio=None, gamma=None):
        return (cupydcn.deform_roi_pool(x, rois, offset, tuple(output_size), spatial_scale,
                                        sampling_ratio, gamma, mask),)


class DeformPSRoIPool(OpRun):
    """cupydcn::DeformPSRoIPool for ONNX's reference evaluator."""

    op_domain = "cupydcn"

    def _run(self, x, rois, trans=None, spatial_scale=None, output_dim=None, group_size=None,
             pooled_size=None, part_size=None, sample_per_part=None, trans_std=None):
        out, count = cupydcn.deform_psroi_pool(x, rois, trans, spatial_scale, output_dim,
                                               group_size, pooled_size, part_size,
                                               sample_per_part, trans_std, return_count=True)
        return (out, count)[:len(self.output)]


class RoIPools(torch.nn.Module):
    def forward(self, x, rois, offset, mask, trans):
        return (ct.deform_roi_pool(x, rois, offset, (3, 2), 0.5, 2, 0.2, mask),
                ct.deform_roi_pool(x, rois, None, 2),
                ct.deform_roi_pool(x, rois, None, (3, 2), 1.0, 1, 0.1, mask),
                ct.deform_psroi_pool(x, rois, trans, 0.5, None, 2, 3, 0, 2, 0.1),
                ct.deform_psroi_pool(x, rois, None, 0.25, 8, 1, 2, 0, 3, 0.0))


def roi_inputs():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 8, 10, 12, generator=gen)
    rois = torch.tensor([[0, 1.0, 1.5, 9.0, 7.0], [1, 0.0, 2.0, 11.0, 5.0],
                         [1, 3.0, 0.0, 7.5, 9.0]])
    offset = 0.3 * torch.randn(3, 2, 3, 2, generator=gen)
    mask = torch.rand(3, 1, 3, 2, generator=gen)
    trans = 0.3 * torch.randn(3, 2, 3, 3, generator=gen)
    return x, rois, offset, mask, trans


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_roi_pools_export_to_the_cupydcn_domain(tmp_path, dynamo):
    args = roi_inputs()
    model_proto = export(RoIPools(), args, tmp_path / "m.onnx", dynamo)
    assert opset_of(model_proto, "cupydcn") == 1
    pools = nodes(model_proto, "DeformRoIPool", "cupydcn")
    assert [list(n.input)[2:] for n in pools] == [["in2", "in3"], [], ["", "in3"]]
    assert attributes(pools[0]) == {"output_size": [3, 2], "spatial_scale": 0.5,
                                    "sampling_ratio": 2, "gamma": pytest.approx(0.2)}
    assert attributes(pools[1]) == {"output_size": [2, 2], "spatial_scale": 1.0,
                                    "sampling_ratio": 0, "gamma": pytest.approx(0.1)}
    ps = nodes(model_proto, "DeformPSRoIPool", "cupydcn")
    assert [len(n.input) for n in ps] == [3, 2]
    assert attributes(ps[0]) == {"spatial_scale": 0.5, "output_dim": 2, "group_size": 2,
                                 "pooled_size": 3, "part_size": 3, "sample_per_part": 2,
                                 "trans_std": pytest.approx(0.1)}
    assert attributes(ps[1])["output_dim"] == 8 and attributes(ps[1])["part_size"] == 2
    evaluator = ReferenceEvaluator(model_proto, new_ops=[DeformRoIPool, DeformPSRoIPool])
    got = evaluator.run(None, {f"in{i}": a.numpy() for i, a in enumerate(args)})
    with torch.no_grad():
        want = RoIPools()(*args)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert rel_err(g, w.numpy()) <= F32_TOLERANCE


class PSRoIPoolWithCount(torch.nn.Module):
    def forward(self, x, rois, trans):
        out, count = ct.deform_psroi_pool(x, rois, trans, 0.5, 2, 2, 3, 0, 2, 0.1,
                                          return_count=True)
        return out, count


def test_psroi_pool_count_output(tmp_path):
    x, rois, _, _, trans = roi_inputs()
    model_proto = export(PSRoIPoolWithCount(), (x, rois, trans), tmp_path / "m.onnx", True)
    (node,) = nodes(model_proto, "DeformPSRoIPool", "cupydcn")
    assert len(node.output) == 2
    evaluator = ReferenceEvaluator(model_proto, new_ops=[DeformPSRoIPool])
    got = evaluator.run(None, {"in0": x.numpy(), "in1": rois.numpy(), "in2": trans.numpy()})
    with torch.no_grad():
        want = PSRoIPoolWithCount()(x, rois, trans)
    for g, w in zip(got, want):
        assert rel_err(g, w.numpy()) <= F32_TOLERANCE


# --------------------------------------------------------------------------
# An ExportedProgram made beforehand (its graph holds torch.ops.cupydcn ops)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("bias,mask", [(True, True), (False, True), (True, False),
                                       (False, False)])
def test_exported_program_exports_and_matches_onnxruntime(tmp_path, bias, mask):
    layer, x, offset, m = conv_case()
    model = Conv(layer, bias, mask)
    args = (x, offset, m) if mask else (x, offset)
    model_proto = export_program(model, args, tmp_path / "m.onnx")
    check_deform_conv_node(model_proto, layer, bias, mask)
    (got,) = run_ort(model_proto, args)
    with torch.no_grad():
        want = model(*args)
    assert rel_err(got, want.numpy()) <= F32_TOLERANCE


@pytest.mark.parametrize("make", [
    lambda: ct.ModulatedDeformConv2dPack(4, 6, 3, stride=(1, 2), padding=(1, 2), dilation=2,
                                         groups=2, deform_groups=2),
    lambda: PaddedConv(),
], ids=["ModulatedDeformConv2dPack", "asymmetric-padding"])
def test_exported_program_of_a_module(tmp_path, make):
    model = randomize(make(), seed=7)
    C = 3 if isinstance(model, PaddedConv) else 4
    x = torch.randn(2, C, 10, 9, generator=torch.Generator().manual_seed(8))
    model_proto = export_program(model, (x,), tmp_path / "m.onnx")
    (node,) = nodes(model_proto, "DeformConv")
    assert len(node.input) == 5  # both modules have a bias and a mask
    (got,) = run_ort(model_proto, (x,))
    with torch.no_grad():
        want = model(x)
    assert rel_err(got, want.numpy()) <= F32_TOLERANCE


def bfloat16_input(model_proto, node):
    """Whether DeformConv's input X comes through a Cast to float32."""
    produced_by = {o: n for n in model_proto.graph.node for o in n.output}
    source = produced_by.get(node.input[0])
    return source is not None and source.op_type == "Cast" and \
        attributes(source)["to"] == onnx.TensorProto.FLOAT


def test_exported_program_bfloat16_below_opset_22(tmp_path):
    """bfloat16 as the model's export: float32 between Casts, run in onnxruntime."""
    layer, x, offset, m = conv_case()
    model = BFloat16Conv(layer)
    model_proto = export_program(model, (x, offset, m), tmp_path / "m.onnx")
    assert opset_of(model_proto) < 22
    node = check_deform_conv_node(model_proto, layer, True, True)
    assert bfloat16_input(model_proto, node)
    (got,) = run_ort(model_proto, (x, offset, m))
    with torch.no_grad():
        want = model(x, offset, m)
    assert rel_err(got, want.numpy()) <= TOLERANCE["bfloat16"]


def test_exported_program_bfloat16_at_opset_22_is_native(tmp_path):
    """The graph only: onnxruntime 1.31 has no bfloat16 DeformConv kernel on the CPU."""
    layer, x, offset, m = conv_case(torch.bfloat16)
    model = Conv(layer, True, True)
    model_proto = export_program(model, (x, offset, m), tmp_path / "m.onnx", opset_version=22)
    assert opset_of(model_proto) == 22
    check_deform_conv_node(model_proto, layer, True, True, version=22)
    assert not nodes(model_proto, "Cast")


def test_exported_program_opset_below_19_is_refused(tmp_path):
    layer, x, offset, _ = conv_case()
    with pytest.raises(Exception, match="DeformConv needs opset_version >= 19, got 18"):
        export_program(layer, (x, offset), tmp_path / "m.onnx", opset_version=18)


def test_exported_program_translation_stays_in_its_export(tmp_path):
    """The translation goes into the running export's registry only: torch's
    own registry is left as it was, and each export registers it again."""
    from torch.onnx._internal.exporter import _registration

    target = torch.ops.cupydcn.deform_conv2d.default
    layer, x, offset, _ = conv_case()
    for i in range(2):
        export_program(layer, (x, offset), tmp_path / f"m{i}.onnx")
        assert not _registration.ONNXRegistry.from_torchlib().is_registered(target)


# --------------------------------------------------------------------------
# Dynamic sizes: a batch, spatial sizes and a number of RoIs that vary
# --------------------------------------------------------------------------


def input_dims(model_proto):
    """Each graph input's dimensions: an int, or the name of a symbolic one."""
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in model_proto.graph.input}


def test_exported_program_dynamic_batch(tmp_path):
    """An ExportedProgram made with a dynamic batch (DeformConv2d with mask,
    groups and offset groups) exports with a symbolic batch, and onnxruntime
    runs it at batch 1 and 3 (exported at 2) with cupydcn's numbers."""
    layer, x, offset, m = conv_case()
    batch = torch.export.Dim("batch")
    program = torch.export.export(layer.eval(), (x, offset, m), dynamic_shapes=({0: batch},) * 3)
    path = tmp_path / "m.onnx"
    torch.onnx.export(program, (x, offset, m), path, dynamo=True, verbose=False,
                      input_names=["in0", "in1", "in2"])
    model_proto = onnx.load(path)
    onnx.checker.check_model(model_proto, full_check=True)
    check_deform_conv_node(model_proto, layer, True, True)
    dims = input_dims(model_proto)
    assert isinstance(dims["in0"][0], str) and dims["in1"][0] == dims["in2"][0] == dims["in0"][0]
    for B, seed in ((1, 7), (3, 8)):
        _, x, offset, m = conv_case(B=B, seed=seed)
        (got,) = run_ort(model_proto, (x, offset, m))
        with torch.no_grad():
            want = layer(x, offset, m)
        assert got.shape[0] == B
        assert rel_err(got, want.numpy()) <= F32_TOLERANCE


def test_exported_program_dynamic_spatial_sizes(tmp_path):
    """ModulatedDeformConv2dPack exported with the batch, H and W dynamic:
    onnxruntime runs the ONNX model at other sizes with cupydcn's numbers."""
    model = randomize(ct.ModulatedDeformConv2dPack(4, 6, 3, stride=(1, 2), padding=(1, 2),
                                                   dilation=2, groups=2, deform_groups=2), 7)
    x = torch.randn(2, 4, 10, 9, generator=torch.Generator().manual_seed(8))
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("H", min=4),
            3: torch.export.Dim("W", min=4)}
    program = torch.export.export(model.eval(), (x,), dynamic_shapes=(dims,))
    path = tmp_path / "m.onnx"
    torch.onnx.export(program, (x,), path, dynamo=True, verbose=False, input_names=["in0"])
    model_proto = onnx.load(path)
    assert all(isinstance(d, str) for d in input_dims(model_proto)["in0"][::2][:2])
    for shape, seed in (((1, 4, 13, 7), 9), ((3, 4, 6, 16), 10)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        (got,) = run_ort(model_proto, (x,))
        with torch.no_grad():
            want = model(x)
        assert got.shape == tuple(want.shape)
        assert rel_err(got, want.numpy()) <= F32_TOLERANCE


# torch's own warning: the Dim shared by four inputs is named once
@pytest.mark.filterwarnings("ignore:# The axis name. R will not be used:UserWarning")
def test_roi_pools_dynamic_rois(tmp_path):
    """The RoI poolings exported (dynamo exporter) with N and R dynamic run
    in the reference evaluator at other N and R with cupydcn's numbers."""
    x, rois, offset, mask, trans = roi_inputs()
    R = torch.export.Dim("R")
    path = tmp_path / "m.onnx"
    torch.onnx.export(RoIPools().eval(), (x, rois, offset, mask, trans), path, dynamo=True,
                      verbose=False, input_names=[f"in{i}" for i in range(5)],
                      dynamic_shapes=({0: torch.export.Dim("N")}, {0: R}, {0: R}, {0: R},
                                      {0: R}))
    model_proto = onnx.load(path)
    dims = input_dims(model_proto)
    assert isinstance(dims["in1"][0], str) and dims["in2"][0] == dims["in1"][0]
    evaluator = ReferenceEvaluator(model_proto, new_ops=[DeformRoIPool, DeformPSRoIPool])
    gen = torch.Generator().manual_seed(9)
    for N, R in ((1, 1), (3, 5)):
        args = (torch.randn(N, 8, 10, 12, generator=gen),
                torch.cat([torch.randint(0, N, (R, 1), generator=gen).float(),
                           torch.rand(R, 4, generator=gen) * 9], 1),
                0.3 * torch.randn(R, 2, 3, 2, generator=gen),
                torch.rand(R, 1, 3, 2, generator=gen),
                0.3 * torch.randn(R, 2, 3, 3, generator=gen))
        got = evaluator.run(None, {f"in{i}": a.numpy() for i, a in enumerate(args)})
        with torch.no_grad():
            want = RoIPools()(*args)
        for g, w in zip(got, want):
            assert g.shape[0] == R
            assert rel_err(g, w.numpy()) <= F32_TOLERANCE
