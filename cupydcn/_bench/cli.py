"""The command line of ``cupydcn bench``: arguments, options, the entry point."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NamedTuple

from cupydcn import _dtypes
from cupydcn._bench import report as _report
from cupydcn._bench.cases import (MAX_SETS, QUICK_SUITE, SUITE, ConvCase, PSRoICase, RoICase,
                                  parse_case, parse_psroi, parse_roi)
from cupydcn._bench.platforms import detect_gpu
from cupydcn._bench.runner import run

DEFAULT_REPS, DEFAULT_WARMUP = 100, 10
QUICK_REPS, QUICK_WARMUP = 20, 3

_DTYPE_ALIASES = {"f32": "float32", "fp32": "float32", "f16": "float16", "fp16": "float16",
                  "half": "float16", "bf16": "bfloat16", "f64": "float64", "fp64": "float64"}


def parse_dtype(text):
    """The dtype table row named ``text`` (float32, float16, bfloat16, float64, or f32, bf16...)."""
    name = _DTYPE_ALIASES.get(str(text).lower(), str(text).lower())
    rows = {row.name: row for row in _dtypes.DTYPES.values()}
    if name not in rows:
        hint = "" if _dtypes.ml_dtypes is not None else " (bfloat16 needs ml_dtypes)"
        raise argparse.ArgumentTypeError(
            f"--dtype {text!r}: expected one of {', '.join(rows)}{hint}")
    return rows[name]


def parse_algorithm(text):
    """``auto`` or the name of an implementation of some op
    (``cupydcn.algorithms(op)`` for each op of ``cupydcn._ops.SPECS``)."""
    import cupydcn
    from cupydcn._ops import SPECS

    name = str(text).strip()
    table = {op: cupydcn.algorithms(op) for op in SPECS}
    if name == "auto" or any(name in names for names in table.values()):
        return name
    listing = "; ".join(f"{op}: {', '.join(names)}" for op, names in table.items())
    raise argparse.ArgumentTypeError(
        f"--algorithm {text!r}: expected auto or an implementation of cupydcn.algorithms(op) "
        f"({listing})")


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def build_parser():
    parser = argparse.ArgumentParser(
        prog="cupydcn bench",
        description="Time cupydcn's deformable convolution, deformable RoI pooling and "
                    "deformable PS RoI pooling (forward, backward, forward+backward) on the "
                    "GPU, beside torchvision.ops.deform_conv2d, the dense cuDNN conv2d of the "
                    "same shape and torchvision.ops.roi_align, after checking every op "
                    "against a float64 reference.",
        epilog=f"--case {ConvCase.syntax}: defaults Cout=C, k=3, stride=1, same padding, "
               "dil=1, groups=1, dg=1, DCNv2 with bias; pairs as 3x1. "
               f"--roi {RoICase.syntax}: defaults 7x7 bins, 2 images, sampling 0 (adaptive), "
               "modulated, spatial scale 1/16. "
               f"--psroi {PSRoICase.syntax}: C = output_dim*group**2; defaults 7x7 bins, "
               "group 1, 2 images, 4x4 samples per bin, a class-agnostic trans with "
               "trans_std 0.1, spatial scale 1/16. Given cases replace the built-in suite "
               "(--suite keeps it). Exit status: 0 all good, 1 no GPU or a cupydcn result "
               "refused by the correctness gate, 2 bad arguments.")
    parser.add_argument("--case", action="append", type=parse_case, default=[],
                        metavar=ConvCase.syntax, help="a deformable convolution case (repeatable)")
    parser.add_argument("--roi", action="append", type=parse_roi, default=[],
                        metavar=RoICase.syntax, help="a RoI pooling case (repeatable)")
    parser.add_argument("--psroi", action="append", type=parse_psroi, default=[],
                        metavar=PSRoICase.syntax,
                        help="a position-sensitive RoI pooling case (repeatable)")
    parser.add_argument("--suite", action="store_true",
                        help="run the built-in suite as well as the given cases")
    parser.add_argument("--dtype", action="append", type=parse_dtype, default=[],
                        help="float32, float16, bfloat16 or float64 (repeatable; default "
                             "float32, float16 and bfloat16, float32 alone with --quick)")
    parser.add_argument("--algorithm", action="append", type=parse_algorithm, default=[],
                        metavar="NAME",
                        help="a cupydcn implementation to time, from cupydcn.algorithms(op), "
                             "or auto (the dispatcher's choice); repeatable, each timed on "
                             "its own rows. A case whose op has none of the names given runs "
                             "the automatic choice (default: auto)")
    parser.add_argument("--tf32", action="store_true",
                        help="let float32 GEMMs and convolutions use TF32, in cupydcn (CuPy's "
                             "cuBLAS compute type) and in torch alike (float32 tolerance 1e-3)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: a smaller suite, {QUICK_REPS} reps, "
                             f"{QUICK_WARMUP} warm-up calls")
    parser.add_argument("--reps", type=_positive,
                        help=f"timed calls per op and pass (default {DEFAULT_REPS})")
    parser.add_argument("--warmup", type=_non_negative,
                        help=f"untimed calls first (default {DEFAULT_WARMUP})")
    parser.add_argument("--sets", type=_positive,
                        help="distinct input sets rotated between calls (default: enough to "
                             f"cover twice the L2 cache, 2 to {MAX_SETS})")
    parser.add_argument("--deterministic", action="store_true",
                        help="time cupydcn's backwards with deterministic=True (no "
                             "floating-point atomics; the automatic choice picks a "
                             "deterministic implementation): their cost")
    parser.add_argument("--no-torch", action="store_true",
                        help="time cupydcn alone even where torch is installed")
    parser.add_argument("--json", metavar="PATH", help="write every result as JSON")
    parser.add_argument("--csv", metavar="PATH", help="write every result as CSV")
    parser.add_argument("--plot", metavar="PATH",
                        help="write a PNG chart of the speed-ups (needs matplotlib)")
    parser.add_argument("--list", action="store_true",
                        help="print the cases that would run and exit")
    return parser


class Options(NamedTuple):
    cases: tuple
    dtypes: tuple
    tf32: bool
    reps: int
    warmup: int
    sets: object
    torch: bool
    json: object
    csv: object
    plot: object
    list: bool
    quick: bool
    deterministic: bool = False
    algorithms: tuple = ()    # names given with --algorithm; () means the automatic choice


def parse_args(argv):
    """:class:`Options` from the command line; argparse's SystemExit on errors."""
    ns = build_parser().parse_args(argv)
    given = [*ns.case, *ns.roi, *ns.psroi]
    suite = QUICK_SUITE if ns.quick else SUITE
    cases = tuple(dict.fromkeys([*given, *(suite if ns.suite or not given else ())]))
    if ns.dtype:
        dtypes = tuple(dict.fromkeys(ns.dtype))
    else:
        names = ("float32",) if ns.quick else ("float32", "float16", "bfloat16")
        rows = {row.name: row for row in _dtypes.DTYPES.values()}
        dtypes = tuple(rows[n] for n in names if n in rows)
    reps = ns.reps or (QUICK_REPS if ns.quick else DEFAULT_REPS)
    warmup = ns.warmup if ns.warmup is not None else (QUICK_WARMUP if ns.quick else DEFAULT_WARMUP)
    return Options(cases, dtypes, ns.tf32, reps, warmup, ns.sets, not ns.no_torch, ns.json,
                   ns.csv, ns.plot, ns.list, ns.quick, ns.deterministic,
                   tuple(dict.fromkeys(ns.algorithm)))


def main(argv=None, *, platform=None, out=None, err=None):
    """``cupydcn bench ARGS``; returns the exit status (see ``--help``).

    ``platform`` replaces the GPU (the CPU test tier passes a
    :class:`~cupydcn._bench.platforms.CpuPlatform` with a fake clock)."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        options = parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else 2
    if options.list:
        for case in options.cases:
            print(case.name, file=out)
        return 0
    try:
        if options.plot:
            _report.import_pyplot()
    except _report.UsageError as error:
        print(f"cupydcn bench: {error}", file=err)
        return 2
    if platform is None:
        platform, why = detect_gpu()
        if platform is None:
            print(f"cupydcn bench: {why}", file=err)
            return 1
    result = run(options, platform, out, err)
    for flag, writer in ((options.json, lambda p: _report.write_json(p, result, options)),
                         (options.csv, lambda p: _report.write_csv(p, result)),
                         (options.plot, lambda p: _report.write_plot(p, result))):
        if flag:
            writer(flag)
            print(f"wrote {os.fspath(flag)}", file=out)
    return result.exit_status
