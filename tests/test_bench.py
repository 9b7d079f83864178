"""``cupydcn bench`` on the CPU tier: nothing here measures speed.

The whole pipeline (arguments, cases, the correctness gate, the table, JSON,
CSV, the plot) runs on NumPy arrays and torch CPU tensors through
``CpuPlatform`` with a fake clock that returns made-up times. torchvision,
where a test needs it, is a stand-in built on cupydcn's NumPy path. The GPU
tier adds one smoke run of the real program with CUDA events.
"""

import argparse
import csv
import importlib.util
import io
import json
import re
import subprocess
import sys
import types

import numpy
import pytest

import cupydcn
from cupydcn import _bench

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
TINY = ["--case", "2,4,6,7", "--roi", "5,3,8,9,2", "--reps", "5", "--warmup", "1"]
FAKE_MS = _bench.FakeClock.MS    # by column: cupydcn 1 ms, torchvision 2 ms, dense 0.5 ms
HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
FakeClock = _bench.FakeClock     # made-up times and memory; still calls every op


def bench(argv, clock=None):
    """(exit status, stdout, stderr, clock) of ``cupydcn bench argv`` on the CPU platform."""
    clock = clock or FakeClock()
    out, err = io.StringIO(), io.StringIO()
    status = _bench.main(argv, platform=_bench.CpuPlatform(clock), out=out, err=err)
    return status, out.getvalue(), err.getvalue(), clock


@pytest.fixture
def no_torchvision(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)


@pytest.fixture
def fake_torchvision(monkeypatch):
    """A torchvision stand-in (deform_conv2d, roi_align) on cupydcn's NumPy path;
    like the real one it has no bfloat16 kernels."""
    torch = pytest.importorskip(
        "torch", reason="torch is not installed: the torchvision stand-in is built on it")

    def numpy_of(t):
        return None if t is None else t.detach().contiguous().numpy()

    def tensor_of(a):
        return None if a is None else torch.from_numpy(numpy.ascontiguousarray(a))

    def refuse_bfloat16(x, name):
        if x.dtype == torch.bfloat16:
            raise RuntimeError(f'"{name}" not implemented for \'BFloat16\'')

    class DeformConv(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, offset, weight, bias, mask, geometry):
            refuse_bfloat16(x, "deformable_im2col")
            ctx.save_for_backward(x, offset, weight, bias, mask)
            ctx.geometry = geometry
            x, offset, weight, bias, mask = map(numpy_of, (x, offset, weight, bias, mask))
            return tensor_of(cupydcn.deform_conv2d(x, offset, weight, bias, *geometry, mask=mask))

        @staticmethod
        def backward(ctx, grad):
            x, offset, weight, bias, mask = map(numpy_of, ctx.saved_tensors)
            g = cupydcn.deform_conv2d_backward(numpy_of(grad), x, offset, weight, bias,
                                               *ctx.geometry, mask=mask)
            return (*map(tensor_of, g), None)

    class RoIAlign(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, rois, keywords):
            refuse_bfloat16(x, "roi_align_forward_kernel")
            ctx.save_for_backward(x, rois)
            ctx.keywords = keywords
            return tensor_of(cupydcn.deform_roi_pool(numpy_of(x), numpy_of(rois), **keywords))

        @staticmethod
        def backward(ctx, grad):
            x, rois = map(numpy_of, ctx.saved_tensors)
            g = cupydcn.deform_roi_pool_backward(numpy_of(grad), x, rois, wrt=("input",),
                                                 **ctx.keywords)
            return tensor_of(g.input), None, None

    def deform_conv2d(input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0),
                      dilation=(1, 1), mask=None):
        return DeformConv.apply(input, offset, weight, bias, mask, (stride, padding, dilation))

    def roi_align(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1,
                  aligned=False):
        assert aligned, "cupydcn's RoI pooling is roi_align(aligned=True)"
        return RoIAlign.apply(input, boxes, dict(output_size=output_size,
                                                 spatial_scale=spatial_scale,
                                                 sampling_ratio=max(sampling_ratio, 0)))

    ops = types.ModuleType("torchvision.ops")
    ops.deform_conv2d, ops.roi_align = deform_conv2d, roi_align
    torchvision = types.ModuleType("torchvision")
    torchvision.__version__ = "0.0+fake"
    torchvision.ops = ops
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    monkeypatch.setitem(sys.modules, "torchvision.ops", ops)
    return torchvision


def table_lines(out):
    """The table's header and rows, each a dict by column name (cells are
    separated by two spaces or more; a case name has single spaces)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("case "))
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    rows = [dict(zip(_bench.TABLE_COLUMNS, re.split(r"\s{2,}", line.strip())))
            for line in lines[start + 2:end]]
    assert all(len(row) == len(_bench.TABLE_COLUMNS) for row in rows)
    return lines[start], rows


# ---- arguments --------------------------------------------------------------


def test_case_defaults_are_the_dcnv2_anchor():
    case = _bench.parse_case("2,128,100,152")
    assert (case.Cout, case.kernel, case.stride, case.padding, case.dilation) == (
        128, (3, 3), (1, 1), (1, 1), (1, 1))
    assert (case.groups, case.offset_groups, case.mask, case.bias) == (1, 1, True, True)
    assert (case.Ho, case.Wo) == (100, 152)
    assert case.name == "conv 2x128x100x152 k3"


def test_case_every_field_and_flag():
    case = _bench.parse_case("2, 64, 33, 20, 32, 3x1, 2, 0x1, 2, 2, 4, v1, nobias")
    assert case == _bench.ConvCase(2, 64, 33, 20, 32, (3, 1), (2, 2), (0, 1), (2, 2), 2, 4,
                                   mask=False, bias=False)
    assert (case.Ho, case.Wo) == (15, 11)
    assert case.name == "conv 2x64x33x20 k3x1 o32 s2 p0x1 d2 g2 dg4 v1 nobias"
    assert _bench.parse_case("1,8,9,9,8,5").padding == (2, 2)   # "same" padding by default


@pytest.mark.parametrize("text, message", [
    ("2,128,100", "expected B,C,H,W[,Cout,k,stride,pad,dil,groups,dg][,v1][,nobias] "
                  "(4 to 11 numbers), got 3"),
    ("1,2,3,4,5,6,7,8,9,10,11,12", "(4 to 11 numbers), got 12"),
    ("2,128,x,152", "field 3 (H) must be a positive integer, got 'x'"),
    ("2,0,8,8", "field 2 (C) must be a positive integer, got '0'"),
    ("2,8,8,8,8,3x3x3", "field 6 (k) must be a positive integer or a pair AxB, got '3x3x3'"),
    ("2,8,8,8,8,3,1,-1", "field 8 (pad) must be an integer >= 0 or a pair AxB, got '-1'"),
    ("2,6,8,8,6,3,1,1,1,4", "groups=4 must divide C=6 and Cout=6"),
    ("2,6,8,8,6,3,1,1,1,1,4", "dg=4 must divide C=6"),
    ("1,4,2,2,4,5,1,0", "the output would be -2x-2"),
])
def test_bad_case_is_a_clear_usage_error(text, message, capsys):
    with pytest.raises(argparse.ArgumentTypeError) as error:
        _bench.parse_case(text)
    assert str(error.value).startswith(f"--case {text!r}: ") and message in str(error.value)
    assert _bench.main(["--case", text]) == 2
    err = capsys.readouterr().err
    assert "cupydcn bench: error: argument --case" in err and message in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["--roi", "512,256,50"], "--roi '512,256,50': expected R,C,H,W[,bins[,images[,sampling]]]"),
    (["--roi", "512,256,50,76,7x"], "field 5 (bins) must be a positive integer or a pair AxB"),
    (["--dtype", "int8"], "--dtype 'int8': expected one of float32, float64, float16"),
    (["--reps", "0"], "argument --reps: expected a positive integer, got '0'"),
    (["--warmup", "-1"], "argument --warmup: expected an integer >= 0, got '-1'"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_other_bad_arguments(argv, message, capsys):
    assert _bench.main(argv) == 2
    assert message in capsys.readouterr().err


def test_roi_and_dtype_parsing():
    roi = _bench.parse_roi("512,256,50,76")
    assert (roi.bins, roi.N, roi.sampling_ratio, roi.mask) == ((7, 7), 2, 0, True)
    assert _bench.parse_roi("8,16,10,12,3x5,4,2,v1") == _bench.RoICase(
        8, 16, 10, 12, (3, 5), 4, 2, mask=False)
    assert _bench.parse_dtype("bf16").name == "bfloat16"
    assert _bench.parse_dtype("FP16").name == "float16"


def test_suite_quick_and_given_cases(capsys):
    assert _bench.main(["--list"]) == 0
    names = capsys.readouterr().out.split("\n")[:-1]
    assert names == [case.name for case in _bench.SUITE]
    assert names[:3] == ["conv 2x128x100x152 k3", "conv 2x256x50x76 k3", "conv 2x512x25x38 k3"]
    assert names[-1] == "roi 512x256x50x76 bins7 n2"
    options = _bench.parse_args(["--quick"])
    assert options.cases == _bench.QUICK_SUITE
    assert ([d.name for d in options.dtypes], options.reps, options.warmup) == (
        ["float32"], _bench.QUICK_REPS, _bench.QUICK_WARMUP)
    options = _bench.parse_args(["--case", "1,8,8,8", "--dtype", "f16", "--dtype", "bf16",
                                 "--reps", "7"])
    assert [c.name for c in options.cases] == ["conv 1x8x8x8 k3"]
    assert [d.name for d in options.dtypes] == ["float16", "bfloat16"]
    assert (options.reps, options.warmup) == (7, _bench.DEFAULT_WARMUP)
    default = _bench.parse_args([])
    assert [d.name for d in default.dtypes] == ["float32", "float16", "bfloat16"]
    with_suite = _bench.parse_args(["--case", "1,8,8,8", "--suite"])
    assert len(with_suite.cases) == len(_bench.SUITE) + 1


def test_no_gpu_is_one_line_and_a_failure():
    if _bench.detect_gpu()[0] is not None:
        pytest.skip("a GPU is visible here: the no-GPU message cannot be seen")
    result = subprocess.run([sys.executable, "-m", "cupydcn", "bench", "--quick"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cupydcn bench: ") and "GPU" in lines[0]
    assert "Traceback" not in result.stderr


def test_cli_passes_the_arguments_in_order(capsys):
    """``cupydcn bench ARGS`` hands ARGS to the bench unchanged (an option's
    value stays after its option)."""
    from cupydcn import __main__

    status = __main__.main(["bench", "--list", "--case", "1,8,8,8", "--roi", "4,8,9,9"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert captured.out.split("\n")[:-1] == ["conv 1x8x8x8 k3", "roi 4x8x9x9 bins7 n2"]


def test_plot_without_matplotlib_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert _bench.main(["--plot", "x.png"], platform=_bench.CpuPlatform(FakeClock())) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cupydcn bench: --plot needs matplotlib")


# ---- the pipeline with a fake clock -----------------------------------------


def test_table_json_csv(tmp_path, no_torchvision):
    json_path, csv_path = tmp_path / "out" / "r.json", tmp_path / "r.csv"
    status, out, err, clock = bench(TINY + ["--dtype", "float32", "--json", str(json_path),
                                            "--csv", str(csv_path)])
    assert status == 0, out
    header, rows = table_lines(out)
    assert re.split(r"\s{2,}", header) == list(_bench.TABLE_COLUMNS)
    assert len(rows) == 2 * 3
    assert [r["case"] for r in rows] == ["conv 2x4x6x7 k3"] * 3 + ["roi 5x3x8x9 bins2 n2"] * 3
    assert [r["pass"] for r in rows] == ["fwd", "bwd", "fwd+bwd"] * 2
    for r in rows:   # the fake clock's 1.00, 1.01, ... 1.04 ms and 3 MiB
        assert (r["cupydcn ms"], r["p10-p90"], r["MiB cupydcn"]) == ("1.020", "1.004-1.036", "3.0")
        assert r["torchvision ms"] == r["speed-up"] == r["MiB tv"] == r["err tv"] == "-"
        assert float(r["err cupydcn"]) < 1e-5
    # the note names what is missing: torch (the README's bare test environment) or torchvision
    assert ("note: torchvision not installed" if HAS_TORCH else "note: torch not installed") in out
    assert "[1/2] conv 2x4x6x7 k3 float32" in err and "[2/2] roi 5x3x8x9 bins2 n2" in err
    assert f"wrote {json_path}" in out and f"wrote {csv_path}" in out

    document = json.loads(json_path.read_text())
    assert {"tool", "schema", "environment", "settings", "results", "notes",
            "exit_status"} <= set(document)
    env = document["environment"]
    for key in ("gpu", "driver", "cuda_runtime", "cupy", "torch", "torchvision", "cupydcn",
                "numpy", "python", "device", "clock", "tf32", "timestamp", "cudnn"):
        assert key in env
    assert env["clock"] == "fake clock" and env["gpu"] is None and env["torchvision"] is None
    assert document["settings"]["reps"] == 5 and document["settings"]["dtypes"] == ["float32"]
    results = document["results"]
    assert len(results) == 6
    first = results[0]
    assert first["case"] == "conv 2x4x6x7 k3" and first["pass"] == "fwd"
    assert first["spec"]["Cout"] == 4 and first["spec"]["mask"] is True
    assert set(first["env"]) == {"gpu", "driver", "cuda_runtime", "cupy", "torch",
                                 "torchvision", "cupydcn"}
    mine = first["cupydcn"]
    assert mine["status"] == "ok" and mine["median_ms"] == pytest.approx(1.02)
    assert mine["p10_ms"] < mine["median_ms"] < mine["p90_ms"] and mine["reps"] == 5
    assert mine["peak_bytes"] == 3 * 2**20 and mine["max_rel_err"] < 1e-5
    assert mine["reference"] == "NumPy reference, image 0"
    assert set(mine["rel_err"]) == {"out", "grad_input", "grad_offset", "grad_weight",
                                    "grad_bias", "grad_mask"}
    assert first["torchvision"] is None and first["speedup_vs_torchvision"] is None
    roi = results[3]["cupydcn"]
    assert set(roi["rel_err"]) == {"out", "grad_input", "grad_offset", "grad_mask"}

    with open(csv_path, newline="") as handle:
        table = list(csv.reader(handle))
    assert table[0] == _bench.csv_header()
    assert len(table) == 1 + 6
    row = dict(zip(table[0], table[1]))
    assert (row["case"], row["kind"], row["dtype"], row["pass"]) == (
        "conv 2x4x6x7 k3", "conv", "float32", "fwd")
    assert float(row["cupydcn_median_ms"]) == pytest.approx(1.02)
    assert row["cupydcn_status"] == "ok" and row["torchvision_status"] == ""
    assert row["cupydcn"] == cupydcn.__version__


def test_every_op_and_pass_is_timed_on_rotated_sets(no_torchvision):
    status, out, err, clock = bench(TINY + ["--dtype", "float16", "--sets", "3", "--no-torch"])
    assert status == 0
    assert clock.timed == ["cupydcn fwd", "cupydcn bwd", "cupydcn fwd+bwd"] * 2
    assert "torch not used (--no-torch)" in out


@needs_torch
def test_dense_floor_column_with_torch(no_torchvision):
    status, out, _, clock = bench(TINY + ["--dtype", "float32"])
    assert status == 0, out
    _, rows = table_lines(out)
    for r in rows[:3]:   # the fake medians: 1.02 / 0.51
        assert (r["dense ms"], r["x dense"], r["MiB dense"]) == ("0.510", "2.00x", "3.0")
        assert float(r["err dense"]) < 1e-5
    assert all(r["dense ms"] == r["x dense"] == "-" for r in rows[3:])   # no dense for RoIs
    assert "dense fwd" in clock.timed and "dense fwd+bwd" in clock.timed


def test_torchvision_column_and_speedup(tmp_path, fake_torchvision):
    path = tmp_path / "r.json"
    status, out, _, clock = bench(TINY + ["--dtype", "float32", "--json", str(path)])
    assert status == 0, out
    _, rows = table_lines(out)
    assert all((r["torchvision ms"], r["speed-up"]) == ("2.040", "2.00x") for r in rows)
    document = json.loads(path.read_text())
    assert document["environment"]["torchvision"] == "0.0+fake"
    first = document["results"][0]
    assert first["cupydcn"]["reference"] == "torchvision float64"
    assert first["torchvision"]["max_rel_err"] < 1e-5
    assert first["speedup_vs_torchvision"] == pytest.approx(2.04 / 1.02)
    roi = [r for r in document["results"] if r["spec"]["kind"] == "roi"][0]
    assert roi["torchvision"]["label"] == "torchvision.ops.roi_align"
    assert set(roi["torchvision"]["rel_err"]) == {"out", "grad_input"}
    assert "RoI rows: torchvision = roi_align(aligned=True)" in out


def test_bfloat16_where_the_baseline_has_none(tmp_path, fake_torchvision):
    path = tmp_path / "r.json"
    status, out, _, clock = bench(TINY + ["--dtype", "bfloat16", "--json", str(path)])
    assert status == 0, out
    _, rows = table_lines(out)
    assert all((r["torchvision ms"], r["speed-up"]) == ("n/a", "-") for r in rows)
    assert "note: torchvision has no bfloat16 here: n/a in the table" in out
    assert not any(label.startswith("torchvision") for label in clock.timed)
    result = json.loads(path.read_text())["results"][0]
    assert result["torchvision"]["status"] == "unsupported"
    assert "BFloat16" in result["torchvision"]["why"]
    assert result["cupydcn"]["status"] == "ok" and result["cupydcn"]["tolerance"] == 2e-2


def test_plot_png(tmp_path, no_torchvision):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed: no PNG to check")
    path = tmp_path / "plots" / "speedup.png"
    status, out, _, _ = bench(TINY + ["--dtype", "float32", "--plot", str(path)])
    assert status == 0
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the correctness gate ---------------------------------------------------


def _off_by_one_percent(real):
    def wrong(*args, **kwargs):
        return real(*args, **kwargs) * 1.01
    return wrong


def _one_unwritten_element(real):
    def wrong(*args, **kwargs):
        out = real(*args, **kwargs).copy()
        out.reshape(-1)[-1] = numpy.nan
        return out
    return wrong


@pytest.mark.parametrize("breaker", [_off_by_one_percent, _one_unwritten_element])
def test_gate_refuses_a_wrong_kernel(breaker, tmp_path, monkeypatch, no_torchvision):
    monkeypatch.setattr(cupydcn, "deform_conv2d", breaker(cupydcn.deform_conv2d))
    path = tmp_path / "r.json"
    status, out, _, clock = bench(TINY + ["--dtype", "float32", "--json", str(path)])
    assert status == 1
    _, rows = table_lines(out)
    assert all(r["cupydcn ms"] == "REFUSED" for r in rows[:3])
    assert all(r["cupydcn ms"] == "1.020" for r in rows[3:])
    assert "REFUSED" in out and "case(s) refused" in out
    # only the RoI case's cupydcn passes are timed (with torch, the conv case's dense floor too)
    assert [label for label in clock.timed if label.startswith("cupydcn")] == [
        "cupydcn fwd", "cupydcn bwd", "cupydcn fwd+bwd"]
    assert clock.timed[-3:] == ["cupydcn fwd", "cupydcn bwd", "cupydcn fwd+bwd"]  # the RoI case
    result = json.loads(path.read_text())
    assert result["exit_status"] == 1
    conv_result = result["results"][0]["cupydcn"]
    assert conv_result["status"] == "refused" and "median_ms" not in conv_result
    assert conv_result["max_rel_err"] == "inf" or conv_result["max_rel_err"] > 1e-5


def test_gate_flags_but_times_an_inaccurate_baseline(monkeypatch, fake_torchvision):
    import torch

    real = fake_torchvision.ops.deform_conv2d

    def wrong_in_float32(*args, **kwargs):   # float64 (the reference) stays right
        out = real(*args, **kwargs)
        return out * 1.01 if out.dtype == torch.float32 else out

    monkeypatch.setattr(fake_torchvision.ops, "deform_conv2d", wrong_in_float32)
    status, out, _, clock = bench(TINY[:2] + ["--dtype", "float32", "--reps", "3"])
    assert status == 0
    assert "torchvision fwd" in clock.timed
    _, rows = table_lines(out)
    assert all(r["err tv"].endswith("!") and r["torchvision ms"] == "2.020" for r in rows)
    assert "above the tolerance (err marked !)" in out


@needs_torch
def test_tf32_switch_is_applied_and_restored(tmp_path, no_torchvision):
    import torch

    before = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    path = tmp_path / "r.json"
    status, out, _, _ = bench(TINY[:2] + ["--dtype", "float32", "--tf32", "--json", str(path)])
    assert status == 0
    document = json.loads(path.read_text())
    assert document["environment"]["tf32"]["enabled"] is True
    assert "fp32_precision=tf32" in document["environment"]["tf32"]["torch"]
    assert document["results"][0]["cupydcn"]["tolerance"] == _bench.TF32_TOLERANCE
    assert "TF32 on" in out
    after = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    assert after == before


def test_input_sets_are_distinct_and_cover_the_cache():
    case = _bench.parse_case("2,4,6,7")
    dtype = _bench.parse_dtype("float32")
    a, b = _bench.make_inputs(case, dtype, 1), _bench.make_inputs(case, dtype, 2)
    assert all(not numpy.array_equal(a[k], b[k]) for k in a)
    assert all(numpy.count_nonzero(v) == v.size for k, v in a.items() if k != "mask")
    nbytes = sum(v.nbytes for v in a.values())
    assert _bench.choose_sets(a, 0) == 2
    assert _bench.choose_sets(a, 3 * nbytes) == 6
    assert _bench.choose_sets(a, 100 * nbytes) == _bench.MAX_SETS
    assert _bench.choose_sets(a, 100 * nbytes, override=3) == 3
    roi = _bench.make_inputs(_bench.parse_roi("50,3,8,9"), dtype, 1)
    boxes = roi["rois"]
    assert set(numpy.unique(boxes[:, 0])) <= {0.0, 1.0}
    assert numpy.all(boxes[:, 3] > boxes[:, 1]) and numpy.all(boxes[:, 4] > boxes[:, 2])
    assert numpy.all(boxes[:, 3] <= 9 * 16) and numpy.all(boxes[:, 4] <= 8 * 16)


def test_progress_bar_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    progress = _bench.Progress(4, stream)
    progress.begin("conv 2x4x6x7 k3 float32")
    progress.show("cupydcn fwd")
    progress.advance()
    progress.close()
    text = stream.getvalue()
    assert "\r[......................" in text
    assert "0/4 conv 2x4x6x7 k3 float32: cupydcn fwd" in text
    assert "\r[######" in text and "1/4" in text and "\n" not in text


# ---- GPU tier: one smoke run of the real program (no speed asserted) --------


@pytest.mark.gpu
def test_gpu_smoke_run(tmp_path):
    path = tmp_path / "r.json"
    out, err = io.StringIO(), io.StringIO()
    status = _bench.main(["--case", "2,16,12,13", "--roi", "16,8,10,12", "--reps", "3",
                          "--warmup", "1", "--dtype", "float32", "--dtype", "float16",
                          "--json", str(path)], out=out, err=err)
    assert status == 0, out.getvalue()
    document = json.loads(path.read_text())
    assert document["environment"]["clock"] == "CUDA events"
    assert document["environment"]["gpu"]
    for row in document["results"]:
        assert row["cupydcn"]["status"] == "ok"
        assert row["cupydcn"]["median_ms"] > 0 and row["cupydcn"]["peak_bytes"] > 0


def test_deterministic_flag_reaches_the_cupydcn_backward():
    from cupydcn import _bench

    options = _bench.parse_args(["--quick", "--deterministic"])
    assert options.deterministic
    assert not _bench.parse_args(["--quick"]).deterministic
    case = options.cases[0]
    ops = _bench.make_ops(case, options.dtypes[0], None, _bench.Baselines(None, None, (), {}), True)
    assert ops[0].deterministic is True
