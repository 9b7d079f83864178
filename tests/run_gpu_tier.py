"""Run the GPU test tier and print a short summary.

    PYTHONPATH=. python tests/run_gpu_tier.py [--budget S] [--per-test S] [pytest args]

Runs every test marked ``gpu`` (``pytest -m gpu -v -s`` with ``PYTHONUNBUFFERED=1``,
so the log names the test that was running if the run is cut short), with the
measured relative errors logged to a JSON-lines file. ``--per-test`` (default
150 s) becomes pytest-timeout's ``--timeout`` where that plugin is importable;
``--budget`` bounds the whole run: past it pytest is interrupted (it still
reports what ran), then killed, and the tier fails. Then prints the tier's result line (``gpu tier: PASS|FAIL|TIMEOUT
...``, the counts from the JUnit XML), the skip reasons, and the worst relative
error per dtype and op against the dtype's tolerance.

Logs go to ``$OUT`` when it is set (the lent GPU machine's output folder), else
a temporary folder: gpu_tier.log (pytest's output), gpu_tier.xml (JUnit),
gpu_errors.jsonl, gpu_tier_summary.json. Exit status: pytest's; 124 when the
budget ran out; 1 when pytest passed but no GPU test passed (all skipped: a
tier that checked nothing is not a pass).
"""

import argparse
import collections
import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree

ROOT = pathlib.Path(__file__).resolve().parent.parent


def pytest_command(junit, per_test, extra):
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-s", "-rfEs",
               "--durations=15", f"--junitxml={junit}"]
    if per_test and importlib.util.find_spec("pytest_timeout") is not None:
        command.append(f"--timeout={per_test}")
    return [*command, *extra]


def run_pytest(command, log_path, env, budget, grace=10):
    """pytest's exit status, or 124 when ``budget`` seconds passed first: then
    pytest is interrupted (SIGINT: it stops, reports and writes its JUnit XML),
    and ``grace`` seconds later its process group is killed."""
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        try:
            return process.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            log.write(f"\n[run_gpu_tier] budget of {budget} s spent: pytest stopped\n")
            return 124


def junit_counts(path):
    """(counts by outcome, skip reasons by count) from pytest's JUnit XML."""
    counts = collections.Counter()
    reasons = collections.Counter()
    if not path.exists():
        return counts, reasons
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "errors"}.get(child.tag, "skipped")
                if child.tag == "skipped":
                    reasons[(child.get("message") or "").removeprefix("Skipped: ")[:160]] += 1
                break
        counts[outcome] += 1
    return counts, reasons


def last_test_started(log_path):
    """The last test pytest -v named in the log (the one running when it was killed)."""
    started = [line.split(" ", 1)[0] for line in log_path.read_text(errors="replace").splitlines()
               if "::" in line and line.startswith("tests/")]
    return started[-1] if started else None


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole tier (default: no limit)")
    parser.add_argument("--per-test", type=int, default=150,
                        help="pytest-timeout's limit per test, where it is installed (0: none)")
    options, extra = parser.parse_known_args(argv)

    out = pathlib.Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="cupydcn-gpu-"))
    out.mkdir(parents=True, exist_ok=True)
    errors = out / "gpu_errors.jsonl"
    errors.unlink(missing_ok=True)
    junit, log_path = out / "gpu_tier.xml", out / "gpu_tier.log"
    junit.unlink(missing_ok=True)
    env = {**os.environ, "CUPYDCN_ERROR_LOG": str(errors), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = pytest_command(junit, options.per_test, extra)
    began = time.monotonic()
    status = run_pytest(command, log_path, env, options.budget)
    seconds = time.monotonic() - began

    sys.path.insert(0, str(ROOT))
    from cupydcn import _check, _dtypes

    print("\n".join(_check.environment()[0]))
    counts, reasons = junit_counts(junit)
    if status == 0 and counts["passed"] == 0:
        status = 1  # every GPU test skipped (no GPU seen) or none collected
    verdict = "PASS" if status == 0 else "TIMEOUT" if status == 124 else "FAIL"
    numbers = ", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "errors", "skipped"))
    timeout_note = "" if "--timeout=" in " ".join(command) else ", no per-test limit " \
        "(pytest-timeout not installed)"
    print(f"gpu tier: {verdict} (pytest exit {status}): {numbers} in {seconds:.0f} s"
          f"{timeout_note}; log {log_path}")
    if status == 124:
        print(f"  stopped after the {options.budget:.0f} s budget while running: "
              f"{last_test_started(log_path) or 'unknown'}")
    for reason, count in reasons.most_common(8):
        print(f"  skipped {count} x: {reason}")

    worst = collections.defaultdict(float)
    cases = collections.Counter()
    if errors.exists():
        for line in errors.read_text().splitlines():
            row = json.loads(line)
            key = (row["dtype"], row["op"])
            worst[key] = max(worst[key], row["err"])
            cases[key] += 1
    tolerance = {row.name: row.tolerance for row in _dtypes.DTYPES.values()}
    if worst:
        print(f"{'dtype':<10}{'op':<44}{'cases':>6}{'worst rel. err':>16}{'tolerance':>11}")
    for (dtype, op), err in sorted(worst.items()):
        print(f"{dtype:<10}{op:<44}{cases[dtype, op]:>6}{err:>16.2e}"
              f"{tolerance.get(dtype, 0):>11.0e}")
    (out / "gpu_tier_summary.json").write_text(json.dumps({
        "verdict": verdict, "exit_status": status, "seconds": round(seconds, 1),
        "counts": dict(counts), "skip_reasons": dict(reasons), "command": command,
        "worst_rel_err": [{"dtype": d, "op": o, "cases": cases[d, o], "err": e,
                           "tolerance": tolerance.get(d)} for (d, o), e in sorted(worst.items())],
    }, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
