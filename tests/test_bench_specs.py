"""``cupydcn bench`` driven from the op specs: PS RoI pooling cases and
``--algorithm`` (each implementation timed on its own rows), on the CPU tier
with the bench's fake clock (nothing here measures speed). The rest of the
bench's contract is tests/test_bench.py.
"""

import csv
import io
import json
import re
import subprocess
import sys

import numpy
import pytest

import cupydcn
from cupydcn import _dispatch
from cupydcn import _bench
from cupydcn._ops import SPECS

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
PSROI = ["--psroi", "6,18,8,9,3,3", "--reps", "3", "--warmup", "1", "--dtype", "float32",
         "--no-torch"]
CONV = ["--case", "2,4,6,7", "--reps", "3", "--warmup", "1", "--dtype", "float32", "--no-torch"]


def bench(argv):
    """(exit status, stdout, clock) of ``cupydcn bench argv`` on the CPU platform."""
    clock = _bench.FakeClock()
    out, err = io.StringIO(), io.StringIO()
    status = _bench.main(argv, platform=_bench.CpuPlatform(clock), out=out, err=err)
    return status, out.getvalue(), clock


def table_rows(out):
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("case "))
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    rows = [dict(zip(_bench.TABLE_COLUMNS, re.split(r"\s{2,}", line.strip())))
            for line in lines[start + 2:end]]
    assert all(len(row) == len(_bench.TABLE_COLUMNS) for row in rows)
    return rows


def automatic(op):
    """The implementation the dispatcher picks for NumPy arrays here."""
    if cupydcn.get_cpu_backend() == "reference":
        return "reference"
    # the CPU's automatic choice is deterministic (cupydcn._dispatch.choose)
    return {"deform_conv2d": "im2col_fused_deterministic"}.get(op, "bins_deterministic")


# ---- the cases come from the specs ------------------------------------------


@pytest.mark.parametrize("case", [_bench.parse_case("2,4,6,7,8,3x1,2,1,1,2,2"),
                                  _bench.parse_roi("5,3,8,9,2,3,1,v1"),
                                  _bench.parse_psroi("6,18,8,9,3,3,1,2,notrans")],
                         ids=lambda c: c.kind)
def test_case_arrays_and_parameters_are_the_specs(case):
    spec = SPECS[case.op]
    host = _bench.make_inputs(case, _bench.parse_dtype("float64"), seed=3)
    assert set(host) == set(spec.arrays) | {"grad_output"}
    assert set(case.params()) == {a.name for a in spec.params}
    bound = spec.bind(**{n: host[n] for n in spec.arrays}, **case.params())
    geo = spec.check(**bound)
    assert spec.output_shapes(geo)["output"] == host["grad_output"].shape
    runner = _bench.make_ops(case, _bench.parse_dtype("float32"), None,
                             _bench.Baselines(None, None, (), {}))[0]
    assert runner.reference == case.reference_key and runner.label == f"cupydcn.{spec.name}"


def test_psroi_syntax_defaults_and_errors(capsys):
    case = _bench.parse_psroi("512,1029,50,76,7,7")
    assert (case.pooled_size, case.group_size, case.output_dim, case.N, case.sample_per_part,
            case.trans) == (7, 7, 21, 2, 4, True)
    assert case.name == "psroi 512x1029x50x76 bins7 g7 n2"
    plain = _bench.parse_psroi("8,16,10,12")
    assert (plain.pooled_size, plain.group_size, plain.output_dim) == (7, 1, 16)
    assert _bench.parse_psroi("8,18,10,12,3,3,4,2,notrans") == _bench.PSRoICase(
        8, 18, 10, 12, 3, 3, 4, 2, trans=False)
    assert _bench.parse_psroi("8,18,10,12,3,3,4,2,notrans").name == \
        "psroi 8x18x10x12 bins3 g3 n4 sp2 notrans"
    assert _bench.main(["--psroi", "8,10,10,12,3,3"]) == 2
    assert "--psroi '8,10,10,12,3,3': C=10 must be a multiple of group**2 = 9" in \
        capsys.readouterr().err
    assert _bench.main(["--psroi", "8,9,10,12,3x3"]) == 2
    assert "field 5 (bins) must be a positive integer, got '3x3'" in capsys.readouterr().err


def test_psroi_is_in_the_suites(capsys):
    assert any(c.kind == "psroi" for c in _bench.SUITE)
    assert any(c.kind == "psroi" for c in _bench.QUICK_SUITE)
    for case in (c for c in _bench.SUITE if c.kind == "psroi"):   # the gate's NumPy work is bounded
        samples = case.output_dim * case.pooled_size**2 * case.sample_per_part**2
        assert 1 <= case.check_items <= _bench.ROI_CHECK
        assert case.check_items * samples <= 2**20
    from cupydcn import __main__

    assert __main__.main(["bench", "--list", "--psroi", "4,18,9,9,3,3"]) == 0
    assert capsys.readouterr().out == "psroi 4x18x9x9 bins3 g3 n2\n"


# ---- PS RoI pooling through the pipeline ------------------------------------


def test_psroi_case_is_gated_timed_and_written(tmp_path):
    path, csv_path = tmp_path / "r.json", tmp_path / "r.csv"
    status, out, clock = bench(PSROI + ["--json", str(path), "--csv", str(csv_path)])
    assert status == 0, out
    rows = table_rows(out)
    assert [r["case"] for r in rows] == ["psroi 6x18x8x9 bins3 g3 n2"] * 3
    assert all(r["cupydcn ms"] == "1.010" and r["torchvision ms"] == "-" for r in rows)
    assert clock.timed == ["cupydcn fwd", "cupydcn bwd", "cupydcn fwd+bwd"]
    assert "note: PS RoI rows: cupydcn alone" in out
    first = json.loads(path.read_text())["results"][0]
    assert first["spec"]["kind"] == "psroi" and first["spec"]["output_dim"] == 2
    mine = first["cupydcn"]
    assert mine["label"] == "cupydcn.deform_psroi_pool"
    assert set(mine["rel_err"]) == {"out", "count", "grad_input", "grad_trans"}
    assert mine["max_rel_err"] < 1e-5 and mine["reference"] == "NumPy reference, first 6 RoIs"
    with open(csv_path, newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [r["kind"] for r in table] == ["psroi"] * 3


def test_psroi_backward_takes_the_forwards_count(monkeypatch):
    real = cupydcn.deform_psroi_pool_backward
    counts = []

    def spy(*args, **kwargs):
        counts.append(kwargs.get("count"))
        return real(*args, **kwargs)

    monkeypatch.setattr(cupydcn, "deform_psroi_pool_backward", spy)
    status, out, _ = bench(PSROI)
    assert status == 0, out
    assert counts and all(c is not None and c.dtype == numpy.float32 for c in counts)


def test_gate_refuses_a_wrong_psroi_kernel(monkeypatch):
    real = cupydcn.deform_psroi_pool

    def wrong(*args, **kwargs):
        out, count = real(*args, **kwargs)
        return out * 1.01, count

    monkeypatch.setattr(cupydcn, "deform_psroi_pool", wrong)
    status, out, clock = bench(PSROI)
    assert status == 1
    assert all(r["cupydcn ms"] == "REFUSED" for r in table_rows(out))
    assert clock.timed == []


# ---- --algorithm --------------------------------------------------------------


def test_each_algorithm_is_timed_on_its_own_rows(tmp_path):
    names = cupydcn.algorithms("deform_conv2d")
    argv = CONV + ["--psroi", "4,8,8,9,2", "--json", str(tmp_path / "r.json"),
                   "--csv", str(tmp_path / "r.csv")]
    for name in names:
        argv += ["--algorithm", name]
    status, out, clock = bench(argv)
    assert status == 0, out
    rows = table_rows(out)
    conv = [r for r in rows if r["case"].startswith("conv")]
    assert [(r["pass"], r["algorithm"]) for r in conv] == [
        (p, n) for p in ("fwd", "bwd", "fwd+bwd") for n in names]
    # TF32 is held to float16's tolerance (Implementation.forward_tolerance_as)
    assert all(r["cupydcn ms"] == "1.010" and float(r["err cupydcn"]) < (
        1e-2 if _dispatch.implementation("deform_conv2d", r["algorithm"]).forward_tolerance_as
        else 1e-5) for r in conv)
    assert [label for label in clock.timed if label.startswith("cupydcn")] == [
        f"cupydcn {n} {p}" for n in names for p in ("fwd", "bwd", "fwd+bwd")] + [
        "cupydcn reference fwd", "cupydcn reference bwd", "cupydcn reference fwd+bwd"]
    psroi = [r for r in rows if r["case"].startswith("psroi")]   # only "reference" applies
    assert [r["algorithm"] for r in psroi] == ["reference"] * 3
    document = json.loads((tmp_path / "r.json").read_text())
    assert document["settings"]["algorithms"] == list(names)
    assert [(r["algorithm"], r["algorithm_requested"]) for r in document["results"][:len(names)]] \
        == [(n, n) for n in names]
    assert document["results"][0]["cupydcn"]["algorithm"] == names[0]
    with open(tmp_path / "r.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [r["algorithm"] for r in table[:len(names)]] == list(names)


def test_the_automatic_choice_is_named_in_every_row(tmp_path):
    path = tmp_path / "r.json"
    status, out, _ = bench(CONV + ["--psroi", "4,8,8,9,2", "--json", str(path)])
    assert status == 0, out
    rows = table_rows(out)
    expected = {"conv": automatic("deform_conv2d"), "psroi": automatic("deform_psroi_pool")}
    assert [r["algorithm"] for r in rows] == [
        f"{expected[r['case'].split()[0]]} (auto)" for r in rows]
    results = json.loads(path.read_text())["results"]
    assert {r["algorithm_requested"] for r in results} == {"auto"}
    assert [r["algorithm"] for r in results] == [expected[r["spec"]["kind"]] for r in results]


def test_deterministic_reaches_every_ops_backward(tmp_path):
    path = tmp_path / "r.json"
    status, out, _ = bench(CONV + ["--psroi", "4,8,8,9,2", "--roi", "5,3,8,9,2",
                                   "--deterministic", "--json", str(path)])
    assert status == 0, out
    for row in json.loads(path.read_text())["results"]:
        chosen = automatic(row["spec"]["op"])
        backward = chosen  # the CPU's automatic choice is already deterministic
        assert row["algorithm"] == {"fwd": chosen, "bwd": backward}.get(
            row["pass"], chosen if chosen == backward else f"{chosen}+{backward}")
    options = _bench.parse_args(["--psroi", "4,8,8,9,2", "--deterministic"])
    runner = _bench.make_ops(options.cases[0], options.dtypes[0], None,
                             _bench.Baselines(None, None, (), {}), True)[0]
    assert runner.deterministic is True


def test_an_algorithm_that_cannot_run_here_is_not_applicable():
    kernels = [n for n in cupydcn.algorithms("deform_conv2d") if n != "reference"]
    if not kernels:
        pytest.skip("no kernel implementation of deform_conv2d is available here")
    status, out, clock = bench(CONV + ["--algorithm", "im2col", "--algorithm", "reference",
                                       "--deterministic"])
    assert status == 0, out
    rows = table_rows(out)
    assert [r["cupydcn ms"] for r in rows if r["algorithm"] == "im2col"] == ["n/a"] * 3
    assert "note: cupydcn algorithm im2col cannot run conv 2x4x6x7 k3 float32 here" in out
    assert "its backward is not deterministic" in out
    assert not any(label.startswith("cupydcn im2col") for label in clock.timed)


def test_algorithm_of_another_op_leaves_the_automatic_choice(capsys):
    status, out, clock = bench(PSROI + ["--algorithm", "reference", "--algorithm", "auto"])
    assert status == 0
    assert [r["algorithm"] for r in table_rows(out)][:2] == [
        "reference", f"{automatic('deform_psroi_pool')} (auto)"]
    status, out, clock = bench(CONV + ["--algorithm", "bins"])
    assert status == 0
    assert ("note: deform_conv2d has none of the algorithms asked (bins): its conv cases run "
            "the automatic choice") in out
    assert clock.timed == ["cupydcn fwd", "cupydcn bwd", "cupydcn fwd+bwd"]


def test_unknown_algorithm_is_a_usage_error(capsys):
    assert _bench.main(["--algorithm", "winograd"]) == 2
    err = capsys.readouterr().err
    assert "argument --algorithm: --algorithm 'winograd': expected auto or an implementation" in err
    for op in SPECS:
        assert f"{op}: {', '.join(cupydcn.algorithms(op))}" in err
    assert "Traceback" not in err


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "cupydcn._bench", "--list", "--case",
                             "1,8,8,8"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "conv 1x8x8x8 k3\n"


# ---- GPU tier: the implementations side by side (no speed asserted) --------


@pytest.mark.gpu
def test_gpu_algorithms_and_psroi_smoke_run(tmp_path):
    path = tmp_path / "r.json"
    out, err = io.StringIO(), io.StringIO()
    argv = ["--case", "2,16,12,13", "--psroi", "16,18,10,12,3,3", "--reps", "3", "--warmup",
            "1", "--dtype", "float32", "--no-torch", "--json", str(path)]
    for name in ("im2col", "im2col_deterministic", "bins", "bins_deterministic", "reference"):
        argv += ["--algorithm", name]
    status = _bench.main(argv, out=out, err=err)
    assert status == 0, out.getvalue()
    rows = json.loads(path.read_text())["results"]
    timed = {(r["spec"]["kind"], r["algorithm"]) for r in rows if "median_ms" in r["cupydcn"]}
    assert timed == {("conv", "im2col"), ("conv", "im2col_deterministic"), ("psroi", "bins"),
                     ("psroi", "bins_deterministic")}
    # the NumPy reference does not run on CuPy arrays: not applicable, not a failure
    assert {r["cupydcn"]["status"] for r in rows if r["algorithm"] == "reference"} == {
        "unsupported"}
