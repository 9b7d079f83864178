"""The run: for every case and dtype, the correctness gate, then the clock,
then the result rows.

Each cupydcn algorithm asked for (``--algorithm``; None: the dispatcher's
automatic choice) is one runner: it is gated, timed and reported on its own
rows, beside the comparison libraries, which are gated and timed once per
case and dtype.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import numpy

from cupydcn import _config
from cupydcn._bench import report as _report
from cupydcn._bench.cases import choose_sets, make_inputs
from cupydcn._bench.libraries import LIBRARIES, PASSES, make_ops, rel_err
from cupydcn._bench.platforms import load_baselines, tf32_mode

TF32_TOLERANCE = 1e-3   # float32 with TF32 GEMMs: a 10-bit mantissa in the products


def _stats(times):
    t = numpy.asarray(times, dtype=numpy.float64)
    p10, p25, p50, p75, p90 = numpy.percentile(t, [10, 25, 50, 75, 90])
    return {"median_ms": float(p50), "p10_ms": float(p10), "p90_ms": float(p90),
            "p25_ms": float(p25), "p75_ms": float(p75), "min_ms": float(t.min()),
            "mean_ms": float(t.mean()), "reps": int(t.size)}


def _failure(error):
    first_line = (str(error).strip().splitlines() or [""])[0][:120]
    return {"why": f"{type(error).__name__}: {first_line}"}


def case_algorithms(case, requested):
    """The cupydcn algorithms to run on ``case``: those of ``requested`` (names,
    ``"auto"`` for the automatic choice) that its op has
    (``cupydcn.algorithms``), in order; the automatic choice (None) alone when
    none was asked or none applies."""
    if not requested:
        return (None,)
    import cupydcn

    available = cupydcn.algorithms(case.op)
    chosen = [None if name == "auto" else name for name in requested
              if name == "auto" or name in available]
    return tuple(dict.fromkeys(chosen)) or (None,)


def resolve_algorithm(runner, host, platform):
    """The implementation names the dispatcher runs for ``runner`` on
    ``host``'s shapes, by pass; ``cupydcn.ArgumentError`` when the named
    algorithm cannot run this case here (a dtype, a platform, a
    ``--deterministic`` it does not meet)."""
    from cupydcn import _dispatch

    spec = runner.spec
    geo = spec.check(**runner.arguments(host))
    forward = _dispatch.choose(spec.name, platform.on_gpu, geo, runner.algorithm)[0].name
    backward = _dispatch.choose(spec.name, platform.on_gpu, geo, runner.algorithm,
                                runner.deterministic)[0].name
    both = forward if forward == backward else f"{forward}+{backward}"
    return {"fwd": forward, "bwd": backward, "fwd+bwd": both}


def bench_case(case, dtype, options, platform, baselines, clock, progress, say):
    """Gate, time and measure one case in one dtype: a list of result rows (one
    per pass and cupydcn algorithm)."""
    from cupydcn import ArgumentError, _dispatch

    tolerance = dtype.tolerance
    if options.tf32 and dtype.name == "float32":
        tolerance = max(tolerance, TF32_TOLERANCE)
    first = make_inputs(case, dtype, seed=1)
    n_sets = choose_sets(first, platform.l2_bytes, options.sets)
    host_sets = [first] + [make_inputs(case, dtype, seed=1 + k) for k in range(1, n_sets)]
    ops = make_ops(case, dtype, platform, baselines, options.deterministic,
                   case_algorithms(case, options.algorithms))
    mine = [op for op in ops if op.column == "cupydcn"]
    check = case.check_slice(first, case.sliced(baselines))

    outcome, references, names = {}, {}, {}
    for op in mine:
        try:
            names[op.key] = resolve_algorithm(op, first, platform)
        except ArgumentError as error:
            outcome[op.key] = {"status": "unsupported", "why": str(error)}
            names[op.key] = dict.fromkeys(PASSES, op.algorithm)
    for op in ops:
        if op.key in outcome:
            continue
        progress.show(f"checking {op.key}")
        previous, _config.poison = _config.poison, op.column == "cupydcn"
        try:
            got = op.results(check)
        except Exception as error:  # an unsupported dtype in a baseline, or a crash
            status = "unsupported" if op.column != "cupydcn" else "failed"
            outcome[op.key] = {"status": status, **_failure(error)}
            continue
        finally:
            _config.poison = previous
        if op.reference not in references:
            f64 = {k: None if v is None else v.astype(numpy.float64) for k, v in check.items()}
            try:
                references[op.reference] = case.reference(op.reference, f64, baselines, platform)
            except Exception as error:  # e.g. out of memory in float64: say so, go on
                references[op.reference] = _failure(error)
        ref = references[op.reference]
        if "why" in ref:
            outcome[op.key] = {"status": "failed" if op.column == "cupydcn" else "unsupported",
                               "why": f"no reference: {ref['why']}"}
            continue
        errors = {k: rel_err(v, ref[k]) if k in ref else float("inf") for k, v in got.items()}
        worst = max(errors.values())
        # an implementation held to another dtype's tolerance (TF32), as check does
        limit = tolerance
        if op.column == "cupydcn" and op.algorithm is not None:
            limit = max(tolerance, _dispatch.implementation(
                op.spec.name, op.algorithm).forward_tolerance(dtype))
        ok = worst <= limit
        outcome[op.key] = {
            "status": "ok" if ok else ("refused" if op.column == "cupydcn" else "inaccurate"),
            "max_rel_err": worst, "rel_err": errors, "tolerance": limit,
            "reference": case.reference_name(op.reference, baselines)}
    parts = []
    for op in ops:
        o = outcome[op.key]
        if "max_rel_err" in o:
            mark = "" if o["status"] == "ok" else f" {o['status'].upper()}"
            parts.append(f"{op.key} {o['max_rel_err']:.1e}{mark}")
        else:
            parts.append(f"{op.key} {o['status']} ({o['why']})")
    against = case.reference_name(ops[0].reference, baselines)
    say(f"  {case.name} {dtype.name}: max rel. error {', '.join(parts)} "
        f"(tolerance {tolerance:.0e}; against {against})")

    timings = {}
    for op in ops:
        if outcome[op.key]["status"] not in ("ok", "inaccurate"):
            continue
        op.load(host_sets)
        try:
            for which in PASSES:
                label = f"{op.key} {which}"
                progress.show(label)
                op.before(which)
                times = clock.time(lambda i, w=which: op.run(w, i), library=op.library,
                                   sets=n_sets, warmup=options.warmup, reps=options.reps,
                                   label=label)
                peak = clock.peak_bytes(lambda w=which: op.run(w, 0), library=op.library,
                                        label=label)
                timings[op.key, which] = {**_stats(times), "peak_bytes": int(peak)}
        finally:
            op.unload()
            platform.free_memory()

    def entry(op, which):
        found = dict(outcome[op.key], label=op.label)
        if op.algorithm is not None:
            found["algorithm"] = op.algorithm
        found.update(timings.get((op.key, which), {}))
        return found

    baseline_ops = {op.column: op for op in ops if op.column != "cupydcn"}
    rows = []
    flop = case.gemm_flop()
    for which in PASSES:
        gflop = None if flop is None else flop * (1, 2, 3)[PASSES.index(which)] / 1e9
        for op in mine:
            row = {"case": case.name, "spec": case.spec(), "dtype": dtype.name, "pass": which,
                   "algorithm": names[op.key][which],
                   "algorithm_requested": op.algorithm or "auto",
                   "tf32": bool(options.tf32), "deterministic": bool(options.deterministic),
                   "sets": n_sets, "warmup": options.warmup, "gemm_gflop": gflop}
            for column in LIBRARIES:
                runner = op if column == "cupydcn" else baseline_ops.get(column)
                row[column] = None if runner is None else entry(runner, which)
                if row[column] and gflop and "median_ms" in row[column]:
                    row[column]["tflops"] = gflop / row[column]["median_ms"]
            ours = (row["cupydcn"] or {}).get("median_ms")
            theirs = (row["torchvision"] or {}).get("median_ms")
            dense = (row["dense"] or {}).get("median_ms")
            row["speedup_vs_torchvision"] = theirs / ours if ours and theirs else None
            row["times_dense"] = ours / dense if ours and dense else None
            rows.append(row)
    return rows


class Report(NamedTuple):
    environment: dict
    rows: list
    notes: list
    exit_status: int


def _algorithm_notes(options):
    """Which cases run the automatic choice because their op has none of the
    algorithms asked for."""
    notes = []
    if not options.algorithms:
        return notes
    asked = ", ".join(options.algorithms)
    for kind, cases in _by_kind(options.cases).items():
        if case_algorithms(cases[0], options.algorithms) == (None,) \
                and "auto" not in options.algorithms:
            notes.append(f"{cases[0].op} has none of the algorithms asked ({asked}): its "
                         f"{kind} cases run the automatic choice")
    return notes


def _by_kind(cases):
    kinds = {}
    for case in cases:
        kinds.setdefault(case.kind, []).append(case)
    return kinds


def run(options, platform, out=None, err=None):
    """Run every case, dtype and algorithm of ``options`` on ``platform``;
    print the table."""
    out = out or sys.stdout
    err = err or sys.stderr
    baselines = load_baselines(platform, options.torch)
    clock = platform.make_clock(baselines.torch)
    notes = list(baselines.notes) + _algorithm_notes(options)
    rows = []
    progress = _report.Progress(len(options.cases) * len(options.dtypes), err)

    def say(line):
        progress.clear()
        print(line, file=out, flush=True)
        progress.show("")

    with tf32_mode(platform, baselines.torch, options.tf32) as tf32_state:
        env = _report.environment(platform, baselines, tf32_state, clock)
        for line in _report.environment_lines(env):
            print(line, file=out)
        for line in notes:
            print(f"note: {line}", file=out)
        print("\ncorrectness gate (relative norm error against float64; cupydcn is timed only "
              "under its dtype's tolerance):", file=out, flush=True)
        for case in options.cases:
            for dtype in options.dtypes:
                progress.begin(f"{case.name} {dtype.name}")
                rows.extend(bench_case(case, dtype, options, platform, baselines, clock,
                                       progress, say))
                progress.advance()
    progress.close()
    row_env = {k: env.get(k) for k in _report.ROW_ENV}
    for row in rows:
        row["env"] = row_env
    table_notes = _report.table_notes(rows)
    notes.extend(table_notes)
    print("", file=out)
    print(_report.format_table(rows), file=out)
    print(f"\ntimes: median [p10-p90] of {options.reps} calls after {options.warmup} warm-up "
          f"calls, {_report.clock_name(clock)}, input sets rotated; algorithm: the cupydcn "
          f"implementation that ran (cupydcn.algorithms); MiB: peak extra memory of one call "
          f"(each library's allocator); speed-up = torchvision / cupydcn; x dense = cupydcn / "
          f"dense cuDNN conv2d of the same shape (the floor)", file=out)
    for note in table_notes:
        print(f"note: {note}", file=out)
    bad = [r for r in rows if (r["cupydcn"] or {}).get("status") in ("refused", "failed")]
    status = 1 if bad else 0
    if bad:
        print(f"\n{len({(r['case'], r['dtype']) for r in bad})} case(s) refused: cupydcn's "
              "result is wrong, no time is posted", file=out)
    out.flush()
    return Report(env, rows, notes, status)
