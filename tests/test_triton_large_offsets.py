"""Element offsets past 2**31 in the Triton kernels: tokens, base-weight columns, base and gradient rows.

An offset computed in 32-bit integers wraps there and reads or writes another address. Triton's
interpreter computes in the kernels' own integer widths (an int32 product wraps, as on a GPU), so
views with row strides past 2**31 elements over lazily committed buffers (4 GB of address space,
a few pages touched) run every kernel with such offsets on the CPU. The run must equal, bit for
bit, the same call on contiguous copies. It runs in a subprocess: a wrapped offset may crash it.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from routedlora.ops import triton_backend

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or not triton_backend.is_available(torch.device("cpu")),
                                reason="interpreter check (a GPU has the sizes to test this for real)")

SCRIPT = textwrap.dedent('''
    import torch
    from routedlora import routers
    from routedlora.ops import triton_backend as tb

    FAR = 2**31 + 2**20  # the last row of every strided view starts past 2**31 elements

    def far_rows(t):
        """``t`` as rows of a view whose last row starts ``FAR`` elements in (lazily committed)."""
        rows, cols = t.shape
        stride = -(-FAR // max(rows - 1, 1))
        try:
            buf = torch.empty(stride * (rows - 1) + cols, dtype=t.dtype)
        except RuntimeError as e:
            print("SKIP", e)
            raise SystemExit(0)
        view = buf.as_strided((rows, cols), (stride, 1))
        view.copy_(t)
        return view

    def run(x, W, bias, base, grad, combine, algo):
        A, B, idx, w, route_ids, R, scale = CASE[combine]
        order, srows, offs = tb._routing_meta(route_ids, R)
        y, saved = tb.forward_impl(x, A, B, idx, w, route_ids, base, W, bias, scale, combine, (order, srows, offs))
        grads = tb.backward_impl(grad, x, A, B, idx, w, saved, W, scale, combine, (route_ids, order, srows, offs),
                                 [True] * 4, algo)
        return [y, saved] + grads

    g = torch.Generator().manual_seed(0)
    N, d, o, r, m, R = 5, 16, 24, 2, 3, 3
    dt = torch.float16
    x = torch.randn(N, d, generator=g).to(dt)
    W = (torch.randn(o, d, generator=g) * 0.25).to(dt)
    bias, base = torch.randn(o, generator=g).to(dt), torch.randn(N, o, generator=g).to(dt)
    grad = torch.randn(N, o, generator=g).to(dt)
    route_ids = torch.tensor([2, 0, 2, 1, 0])
    CASE = {}
    for combine, h in (("params", 2), ("outputs", 1)):
        A = (torch.randn(h, m, d // h, r, generator=g) * 0.3).to(dt)
        B = (torch.randn(h, m, r, o // h, generator=g) * 0.5).to(dt)
        logits = torch.randn(R, h, m, generator=g)
        rt = routers.poly_route(logits) if combine == "params" else routers.topk_route(logits, k=2)
        CASE[combine] = (A, B, rt.idx.contiguous(), rt.w.contiguous(), route_ids, R, 0.5)
    fx, fW, fbase, fgrad = far_rows(x), far_rows(W), far_rows(base), far_rows(grad)
    assert fx.stride(0) * (N - 1) >= 2**31 and fW.stride(0) * (o - 1) >= 2**31
    checked = 0
    for combine in ("params", "outputs"):
        for algo in ("rows", "tokens"):
            for linear in (True, False):  # the base linear in the expand's tiles, or a base tensor
                near = run(x, W if linear else None, bias if linear else None, None if linear else base, grad,
                           combine, algo)
                far = run(fx, fW if linear else None, bias if linear else None, None if linear else fbase, fgrad,
                          combine, algo)
                for name, a, b in zip(["y", "saved", "dx", "dA", "dB", "dw"], near, far):
                    assert a is not None and torch.equal(a, b), (combine, algo, linear, name)
                checked += 1
    print("OK", checked)
''')


def test_offsets_past_2_31_elements_match_contiguous_inputs_bitwise():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    if out.stdout.startswith("SKIP"):
        pytest.skip("cannot reserve 4 GB of address space here: " + out.stdout.strip())
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    assert out.stdout.strip().endswith("OK 8"), out.stdout
