"""routed_lora (every backend on this machine) against the naive per-token statement.

Tolerances: float64 1e-10 (and gradcheck); float32 1e-5 relative to the output's
scale; float16 / bfloat16 (CPU matmuls) 2e-2 / 5e-2 relative to the output's scale.
"""
import itertools

import pytest
import torch
from naive import naive_delta

from routedlora import routers
from routedlora.backends import available_backends
from routedlora.ops import routed_lora

BACKENDS = available_backends(torch.device("cpu"))  # these tests run on CPU tensors
# float64 is the reference's own check (gradcheck); the fused kernels take 16/32-bit
# floats and are compared with the reference in test_triton.py.
F64_BACKENDS = ["torch"]

# (N, d, o, r): odd widths, r = 1, one token, an empty batch
SIZES = [(5, 6, 10, 1), (1, 6, 6, 3), (0, 6, 6, 2), (9, 12, 8, 2)]
ROUTERS = ["poly", "poly_noise", "softmax", "topk", "topk_raw", "cpoly"]


def make_routing(kind, logits, gen):
    if kind == "poly":
        return routers.poly_route(logits)
    if kind == "poly_noise":
        noise = routers.gumbel_uniform(logits.shape, generator=gen, dtype=logits.dtype)
        return routers.poly_route(logits, noise=noise, temperature=0.7)
    if kind == "softmax":
        return routers.softmax_route(logits, temperature=0.5)
    if kind == "topk":
        return routers.topk_route(logits, k=2)
    if kind == "topk_raw":
        return routers.topk_route(logits, k=2, renormalize=False)
    return routers.cpoly_route(logits, n_common=2)


def cases():
    for (N, d, o, r), h, combine, kind in itertools.product(SIZES, (1, 2, 4), ("params", "outputs"), ROUTERS):
        if d % h or o % h or (combine == "outputs" and h != 1):
            continue
        yield N, d, o, r, h, combine, kind


def inputs(N, d, o, r, h, m=4, R=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g, dtype=dtype)
    A = torch.randn(h, m, d // h, r, generator=g, dtype=dtype)
    B = torch.randn(h, m, r, o // h, generator=g, dtype=dtype)
    logits = torch.randn(R, h, m, generator=g, dtype=dtype)
    route_ids = torch.randint(0, R, (N,), generator=g)  # mixed rows in one batch
    return x, A, B, logits, route_ids, g


@pytest.mark.parametrize("backend", F64_BACKENDS)
@pytest.mark.parametrize("N,d,o,r,h,combine,kind", list(cases()))
def test_forward_and_gradients_float64(backend, N, d, o, r, h, combine, kind):
    x, A, B, logits, route_ids, g = inputs(N, d, o, r, h)
    state = g.get_state()

    def ours(x, A, B, logits):
        g.set_state(state)
        rt = make_routing(kind, logits, g)
        return routed_lora(x, A, B, rt.idx, rt.w, route_ids, scale=0.5, combine=combine, backend=backend)

    def theirs(x, A, B, logits):
        g.set_state(state)
        rt = make_routing(kind, logits, g)
        return naive_delta(x, A, B, rt.idx, rt.w, route_ids, 0.5, combine)

    args = [t.clone().requires_grad_(True) for t in (x, A, B, logits)]
    out = ours(*args)
    ref = theirs(*args)
    assert out.shape == (N, o)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    if N:
        cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        g_ours = torch.autograd.grad((out * cot).sum(), args)
        g_ref = torch.autograd.grad((ref * cot).sum(), args)
        for name, a, b in zip(("x", "lora_A", "lora_B", "logits"), g_ours, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m, n=name: f"d{n}: {m}")
        assert torch.autograd.gradcheck(ours, tuple(args), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("combine,h", [("params", 1), ("params", 4), ("outputs", 1)])
def test_low_precision_forward(backend, dtype, tol, combine, h):
    if backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("Triton's interpreter multiplies bfloat16 dot operands as raw bits (triton#11584)")
    x, A, B, logits, route_ids, _ = inputs(33, 16, 24, 4, h, m=8, R=5, dtype=torch.float32, seed=1)
    rt = routers.topk_route(logits, k=3) if combine == "outputs" else routers.poly_route(logits)
    ref = naive_delta(x.double(), A.double(), B.double(), rt.idx, rt.w.double(), route_ids, 0.25, combine)
    xs, As, Bs = (t.to(dtype) for t in (x, A, B))
    base = torch.randn(33, 24, dtype=dtype)
    out = routed_lora(xs, As, Bs, rt.idx, rt.w, route_ids, scale=0.25, combine=combine, base=base,
                      backend=backend)
    assert out.dtype == dtype
    err = (out.double() - base.double() - ref).abs().max() / ref.abs().max()
    assert err < tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_gradients_float32(backend):
    x, A, B, logits, route_ids, _ = inputs(17, 12, 8, 3, 2, dtype=torch.float32, seed=2)
    args = [t.clone().requires_grad_(True) for t in (x, A, B, logits)]
    args64 = [t.detach().double().requires_grad_(True) for t in args]
    cot = torch.randn(17, 8)
    rt = routers.softmax_route(args[3])
    g32 = torch.autograd.grad((routed_lora(*args[:3], rt.idx, rt.w, route_ids, scale=0.5, backend=backend)
                               * cot).sum(), args)
    rt64 = routers.softmax_route(args64[3])
    g64 = torch.autograd.grad((naive_delta(*args64[:3], rt64.idx, rt64.w, route_ids, 0.5, "params")
                               * cot.double()).sum(), args64)
    for a, b in zip(g32, g64):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", F64_BACKENDS)
def test_one_routing_row_per_token_and_duplicates(backend):
    # token-level routing (every token its own row) and repeated skills inside a row
    x, A, B, _, _, g = inputs(7, 6, 6, 2, 1)
    idx = torch.tensor([[[0, 0]], [[1, 3]], [[2, 2]], [[3, 1]], [[0, 1]], [[1, 1]], [[2, 0]]])
    w = torch.rand(7, 1, 2, generator=g, dtype=torch.float64, requires_grad=True)
    route_ids = torch.arange(7)
    for combine in ("params", "outputs"):
        out = routed_lora(x, A, B, idx, w, route_ids, scale=1.0, combine=combine, backend=backend)
        torch.testing.assert_close(out, naive_delta(x, A, B, idx, w, route_ids, 1.0, combine))
        assert torch.autograd.gradcheck(
            lambda w: routed_lora(x, A, B, idx, w, route_ids, combine=combine, backend=backend), (w,))


@pytest.mark.parametrize("backend", F64_BACKENDS)
def test_one_hot_routing_is_plain_multi_lora(backend):
    # K = 1, weight 1: token n gets exactly skill idx[n]'s LoRA, as punica/vLLM serve it
    x, A, B, _, _, g = inputs(6, 8, 8, 2, 1)
    idx = torch.randint(0, 4, (6, 1, 1), generator=g)
    out = routed_lora(x, A, B, idx, torch.ones(6, 1, 1, dtype=torch.float64), torch.arange(6), backend=backend)
    expect = torch.stack([x[n] @ A[0, idx[n, 0, 0]] @ B[0, idx[n, 0, 0]] for n in range(6)])
    torch.testing.assert_close(out, expect)


def test_no_adapter_sized_buffer_is_saved():
    # The reference must not keep per-token adapters for backward: what it saves
    # beyond its inputs is O(N * r).
    N, d, o, r, h, m = 64, 32, 32, 4, 2, 4
    x, A, B, logits, route_ids, _ = inputs(N, d, o, r, h, m=m, R=4, dtype=torch.float32)
    x.requires_grad_(True)
    rt = routers.poly_route(logits)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        routed_lora(x, A, B, rt.idx, rt.w, route_ids, backend="torch")
    extra = [t for t in saved if not any(t is s for s in (x, A, B, rt.idx, rt.w, route_ids))]
    assert sum(t.numel() for t in extra) <= N * r
