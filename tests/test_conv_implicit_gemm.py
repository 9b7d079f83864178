"""The implicit-GEMM forward and backward (kernels/deform_conv_igemm.cu,
cupydcn/_conv_implicit_gemm.py).

The kernel runs on the host backend with its checks on (the ``host`` fixture:
shared-memory races, poisoned shared memory, late cp.async copies, varied
scheduling, divergent barriers) against the float64 reference, on shapes that
exercise the 64 x 64 tile edges, groups, offset groups that change inside a
channel chunk, stride / dilation / padding, non-square kernels, C/groups not a
multiple of the K tile of 16 (and a multiple of 8, where the half types' weight
goes through 16-byte cp.async copies), in every dtype and through TF32. Each
mutation of the kernel (a barrier removed, a fragment index off by one, a
missing cp.async wait) must fail a run. The backward's kernels (the weight
gradient with its pixels split across blocks, the data gradient fused with the
input / offset / mask scatter) run the same way, every gradient against the
reference in every dtype, with splits of one step and splits that cross images,
each gradient asked alone, an empty batch, and mutations of their own (barriers,
the cp.async wait, a tap, a fragment column or a channel off by one, sums not
reset between offset groups). The public API routes through the
dispatcher (tests/test_implementations.py runs it on the shared problem);
here, its automatic choice. NVRTC compiles the file for sm_70/80/90
(tests/test_nvrtc.py); nvcc, where installed, shows no register spills.
"""

import re
import shutil
import subprocess

import numpy
import pytest

import cupydcn
from cupydcn import (_conv_implicit_gemm, _deform_conv, _dispatch, _dtypes, _kernels,
                     _validation, reference)
from helpers import DTYPES, assert_close, dtype_name
from test_deform_conv import make_case, reference_results

# (B, C, H, W, Cout, kh, kw, groups, offset_groups, stride, padding, dilation, mask, bias)
CASES = {
    # M = 98 and N = 70: two tiles each way, both with a ragged edge; Cg = 3, K = 27
    "tile edges": (2, 6, 7, 7, 70, 3, 3, 2, 3, (1, 1), (1, 1), (1, 1), True, True),
    # groups 2 x offset groups 5 (C/og = 4, Cg = 10: the group changes inside a chunk),
    # 3x2 kernel, stride (2, 1), padding (1, 0), dilation (1, 2), DCNv1 (no mask)
    "groups": (3, 20, 9, 8, 6, 3, 2, 2, 5, (2, 1), (1, 0), (1, 2), False, True),
    # Cg = 24: a full chunk of 16 then 8 (16-byte weight copies for the half types); Cout 9
    "chunks": (1, 24, 6, 5, 9, 2, 3, 1, 2, (1, 2), (0, 1), (2, 1), True, False),
    # Cout/groups 16: the backward's 16-byte weight copies for the half types; Cg = 8 (a
    # K chunk half padding), C/og = 4 (the offset group changes inside a chunk), M = 84
    "cout 16": (2, 8, 6, 7, 16, 3, 3, 1, 2, (1, 1), (1, 1), (1, 1), True, True),
    # Cout 130: three forward N tiles and two of the weight gradient's 128-row tiles
    "tall": (1, 5, 4, 5, 130, 1, 2, 1, 1, (1, 1), (0, 1), (1, 1), True, False),
}
TF32 = "tf32"


def _geometry(typed, params):
    return _validation.check_deform_conv2d(typed["input"], typed["offset"], typed["weight"],
                                           typed["bias"], mask=typed["mask"], **params)


def _run(backend, case, dtype, tf32=False, seed=0):
    typed, exact, params = make_case(case, dtype, seed=seed)
    geo = _geometry(typed, params)
    out = _conv_implicit_gemm.forward(backend, geo, typed["input"], typed["offset"],
                                      typed["weight"], typed["bias"], typed["mask"], tf32=tf32)
    ref = reference.deform_conv2d(exact["input"], exact["offset"], exact["weight"],
                                  exact["bias"], mask=exact["mask"], **params)
    return out, ref


@pytest.mark.parametrize("dtype", [*DTYPES, TF32], ids=lambda d: d if d == TF32 else dtype_name(d))
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_reference_with_host_checks(host, case, dtype):
    tf32 = dtype == TF32
    dtype = numpy.float32 if tf32 else dtype
    out, ref = _run(host, CASES[case], dtype, tf32)
    assert out.dtype == numpy.dtype(dtype) and out.shape == ref.shape
    # TF32 operands carry float16's 10-bit mantissa: float16's tolerance
    assert_close(out, ref, numpy.float16 if tf32 else dtype, f"{case} {dtype_name(dtype)}")


def test_tf32_rounds_and_the_default_float32_does_not(host):
    """float32 through ``implicit_gemm`` is exact float32 (FMA in float32);
    through TF32 it differs from it by the operands' rounding."""
    exact_out, ref = _run(host, CASES["chunks"], numpy.float32)
    tf32_out, _ = _run(host, CASES["chunks"], numpy.float32, tf32=True)
    assert_close(exact_out, ref, numpy.float32)
    err = numpy.linalg.norm(tf32_out - ref) / numpy.linalg.norm(ref)
    assert 1e-6 < err < 1e-2, err


# ---------------------------------------------------------------- mutations

MUTATIONS = {
    "barrier removed (tiles landed)": ("__syncthreads();  // [mutation: tiles landed]", ""),
    "barrier removed (tiles consumed)": ("__syncthreads();  // [mutation: tiles consumed]", ""),
    "missing cp.async wait": ("dcn_cp_async_wait<0>();  // [mutation: wait]", ";"),
    "A fragment row off by one (ldmatrix)": ("(wm + 16 * mi + lane % 16) * LDS",
                                             "(wm + 16 * mi + (lane + 1) % 16) * LDS"),
    "B fragment column off by one (ldmatrix)": ("(q / 2) * 8 + lane % 8) * LDS",
                                                "(q / 2) * 8 + (lane + 1) % 8) * LDS"),
    "SIMT fragment column off by one": ("(wn + 8 * ni + 2 * t + h) * LDS",
                                        "(wn + 8 * ni + 2 * t + 1 - h) * LDS"),
    "tf32 fragment index off by one": ("a_tile[(row + 8) * LDS + kk + t + 4]",
                                       "a_tile[(row + 8) * LDS + kk + t + 3]"),
}
# The dtype whose path each mutation lives on.
MUTATED_DTYPE = {"A fragment row off by one (ldmatrix)": numpy.float16,
                 "B fragment column off by one (ldmatrix)": "bfloat16",
                 "SIMT fragment column off by one": numpy.float64,
                 "tf32 fragment index off by one": TF32,
                 "missing cp.async wait": numpy.float16}


def _mutation_backend(text=None):
    """The host backend of the mutation runs (checks on, one worker, a fixed seed),
    on ``text`` as the kernel file; built unoptimised (-O0): the runs are tiny, the
    build is most of their time."""
    sources = None if text is None else {"deform_conv_igemm": text}
    return _kernels.HostBackend(checks=True, workers=1, seed=5, sources=sources,
                                flags=("-O0",))


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_each_mutation_fails(mutation):
    old, new = MUTATIONS[mutation]
    text = _kernels.source("deform_conv_igemm")
    assert text.count(old) == 1, f"the mutation's line is gone: {old!r}"
    backend = _mutation_backend(text.replace(old, new))
    dtype = MUTATED_DTYPE.get(mutation, numpy.float32)
    tf32 = dtype == TF32
    if dtype == "bfloat16":
        dtype = next(d for d in DTYPES if dtype_name(d) == "bfloat16")
    dtype = numpy.float32 if tf32 else dtype
    failure = None
    try:
        out, ref = _run(backend, CASES["chunks"], dtype, tf32)
        assert_close(out, ref, numpy.float16 if tf32 else dtype)
    except (RuntimeError, AssertionError) as error:
        failure = error
    assert failure is not None, f"the mutation '{mutation}' went unnoticed"


def test_unmutated_kernel_passes_the_mutation_runs():
    """The runs above fail because of the mutations: unmutated, the same
    backend settings pass in every dtype they use."""
    backend = _mutation_backend()
    for dtype in (*DTYPES, TF32):
        tf32 = dtype == TF32
        dtype = numpy.float32 if tf32 else dtype
        out, ref = _run(backend, CASES["chunks"], dtype, tf32)
        assert_close(out, ref, numpy.float16 if tf32 else dtype)


# ---------------------------------------------------------------- backward

def _run_backward(backend, case, dtype, wrt=_deform_conv.GRADIENTS, per_split=None):
    """(wrt, the kernels' gradients, the reference's) of ``case`` in ``dtype``."""
    typed, exact, params = make_case(case, dtype)
    geo = _geometry(typed, params)
    wrt = _validation.check_wrt(wrt, _deform_conv.GRADIENTS, bias=typed["bias"],
                                mask=typed["mask"])
    grads = _conv_implicit_gemm.backward(backend, geo, typed["grad_output"], typed["input"],
                                         typed["offset"], typed["weight"], typed["mask"], wrt,
                                         per_split=per_split)
    return wrt, grads, reference_results(exact, params)[1]


def _assert_gradients(wrt, grads, ref, dtype, what=""):
    """Every gradient of ``wrt`` close to the reference, in ``dtype``; the others None."""
    for name in _deform_conv.GRADIENTS:
        got = getattr(grads, name)
        if name not in wrt:
            assert got is None, f"{what}: {name} was not asked for"
            continue
        expected = getattr(ref, name)
        assert got.dtype == numpy.dtype(dtype) and got.shape == expected.shape, (what, name)
        assert_close(got, expected, dtype, f"{what} grad_{name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", sorted(CASES))
def test_backward_matches_reference_with_host_checks(host, case, dtype):
    wrt, grads, ref = _run_backward(host, CASES[case], dtype)
    assert {"input", "offset", "weight"} <= wrt
    _assert_gradients(wrt, grads, ref, dtype, f"{case} {dtype_name(dtype)}")


@pytest.mark.parametrize("per_split", [1, 16, 21, 10**6])
@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float16], ids=dtype_name)
def test_weight_gradient_split_over_pixels(host, dtype, per_split):
    """The weight gradient's reduction over the 84 pixels split across blocks:
    one pixel per block, one step of 16, 21 (splits that end mid-step and cross
    an image), one split: each block adds its tile with atomics."""
    wrt, grads, ref = _run_backward(host, CASES["cout 16"], dtype, ("weight",), per_split)
    _assert_gradients(wrt, grads, ref, dtype, f"per_split {per_split}")


@pytest.mark.parametrize("name", ["input", "offset", "weight", "bias", "mask"])
def test_each_gradient_alone(host, name):
    """The kernels take null pointers for the gradients not asked for."""
    wrt, grads, ref = _run_backward(host, CASES["tile edges"], numpy.float32, (name,))
    assert wrt == {name}
    _assert_gradients(wrt, grads, ref, numpy.float32, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_backward_of_an_empty_batch(host, dtype):
    """Batch 0: no launch; the gradients of the weight and bias are zeros, the
    others empty."""
    case = (0, *CASES["cout 16"][1:])
    wrt, grads, ref = _run_backward(host, case, dtype)
    assert wrt == set(_deform_conv.GRADIENTS)
    for name in wrt:
        got, expected = getattr(grads, name), getattr(ref, name)
        assert got.dtype == numpy.dtype(dtype) and got.shape == expected.shape, name
        assert not numpy.any(got.astype(numpy.float64)), name
    assert grads.weight.size and grads.bias.size


def test_a_bad_per_split_is_refused():
    typed, _, params = make_case(CASES["chunks"], numpy.float32)
    with pytest.raises(cupydcn.ArgumentError, match=r"per_split must be a positive int, got 0"):
        _conv_implicit_gemm.backward(_kernels.NoWorkBackend(), _geometry(typed, params),
                                     typed["grad_output"], typed["input"], typed["offset"],
                                     typed["weight"], typed["mask"], {"weight"}, per_split=0)


BACKWARD_MUTATIONS = {
    "barrier removed (weight tiles landed)":
        ("__syncthreads();  // [mutation: weight tiles landed]", ""),
    "barrier removed (data tiles landed)": ("__syncthreads();  // [mutation: data tiles landed]",
                                            ""),
    "barrier removed (weight tiles consumed)":
        ("__syncthreads();  // [mutation: weight tiles consumed]", ""),
    "barrier removed (data tiles consumed)":
        ("__syncthreads();  // [mutation: data tiles consumed]", ""),
    "barrier removed (gradient tile written)":
        ("__syncthreads();  // [mutation: gradient tile written]", ""),
    "barrier removed (gradient tile read)":
        ("__syncthreads();  // [mutation: gradient tile read]", ""),
    "missing cp.async wait (data)": ("dcn_cp_async_wait<0>();  // [mutation: data wait]", ";"),
    "tap off by one (weight samples)": ("og, kb.tap, oy, ox);", "og, (kb.tap + 1) % taps, oy, ox);"),
    "tap off by one (data epilogue)": ("og, kq.tap, ey, ex);", "og, (kq.tap + 1) % taps, ey, ex);"),
    "weight fragment column off by one": ("k_index(k0, wn + 8 * ni + 2 * t + e,",
                                          "k_index(k0, wn + 8 * ni + 2 * t + 1 - e,"),
    "gradient tile channel off by one": ("g_tile[ep * GLD + 16 * eq + (c - kq.c)]",
                                         "g_tile[ep * GLD + 16 * eq + (c - kq.c + 1) % 16]"),
    "sums not reset between offset groups": ("sum_dy = sum_dx = sum_mask = (A)0;", ";"),
}
BACKWARD_MUTATED_DTYPE = {"missing cp.async wait (data)": numpy.float16}
# "cout 16" reduces the data gradient over Cout/groups = 16 in one step: a barrier
# between steps needs more of them (Cout/groups = 35 in three).
BACKWARD_MUTATED_CASE = {"barrier removed (data tiles consumed)": "tile edges"}




@pytest.mark.parametrize("mutation", sorted(BACKWARD_MUTATIONS))
def test_each_backward_mutation_fails(mutation):
    old, new = BACKWARD_MUTATIONS[mutation]
    text = _kernels.source("deform_conv_igemm")
    assert text.count(old) == 1, f"the mutation's line is gone: {old!r}"
    backend = _mutation_backend(text.replace(old, new))
    dtype = BACKWARD_MUTATED_DTYPE.get(mutation, numpy.float32)
    case = CASES[BACKWARD_MUTATED_CASE.get(mutation, "cout 16")]
    failure = None
    try:
        wrt, grads, ref = _run_backward(backend, case, dtype, per_split=21)
        _assert_gradients(wrt, grads, ref, dtype)
    except (RuntimeError, AssertionError) as error:
        failure = error
    assert failure is not None, f"the mutation '{mutation}' went unnoticed"


def test_unmutated_backward_passes_the_mutation_runs():
    backend = _mutation_backend()
    for case, dtype in (("cout 16", numpy.float32), ("cout 16", numpy.float16),
                        ("tile edges", numpy.float32)):
        wrt, grads, ref = _run_backward(backend, CASES[case], dtype, per_split=21)
        _assert_gradients(wrt, grads, ref, dtype, f"{case} {dtype_name(dtype)}")


# ---------------------------------------------------------------- the dispatcher

def _geo(dtype):
    typed, _, params = make_case(CASES["groups"], dtype)
    return _geometry(typed, params)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_automatic_choice(dtype):
    """implicit_gemm is chosen for the half types on CUDA only; on the host the
    choice is deterministic im2col (or the reference backend); TF32 is never
    chosen."""
    geo = _geo(dtype)
    implementations = {i.name: i for i in _dispatch._registry["deform_conv2d"]}
    half = dtype_name(dtype) in ("float16", "bfloat16")
    for name in ("implicit_gemm", "implicit_gemm_tf32"):
        automatic = implementations[name].automatic
        assert automatic(_dispatch.CUDA, geo) == (half and name == "implicit_gemm")
        assert not automatic(_dispatch.HOST, geo)
    host_choice = _dispatch.choose("deform_conv2d", False, geo)[0].name
    assert host_choice in ("im2col_fused_deterministic", "reference")
    assert _dispatch.choose("deform_conv2d", False, geo, deterministic=True)[0].deterministic


def test_tf32_is_only_for_float32_and_named_explicitly():
    typed, _, params = make_case(CASES["groups"], numpy.float16)
    with pytest.raises(cupydcn.ArgumentError,
                       match=r"algorithm 'implicit_gemm_tf32' cannot run this deform_conv2d "
                             r"call: it does not support float16"):
        cupydcn.deform_conv2d(typed["input"], typed["offset"], typed["weight"], typed["bias"],
                              mask=typed["mask"], algorithm="implicit_gemm_tf32", **params)
    assert "implicit_gemm_tf32" in cupydcn.algorithms("deform_conv2d")


def test_a_grid_past_cuda_limits_is_refused_with_the_reason():
    geo = _geo(numpy.float32)._replace(groups=70000, Cout=70000, C=70000)
    reason = _conv_implicit_gemm._supports(geo)
    assert reason is not None and "65535" in reason and "70000" in reason


# ---------------------------------------------------------------- registers

@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_no_register_spills(arch, tmp_path):
    """nvcc --resource-usage: every instantiation compiles with 0 bytes of
    spill stores and loads (the registers and shared memory are in the
    module docstring's table)."""
    signatures = {  # pointers (const T, T, A: the accumulation type) and indices
        "deform_conv_igemm": ("const T*",) * 5 + ("T*",) + ("I",) * 18,
        "deform_conv_igemm_grad_weight": ("const T*",) * 4 + ("A*",) + ("I",) * 19,
        "deform_conv_igemm_grad_data": ("const T*",) * 5 + ("A*",) * 3 + ("I",) * 18,
    }
    assert set(signatures) == set(_kernels.KERNELS["deform_conv_igemm"])
    instances = []
    for kernel, signature in signatures.items():
        for dtype in _dtypes.DTYPES.values():
            for bits in (32, 64):
                name = _kernels.template_name(kernel, dtype, bits)
                T, I = [x.strip() for x in name[name.index("<") + 1:-1].split(",")]
                types = {"T": T, "I": I, "A": "double" if T == "double" else "float"}
                params = ", ".join(re.sub(r"\b[TIA]\b", lambda m: types[m.group()], p)
                                   for p in signature)
                instances.append(f"template __global__ void {kernel}<{T}, {I}>({params});")
    src = tmp_path / "igemm.cu"
    src.write_text(_kernels.source("deform_conv_igemm") + "\n" + "\n".join(instances) + "\n")
    result = subprocess.run(["nvcc", "-std=c++17", "-cubin", f"-arch={arch}", "--resource-usage",
                             "-o", str(tmp_path / "igemm.cubin"), str(src)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
    assert len(spills) == len(instances), result.stderr
    assert all(s == ("0", "0") for s in spills), result.stderr
