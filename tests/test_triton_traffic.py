"""Every Triton launcher's traffic formula equals what its kernel does, counted in the interpreter.

For each launch: the grid, the bytes each tensor argument serves to masked loads and stores
(every request, and each address once) and the FLOPs of the tl.dot calls at tile shape, on
small random shapes with rows that tiles straddle, one token, r = 1, odd widths, and two
tile configurations. Arguments passed the same storage (a placeholder, or ``base = y``) are
compared together. All counts are exact: integers, no tolerance.
"""
import contextlib
import itertools

import pytest
import torch
from triton_counter import counting

from routedlora.ops import triton_backend as tb

pytestmark = pytest.mark.skipif(not tb.is_available(torch.device("cpu")), reason="needs Triton's interpreter")

# the second: token chunks as short as one tile and two skills per program, so split grids and
# skill blocks run on small shapes
TILES = [None, dict(BLOCK_N=32, BLOCK_D=16, BLOCK_O=32, BLOCK_W=16, BLOCK_K=32, SPLIT_TILES=1, SKILL_COLUMNS=32,
                    num_warps=1, num_stages=1)]
SHAPES = [  # N, h, m, dh, oh, r, R, K
    (37, 2, 4, 12, 9, 3, 5, 2), (1, 1, 3, 7, 5, 1, 1, 3), (50, 1, 6, 20, 33, 2, 50, 1), (64, 4, 3, 5, 6, 4, 3, 3)]
CASES = list(itertools.product(SHAPES, ("random", "sequences", "tokens"), range(len(TILES))))


def check(launch, traffic):
    assert launch.kernel == traffic.kernel
    assert tuple(launch.grid) == tuple(traffic.grid)
    assert launch.flops == traffic.flops, "flops"
    for group in launch.args:
        names = group.split("|")
        assert launch.requested(group) == sum(traffic.requested.get(n, 0) for n in names), f"{group} requested"
        assert launch.distinct(group) == max(traffic.distinct.get(n, 0) for n in names), f"{group} distinct"


def tiles(tile):
    return tb.tile_override(TILES[tile]) if TILES[tile] else contextlib.nullcontext()


def counted(tile, fn):
    """The one kernel launch ``fn`` makes, counted in the interpreter, and the tile sizes it used."""
    with tiles(tile), torch.no_grad(), counting() as launches:
        fn()
    assert len(launches) == 1
    return launches[0]


def blocks(tile, N, width, r):
    with tiles(tile):
        return tb._blocks(N, width, r, True)


def setup(shape, layout, dtype=torch.float32, seed=0):
    N, h, m, dh, oh, r, R, K = shape
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, h * dh, generator=g).to(dtype)
    A = torch.randn(h, m, dh, r, generator=g).to(dtype)
    B = torch.randn(h, m, r, oh, generator=g).to(dtype)
    idx = torch.randint(0, m, (R, h, K), generator=g)
    w = torch.rand(R, h, K, generator=g)
    if layout == "random":
        rid = torch.randint(0, R, (N,), generator=g)
    elif layout == "sequences":
        rid = torch.arange(N) * R // max(N, 1)
    else:  # every token its own row (token-level routing)
        rid = torch.arange(N) % R
    order, srows, offs = tb._routing_meta(rid, R)
    return X, A, B, idx, w, rid, order, srows, offs, g


@pytest.mark.parametrize("shape,layout,tile", CASES)
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_shrink(shape, layout, tile, mode):
    N, h, m, dh, oh, r, R, K = shape
    if mode == 1 and h != 1:
        pytest.skip("one result per slot: the outputs combine, one head")
    X, A, B, idx, w, rid, order, srows, _, g = setup(shape, layout, seed=N + mode)
    out = (torch.empty(N, r), torch.empty(N, K, r), torch.empty(N, h, K))[mode]
    v = torch.randn(N, r, generator=g) if mode == 2 else None
    res = {}
    launch = counted(tile, lambda: res.setdefault("parts", tb._shrink(X, A, idx, w, order, srows, mode, K, out, v=v)))
    b = blocks(tile, N, dh, r)
    b["BLOCK_M"] = tb._skill_block(m, r, b) if mode == 2 else 1
    splits = tb._split_k(N, h if mode != 2 else 1, dh, b)[0]  # split-K: partials, one per split
    assert tuple(res["parts"].shape) == (splits,) + tuple(out.shape)
    check(launch, tb.shrink_traffic(X, A, idx, w, srows, mode, K, res["parts"], v, b,
                                    (tb.triton_cdiv(N, b["BLOCK_N"]), splits)))


@pytest.mark.parametrize("shape,layout,tile", CASES)
@pytest.mark.parametrize("mix,base_kind", [(True, "tensor"), (True, None), (False, "tensor"), (True, "linear"),
                                           (False, "linear_nobias")])
@pytest.mark.parametrize("splits", [1, 3])
def test_expand(shape, layout, tile, mix, base_kind, splits):
    N, h, m, dh, oh, r, R, K = shape
    if not mix and h != 1:
        pytest.skip("one slot per rank vector: the outputs combine, one head")
    X, A, B, idx, w, rid, order, srows, _, g = setup(shape, layout, dtype=torch.float16, seed=N)
    U = torch.randn((splits, N, r) if mix else (splits, N, K, r), generator=g)  # the shrink's partials
    u_out = torch.empty(U.shape[1:]) if splits > 1 else None  # the summed partials kept for backward
    y = torch.empty(N, h * oh, dtype=torch.float16)
    base = torch.randn(N, h * oh, generator=g).half() if base_kind == "tensor" else None
    linear = None
    if base_kind and base_kind.startswith("linear"):  # the base GEMM in the same tiles, W (o, d) read as Wᵀ
        W = torch.randn(h * oh, h * dh + 3, generator=g).half()
        bias = torch.randn(h * oh, generator=g).half() if base_kind == "linear" else None
        linear = (torch.randn(N, h * dh + 3, generator=g).half(), W.t(), bias)
    launch = counted(tile, lambda: tb._expand(U, B, idx, w, order, srows, K, 0.5, mix, y, base, linear, u_out))
    if u_out is not None:
        torch.testing.assert_close(u_out, U.sum(0), rtol=1e-6, atol=1e-6)
    b = blocks(tile, N, oh, r)
    grid = tb._expand_grid(N, h, oh, b)
    check(launch, tb.expand_traffic(U, B, idx, w, srows, K, mix, y, base, linear, b, grid, u_out))


@pytest.mark.parametrize("shape,layout,tile", CASES)
@pytest.mark.parametrize("sides", ["both", "x", "grad"])
@pytest.mark.parametrize("slots", [False, True])
def test_row_reduce(shape, layout, tile, sides, slots):
    N, h, m, dh, oh, r, R, K = shape
    X, A, B, idx, w, rid, order, srows, offs, g = setup(shape, layout, seed=N + 11)
    rp = K * r if slots else r
    grad = torch.randn(N, h * oh, generator=g)
    du, u = torch.randn(N, rp, generator=g), torch.randn(N, rp, generator=g)
    G = torch.empty(R, h * dh, rp) if sides in ("both", "x") else None
    Hh = torch.empty(R, h * oh, rp) if sides in ("both", "grad") else None
    launch = counted(tile, lambda: tb._row_reduce(X, du if G is not None else None, grad,
                                                  u if Hh is not None else None, order, offs, G, Hh, 0.5))
    b = blocks(tile, N, max(h * dh, h * oh), rp)
    grid = (R, (tb.triton_cdiv(h * dh, b["BLOCK_W"]) if G is not None else 0)
            + (tb.triton_cdiv(h * oh, b["BLOCK_W"]) if Hh is not None else 0))
    check(launch, tb.row_reduce_traffic(X, du if G is not None else None, grad, u if Hh is not None else None, offs,
                                        G, Hh, b, grid))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("slots", [False, True])
@pytest.mark.parametrize("want", [("A", "B", "w"), ("A", "B"), ("w",), ("B", "w"), ("A",)])
def test_mix_grads(shape, slots, want):
    N, h, m, dh, oh, r, R, K = shape
    if slots and h != 1:
        pytest.skip("slots: the outputs combine, one head")
    X, A, B, idx, w, rid, order, srows, offs, g = setup(shape, "random", seed=N + 13)
    rp = K * r if slots else r
    need_w = "w" in want
    G = torch.randn(R, h * dh, rp, generator=g) if "A" in want or (need_w and not slots) else None
    Hh = torch.randn(R, h * oh, rp, generator=g)
    dA = torch.empty_like(A) if "A" in want else None
    dB = torch.empty_like(B) if "B" in want else None
    with torch.no_grad(), counting() as launches:
        tb._mix_grads(G, Hh, A, B, idx, w, dA, dB, slots, need_w)
    t = tb._mix_tiles(r, m, K, True)
    na = tb.triton_cdiv(dh, t["BLOCK_W"]) if G is not None and (dA is not None or (need_w and not slots)) else 0
    nb = tb.triton_cdiv(oh, t["BLOCK_W"]) if dB is not None or need_w else 0
    dwp = torch.empty(R, h, K, (na if need_w and not slots else 0) + (nb if need_w else 0)) if need_w else None
    assert launches[0].kernel == "_mix_grads_kernel"
    check(launches[0], tb.mix_grads_traffic(G, Hh, A, B, idx, w, dA, dB, dwp, slots, na, nb, t, (h, na + nb)))


@pytest.mark.parametrize("shape,layout,tile", CASES)
@pytest.mark.parametrize("shared_v,transposed", [(True, False), (False, True)])
def test_weight_grad(shape, layout, tile, shared_v, transposed):
    N, h, m, dh, oh, r, R, K = shape
    X, A, B, idx, w, rid, order, srows, _, g = setup(shape, layout, seed=N + 7)
    V = torch.randn((N, r) if shared_v else (N, K, r), generator=g)
    out = torch.empty(h, m, r, dh) if transposed else torch.empty(h, m, dh, r)
    launch = counted(tile, lambda: tb._weight_grad(X, V, idx, w, rid, out, dh, 1.0, shared_v, transposed))
    b = blocks(tile, N, dh, r)
    b["BLOCK_M"] = tb._skill_block(m, r, b)
    programs = h * tb.triton_cdiv(m, b["BLOCK_M"]) * tb.triton_cdiv(dh, b["BLOCK_W"])
    chunks, chunk = tb._token_chunks(N, programs, b)
    dst = out if chunks == 1 else torch.empty((chunks,) + tuple(out.shape))
    check(launch, tb.weight_grad_traffic(X, V, idx, w, rid, dst, dh, shared_v, b, (programs, chunks), chunk))


@pytest.mark.parametrize("shape,layout", list(itertools.product(SHAPES, ("random", "sequences", "tokens"))))
def test_segment_sum(shape, layout):
    N, h, m, dh, oh, r, R, K = shape
    X, A, B, idx, w, rid, order, srows, offs, g = setup(shape, layout, seed=N + 3)
    P = torch.randn(N, h * K, generator=g)
    launch = counted(0, lambda: tb._segment_sum(P, order, offs, R))
    check(launch, tb.segment_sum_traffic(P[None], offs, R, 16))
    Pp, Qp = torch.randn(3, N, h * K, generator=g), torch.randn(2, N, h * K, generator=g)  # two sources' partials
    res = {}
    launch = counted(0, lambda: res.setdefault("out", tb._segment_sum(Pp, order, offs, R, Qp)))
    check(launch, tb.segment_sum_traffic(Pp, offs, R, 16, Qp))
    per_token = Pp.sum(0) + Qp.sum(0)
    want = torch.zeros(R, h * K).index_add_(0, rid, per_token)
    torch.testing.assert_close(res["out"], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,kw,noise", [("poly", {}, False), ("poly", {}, True), ("softmax", {}, False),
                                           ("topk", dict(k=2), False), ("topk", dict(k=3, renormalize=False), False)])
@pytest.mark.parametrize("R,h,m,T", [(5, 2, 4, 3), (1, 1, 3, 1), (9, 4, 6, 4)])
def test_routers(kind, kw, noise, R, h, m, T):
    g = torch.Generator().manual_seed(R + h)
    logits = torch.randn(T, h, m, generator=g).half()
    rows_task = torch.randint(0, T, (R,), generator=g)
    row_example = torch.arange(R)
    seed = torch.tensor([123]) if noise else None
    K = kw.get("k", m)
    renorm = kw.get("renormalize", True)
    order, _, offs = tb._routing_meta(rows_task, T)
    for ex in (row_example, None):  # None: row r is example r (no table read)
        with torch.no_grad(), counting() as launches:
            idx, w = tb._route_op(logits, rows_task, ex, seed, kind, K, 1.0, renorm, 0)
        (launch,) = launches
        check(launch, tb.router_traffic(logits, rows_task, kind, K, noise, renorm, False, ex))
        dw = torch.randn(R, h, K, generator=g)
        with torch.no_grad(), counting() as launches:
            tb._route_backward_op(dw, logits, rows_task, ex, seed, idx, order, offs, kind, K, 1.0, renorm, 0)
        check(launches[0], tb.router_traffic(logits, rows_task, kind, K, noise, renorm, True, ex))
    assert launches[1].kernel == "_segment_sum_kernel"  # logits' gradients summed per task
