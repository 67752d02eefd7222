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


def test_resources_of_the_launched_variants_for_sm90(tmp_path, monkeypatch):
    # registers, spills, shared memory and occupancy from ptxas -v, as the cost suite reports them
    from benchmarks.cost import triton_resources

    monkeypatch.setenv("ROUTEDLORA_CACHE_DIR", str(tmp_path))
    spec = dict(kernel="_segment_sum_kernel", dtype="float32", constexprs=dict(BLOCK_T=64, BLOCK_C=16), num_warps=4,
                num_stages=3)
    (res,) = triton_resources([spec]).values()
    assert res["registers"] > 0 and res["spill_bytes"] == 0 and res["num_warps"] == 4
    assert 0 < res["occupancy"] <= 1 and res["blocks_per_sm"] >= 1
    assert list(tmp_path.glob("triton-resources-*.json"))  # cached for the next run
