"""``cupydcn bench``: time cupydcn against torchvision and cuDNN on the GPU.

A program, not a test (STYLE.md habit 8). For every case, dtype and cupydcn
algorithm it

1. draws several distinct input sets (random, never zeros) and rotates among
   them from one repetition to the next, so that the L2 cache does not flatter;
2. runs every op once, forward and backward, and compares each output and
   gradient with a float64 reference (torchvision on float64 inputs, or the
   NumPy reference ``cupydcn.reference`` on a slice of the batch or the RoIs):
   ``||got - ref|| / ||ref||``, the largest over the op's results. A cupydcn
   result above the dtype's tolerance (``_dtypes.DTYPES[...].tolerance``) is
   refused: it is not timed, the table says so and the exit status is 1.
   Baselines above it are timed and flagged;
3. times forward, backward and forward+backward through a clock (CUDA events
   around each call after a warm-up; median and p10-p90) and measures the
   peak extra memory of one call with each library's own allocator;

then prints a table (a progress bar on stderr) and writes JSON, CSV and a PNG
chart on request. Every row names the cupydcn implementation that ran
(``--algorithm``, from ``cupydcn.algorithms(op)``; the dispatcher's choice by
default), and every result records the GPU, driver, CUDA, CuPy, torch and
torchvision versions.

The package, one concern per module:

- :mod:`.cli`: the command line (argparse), :class:`Options`, :func:`main`;
- :mod:`.cases`: one class per op kind (:class:`ConvCase`, :class:`RoICase`,
  :class:`PSRoICase`): inputs, parameters, comparison libraries and
  references, driven from ``cupydcn._ops.SPECS``; the built-in suites;
- :mod:`.libraries`: how cupydcn (per algorithm) and the torch comparison
  libraries run a case, and the relative error;
- :mod:`.clock`: CUDA-event timing (:class:`CudaClock`) and the made-up times
  of the CPU test tier (:class:`FakeClock`);
- :mod:`.platforms`: the GPU or the CPU, the comparison libraries usable
  there, TF32;
- :mod:`.runner`: the correctness gate, the timing loop, the rows;
- :mod:`.report`: the progress bar, the table, JSON, CSV, PNG.

Adding an op kind is one case class in :mod:`.cases` (and its line in the
suites); a new implementation of an op needs nothing here.
"""

from cupydcn._bench.cases import (MAX_SETS, QUICK_SUITE, ROI_CHECK, SUITE, Comparison,
                                  ConvCase, PSRoICase, RoICase, choose_sets, make_inputs,
                                  parse_case, parse_psroi, parse_roi)
from cupydcn._bench.cli import (DEFAULT_REPS, DEFAULT_WARMUP, QUICK_REPS, QUICK_WARMUP, Options,
                                build_parser, main, parse_algorithm, parse_args, parse_dtype)
from cupydcn._bench.clock import CudaClock, FakeClock
from cupydcn._bench.libraries import (LIBRARIES, PASSES, CupydcnRunner, TorchRunner, make_ops,
                                      rel_err, to_host64)
from cupydcn._bench.platforms import (Baselines, CpuPlatform, GpuPlatform, detect_gpu,
                                      load_baselines, tf32_mode)
from cupydcn._bench.report import (TABLE_COLUMNS, Progress, UsageError, csv_header,
                                   format_table, write_csv, write_json, write_plot)
from cupydcn._bench.runner import TF32_TOLERANCE, Report, bench_case, case_algorithms, run

__all__ = [
    "Baselines", "Comparison", "ConvCase", "CpuPlatform", "CudaClock", "CupydcnRunner",
    "DEFAULT_REPS", "DEFAULT_WARMUP", "FakeClock", "GpuPlatform", "LIBRARIES",
    "MAX_SETS", "Options", "PASSES", "PSRoICase", "Progress", "QUICK_REPS", "QUICK_SUITE",
    "QUICK_WARMUP", "ROI_CHECK", "Report", "RoICase", "SUITE", "TABLE_COLUMNS",
    "TF32_TOLERANCE", "TorchRunner", "UsageError", "bench_case", "build_parser",
    "case_algorithms", "choose_sets", "csv_header", "detect_gpu", "format_table",
    "load_baselines", "main", "make_inputs", "make_ops", "parse_algorithm", "parse_args",
    "parse_case", "parse_dtype", "parse_psroi", "parse_roi", "rel_err", "run", "tf32_mode",
    "to_host64", "write_csv", "write_json", "write_plot",
]
