"""Every Triton kernel variant compiles for sm_80 and sm_90, on a machine without a GPU.

The interpreter tests check the math, not the compiler. This runs
``python -m routedlora.triton_kernels.compile_check`` (ptxas from the triton wheel) in a
fresh process: the interpreter this test session uses rewires triton's own library.
"""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_all_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "routedlora.triton_kernels.compile_check", "--arch", "80", "90"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "all kernels compiled" in proc.stdout
