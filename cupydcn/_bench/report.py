"""What the bench shows and writes: the progress bar, the environment lines,
the table and its notes, JSON, CSV and the PNG chart.

A result row is one case, dtype, pass and cupydcn algorithm; it holds one
entry per library column (``cupydcn``, ``torchvision``, ``dense``: status,
errors, times, memory, or None where the library has no such op).
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import pathlib
import platform as _platform

import numpy

from cupydcn import _config
from cupydcn._bench.libraries import LIBRARIES, PASSES

_MIB = 2.0**20
ROW_ENV = ("gpu", "driver", "cuda_runtime", "cupy", "torch", "torchvision", "cupydcn")


class UsageError(Exception):
    """A bad command line: one line for the user, exit status 2."""


class Progress:
    """A one-line progress bar on a terminal; one line per item otherwise."""

    def __init__(self, total, stream):
        self.total, self.stream, self.done = max(total, 1), stream, 0
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.width = 0
        self.item = ""

    def begin(self, text):
        self.item = text
        if self.tty:
            self.show("")
        else:
            print(f"[{self.done + 1}/{self.total}] {text}", file=self.stream, flush=True)

    def show(self, detail):
        if not self.tty:
            return
        filled = round(24 * self.done / self.total)
        line = (f"[{'#' * filled}{'.' * (24 - filled)}] {self.done}/{self.total} {self.item}"
                f"{': ' + detail if detail else ''}")[:150]
        self.stream.write("\r" + line.ljust(self.width))
        self.stream.flush()
        self.width = len(line)

    def clear(self):
        if self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0

    def advance(self):
        self.done += 1
        self.show("")

    def close(self):
        self.clear()


# ---------------------------------------------------------------------------
# The environment
# ---------------------------------------------------------------------------


def clock_name(clock):
    return getattr(clock, "name", type(clock).__name__)


def environment(platform, baselines, tf32_state, clock):
    import cupydcn
    from cupydcn import _dispatch

    cpu_backend, why = _dispatch.cpu_backend_reason()
    env = {"cupydcn": cupydcn.__version__, "numpy": numpy.__version__,
           "python": _platform.python_version(), "os": _platform.platform(),
           "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "clock": clock_name(clock),
           "workspace_limit_bytes": _config.get_workspace_limit(),
           "cpu_backend": f"{cpu_backend} ({why})"}
    env.update(platform.device_info())
    env.update(baselines.versions)
    env["tf32"] = tf32_state
    return env


def environment_lines(env):
    lines = [f"cupydcn {env['cupydcn']}, NumPy {env['numpy']}, Python {env['python']}, "
             f"CuPy {env['cupy'] or 'not installed'}",
             f"device: {env['device']}"]
    if env.get("gpu"):
        lines.append(f"driver {env['driver']}, CUDA runtime {env['cuda_runtime']}, "
                     f"NVRTC {env['nvrtc']}, {env['gpu_memory_gib']} GiB, "
                     f"L2 {env['l2_cache_mib']} MiB")
    else:
        lines.append(f"CPU backend: {env['cpu_backend']}")
    lines.append(f"torch {env['torch'] or '-'} (CUDA {env['torch_cuda'] or '-'}, cuDNN "
                 f"{env['cudnn'] or '-'}), torchvision {env['torchvision'] or '-'}")
    tf32 = env["tf32"]
    lines.append(f"TF32 {'on' if tf32['enabled'] else 'off'}: CuPy float32 GEMMs "
                 f"{tf32['cupy_float32_compute_type']}"
                 + (f"; torch {tf32['torch']}" if tf32.get("torch") else ""))
    return lines


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------


def table_notes(rows):
    notes = []
    for column in ("torchvision", "dense"):
        missing = {}
        for row in rows:
            o = row[column]
            if o and o["status"] == "unsupported":
                missing.setdefault(row["dtype"], o["why"])
        for dtype, why in missing.items():
            notes.append(f"{column} has no {dtype} here: n/a in the table ({why})")
    cannot = {}
    for row in rows:
        o = row["cupydcn"]
        if o and o["status"] == "unsupported":
            cannot.setdefault((row["algorithm"], row["case"], row["dtype"]), o["why"])
    for (algorithm, case, dtype), why in cannot.items():
        notes.append(f"cupydcn algorithm {algorithm} cannot run {case} {dtype} here: n/a in "
                     f"the table ({why})")
    if any(r["spec"]["kind"] == "roi" and r["torchvision"] for r in rows):
        notes.append("RoI rows: torchvision = roi_align(aligned=True), without offset or "
                     "mask; cupydcn's backward also computes the offset and mask gradients")
    if any(r["spec"]["kind"] == "psroi" for r in rows):
        notes.append("PS RoI rows: cupydcn alone (torchvision's ps_roi_align is neither "
                     "deformable nor the DCN operator's sampling)")
    flagged = {(r["case"], r["dtype"], c) for r in rows for c in ("torchvision", "dense")
               if r[c] and r[c]["status"] == "inaccurate"}
    for case, dtype, column in sorted(flagged):
        notes.append(f"{column} on {case} {dtype} is above the tolerance (err marked !): "
                     "timed anyway, it is the baseline")
    return notes


def _ms(entry):
    if entry is None:
        return "-"
    if "median_ms" in entry:
        return f"{entry['median_ms']:.3f}"
    return {"unsupported": "n/a", "refused": "REFUSED", "failed": "FAILED"}.get(
        entry["status"], entry["status"])


def _spread(entry):
    if entry and "median_ms" in entry:
        return f"{entry['p10_ms']:.3f}-{entry['p90_ms']:.3f}"
    return "-"


def _mib(entry):
    if entry and "peak_bytes" in entry:
        return f"{entry['peak_bytes'] / _MIB:.1f}"
    return "-"


def _err(entry):
    if entry is None or "max_rel_err" not in entry:
        return "-"
    return f"{entry['max_rel_err']:.1e}" + ("" if entry["status"] == "ok" else "!")


TABLE_COLUMNS = ("case", "dtype", "pass", "algorithm", "cupydcn ms", "p10-p90",
                 "torchvision ms", "dense ms", "speed-up", "x dense", "MiB cupydcn", "MiB tv",
                 "MiB dense", "err cupydcn", "err tv", "err dense")
_LEFT = 4   # case, dtype, pass, algorithm are left-aligned, numbers right-aligned


def table_cells(row):
    c, t, d = row["cupydcn"], row["torchvision"], row["dense"]
    algorithm = row["algorithm"] + (" (auto)" if row["algorithm_requested"] == "auto" else "")
    return (row["case"], row["dtype"], row["pass"], algorithm, _ms(c), _spread(c),
            _ms(t), _ms(d),
            f"{row['speedup_vs_torchvision']:.2f}x" if row["speedup_vs_torchvision"] else "-",
            f"{row['times_dense']:.2f}x" if row["times_dense"] else "-",
            _mib(c), _mib(t), _mib(d), _err(c), _err(t), _err(d))


def format_table(rows):
    cells = [TABLE_COLUMNS] + [table_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(TABLE_COLUMNS))]

    def fmt(line):
        return "  ".join(v.ljust(w) if i < _LEFT else v.rjust(w)
                         for i, (v, w) in enumerate(zip(line, widths))).rstrip()

    rule = "-" * len(fmt(cells[0]))
    return "\n".join([fmt(cells[0]), rule, *(fmt(line) for line in cells[1:])])


# ---------------------------------------------------------------------------
# Files: JSON, CSV, PNG
# ---------------------------------------------------------------------------


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _prepare(path):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path, report, options):
    settings = {"reps": options.reps, "warmup": options.warmup, "sets": options.sets,
                "tf32": options.tf32, "quick": options.quick,
                "deterministic": options.deterministic,
                "algorithms": list(options.algorithms) or ["auto"],
                "dtypes": [d.name for d in options.dtypes],
                "cases": [c.spec() | {"name": c.name} for c in options.cases],
                "passes": list(PASSES)}
    document = {"tool": "cupydcn bench", "schema": 1, "environment": report.environment,
                "settings": settings, "results": report.rows, "notes": report.notes,
                "exit_status": report.exit_status}
    _prepare(path).write_text(json.dumps(_jsonable(document), indent=1) + "\n")


CSV_LIBRARY_FIELDS = ("status", "median_ms", "p10_ms", "p90_ms", "peak_mib", "max_rel_err")


def csv_header():
    head = ["case", "kind", "dtype", "pass", "algorithm", "algorithm_requested", "tf32", "sets",
            "gemm_gflop"]
    for column in LIBRARIES:
        head += [f"{column}_{f}" for f in CSV_LIBRARY_FIELDS]
    return head + ["speedup_vs_torchvision", "times_dense", *ROW_ENV]


def write_csv(path, report):
    with open(_prepare(path), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(csv_header())
        for row in report.rows:
            line = [row["case"], row["spec"]["kind"], row["dtype"], row["pass"],
                    row["algorithm"], row["algorithm_requested"], row["tf32"], row["sets"],
                    row["gemm_gflop"]]
            for column in LIBRARIES:
                entry = row[column] or {}
                values = dict(entry)
                if "peak_bytes" in entry:
                    values["peak_mib"] = round(entry["peak_bytes"] / _MIB, 3)
                line += [values.get(f, "") for f in CSV_LIBRARY_FIELDS]
            line += [row["speedup_vs_torchvision"], row["times_dense"]]
            line += [row["env"].get(k) for k in ROW_ENV]
            writer.writerow(["" if v is None else v for v in line])


def import_pyplot():
    """matplotlib's pyplot on the Agg backend; UsageError when it is missing."""
    try:
        import matplotlib
    except ImportError as error:
        raise UsageError(f"--plot needs matplotlib ({error}); install it "
                         "(python -m pip install matplotlib) or drop --plot") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def write_plot(path, report):
    """Bars of the speed-up over torchvision and of the fraction of the dense
    floor reached (dense time / cupydcn time), per case, pass (and algorithm
    when the run has several), one colour per dtype."""
    pyplot = import_pyplot()
    rows = report.rows
    several = len({r["algorithm"] for r in rows}) > 1

    def label(r):
        return f"{r['case']}\n{r['pass']}" + (f" {r['algorithm']}" if several else "")

    labels = list(dict.fromkeys(label(r) for r in rows))
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    panels = (("speedup_vs_torchvision", "torchvision time / cupydcn time (>1: cupydcn faster)"),
              ("times_dense", "dense cuDNN time / cupydcn time (1 = the floor)"))
    size = (max(8.0, 0.55 * len(labels) * len(dtypes) + 3), 9)
    figure, axes = pyplot.subplots(2, 1, figsize=size, squeeze=False)
    width = 0.8 / max(len(dtypes), 1)
    for ax, (key, title) in zip(axes[:, 0], panels):
        drawn = False
        for k, dtype in enumerate(dtypes):
            xs, ys = [], []
            for r in rows:
                value = r[key]
                if r["dtype"] == dtype and value:
                    shift = (k - (len(dtypes) - 1) / 2) * width
                    xs.append(labels.index(label(r)) + shift)
                    ys.append(value if key == "speedup_vs_torchvision" else 1.0 / value)
            if xs:
                ax.bar(xs, ys, width=width, label=dtype, color=f"C{k}")
                drawn = True
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no baseline in this run", transform=ax.transAxes, ha="center")
    env = report.environment
    figure.suptitle(f"cupydcn {env['cupydcn']} on {env['device']}, TF32 "
                    f"{'on' if env['tf32']['enabled'] else 'off'}; torch {env['torch'] or '-'}, "
                    f"torchvision {env['torchvision'] or '-'}", fontsize=10)
    figure.tight_layout()
    figure.savefig(_prepare(path), dpi=110)
    pyplot.close(figure)
