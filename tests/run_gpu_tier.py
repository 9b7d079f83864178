"""Run the GPU test tier and print a short summary.

    PYTHONPATH=. python tests/run_gpu_tier.py [extra pytest args]

Runs every test marked ``gpu`` (``-m gpu``), with the measured relative errors
logged to a JSON-lines file, then prints the GPU, the number of cases, and the
worst relative error per dtype and op against the dtype's tolerance. Logs go to
``$OUT`` when it is set (the lent GPU machine's output folder), else a temporary
folder. The exit status is pytest's.
"""

import collections
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main(argv):
    out = pathlib.Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="cupydcn-gpu-"))
    out.mkdir(parents=True, exist_ok=True)
    errors = out / "gpu_errors.jsonl"
    errors.unlink(missing_ok=True)
    junit = out / "gpu_tier.xml"
    env = {**os.environ, "CUPYDCN_ERROR_LOG": str(errors)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with open(out / "gpu_tier.log", "w") as log:
        status = subprocess.call(
            [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", f"--junitxml={junit}",
             *argv], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    tail = (out / "gpu_tier.log").read_text().strip().splitlines()[-1:]

    sys.path.insert(0, str(ROOT))
    from cupydcn import _check, _dtypes

    lines, _, _ = _check.environment()
    worst = collections.defaultdict(float)
    counts = collections.Counter()
    if errors.exists():
        for line in errors.read_text().splitlines():
            row = json.loads(line)
            key = (row["dtype"], row["op"])
            worst[key] = max(worst[key], row["err"])
            counts[key] += 1
    tolerance = {row.name: row.tolerance for row in _dtypes.DTYPES.values()}
    print("\n".join(lines))
    print(f"pytest -m gpu: {tail[0] if tail else 'no output'} (log: {out / 'gpu_tier.log'})")
    print(f"{'dtype':<10}{'op':<34}{'cases':>6}{'worst rel. err':>16}{'tolerance':>11}")
    for (dtype, op), err in sorted(worst.items()):
        print(f"{dtype:<10}{op:<34}{counts[dtype, op]:>6}{err:>16.2e}{tolerance.get(dtype, 0):>11.0e}")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
