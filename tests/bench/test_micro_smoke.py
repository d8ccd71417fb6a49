"""The microbenchmarks (bench/micro) run as plain tests, untimed (--benchmark-disable), so CI checks
that every benchmarked path still runs and agrees with its reference. Timed runs: see
bench/micro/conftest.py."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_microbenchmarks_pass_untimed(tmp_path, small_bundle):
    path = [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, UWRT_MICRO_BUNDLE=str(small_bundle), PYTHONPATH=os.pathsep.join(path))
    proc = subprocess.run([sys.executable, "-m", "pytest", "bench/micro", "-q", "-p", "no:cacheprovider",
                           "--benchmark-disable", "-rs", "--basetemp", str(tmp_path / "micro")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "error" not in proc.stdout.splitlines()[-1]
