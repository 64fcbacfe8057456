"""The compile check of the Triton kernels for sm_80 / sm_90 (``autoq.kernels.aot``), in CI.

Compiling needs no GPU, but it must run without ``TRITON_INTERPRET`` (under the interpreter
``@triton.jit`` returns an interpreted function), so each check runs in a subprocess with that
variable removed. The first test is the CI gate (the defaults plus a sample: a few minutes on
2 CPUs, less with a warm Triton cache); the others show that the check fails when it should, and
reuse the first one's cached compiles.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]


def run_python(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_every_default_config_compiles_and_fits(tmp_path):
    out = tmp_path / "kernels-aot.md"
    result = run_python(["-m", "autoq.kernels.aot", "--out", str(out)], timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr
    text = out.read_text()
    assert "## Problems\n\nnone" in text
    rows = [line for line in text.splitlines() if line.startswith("| int")]
    assert any("| int4 | gemv" in row and "| yes |" in row for row in rows)
    assert {"sm_80", "sm_90"} <= {cell.strip() for row in rows for cell in row.split("|")}


def test_check_fails_on_an_over_budget_gemv_loop():
    result = run_python(["-m", "autoq.kernels.aot", "--only", "int4 gemv n128 k256 s4 w4 g128 bf16",
                         "--arch", "90", "--sample", "0", "--budget", "0.1"], timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "over the budget of 0.1" in result.stdout


def test_check_fails_on_a_kernel_that_does_not_compile(tmp_path):
    script = textwrap.dedent("""
        import triton
        import triton.language as tl
        from autoq.kernels import aot
        from autoq.kernels.tuning import KernelConfig

        @triton.jit
        def broken(x_ptr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, undefined_name + offs)

        def source(job):
            return aot.KernelSource(broken, {"x_ptr": "fp32"}, {"BLOCK": 16}, 4, 1)

        from autoq.kernels import triton_backend as tb

        job = aot.Job(tb.INT4.traits, KernelConfig("gemv"), "bf16", 90, 32, default=True)
        [result] = aot.run_jobs([job], workers=1, source_for=source)
        print("\\n".join(aot.problems(result)))
    """)
    path = tmp_path / "broken_kernel.py"  # @triton.jit reads its function's source file
    path.write_text(script)
    result = run_python([str(path)], timeout=300)
    assert result.returncode == 0, result.stderr
    assert "does not compile" in result.stdout and "undefined_name" in result.stdout
