"""The CI scripts: .ci/run runs the README's test command first, .ci/gpu is
time-bounded and reports PASS or FAIL first in a summary printed last.

.ci/gpu is run here for real where there is no GPU (it must fail fast), and
with a stand-in Python (``$PYTHON``) whose stages pass or hang, so that the
stage logic, the time limits and the summary are checked without a GPU. The
scripts live in the checkout, not in the sdist: without them these tests skip.
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CI_RUN, CI_GPU = ROOT / ".ci" / "run", ROOT / ".ci" / "gpu"

pytestmark = [
    pytest.mark.skipif(not CI_GPU.is_file(), reason="not a checkout: .ci/ is not here"),
    pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                       reason="the CI scripts need bash and coreutils' timeout"),
]


def _gpu_visible():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, no device
        return False


def run_gpu_script(tmp_path, *stages, python=sys.executable, budget=None, timeout=120):
    """(exit status, stdout, seconds) of ``bash .ci/gpu STAGES`` with $OUT = tmp_path/out."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": str(python)}
    if budget is not None:
        env["CUPYDCN_GPU_BUDGET_S"] = str(budget)
    began = time.monotonic()
    result = subprocess.run(["bash", str(CI_GPU), *stages], cwd=ROOT, env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=timeout)
    return result.returncode, result.stdout, time.monotonic() - began


def summary_of(stdout, tmp_path):
    """The summary block: printed last, and the same as $OUT/summary.txt."""
    saved = (tmp_path / "out" / "summary.txt").read_text()
    assert stdout.endswith(saved), stdout[-2000:]
    return saved.splitlines()


def fake_python(tmp_path, check):
    """A stand-in for python3: describes a GPU; ``-m cupydcn check`` runs ``check``."""
    script = tmp_path / "python"
    script.write_text(
        "#!/usr/bin/env bash\n"
        'if [ "$1" = - ]; then cat > /dev/null; echo "GPU 0: Stand-in GPU, sm_90"; exit 0; fi\n'
        f'if [ "$1 $2 $3" = "-m cupydcn check" ]; then {check}; fi\n'
        "exit 1\n")
    script.chmod(0o755)
    return script


def test_ci_gpu_without_a_gpu_fails_fast(tmp_path):
    if _gpu_visible():
        pytest.skip("a GPU is visible here: .ci/gpu would run its stages")
    status, stdout, seconds = run_gpu_script(tmp_path)
    assert status != 0
    assert seconds < 60, f".ci/gpu took {seconds:.0f} s to find no GPU"
    assert "no CUDA GPU found" in stdout
    summary = summary_of(stdout, tmp_path)
    assert summary[0].startswith("FAIL") and "no CUDA GPU found" in summary[0]
    assert [line.split()[:2] for line in summary[1:5]] == [
        ["environment", "FAIL"], ["smoke", "NOT"], ["tier", "NOT"], ["bench-quick", "NOT"]]
    assert (tmp_path / "out" / "environment.log").is_file()


def test_ci_gpu_passing_stage_and_summary(tmp_path):
    check = ("printf 'deform_conv2d forward  float32  1.0e-07  1e-05  ok\\n"
             "deform_conv2d grad_input  float32  1.0e-07  1e-05  ok\\n"
             "all ops match the reference on GPU\\n'; exit 0")
    status, stdout, _ = run_gpu_script(tmp_path, "smoke", python=fake_python(tmp_path, check))
    summary = summary_of(stdout, tmp_path)
    assert status == 0, stdout
    assert summary[0].startswith("PASS")
    assert summary[1].split()[:2] == ["environment", "PASS"] and "Stand-in GPU" in summary[1]
    assert re.match(r"\s*smoke\s+PASS\s+2 comparisons ok, 0 failed, on the GPU$", summary[2])


def test_ci_gpu_failing_smoke_is_a_failure(tmp_path):
    check = "echo 'deform_conv2d forward  bfloat16  3.0e-01  2e-02  FAILED'; exit 1"
    status, stdout, _ = run_gpu_script(tmp_path, "smoke", python=fake_python(tmp_path, check))
    summary = summary_of(stdout, tmp_path)
    assert status != 0
    assert summary[0].startswith("FAIL") and "smoke FAIL" in summary[0]
    assert re.match(r"\s*smoke\s+FAIL\s+0 comparisons ok, 1 failed", summary[2])


def test_ci_gpu_cuts_a_hung_stage_within_the_budget(tmp_path):
    """A stage that never ends is stopped at what is left of the budget (here
    15 s, less the 5 s kill grace) and the run reports it and fails."""
    status, stdout, seconds = run_gpu_script(
        tmp_path, "smoke", python=fake_python(tmp_path, "exec sleep 600"), budget=15)
    summary = summary_of(stdout, tmp_path)
    assert status != 0
    assert seconds < 15 + 10, f"a 15 s budget took {seconds:.0f} s"
    assert summary[0].startswith("FAIL") and "smoke TIMEOUT" in summary[0]
    assert summary[2].split()[:2] == ["smoke", "TIMEOUT"]


def test_ci_gpu_refuses_an_unknown_stage(tmp_path):
    status, _, _ = run_gpu_script(tmp_path, "everything")
    assert status == 2


def readme_test_command():
    """The command of the README's "Tests" section."""
    text = (ROOT / "README.md").read_text()
    commands = re.findall(r"^python -m pip install \"\.\[test[^\n]*$", text, re.MULTILINE)
    assert len(commands) == 1, commands
    return commands[0]


def test_ci_run_runs_the_readme_test_command_first():
    """.ci/run runs the README's test command verbatim, in a venv of its own
    before any framework is installed, and fails if either stage fails."""
    if not (ROOT / "README.md").is_file():
        pytest.skip("README.md is not here")
    script = CI_RUN.read_text()
    command = readme_test_command()
    assert f"    {command}\n" in script, f".ci/run does not run the README's command: {command}"
    bare = script[script.index("\nbare() {"):script.index("\n}\n", script.index("\nbare() {"))]
    assert "readme_test_command" in bare and "pip install" not in bare
    assert script.index("\nbare() {") < script.index("torch==")
    assert 'exit "$failed"' in script
