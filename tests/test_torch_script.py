"""The torch bridge under TorchScript and torch.fx, and its ``algorithm=``.

TorchScript: ``torch.jit.script`` of the functions and of the modules (run,
compared with eager, saved and loaded). torch.fx: symbolic tracing records
each op as one ``call_function`` leaf (as torchvision's ops are), so
``torchvision.models.feature_extraction`` works on models holding them; the
traced module computes what the eager one does. ``algorithm=``: every
implementation available here, named through the bridge, reaches the core's
forward and backward and gives the reference's numbers.
"""

import io
import operator
import pickle

import pytest

torch = pytest.importorskip("torch", reason="the torch bridge tests need torch")

from torch import nn  # noqa: E402

import cupydcn  # noqa: E402
import cupydcn.torch as ct  # noqa: E402
from cupydcn.torch import deform_conv2d as imported_deform_conv2d  # noqa: E402
from test_torch import call_conv, conv_inputs, psroi_inputs, roi_inputs  # noqa: E402

EXACT = dict(rtol=0, atol=0)

# torch >= 2.10 deprecates TorchScript (in favour of torch.compile and
# torch.export) but still ships it, and torchvision users still script models
SCRIPT_DEPRECATED = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")


def conv_args(t, params):
    return (t["input"], t["offset"], t["weight"], t["bias"], params["stride"],
            params["padding"], params["dilation"], t["mask"])


def roundtrip(scripted):
    """``scripted`` saved with torch.jit.save and loaded back."""
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


# --------------------------------------------------------------------------
# TorchScript
# --------------------------------------------------------------------------


@SCRIPT_DEPRECATED
@pytest.mark.parametrize("mask,bias", [(True, True), (False, False)])
def test_scripted_function_equals_eager(mask, bias):
    t, params = conv_inputs(mask=mask, bias=bias, requires_grad=False)
    scripted = torch.jit.script(ct.deform_conv2d)
    graph = str(scripted.graph)
    assert "cupydcn::deform_conv2d" in graph
    expected = call_conv(t, params)
    torch.testing.assert_close(scripted(*conv_args(t, params)), expected, **EXACT)
    # keywords, lists for pairs, and ints where torchvision takes ints
    got = scripted(t["input"], t["offset"], t["weight"], bias=t["bias"], mask=t["mask"],
                   stride=list(params["stride"]), padding=list(params["padding"]),
                   dilation=list(params["dilation"]))
    torch.testing.assert_close(got, expected, **EXACT)
    t1, p1 = conv_inputs(mask=mask, bias=bias, stride=(1, 1), padding=(1, 1), dilation=(2, 2),
                         kw=3, requires_grad=False)
    got = scripted(t1["input"], t1["offset"], t1["weight"], t1["bias"], 1, 1, 2, t1["mask"])
    torch.testing.assert_close(got, call_conv(t1, p1), **EXACT)


@SCRIPT_DEPRECATED
def test_scripted_function_as_torchvision_tests_call_it():
    """A TorchScript function calling the op with Tuple[int, int] geometry
    (torchvision's TestDeformConv.test_backward), gradients included."""

    @torch.jit.script
    def script_func(x_, offset_, mask_, weight_, bias_, stride_, pad_, dilation_):
        # type:(Tensor, Tensor, Tensor, Tensor, Tensor, Tuple[int, int], Tuple[int, int], Tuple[int, int])->Tensor  # noqa: E501
        return ct.deform_conv2d(x_, offset_, weight_, bias_, stride=stride_, padding=pad_,
                                dilation=dilation_, mask=mask_)

    t, p = conv_inputs()
    names = ("input", "offset", "mask", "weight", "bias")
    assert torch.autograd.gradcheck(
        lambda *a: script_func(*a, p["stride"], p["padding"], p["dilation"]),
        [t[n] for n in names])
    torch.testing.assert_close(
        script_func(*(t[n] for n in names), p["stride"], p["padding"], p["dilation"]),
        call_conv(t, p), **EXACT)


@SCRIPT_DEPRECATED
def test_scripted_function_errors_are_the_cores():
    t, params = conv_inputs(requires_grad=False)
    scripted = torch.jit.script(ct.deform_conv2d)
    args = list(conv_args(t, params))
    args[1] = args[1][:, :2]
    # TorchScript re-raises the core's ArgumentError as a RuntimeError, message kept
    with pytest.raises(RuntimeError, match=r"offset\.shape\[1\]"):
        scripted(*args)


@SCRIPT_DEPRECATED
def test_scripted_roi_functions_equal_eager():
    x, rois, offset, mask, rp = roi_inputs(requires_grad=False)
    roi = torch.jit.script(ct.deform_roi_pool)
    torch.testing.assert_close(roi(x, rois, offset, mask=mask, **rp),
                               ct.deform_roi_pool(x, rois, offset, mask=mask, **rp), **EXACT)
    torch.testing.assert_close(roi(x, rois, None, 3), ct.deform_roi_pool(x, rois, None, 3),
                               **EXACT)
    xp, prois, trans, pp = psroi_inputs(requires_grad=False)
    psroi = torch.jit.script(ct.deform_psroi_pool)
    expected = ct.deform_psroi_pool(xp, prois, trans, return_count=True, **pp)
    got = psroi(xp, prois, trans, return_count=True, **pp)
    assert isinstance(got, tuple) and len(got) == 2
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **EXACT)
    torch.testing.assert_close(psroi(xp, prois, trans, **pp), expected[0], **EXACT)


@SCRIPT_DEPRECATED
def test_scripted_deform_conv2d_module_runs_and_loads():
    torch.manual_seed(0)
    t, params = conv_inputs(Cout=6, requires_grad=False)
    layer = ct.DeformConv2d(4, 6, (3, 2), groups=2, **params).double()
    scripted = torch.jit.script(layer)
    for mask in (t["mask"], None):
        expected = layer(t["input"], t["offset"], mask)
        torch.testing.assert_close(scripted(t["input"], t["offset"], mask), expected, **EXACT)
        torch.testing.assert_close(roundtrip(scripted)(t["input"], t["offset"], mask),
                                   expected, **EXACT)
    # torchvision's TestDeformConv.test_forward_scriptability
    torch.jit.script(ct.DeformConv2d(in_channels=8, out_channels=8, kernel_size=3))
    # gradients flow through the scripted module
    x = t["input"].clone().requires_grad_()
    scripted(x, t["offset"], t["mask"]).sum().backward()
    x_eager = t["input"].clone().requires_grad_()
    layer.zero_grad()
    layer(x_eager, t["offset"], t["mask"]).sum().backward()
    torch.testing.assert_close(x.grad, x_eager.grad, **EXACT)


@SCRIPT_DEPRECATED
@pytest.mark.parametrize("cls", [ct.DeformConv2dPack, ct.ModulatedDeformConv2dPack])
def test_scripted_packs_equal_eager(cls):
    torch.manual_seed(0)
    layer = cls(4, 6, 3, padding=1, groups=2, deform_groups=2).double()
    nn.init.normal_(layer.conv_offset.weight, std=0.1)  # offsets away from zero
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    torch.testing.assert_close(torch.jit.script(layer)(x), layer(x), **EXACT)


# --------------------------------------------------------------------------
# torch.fx
# --------------------------------------------------------------------------


class ConvNet(nn.Module):
    """A conv, the three conv modules, and the function imported by name."""

    def __init__(self):
        super().__init__()
        self.offset = nn.Conv2d(4, 2 * 9, 3, padding=1)
        self.dcn = ct.DeformConv2d(4, 6, 3, padding=1)
        self.v2 = ct.ModulatedDeformConv2dPack(6, 6, 3, padding=1, deform_groups=2)
        self.v1 = ct.DeformConv2dPack(6, 6, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(3, 6, 1, 1))
        for conv in (self.v2.conv_offset, self.v1.conv_offset):
            nn.init.normal_(conv.weight, std=0.1)

    def forward(self, x):
        y = self.dcn(x, self.offset(x))
        y = self.v1(self.v2(y).relu())
        return imported_deform_conv2d(y, torch.zeros_like(y[:, :2]), self.weight)


def op_nodes(graph, function):
    return [n for n in graph.nodes if n.op == "call_function" and n.target is function]


def module_nodes(graph):
    return [n.target for n in graph.nodes if n.op == "call_module"]


def test_fx_traces_the_op_as_a_leaf():
    torch.manual_seed(0)
    net = ConvNet().double()
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    traced = torch.fx.symbolic_trace(net)
    # DeformConv2d is one call_module node, as torch.nn's modules (and
    # torchvision's DeformConv2d in its feature extraction) are; the Packs
    # are traced through, to their offset convs and one op node each
    assert module_nodes(traced.graph) == ["offset", "dcn", "v2.conv_offset", "v1.conv_offset"]
    assert len(op_nodes(traced.graph, ct.deform_conv2d)) == 3
    assert not any(n.op == "get_attr" and n.target.startswith("dcn.") for n in traced.graph.nodes)
    # nothing of the op's body is traced (no shape reads, no torch.ops call):
    # the calls are the op's and the model's own
    called = {n.target for n in traced.graph.nodes if n.op == "call_function"}
    assert called == {ct.deform_conv2d, torch.chunk, torch.cat, torch.sigmoid,
                      torch.zeros_like, operator.getitem}, called
    torch.testing.assert_close(traced(x), net(x), **EXACT)
    # it pickles (the op by its public name) and traces again, the op still a leaf
    torch.testing.assert_close(pickle.loads(pickle.dumps(traced))(x), net(x), **EXACT)
    retraced = torch.fx.symbolic_trace(traced)
    assert module_nodes(retraced.graph) == module_nodes(traced.graph)
    assert len(op_nodes(retraced.graph, ct.deform_conv2d)) == 3
    torch.testing.assert_close(retraced(x), net(x), **EXACT)


def test_fx_traces_deform_conv2d_as_the_root():
    """Traced itself, DeformConv2d cannot be a node of its own graph: its
    op is one call_function node, with or without a mask."""
    torch.manual_seed(0)
    t, params = conv_inputs(Cout=6, requires_grad=False)
    layer = ct.DeformConv2d(4, 6, (3, 2), groups=2, **params).double()
    traced = torch.fx.symbolic_trace(layer)
    assert module_nodes(traced.graph) == [] and len(op_nodes(traced.graph, ct.deform_conv2d)) == 1
    for mask in (t["mask"], None):
        torch.testing.assert_close(traced(t["input"], t["offset"], mask),
                                   layer(t["input"], t["offset"], mask), **EXACT)


def test_fx_feature_extraction():
    """What torchvision.models.feature_extraction does: trace, make nodes
    outputs, run: each feature equals its module's output in eager."""
    torch.manual_seed(0)
    net = ConvNet().double()
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    seen = {}
    for name in ("dcn", "v2"):
        getattr(net, name).register_forward_hook(
            lambda module, args, out, _name=name: seen.setdefault(_name, out))
    expected = net(x)
    traced = torch.fx.symbolic_trace(net)
    graph = traced.graph
    features = {"dcn": next(n for n in graph.nodes if n.op == "call_module" and n.target == "dcn"),
                "v2": op_nodes(graph, ct.deform_conv2d)[0]}
    output = next(n for n in graph.nodes if n.op == "output")
    final = output.args[0]
    graph.erase_node(output)
    graph.output(dict(features, out=final))
    graph.eliminate_dead_code()
    traced.recompile()
    got = traced(x)
    for name in ("dcn", "v2"):
        torch.testing.assert_close(got[name], seen[name], **EXACT)
    torch.testing.assert_close(got["out"], expected, **EXACT)


def test_fx_traces_the_roi_ops_as_leaves():
    class RoINet(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = ct.DeformRoIPool((3, 4), sampling_ratio=2)
            self.ps = ct.DeformPSRoIPool(1.0, 3, 4, False, group_size=2, part_size=3,
                                         sample_per_part=2, trans_std=0.1)

        def forward(self, x, rois, offset, xp, prois, trans):
            return self.pool(x, rois, offset), self.ps(xp, prois, trans)

    x, rois, offset, _, _ = roi_inputs(requires_grad=False)
    xp, prois, trans, _ = psroi_inputs(requires_grad=False)
    net = RoINet()
    traced = torch.fx.symbolic_trace(net)
    assert len(op_nodes(traced.graph, ct.deform_roi_pool)) == 1
    assert len(op_nodes(traced.graph, ct.deform_psroi_pool)) == 1
    for a, b in zip(traced(x, rois, offset, xp, prois, trans),
                    net(x, rois, offset, xp, prois, trans)):
        torch.testing.assert_close(a, b, **EXACT)


# --------------------------------------------------------------------------
# algorithm=
# --------------------------------------------------------------------------


def spy_core(monkeypatch, names):
    """Record the algorithm= each named core entry point receives."""
    seen = []
    for name in names:
        real = getattr(cupydcn, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen.append((_name, kwargs.get("algorithm")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cupydcn, name, spy)
    return seen


@pytest.mark.parametrize("algorithm", cupydcn.algorithms("deform_conv2d"))
def test_conv_algorithm_reaches_forward_and_backward(monkeypatch, algorithm):
    from cupydcn import _dispatch

    implementation = _dispatch.implementation("deform_conv2d", algorithm)
    if implementation.dtypes is not None and "float64" not in implementation.dtypes:
        pytest.skip(f"{algorithm} does not support float64 (this test's dtype)")
    seen = spy_core(monkeypatch, ("deform_conv2d", "deform_conv2d_backward"))
    t, params = conv_inputs()
    out = ct.deform_conv2d(*conv_args(t, params), algorithm=algorithm)
    out.sum().backward()
    assert seen == [("deform_conv2d", algorithm), ("deform_conv2d_backward", algorithm)]
    grads = {n: v.grad for n, v in t.items()}
    reference = {n: v.detach().requires_grad_() for n, v in t.items()}
    expected = ct.deform_conv2d(*conv_args(reference, params), algorithm="reference")
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for name, value in reference.items():
        torch.testing.assert_close(grads[name], value.grad, rtol=1e-12, atol=1e-12)


def roi_call(op, algorithm):
    """(output, input gradient) of ``op`` on its test inputs."""
    if op == "deform_roi_pool":
        x, rois, offset, mask, rp = roi_inputs()
        out = ct.deform_roi_pool(x, rois, offset, mask=mask, algorithm=algorithm, **rp)
    else:
        x, rois, offset, rp = psroi_inputs()
        out = ct.deform_psroi_pool(x, rois, offset, algorithm=algorithm, **rp)
    out.sum().backward()
    return out, x.grad


@pytest.mark.parametrize("op", ["deform_roi_pool", "deform_psroi_pool"])
def test_roi_algorithm_reaches_forward_and_backward(monkeypatch, op):
    expected = roi_call(op, "reference")
    for algorithm in cupydcn.algorithms(op):
        seen = spy_core(monkeypatch, (op, f"{op}_backward"))
        got = roi_call(op, algorithm)
        assert seen == [(op, algorithm), (f"{op}_backward", algorithm)], seen
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        monkeypatch.undo()


@SCRIPT_DEPRECATED
def test_module_algorithm_reaches_the_core(monkeypatch):
    seen = spy_core(monkeypatch, ("deform_conv2d", "deform_roi_pool", "deform_psroi_pool"))
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    for layer in (ct.DeformConv2dPack(4, 4, 3, padding=1, algorithm="reference"),
                  ct.ModulatedDeformConv2dPack(4, 4, 3, padding=1, algorithm="reference")):
        layer.double()(x)
    t, params = conv_inputs(Cout=6, requires_grad=False)
    layer = ct.DeformConv2d(4, 6, (3, 2), groups=2, algorithm="reference", **params).double()
    layer(t["input"], t["offset"], t["mask"])
    torch.jit.script(layer)(t["input"], t["offset"], t["mask"])
    assert "algorithm='reference'" in repr(layer)
    xr, rois, offset, _, rp = roi_inputs(requires_grad=False)
    ct.DeformRoIPool(algorithm="reference", **rp)(xr, rois, offset)
    xp, prois, trans, pp = psroi_inputs(requires_grad=False)
    ps = ct.DeformPSRoIPool(1.0, 3, 4, False, group_size=2, part_size=3)
    ps.algorithm = "reference"
    ps(xp, prois, trans)
    assert seen == [("deform_conv2d", "reference")] * 4 + [("deform_roi_pool", "reference"),
                                                           ("deform_psroi_pool", "reference")]


def test_algorithm_errors_name_the_choices():
    t, params = conv_inputs(requires_grad=False)
    with pytest.raises(cupydcn.ArgumentError, match="algorithm must be None or one of .*"
                                                    "reference.* got 'nope'"):
        ct.deform_conv2d(*conv_args(t, params), algorithm="nope")
    with pytest.raises(RuntimeError, match="algorithm"):
        ct.deform_conv2d(*conv_args(t, params), algorithm=3)


def test_algorithm_under_compile():
    t, params = conv_inputs(requires_grad=False)
    torch._dynamo.reset()

    def f(input, offset, weight, bias, mask):
        return ct.deform_conv2d(input, offset, weight, bias, mask=mask, algorithm="reference",
                                **params)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    args = (t["input"], t["offset"], t["weight"], t["bias"], t["mask"])
    torch.testing.assert_close(compiled(*args), f(*args), **EXACT)


@SCRIPT_DEPRECATED
def test_scripted_function_passes_the_algorithm(monkeypatch):
    seen = spy_core(monkeypatch, ("deform_conv2d",))
    t, params = conv_inputs(requires_grad=False)
    scripted = torch.jit.script(ct.deform_conv2d)
    scripted(*conv_args(t, params), algorithm="reference")
    assert seen == [("deform_conv2d", "reference")]


@SCRIPT_DEPRECATED
@pytest.mark.parametrize("cls", [ct.DeformRoIPoolPack, ct.ModulatedDeformRoIPoolPack])
def test_roi_packs_script_and_trace(cls):
    torch.manual_seed(0)
    x, rois, _, _, _ = roi_inputs(requires_grad=False)
    pool = cls((3, 4), 3, 16, sampling_ratio=2).double()
    for fc in (pool.offset_fc[-1],) + ((pool.mask_fc[-2],) if hasattr(pool, "mask_fc") else ()):
        nn.init.normal_(fc.weight, std=0.1)  # offsets (and mask) away from their init
    expected = pool(x, rois)
    traced = torch.fx.symbolic_trace(pool)
    assert len(op_nodes(traced.graph, ct.deform_roi_pool)) == 2
    torch.testing.assert_close(traced(x, rois), expected, **EXACT)
    torch.testing.assert_close(torch.jit.script(pool)(x, rois), expected, **EXACT)
    # a raise compiled by TorchScript comes back as torch.jit.Error, message kept
    with pytest.raises(torch.jit.Error, match=r"input.shape\[1\] must be output_channels = 3"):
        torch.jit.script(pool)(x[:, :2], rois)
