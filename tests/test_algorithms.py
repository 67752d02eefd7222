"""The torch backend's two algorithms against the naive per-token statement, and the choice between them.

Both algorithms (row-mixed and rank space) run on contiguous rows (one row per sequence
of S tokens, S = 1 being token-level rows) for every router x combine x h in {1, 2, 4},
odd sizes (d = 6, r = 1, one token, an empty batch, ragged widths), forward and the
gradients of x, lora_A, lora_B, the logits and base, plus gradcheck. Tolerances: float64
1e-10 (gradients 1e-9); float32 / float16 / bfloat16 forward 1e-5 / 2e-2 / 5e-2 relative
to the output's scale, float32 gradients 1e-4 relative.
"""
import itertools

import pytest
import torch
from naive import naive_delta
from test_ops import ROUTERS, make_routing

from torch.utils.flop_counter import FlopCounterMode

from routedlora.ops import RoutedLoraFunction, TokenRows, plan, rank_space, routed_lora, row_mixed

ALGORITHMS = {"row_mixed": row_mixed, "rank_space": rank_space}
# (R rows, S tokens per row, d, o, r)
SIZES = [(3, 4, 6, 10, 1), (1, 1, 6, 6, 3), (0, 5, 6, 6, 2), (2, 5, 12, 8, 2), (5, 1, 12, 4, 3)]


def run(algo, x, A, B, idx, w, S, scale, combine, base=None, weight=None, bias=None):
    """Call the op with a pinned algorithm (the public op picks one by cost)."""
    impl = ALGORITHMS[algo]
    rows = TokenRows.contiguous(w.shape[0], S, x.device)
    rid = rows.route_ids if impl.NEEDS_ROUTE_IDS else None
    return RoutedLoraFunction.apply(x, A, B, idx, w, base, weight, bias, S, rid, None, None, None, scale, combine,
                                    impl)


def inputs(R, S, d, o, r, h, m=4, T=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R * S, d, generator=g, dtype=dtype)
    A = torch.randn(h, m, d // h, r, generator=g, dtype=dtype)
    B = torch.randn(h, m, r, o // h, generator=g, dtype=dtype)
    logits = torch.randn(T, h, m, generator=g, dtype=dtype)
    rows_task = torch.randint(0, T, (R,), generator=g)  # rows of mixed tasks
    base = torch.randn(R * S, o, generator=g, dtype=dtype)
    return x, A, B, logits, rows_task, base, g


def cases():
    for (R, S, d, o, r), h, combine, kind in itertools.product(SIZES, (1, 2, 4), ("params", "outputs"), ROUTERS):
        if d % h or o % h or (combine == "outputs" and h != 1):
            continue
        yield R, S, d, o, r, h, combine, kind


@pytest.mark.parametrize("algo", list(ALGORITHMS))
@pytest.mark.parametrize("R,S,d,o,r,h,combine,kind", list(cases()))
def test_forward_and_gradients_float64(algo, R, S, d, o, r, h, combine, kind):
    x, A, B, logits, rows_task, base, g = inputs(R, S, d, o, r, h)
    state = g.get_state()
    route_ids = torch.arange(R).repeat_interleave(S)

    def ours(x, A, B, logits, base):
        g.set_state(state)
        rt = make_routing(kind, logits[rows_task], g)
        return run(algo, x, A, B, rt.idx, rt.w, S, 0.5, combine, base)

    def theirs(x, A, B, logits, base):
        g.set_state(state)
        rt = make_routing(kind, logits[rows_task], g)
        return base + naive_delta(x, A, B, rt.idx, rt.w, route_ids, 0.5, combine)

    args = [t.clone().requires_grad_(True) for t in (x, A, B, logits, base)]
    out, ref = ours(*args), theirs(*args)
    assert out.shape == (R * S, o)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    if R:
        cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        g_ours = torch.autograd.grad((out * cot).sum(), args)
        g_ref = torch.autograd.grad((ref * cot).sum(), args)
        for name, a, b in zip(("x", "lora_A", "lora_B", "logits", "base"), g_ours, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m, n=name: f"d{n}: {m}")
        assert torch.autograd.gradcheck(ours, tuple(args), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("algo", list(ALGORITHMS))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("combine,h", [("params", 1), ("params", 4), ("outputs", 1)])
def test_low_precision_forward(algo, dtype, tol, combine, h):
    x, A, B, logits, rows_task, base, g = inputs(5, 7, 16, 24, 4, h, m=8, T=4, dtype=torch.float32, seed=1)
    rt = make_routing("topk" if combine == "outputs" else "poly", logits[rows_task], g)
    ref = naive_delta(x.double(), A.double(), B.double(), rt.idx, rt.w.double(), torch.arange(5).repeat_interleave(7),
                      0.25, combine)
    xs, As, Bs, bs = (t.to(dtype) for t in (x, A, B, base))
    out = run(algo, xs, As, Bs, rt.idx, rt.w, 7, 0.25, combine, bs)
    assert out.dtype == dtype
    err = (out.double() - bs.double() - ref).abs().max() / ref.abs().max()
    assert err < tol


@pytest.mark.parametrize("algo", list(ALGORITHMS))
@pytest.mark.parametrize("combine,h", [("params", 2), ("outputs", 1)])
def test_float32_gradients(algo, combine, h):
    x, A, B, logits, rows_task, _, g = inputs(4, 6, 12, 8, 3, h, dtype=torch.float32, seed=2)
    args = [t.clone().requires_grad_(True) for t in (x, A, B, logits)]
    args64 = [t.detach().double().requires_grad_(True) for t in args]
    cot = torch.randn(24, 8)
    route_ids = torch.arange(4).repeat_interleave(6)
    rt = make_routing("topk_raw" if combine == "outputs" else "softmax", args[3][rows_task], g)
    g32 = torch.autograd.grad((run(algo, *args[:3], rt.idx, rt.w, 6, 0.5, combine) * cot).sum(), args)
    rt64 = make_routing("topk_raw" if combine == "outputs" else "softmax", args64[3][rows_task], g)
    g64 = torch.autograd.grad((naive_delta(*args64[:3], rt64.idx, rt64.w, route_ids, 0.5, combine)
                               * cot.double()).sum(), args64)
    for a, b in zip(g32, g64):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_only_the_gradients_asked_for(algo):
    # MHR-z: only the routing weights train; the skills' gradients are never computed
    x, A, B, logits, rows_task, base, g = inputs(3, 4, 8, 8, 2, 2, dtype=torch.float64)
    w_logits = logits.clone().requires_grad_(True)
    rt = make_routing("poly", w_logits[rows_task], g)
    out = run(algo, x, A, B, rt.idx, rt.w, 4, 0.5, "params", base)
    (dlogits,) = torch.autograd.grad(out.square().sum(), [w_logits])
    ref_rt = make_routing("poly", w_logits[rows_task], g)
    ref = base + naive_delta(x, A, B, ref_rt.idx, ref_rt.w, torch.arange(3).repeat_interleave(4), 0.5, "params")
    (dref,) = torch.autograd.grad(ref.square().sum(), [w_logits])
    torch.testing.assert_close(dlogits, dref, rtol=1e-9, atol=1e-9)


def test_duplicate_skills_in_a_row_add_up():
    x, A, B, _, _, _, g = inputs(3, 2, 6, 6, 2, 1)
    idx = torch.tensor([[[0, 0]], [[1, 3]], [[2, 2]]])
    w = torch.rand(3, 1, 2, generator=g, dtype=torch.float64, requires_grad=True)
    for algo, combine in itertools.product(ALGORITHMS, ("params", "outputs")):
        out = run(algo, x, A, B, idx, w, 2, 1.0, combine)
        torch.testing.assert_close(out, naive_delta(x, A, B, idx, w, torch.arange(3).repeat_interleave(2), 1.0,
                                                    combine))
        assert torch.autograd.gradcheck(lambda w: run(algo, x, A, B, idx, w, 2, 1.0, combine), (w,))


def test_public_op_takes_seq_len_or_route_ids_and_agrees():
    x, A, B, logits, rows_task, base, g = inputs(4, 8, 8, 8, 2, 2, dtype=torch.float64)
    rt = make_routing("poly", logits[rows_task], g)
    by_len = routed_lora(x, A, B, rt.idx, rt.w, seq_len=8, base=base)
    by_ids = routed_lora(x, A, B, rt.idx, rt.w, torch.arange(4).repeat_interleave(8), base=base)
    by_rows = routed_lora(x, A, B, rt.idx, rt.w, TokenRows.contiguous(4, 8, x.device), base=base)
    torch.testing.assert_close(by_len, by_ids, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(by_rows, by_ids, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="seq_len"):
        routed_lora(x, A, B, rt.idx, rt.w, seq_len=7)
    with pytest.raises(ValueError, match="seq_len"):
        routed_lora(x, A, B, rt.idx, rt.w, torch.zeros(32, dtype=torch.long), seq_len=8)
    with pytest.raises(ValueError, match="route_ids"):
        routed_lora(x, A, B, rt.idx, rt.w)


@pytest.mark.parametrize("algo", list(ALGORITHMS))
@pytest.mark.parametrize("combine,h,kind", [("params", 1, "poly_noise"), ("params", 4, "cpoly"),
                                            ("outputs", 1, "topk")])
@pytest.mark.parametrize("bias", [True, False])
def test_owned_base_linear_float64(algo, combine, h, kind, bias):
    # weight/bias given: the op computes x Wᵀ + b itself and accumulates the delta and the
    # adapter's dx into the base's buffers; every gradient, the base's included, is exact
    x, A, B, logits, rows_task, _, g = inputs(3, 5, 8, 12, 2, h)
    gw = torch.Generator().manual_seed(4)
    W = torch.randn(12, 8, generator=gw, dtype=torch.float64)
    b = torch.randn(12, generator=gw, dtype=torch.float64) if bias else None
    state = g.get_state()
    route_ids = torch.arange(3).repeat_interleave(5)

    def ours(x, A, B, logits, W, *b):
        g.set_state(state)
        rt = make_routing(kind, logits[rows_task], g)
        return run(algo, x, A, B, rt.idx, rt.w, 5, 0.5, combine, weight=W, bias=b[0] if b else None)

    def theirs(x, A, B, logits, W, *b):
        g.set_state(state)
        rt = make_routing(kind, logits[rows_task], g)
        base = torch.nn.functional.linear(x, W, b[0] if b else None)
        return base + naive_delta(x, A, B, rt.idx, rt.w, route_ids, 0.5, combine)

    args = [t.clone().requires_grad_(True) for t in (x, A, B, logits, W) + ((b,) if bias else ())]
    out, ref = ours(*args), theirs(*args)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    for a, e in zip(torch.autograd.grad((out * cot).sum(), args), torch.autograd.grad((ref * cot).sum(), args)):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)
    assert torch.autograd.gradcheck(ours, tuple(args), eps=1e-6, atol=1e-7)


def test_owned_base_with_frozen_weight_and_no_input_grad():
    # frozen base weight, x without grad (the first layer): only the adapter's gradients
    x, A, B, logits, rows_task, _, g = inputs(2, 3, 4, 4, 2, 1)
    W = torch.randn(4, 4, dtype=torch.float64)
    A.requires_grad_(True)
    rt = make_routing("poly", logits[rows_task], g)
    out = routed_lora(x, A, B, rt.idx, rt.w, seq_len=3, weight=W)
    (dA,) = torch.autograd.grad(out.sum(), [A])
    ref = x @ W.T + naive_delta(x, A, B, rt.idx, rt.w, torch.arange(2).repeat_interleave(3), 1.0, "params")
    (dA_ref,) = torch.autograd.grad(ref.sum(), [A])
    torch.testing.assert_close(out, ref.detach())
    torch.testing.assert_close(dA, dA_ref)
    with pytest.raises(ValueError, match="weight"):
        routed_lora(x, A, B, rt.idx, rt.w, seq_len=3, weight=W, base=x @ W.T)
    with pytest.raises(ValueError, match="weight"):
        routed_lora(x, A, B, rt.idx, rt.w, seq_len=3, weight=W[:, :3])
    with pytest.raises(ValueError, match="bias"):
        routed_lora(x, A, B, rt.idx, rt.w, seq_len=3, weight=W, bias=torch.zeros(5, dtype=torch.float64))
    with pytest.raises(TypeError, match="weight"):
        routed_lora(x, A, B, rt.idx, rt.w, seq_len=3, weight=W.float())


@pytest.mark.parametrize("algo", list(ALGORITHMS))
@pytest.mark.parametrize("combine,h,K", [("params", 1, 4), ("params", 2, 4), ("params", 4, 4), ("outputs", 1, 2),
                                         ("outputs", 1, 4)])
def test_dense_routing_without_idx_matches_the_sparse_form(algo, combine, h, K):
    # idx=None: w weights every skill in order (Poly, MHR, C-Poly); the op skips scatter and gather
    x, A, B, logits, rows_task, base, g = inputs(3, 4, 8, 12, 2, h, m=K)
    w = torch.rand(3, h, K, generator=g, dtype=torch.float64, requires_grad=True)
    dense_idx = torch.arange(K).expand(3, h, K)
    args = [t.clone().requires_grad_(True) for t in (x, A, B)]
    a = run(algo, *args, None, w, 4, 0.5, combine, base)
    b = run(algo, *args, dense_idx, w, 4, 0.5, combine, base)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for ga, gb in zip(torch.autograd.grad(a.sum(), args + [w]), torch.autograd.grad(b.sum(), args + [w])):
        torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="dense routing"):
        routed_lora(x, A, B, None, w[:, :, :K - 1], seq_len=4)


# --- the choice between the algorithms ------------------------------------------------


@pytest.mark.parametrize("algo", list(ALGORITHMS))
@pytest.mark.parametrize("combine,h,K", [("params", 1, 4), ("params", 4, 4), ("outputs", 1, 2)])
def test_plan_counts_the_flops_each_algorithm_runs(algo, combine, h, K):
    # the cost model's matrix-product flops are exactly what torch.utils.flop_counter counts
    R, S, d, o, r, m = 3, 5, 12, 8, 2, 4
    x, A, B, _, _, _, g = inputs(R, S, d, o, r, h, m=m, dtype=torch.float32)
    x, A, B = (t.requires_grad_(True) for t in (x, A, B))
    idx = None if combine == "params" else torch.randint(0, m, (R, 1, K), generator=g)
    w = torch.rand(R, h, m if idx is None else K, generator=g, requires_grad=True)
    with FlopCounterMode(display=False) as fwd:
        y = run(algo, x, A, B, idx, w, S, 0.5, combine)
    with FlopCounterMode(display=False) as bwd:
        y.backward(torch.randn_like(y))
    shape = plan.Shape(R * S, R, h, m, m if idx is None else K, d, o, r, 4, combine)
    planned_fwd = sum(op.flops for op in plan.op_counts(algo, shape, False) if op.gemm)
    planned_all = sum(op.flops for op in plan.op_counts(algo, shape, True) if op.gemm)
    assert planned_fwd == fwd.get_total_flops()
    assert planned_all - planned_fwd == bwd.get_total_flops()


def test_plan_takes_row_mixed_for_long_rows_and_rank_space_for_short_ones():
    def pick(N, R, device, backward=True, h=4, d=4096, r=16, elem=2):
        return plan.cheaper(plan.Shape(N, R, h, 8, 8, d, d, r, elem, "params"), device, backward)

    # DESIGN.md's design point (64 sequences x 256 tokens) and decode-like rows on an H100 model
    assert pick(16384, 64, "cuda") == "row_mixed"
    assert pick(16384, 4096, "cuda") == "rank_space"  # 4 tokens per row
    assert pick(16384, 16384, "cuda") == "rank_space"  # token-level rows
    # the CPU model: the layer suite's cases
    assert pick(8192, 64, "cpu", d=1024, elem=4) == "row_mixed"
    assert pick(8192, 2048, "cpu", d=1024, elem=4) == "rank_space"
    # rows of different lengths (explicit route_ids) take rank space whatever the shape
    x = torch.randn(12, 8)
    A, B = torch.randn(1, 4, 8, 2), torch.randn(1, 4, 2, 8)
    ragged = TokenRows.of(torch.tensor([0] * 11 + [1]), 2)
    assert plan.choose(x, A, B, None, ragged, "params") == "rank_space"
    assert plan.choose(x, A, B, None, TokenRows.contiguous(2, 6, "cpu"), "params") in ALGORITHMS
