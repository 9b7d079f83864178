"""Dynamic shapes of the torch ops under ``torch.export`` and ``torch.compile``.

The ops' fake implementations keep symbolic what may vary between calls of
one traced graph: deform_conv2d's batch B and spatial sizes H, W (and Ho, Wo,
from them), the RoI poolings' feature batch N, spatial sizes H, W and number
of RoIs R (also when the data decides it). An ExportedProgram made with
``dynamic_shapes`` runs at other sizes (batch 0, 1 and odd ones) with the
eager numbers, ``torch.compile(dynamic=True)`` compiles once for every batch,
and a wrong shape still gets the shared validation's message naming the
argument. Channels and kernel sizes
stay static: a dynamic one is reported by torch as specialized.
"""

import pytest

torch = pytest.importorskip("torch", reason="the torch bridge tests need torch")

from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402
from torch.export import Dim  # noqa: E402

import cupydcn.torch as ct  # noqa: E402
from cupydcn import _ops  # noqa: E402

EXACT = dict(rtol=0, atol=0)


def randomized(module, seed):
    """``module`` in eval mode with random parameters (the packs' offset
    branches start at zero, which would hide a wrong offset)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return module.eval()


# deform_conv2d with groups, offset groups, a non-square kernel, stride, dilation
KERNEL, STRIDE, PADDING, DILATION, GROUPS, DG = (3, 2), (2, 1), (2, 1), (1, 2), 2, 2


def conv_layer():
    return randomized(ct.DeformConv2d(4, 6, KERNEL, STRIDE, PADDING, DILATION, GROUPS), 1)


def conv_inputs(B, H=9, W=11, seed=0):
    kh, kw = KERNEL
    Ho = (H + 2 * PADDING[0] - DILATION[0] * (kh - 1) - 1) // STRIDE[0] + 1
    Wo = (W + 2 * PADDING[1] - DILATION[1] * (kw - 1) - 1) // STRIDE[1] + 1
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 4, H, W, generator=gen),
            2 * torch.randn(B, 2 * DG * kh * kw, Ho, Wo, generator=gen),
            torch.rand(B, DG * kh * kw, Ho, Wo, generator=gen))


class RoIPools(torch.nn.Module):
    """Both RoI poolings, with and without offset/trans and mask."""

    def forward(self, x, rois, offset, mask, trans):
        return (ct.deform_roi_pool(x, rois, offset, (3, 2), 0.5, 2, 0.2, mask),
                ct.deform_roi_pool(x, rois, None, 2),
                ct.deform_psroi_pool(x, rois, trans, 0.5, None, 2, 3, 0, 2, 0.1),
                ct.deform_psroi_pool(x, rois, None, 0.25, 8, 1, 2, 0, 3, 0.0,
                                     return_count=True)[1])


def roi_inputs(N, R, H=10, W=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 8, H, W, generator=gen)
    corners = torch.rand(R, 4, generator=gen) * torch.tensor([W, H, W, H]) - 1
    rois = torch.cat([torch.randint(0, N, (R, 1), generator=gen).float(), corners], 1)
    return (x, rois, 0.3 * torch.randn(R, 2, 3, 2, generator=gen),
            torch.rand(R, 1, 3, 2, generator=gen), 0.3 * torch.randn(R, 2, 3, 3, generator=gen))


def placeholder_shapes(program):
    """The shapes of the exported program's user inputs, as traced."""
    return [n.meta["val"].shape for n in program.graph.nodes
            if n.op == "placeholder" and n.name in program.graph_signature.user_inputs]


def output_shapes(program):
    (node,) = [n for n in program.graph.nodes if n.op == "output"]
    return [a.meta["val"].shape for a in node.args[0]]


def symbolic(size):
    return isinstance(size, torch.SymInt)


# --------------------------------------------------------------------------
# torch.export
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(_ops.SPECS))
def test_dynamic_symbols_name_dimensions(name):
    """Each symbol a spec lets stay dynamic is a plain dimension of an array
    layout (a misspelt one would silently be specialized)."""
    spec = _ops.SPECS[name]
    symbols = {s for layout in spec.array_layouts().values() for s in layout}
    assert spec.dynamic and set(spec.dynamic) <= symbols


def test_derived_sizes_are_dynamic_symbols():
    spec = _ops.SPECS["deform_conv2d"]
    x, offset, mask = conv_inputs(1, H=9, W=11)
    geo = spec.check(x, offset, conv_layer().weight, None, STRIDE, PADDING, DILATION, mask)
    derived = spec.derived_sizes(geo, geo._asdict())
    assert set(derived) <= set(spec.dynamic) and derived == {"Ho": geo.Ho, "Wo": geo.Wo}


def test_export_deform_conv2d_dynamic_batch():
    """DeformConv2d with mask, groups and offset groups, the batch a Dim: the
    program's output batch is the inputs' symbol, and it runs at batch 0, 1
    and 3 (exported at 2) with the eager numbers."""
    layer = conv_layer()
    batch = Dim("batch")
    program = torch.export.export(layer, conv_inputs(2), dynamic_shapes=({0: batch},) * 3)
    shapes = placeholder_shapes(program)
    (out,) = output_shapes(program)
    assert symbolic(out[0]) and not any(map(symbolic, out[1:]))
    assert [str(s[0]) for s in shapes] == [str(out[0])] * 3
    for B, seed in ((0, 1), (1, 2), (3, 3)):
        args = conv_inputs(B, seed=seed)
        got = program.module()(*args)
        assert got.shape[0] == B
        torch.testing.assert_close(got, layer(*args), **EXACT)


def test_export_pack_dynamic_batch_and_spatial_sizes():
    """ModulatedDeformConv2dPack (its offset branch a conv of the input) with
    the batch, H and W dynamic: Ho and Wo follow from them symbolically."""
    pack = randomized(ct.ModulatedDeformConv2dPack(4, 6, 3, stride=(1, 2), padding=(1, 2),
                                                   dilation=2, groups=2, deform_groups=2), 2)
    x = torch.randn(2, 4, 10, 9, generator=torch.Generator().manual_seed(3))
    dims = {0: Dim("batch"), 2: Dim("H", min=4), 3: Dim("W", min=4)}
    program = torch.export.export(pack, (x,), dynamic_shapes=(dims,))
    (out,) = output_shapes(program)
    assert symbolic(out[0]) and symbolic(out[2]) and symbolic(out[3])
    for shape, seed in (((1, 4, 13, 7), 4), ((3, 4, 6, 16), 5)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        got = program.module()(x)
        want = pack(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, **EXACT)


def test_export_roi_pools_dynamic_rois_and_batch():
    """Both RoI poolings (offset/trans, mask, count) with N, H, W and R
    dynamic: every output has R symbolic, and the program runs at other N, R,
    H, W (R = 0 and 1 among them) with the eager numbers."""
    R = Dim("R")
    dynamic_shapes = ({0: Dim("N"), 2: Dim("H"), 3: Dim("W")}, {0: R}, {0: R}, {0: R}, {0: R})
    program = torch.export.export(RoIPools(), roi_inputs(2, 3), dynamic_shapes=dynamic_shapes)
    outs = output_shapes(program)
    assert len(outs) == 4 and all(symbolic(s[0]) for s in outs)
    assert not any(symbolic(n) for s in outs for n in s[1:])
    for (N, R, H, W), seed in (((1, 0, 10, 12), 1), ((3, 1, 7, 9), 2), ((1, 5, 13, 8), 3)):
        args = roi_inputs(N, R, H, W, seed)
        got = program.module()(*args)
        want = RoIPools()(*args)
        for g, w in zip(got, want):
            assert g.shape[0] == R
            torch.testing.assert_close(g, w, **EXACT)


class ScoredRoIs(torch.nn.Module):
    """The RoIs a detector keeps: their number depends on the data."""

    def forward(self, x, boxes, scores):
        return ct.deform_roi_pool(x, boxes[scores > 0.5], None, (3, 2), 0.5, 2, 0.2)


def test_export_data_dependent_number_of_rois():
    """R unknown until the graph runs (an unbacked size): the program keeps it
    symbolic and runs with the eager numbers whatever the scores keep."""
    x, boxes = roi_inputs(2, 9)[:2]
    gen = torch.Generator().manual_seed(5)
    program = torch.export.export(ScoredRoIs(), (x, boxes, torch.rand(9, generator=gen)))
    assert symbolic(output_shapes(program)[0][0])
    for scores in (torch.rand(9, generator=gen), torch.zeros(9), torch.ones(9)):
        want = ScoredRoIs()(x, boxes, scores)
        torch.testing.assert_close(program.module()(x, boxes, scores), want, **EXACT)


def test_export_ties_the_batches_together():
    """The input's, offset's and mask's batches given as separate Dims:
    torch.export reports that they must be equal (the fakes' torch._check)."""
    dims = ({0: Dim("B1")}, {0: Dim("B2")}, {0: Dim("B3")})
    with pytest.raises(torch._dynamo.exc.UserError, match=r"B2 = B1"):
        torch.export.export(conv_layer(), conv_inputs(2), dynamic_shapes=dims)


def test_export_relates_the_output_size_to_the_input_size():
    """H and the offset's Ho given as separate Dims: the program records Ho
    as a function of H (the fakes' torch._check of spec.derived_sizes), and
    a call breaking it is refused by the program's own guard."""
    layer = conv_layer()
    batch = Dim("batch")
    dims = ({0: batch, 2: Dim("H")}, {0: batch, 2: Dim("Ho")}, {0: batch, 2: Dim("Ho")})
    program = torch.export.export(layer, conv_inputs(2), dynamic_shapes=dims)
    x, offset, mask = conv_inputs(3, H=13, seed=1)  # Ho = 8
    torch.testing.assert_close(program.module()(x, offset, mask), layer(x, offset, mask),
                               **EXACT)
    with pytest.raises(AssertionError, match=r"offset\.size\(\)\[2\] == .*input\.size\(\)\[2\]"):
        program.module()(x, offset[:, :, :6], mask[:, :, :6])


def test_export_dynamic_channels_are_reported_as_specialized():
    """Channels stay static (documented): a dynamic one is torch's
    constraint violation naming the Dim."""
    with pytest.raises(torch._dynamo.exc.UserError, match=r"marked C as dynamic"):
        torch.export.export(conv_layer(), conv_inputs(2),
                            dynamic_shapes=({1: Dim("C")}, None, None))


def test_export_wrong_shape_names_the_argument():
    layer = conv_layer()
    x, offset, mask = conv_inputs(2)
    with pytest.raises(Exception, match=r"offset\.shape\[1\] must be a positive multiple"):
        torch.export.export(layer, (x, offset[:, :-2], mask),
                            dynamic_shapes=({0: Dim("batch")},) * 3)
    with pytest.raises(Exception, match=r"mask\.shape must be \(B, offset_groups\*kh\*kw"):
        torch.export.export(layer, (x, offset, mask[:, :-1]),
                            dynamic_shapes=({0: Dim("batch")},) * 3)


# --------------------------------------------------------------------------
# torch.compile(dynamic=True)
# --------------------------------------------------------------------------


def test_compile_dynamic_compiles_once_for_every_batch():
    """torch.compile(dynamic=True, fullgraph=True), forward and backward
    (aot_eager: the fakes of both ops): batches 2, 3 and 5 share one graph
    (batches 0 and 1 are torch's own specializations, left out) and give the
    eager output and gradients."""
    layer = conv_layer()

    def f(x, offset, mask):
        return ct.deform_conv2d(x, offset, layer.weight, layer.bias, STRIDE, PADDING, DILATION,
                                mask)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, backend=counter, dynamic=True, fullgraph=True)
    for B, seed in ((2, 1), (3, 2), (5, 3)):
        results = []
        for function in (compiled, f):
            args = [t.requires_grad_() for t in conv_inputs(B, seed=seed)]
            out = function(*args)
            out.backward(torch.ones_like(out))
            results.append((out, *(a.grad for a in args)))
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, **EXACT)
    assert counter.frame_count == 1


def test_compile_dynamic_roi_pools_compile_once():
    """N and R vary, one graph. Their sizes differ from every static size of
    the inputs (2, 3, 5, 8): torch's duck shaping would give a batch of 2 the
    symbol of offset.shape[1], which is specialized."""
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(RoIPools(), backend=counter, dynamic=True, fullgraph=True)
    compiles = []
    for (N, R), seed in (((4, 9), 1), ((6, 11), 2), ((7, 13), 3)):
        args = roi_inputs(N, R, seed=seed)
        for got, want in zip(compiled(*args), RoIPools()(*args)):
            torch.testing.assert_close(got, want, **EXACT)
        compiles.append(counter.frame_count)
    # the first call may compile more than once (dynamo restarts its analysis
    # here, whatever the sizes); the later calls compile nothing
    assert compiles[0] >= 1 and compiles[1:] == compiles[:1] * 2


def test_compile_dynamic_wrong_shape_names_the_argument():
    layer = conv_layer()
    x, offset, mask = conv_inputs(3)
    compiled = torch.compile(layer, backend="aot_eager", dynamic=True, fullgraph=True)
    with pytest.raises(Exception, match=r"offset\.shape\[1\] must be a positive multiple"):
        compiled(x, offset[:, :-2], mask)
