"""Every Triton kernel variant compiles (PTX + cubin) for sm_80 and sm_90 without a GPU.

Runs `python -m uwrt.kernels.compile_check` in a child process with TRITON_INTERPRET removed (the
kernels must be real JITFunctions). ~1 min from an empty Triton cache on 2 cores, seconds after.
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_all_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "uwrt.kernels.compile_check", "--arch", "80,90"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    print(r.stdout[-4000:], r.stderr[-4000:])
    assert r.returncode == 0
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("ok ", "FAIL"))]
    assert lines and all(ln.startswith("ok ") for ln in lines)
    assert any("sm_80" in ln for ln in lines) and any("sm_90" in ln for ln in lines)
    assert all("cubin" in ln for ln in lines)


def test_compile_check_fails_on_a_bad_kernel(tmp_path):
    """The check can fail: a tl.dot with 8-row tiles (fine in the interpreter) must be rejected."""
    mod = tmp_path / "bad_kernel_mod.py"
    mod.write_text(
        "import triton, triton.language as tl\n"
        "@triton.jit\n"
        "def bad(x_ptr, y_ptr, B: tl.constexpr):\n"
        "    i = tl.arange(0, B)\n"
        "    a = tl.load(x_ptr + i[:, None] * B + i[None, :])\n"
        "    tl.store(y_ptr + i[:, None] * B + i[None, :], tl.dot(a, a))\n"
        "COMPILE_VARIANTS = [(bad, {'x_ptr': '*fp16', 'y_ptr': '*fp32', 'B': 'constexpr'}, {'B': 8}, 'bad dot 8')]\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), ROOT, env.get("PYTHONPATH", "")])
    code = ("import sys, uwrt.kernels.compile_check as c; c.MODULES = ('bad_kernel_mod', 'kernels.not_there'); "
            "sys.exit(c.main(['--arch', '80']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL sm_80" in r.stdout and "bad dot 8" in r.stdout
    assert "skip kernels.not_there: module not found" in r.stdout
