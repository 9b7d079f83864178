"""The dispatcher: algorithms(), algorithm=, deterministic=, the CPU backend."""

import numpy
import pytest

import cupydcn
from cupydcn import _dispatch, _ops, reference
from helpers import assert_close, forward_tolerance

OPS = ("deform_conv2d", "deform_roi_pool", "deform_psroi_pool")


@pytest.fixture
def cpu_backend():
    """Restore the CPU backend a test changes."""
    previous = _dispatch.get_cpu_backend()
    yield
    cupydcn.set_cpu_backend(previous)


def _conv_args(rng, dtype=numpy.float64):
    x = rng.standard_normal((2, 4, 7, 6)).astype(dtype)
    offset = rng.uniform(-1.5, 1.5, (2, 18, 7, 6)).astype(dtype)
    w = rng.standard_normal((3, 4, 3, 3)).astype(dtype)
    mask = rng.uniform(0, 1, (2, 9, 7, 6)).astype(dtype)
    return x, offset, w, mask


@pytest.mark.parametrize("op", OPS)
def test_algorithms_lists_the_kernels_and_the_reference(op):
    names = cupydcn.algorithms(op)
    assert "reference" in names
    assert len(names) == len(set(names))
    assert set(names) <= {i.name for i in _dispatch._registry[op]}
    assert any(i.launch is not None for i in _dispatch._registry[op])


def test_algorithms_unknown_op():
    with pytest.raises(ValueError, match="op must be one of deform_conv2d"):
        cupydcn.algorithms("deform_conv3d")


def test_unknown_algorithm_names_the_ones_that_exist():
    x, offset, w, _ = _conv_args(numpy.random.default_rng(0))
    with pytest.raises(ValueError, match=r"algorithm must be None or one of .*reference.*"
                                         r"got 'fastest'") as info:
        cupydcn.deform_conv2d(x, offset, w, padding=1, algorithm="fastest")
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(TypeError, match="algorithm must be None or a name"):
        cupydcn.deform_conv2d(x, offset, w, padding=1, algorithm=3)


def test_deterministic_filters_the_choice():
    x, offset, w, mask = _conv_args(numpy.random.default_rng(1))
    g = numpy.ones((2, 3, 7, 6))
    atomic = [i.name for i in _dispatch._registry["deform_conv2d"]
              if i.launch is not None and not i.deterministic]
    for name in atomic:
        with pytest.raises(ValueError, match="not deterministic"):
            cupydcn.deform_conv2d_backward(g, x, offset, w, padding=1, mask=mask,
                                           algorithm=name, deterministic=True)


@pytest.mark.parametrize("backend", ["host", "reference"])
@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
def test_every_cpu_algorithm_matches_the_reference(cpu_backend, backend, dtype):
    """Every registered implementation that runs on the CPU, by name and by
    the automatic choice of each CPU backend, against the float64 reference."""
    cupydcn.set_cpu_backend(backend)
    rng = numpy.random.default_rng(2)
    x, offset, w, mask = _conv_args(rng, dtype)
    g = rng.standard_normal((2, 3, 7, 6)).astype(dtype)
    exact = [a.astype(numpy.float64) for a in (x, offset, w, mask, g)]
    one = (1, 1)
    ref = reference.deform_conv2d(*exact[:3], None, one, one, one, exact[3])
    ref_grads = reference.deform_conv2d_backward(exact[4], *exact[:3], None, one, one, one,
                                                 exact[3])
    for name in (None, *cupydcn.algorithms("deform_conv2d")):
        implementation = name and _dispatch.implementation("deform_conv2d", name)
        if name is not None and implementation.dtypes is not None and (
                numpy.dtype(dtype).name not in implementation.dtypes):
            continue  # e.g. implicit_gemm_tf32, float32 only (test_implementations skips it)
        out = cupydcn.deform_conv2d(x, offset, w, padding=1, mask=mask, algorithm=name)
        assert out.dtype == dtype
        assert_close(out, ref, dtype, f"forward {name}",
                     forward_tolerance("deform_conv2d", name, dtype))
        grads = cupydcn.deform_conv2d_backward(g, x, offset, w, padding=1, mask=mask,
                                               algorithm=name)
        for field, ref_grad in zip(cupydcn.DeformConv2dGrads._fields, ref_grads):
            if field != "bias":
                assert_close(getattr(grads, field), ref_grad, dtype, f"grad {field} {name}")


def test_cpu_backend_setting(cpu_backend, monkeypatch):
    assert cupydcn.set_cpu_backend("reference") in ("host", "reference")
    assert cupydcn.get_cpu_backend() == "reference"
    with pytest.raises(ValueError, match="cpu backend must be one of host, reference, got 'gpu'"):
        cupydcn.set_cpu_backend("gpu")
    monkeypatch.setenv("CUPYDCN_CPU_BACKEND", "reference")
    monkeypatch.setattr(_dispatch, "_cpu_choice", None)
    assert _dispatch.cpu_backend_reason() == ("reference", "set by $CUPYDCN_CPU_BACKEND")
    monkeypatch.setenv("CUPYDCN_CPU_BACKEND", "fast")
    monkeypatch.setattr(_dispatch, "_cpu_choice", None)
    with pytest.raises(ValueError, match=r"\$CUPYDCN_CPU_BACKEND must be one of"):
        _dispatch.cpu_backend_reason()


def test_cpu_backend_falls_back_without_a_compiler(cpu_backend, monkeypatch):
    monkeypatch.delenv("CUPYDCN_CPU_BACKEND", raising=False)
    monkeypatch.setattr(_dispatch, "_compiler", lambda: None)
    monkeypatch.setattr(_dispatch, "_cpu_choice", None)
    name, why = _dispatch.cpu_backend_reason()
    assert name == "reference" and "no C++ compiler" in why
    with pytest.raises(ValueError, match=r"needs a C\+\+ compiler"):
        cupydcn.set_cpu_backend("host")


def test_gpu_only_algorithm_refused_on_the_cpu(monkeypatch):
    """An implementation that runs only on a GPU says so for NumPy arrays."""
    gpu_only = _dispatch.Implementation(
        name="test_gpu_only", op="deform_conv2d", runs_on=frozenset({_dispatch.CUDA}),
        deterministic=True, forward=None, backward=None, launch=_dispatch.Launch("deform_conv"))
    monkeypatch.setitem(_dispatch._registry, "deform_conv2d",
                        [*_dispatch._registry["deform_conv2d"], gpu_only])
    x, offset, w, _ = _conv_args(numpy.random.default_rng(3))
    with pytest.raises(ValueError, match="algorithm 'test_gpu_only' cannot run this "
                                         "deform_conv2d call: it runs on a CUDA GPU"):
        cupydcn.deform_conv2d(x, offset, w, padding=1, algorithm="test_gpu_only")


@pytest.mark.parametrize("spec", _ops.SPECS.values(), ids=lambda s: s.name)
def test_specs_match_the_public_functions(spec):
    """The spec's argument list is the public forward's signature."""
    import inspect

    parameters = list(inspect.signature(spec.forward).parameters.values())
    names = [p.name for p in parameters if p.name not in ("algorithm", "return_count")]
    assert names == [a.name for a in spec.args]
    for p in parameters:
        arg = next((a for a in spec.args if a.name == p.name), None)
        if arg is not None and arg.default is not _ops.REQUIRED:
            assert p.default == arg.default, p.name
    assert tuple(spec.grads_type._fields) == spec.gradients
    assert set(spec.gradients) <= set(spec.arrays)


def test_kernel_algorithm_without_a_compiler_says_why(cpu_backend, monkeypatch):
    """A kernel implementation named for NumPy arrays where no C++ compiler is
    found: a clear ArgumentError, not the loader's failure."""
    monkeypatch.setattr(_dispatch, "_compiler", lambda: None)
    x, offset, w, _ = _conv_args(numpy.random.default_rng(4))
    with pytest.raises(ValueError, match=r"algorithm 'im2col' cannot run this deform_conv2d "
                                         r"call: the host build of its kernels needs a C\+\+ "
                                         r"compiler"):
        cupydcn.deform_conv2d(x, offset, w, padding=1, algorithm="im2col")
