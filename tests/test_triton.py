"""The triton backend against the torch reference (interpreter on the CPU, real kernels on a GPU).

Tolerances, relative to the largest magnitude of the reference: float32 2e-5 (tf32
disabled), float16 / bfloat16 2e-2 (operands rounded to 16 bits, float32 accumulation).
bfloat16 runs only on a GPU: the interpreter multiplies bfloat16 dot operands as raw bits.
"""
import contextlib
import copy
import itertools

import pytest
import torch
from torch import nn

import routedlora
from layer_compare import assert_layers_agree
from routedlora import routers
from routedlora.ops import routed_lora
from routedlora.ops import triton_backend

pytestmark = pytest.mark.skipif(not triton_backend.is_available(torch.device("cuda" if torch.cuda.is_available()
                                                                             else "cpu")),
                                reason="triton not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def route(kind, logits):
    if kind == "poly":
        return routers.poly_route(logits)
    if kind == "softmax":
        return routers.softmax_route(logits, temperature=0.5)
    if kind == "topk":
        return routers.topk_route(logits, k=2)
    if kind == "onehot":
        return routers.topk_route(logits, k=1, renormalize=False)
    return routers.cpoly_route(logits, n_common=2)


BASES = ("tensor", "linear", "linear_nobias", "none")  # base output given; base linear owned by the op; none


@contextlib.contextmanager
def algorithm(name):
    """Force the backward's way of computing gradients (``None``: the backend's own choice)."""
    if name is None:
        yield
        return
    prev = triton_backend.backward_algorithm
    triton_backend.backward_algorithm = lambda *a, **k: name
    try:
        yield
    finally:
        triton_backend.backward_algorithm = prev


def compare(N, d, o, r, h, m, R, combine, kind, dtype, route_ids=None, seed=0, with_base=True, base_kind=None,
            algo=None, frozen=()):
    """The triton backend against the torch backend: output and the gradient of every input.

    ``frozen``: leaves that need no gradient (``"x"``, ``"A"``, ``"B"``, ``"logits"``)."""
    base_kind = base_kind or ("tensor" if with_base else "none")
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(DEVICE, dtype)
    x = mk(N, d)
    A = mk(h, m, d // h, r, sc=d ** -0.5)
    B = mk(h, m, r, o // h, sc=r ** -0.5)
    logits = torch.randn(R, h, m, generator=g).to(DEVICE)
    base = mk(N, o) if base_kind == "tensor" else None
    weight = mk(o, d, sc=d ** -0.5) if base_kind.startswith("linear") else None
    bias = mk(o) if base_kind == "linear" else None
    if route_ids is None:
        route_ids = torch.randint(0, R, (N,), generator=g)
    route_ids = route_ids.to(DEVICE)
    cot = mk(N, o)
    names = ["x", "A", "B", "logits"]
    results = {}
    for backend in ("torch", "triton"):
        leaves = [t.clone().requires_grad_(n not in frozen) for n, t in zip(names, (x, A, B, logits))]
        rt = route(kind, leaves[3])
        with algorithm(algo):
            y = routed_lora(leaves[0], leaves[1], leaves[2], rt.idx, rt.w, route_ids, scale=0.5, combine=combine,
                            base=base, weight=weight, bias=bias, backend=backend)
            live = [t for t in leaves if t.requires_grad]
            grads = torch.autograd.grad((y.float() * cot.float()).sum(), live, allow_unused=True) if live else []
        grads = iter(grads)
        grads = [next(grads) if t.requires_grad else None for t in leaves]
        grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves, grads)]
        results[backend] = [y] + list(grads)
    for name, ref, got in zip(["y", "dx", "dA", "dB", "dlogits"], results["torch"], results["triton"]):
        assert got.shape == ref.shape and got.dtype == ref.dtype, name
        if ref.numel() == 0:
            continue
        scale = ref.float().abs().max().clamp_min(1e-6)
        err = (got.float() - ref.float()).abs().max() / scale
        assert err <= TOL[dtype], f"{name}: relative error {err:.2e}"


def cases():
    for (h, combine), kind in itertools.product([(1, "params"), (2, "params"), (4, "params"), (1, "outputs")],
                                                ["poly", "softmax", "topk", "onehot", "cpoly"]):
        yield h, combine, kind


@pytest.mark.parametrize("algo", ["rows", "tokens"])
@pytest.mark.parametrize("h,combine,kind", list(cases()))
def test_routers_combines_heads_float32(h, combine, kind, algo):
    compare(N=37, d=20, o=12, r=3, h=h, m=5, R=4, combine=combine, kind=kind, dtype=torch.float32, algo=algo)


@pytest.mark.parametrize("algo", ["rows", "tokens"])
@pytest.mark.parametrize("base_kind", BASES)
@pytest.mark.parametrize("combine,h", [("params", 2), ("outputs", 1)])
def test_base_output_or_base_linear(base_kind, combine, h, algo):
    # "linear": the base GEMM runs in the expand's tiles, forward (x Wᵀ + b) and backward (g W)
    compare(N=29, d=24, o=20, r=3, h=h, m=4, R=3, combine=combine, kind="topk" if h == 1 else "poly",
            dtype=torch.float32, base_kind=base_kind, algo=algo)


@pytest.mark.parametrize("frozen", [("A", "B"), ("A", "B", "logits"), ("x",), ("x", "logits"), ("B",), ("A",),
                                    ("x", "A", "B")])
@pytest.mark.parametrize("combine,h", [("params", 2), ("outputs", 1)])
def test_only_the_gradients_asked_for(frozen, combine, h):
    # frozen leaves: their gradients are not computed, the rest still match
    for algo in ("rows", "tokens"):
        compare(N=26, d=16, o=12, r=2, h=h, m=3, R=4, combine=combine, kind="poly", dtype=torch.float32,
                base_kind="linear", algo=algo, frozen=frozen)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("combine,h", [("params", 2), ("outputs", 1)])
def test_dtypes(dtype, combine, h):
    compare(N=40, d=24, o=18, r=4, h=h, m=4, R=5, combine=combine, kind="topk" if combine == "outputs" else "poly",
            dtype=dtype)


@pytest.mark.parametrize("algo", ["rows", "tokens"])
@pytest.mark.parametrize("N,d,o,r", [(1, 6, 10, 1), (5, 6, 6, 1), (33, 18, 34, 5), (17, 100, 3, 2)])
@pytest.mark.parametrize("combine", ["params", "outputs"])
def test_odd_sizes(N, d, o, r, combine, algo):
    # d, o not multiples of any block; r = 1; one token
    compare(N=N, d=d, o=o, r=r, h=1, m=3, R=3, combine=combine, kind="poly", dtype=torch.float32, algo=algo,
            base_kind="linear" if N % 2 else "tensor")


@pytest.mark.parametrize("algo", ["rows", "tokens"])
@pytest.mark.parametrize("combine", ["params", "outputs"])
def test_empty_batch(combine, algo):
    for base_kind in BASES:
        compare(N=0, d=8, o=8, r=2, h=1, m=3, R=2, combine=combine, kind="poly", dtype=torch.float32,
                base_kind=base_kind, algo=algo)


@pytest.mark.parametrize("algo", ["rows", "tokens"])
@pytest.mark.parametrize("combine", ["params", "outputs"])
def test_one_task_every_token_own_row_and_straddling_tiles(combine, algo):
    # one routing row for the whole batch
    compare(N=40, d=16, o=16, r=2, h=1, m=4, R=1, combine=combine, kind="poly", dtype=torch.float32, algo=algo,
            route_ids=torch.zeros(40, dtype=torch.long))
    # every token its own row (token-level MoE-LoRA)
    compare(N=23, d=16, o=16, r=2, h=1, m=4, R=23, combine=combine, kind="topk", dtype=torch.float32, algo=algo,
            route_ids=torch.randperm(23))
    # runs of 7 tokens: every 16-token tile straddles two or three rows; unsorted order too
    runs = torch.arange(6).repeat_interleave(7)
    compare(N=42, d=16, o=16, r=2, h=1, m=4, R=6, combine=combine, kind="softmax", dtype=torch.float32, algo=algo,
            route_ids=runs)
    compare(N=42, d=16, o=16, r=2, h=1, m=4, R=6, combine=combine, kind="softmax", dtype=torch.float32, algo=algo,
            route_ids=runs[torch.randperm(42)])
    # rows that appear in no token
    compare(N=20, d=16, o=16, r=2, h=1, m=4, R=9, combine=combine, kind="poly", dtype=torch.float32, algo=algo,
            route_ids=torch.tensor([0, 3, 8] * 6 + [3, 3]))


def _tile_config(name):
    if name == "split":  # token chunks of one tile and one skill per program: split grids, skill blocks
        return dict(BLOCK_N=16, BLOCK_D=16, BLOCK_O=16, BLOCK_W=16, BLOCK_K=16, SPLIT_TILES=1, SKILL_COLUMNS=16,
                    num_warps=1, num_stages=1)
    return triton_backend.tile_table()["classes"][name]  # the GPU's tile sizes, run in the interpreter


# the training and medium classes at every rank the kernels size for; the decode class (whose
# small tiles the interpreter's own resemble) and split-everything tiles, slow in the
# interpreter, at the ranks that change their code paths
TILE_CASES = [(c, r) for c in ("medium", "train") for r in (1, 16, 64, 128)] + [("decode", 16), ("split", 1),
                                                                                 ("split", 128)]


@pytest.mark.parametrize("cls,r", TILE_CASES)
@pytest.mark.parametrize("combine,h,kind", [("params", 2, "poly"), ("outputs", 1, "topk")])
def test_tile_classes_and_ranks(cls, r, combine, h, kind):
    # the interpreter picks its own small tiles; here every class's GPU tiles run on a small shape
    # (d and o not multiples of any block, tiles straddling rows)
    N = 40 if cls == "split" else 70
    with triton_backend.tile_override(_tile_config(cls)):
        for algo in ("rows", "tokens"):
            compare(N=N, d=2 * 37, o=2 * 21, r=r, h=h, m=5, R=6, combine=combine, kind=kind, dtype=torch.float32,
                    base_kind="linear", algo=algo, seed=r)


@pytest.mark.parametrize("group", [2, 3, 64])
def test_grouped_program_orders_compute_the_same(group):
    # the fused expand's grouped order (a base weight larger than L2: `group` token tiles side by
    # side per column panel): every program does the same work, in another order, so the output
    # and every gradient are bitwise those of the column-fastest order; 5 token tiles, so a group
    # of 2 or 3 leaves a short last group
    g = torch.Generator().manual_seed(group)
    x = torch.randn(70, 24, generator=g).to(DEVICE)
    A = (torch.randn(2, 4, 12, 3, generator=g) * 0.3).to(DEVICE)
    B = (torch.randn(2, 4, 3, 21, generator=g) * 0.5).to(DEVICE)
    W = (torch.randn(42, 24, generator=g) * 0.2).to(DEVICE)
    bias = torch.randn(42, generator=g).to(DEVICE)
    logits = torch.randn(6, 2, 4, generator=g).to(DEVICE)
    route_ids = torch.randint(0, 6, (70,), generator=g).to(DEVICE)
    runs = []
    for grp in (1, group):
        leaves = [t.clone().requires_grad_(True) for t in (x, A, B, logits)]
        with triton_backend.tile_override(dict(triton_backend._INTERPRETER_TILES, GROUP=grp)):
            rt = routers.poly_route(leaves[3])
            y = routed_lora(leaves[0], leaves[1], leaves[2], rt.idx, rt.w, route_ids, scale=0.5, weight=W, bias=bias,
                            backend="triton")
            runs.append([y] + list(torch.autograd.grad(y.square().sum(), leaves)))
    for name, a, b in zip(["y", "dx", "dA", "dB", "dlogits"], *runs):
        assert torch.equal(a, b), name
    if group != 3:  # against torch once: the orders are equal bitwise
        return
    with triton_backend.tile_override(dict(triton_backend._INTERPRETER_TILES, GROUP=group)):
        compare(N=70, d=24, o=42, r=3, h=2, m=4, R=6, combine="params", kind="poly", dtype=torch.float32,
                base_kind="linear")
        compare(N=70, d=24, o=42, r=3, h=1, m=4, R=6, combine="outputs", kind="topk", dtype=torch.float32,
                base_kind="linear")


def test_weight_gradients_are_deterministic():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 16, generator=g).to(DEVICE)
    A = torch.randn(2, 4, 8, 3, generator=g).to(DEVICE).requires_grad_(True)
    B = torch.randn(2, 4, 3, 8, generator=g).to(DEVICE).requires_grad_(True)
    logits = torch.randn(5, 2, 4, generator=g).to(DEVICE).requires_grad_(True)
    route_ids = torch.randint(0, 5, (50,), generator=g).to(DEVICE)
    runs = []
    for _ in range(2):
        rt = routers.poly_route(logits)
        y = routed_lora(x, A, B, rt.idx, rt.w, route_ids, backend="triton")
        runs.append(torch.autograd.grad(y.square().sum(), [A, B, logits]))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_layer_and_from_peft_model_round_trip():
    from peft import PolyConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    peft_model = get_peft_model(LlamaForCausalLM(cfg), PolyConfig(r=2, n_tasks=3, n_skills=3, n_splits=2,
                                                                  target_modules=["q_proj", "v_proj"],
                                                                  init_weights=False, task_type="CAUSAL_LM"))
    peft_model.eval()
    ref = copy.deepcopy(peft_model)
    model = routedlora.from_peft(peft_model, backend="triton").to(DEVICE)
    ref.to(DEVICE)
    ids = torch.randint(0, 64, (3, 6)).to(DEVICE)
    tasks = torch.tensor([2, 0, 1]).to(DEVICE)
    out_ref = ref(input_ids=ids, task_ids=tasks, labels=ids)
    with routedlora.routing(model, tasks):
        out = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, out_ref.logits, rtol=1e-4, atol=1e-5)
    out.loss.backward()
    out_ref.loss.backward()
    for name, layer in routedlora.routed_layers(model):
        poly = ref.base_model.model.get_submodule(name)
        pairs = [(layer.lora_A, poly.poly_lora_A["default"]), (layer.lora_B, poly.poly_lora_B["default"]),
                 (layer.router_logits, poly.poly_router["default"].module_logits)]
        for p, q in pairs:
            torch.testing.assert_close(p.grad.reshape(q.grad.shape), q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compiles_as_single_ops():
    torch.manual_seed(0)
    layer = routedlora.RoutedLoraLinear(nn.Linear(16, 8), n_tasks=3, n_skills=4, r=2, n_heads=2, init_weights=False,
                                        backend="triton").eval().to(DEVICE)
    x = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
    tasks = torch.tensor([0, 2], device=DEVICE)
    eager = layer(x, task_ids=tasks)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(x, task_ids=tasks)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    assert layer.lora_A.grad is not None


def test_missing_triton_device_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if DEVICE == "cuda":
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        routed_lora(torch.randn(2, 4), torch.randn(1, 2, 4, 1), torch.randn(1, 2, 1, 4),
                    torch.zeros(1, 1, 1, dtype=torch.long), torch.ones(1, 1, 1), torch.zeros(2, dtype=torch.long),
                    backend="triton")


# --- routers inside kernels ---------------------------------------------------------


@pytest.mark.parametrize("kind,kw,noise", [
    ("poly", {}, False), ("poly", dict(temperature=0.5), True), ("softmax", dict(temperature=0.5), False),
    ("topk", dict(k=3, temperature=0.7), False), ("topk", dict(k=2, renormalize=False), False),
    ("topk", dict(k=1), False),
])
def test_kernel_routers_match_torch_routers(kind, kw, noise):
    g = torch.Generator().manual_seed(5)
    T, h, m = 5, 2, 7  # and 9 routing rows below
    logits = torch.randn(T, h, m, generator=g).to(DEVICE).requires_grad_(True)
    rows_task = torch.tensor([0, 3, 3, 1, 4, 0, 3, 2, 2]).to(DEVICE)  # tasks repeat: their gradients add up
    row_example = torch.tensor([0, 0, 1, 1, 2, 3, 3, 4, 5]).to(DEVICE)  # per-token rows share an example's noise
    seed = torch.tensor([987654321], device=DEVICE) if noise else None
    idx, w = triton_backend.route(logits, rows_task, row_example, kind=kind, seed=seed, **kw)
    z = logits[rows_task].float()
    if kind == "poly":
        u = triton_backend.uniform_draws(seed, 6, h, m)[row_example] if noise else None
        ref = routers.poly_route(z, noise=u, **kw)
    elif kind == "softmax":
        ref = routers.softmax_route(z, **kw)
    else:
        ref = routers.topk_route(z, **kw)
    assert torch.equal(idx, ref.idx)
    torch.testing.assert_close(w, ref.w, rtol=1e-5, atol=1e-6)
    cot = torch.randn(w.shape, generator=g).to(DEVICE)
    g_kernel = torch.autograd.grad((w * cot).sum(), logits)[0]
    g_ref = torch.autograd.grad((ref.w * cot).sum(), logits)[0]
    torch.testing.assert_close(g_kernel, g_ref, rtol=1e-5, atol=1e-6)


def test_kernel_noise_is_uniform_and_keyed_by_example():
    seed = torch.tensor([42], device=DEVICE)
    u = triton_backend.uniform_draws(seed, 64, 2, 8)
    assert 0.4 < float(u.mean()) < 0.6 and float(u.min()) > 0 and float(u.max()) < 1
    assert torch.equal(triton_backend.uniform_draws(seed, 64, 2, 8), u)  # regenerated, not stored
    assert not torch.equal(triton_backend.uniform_draws(torch.tensor([43], device=DEVICE), 64, 2, 8), u)


@pytest.mark.parametrize("router,h", [("poly", 2), ("softmax", 2), ("topk", 1), ("cpoly", 2), ("mta", 1)])
def test_layer_on_triton_equals_layer_on_torch(router, h):
    torch.manual_seed(0)
    base = nn.Linear(16, 12).to(DEVICE)
    kw = dict(n_tasks=4, n_skills=3, r=2, n_heads=h, router=router, init_weights=False)
    cls = routedlora.MTALinear if router == "mta" else routedlora.RoutedLoraLinear
    ref = cls(base, backend="torch", **kw).eval()
    fast = cls(base, backend="triton", **kw).eval()
    fast.load_state_dict(ref.state_dict())
    if router == "mta":
        ref.set_stage(2)
        fast.set_stage(2)
    x = torch.randn(3, 5, 16, device=DEVICE)
    tasks = torch.tensor([3, 0, 3], device=DEVICE)
    assert_layers_agree(ref, fast, x, tasks)


def test_layer_training_noise_on_triton_is_seeded_and_per_example():
    torch.manual_seed(0)
    base = nn.Linear(16, 12).to(DEVICE)
    make = lambda: routedlora.RoutedLoraLinear(base, n_tasks=3, n_skills=4, r=2, n_heads=2, init_weights=False,
                                               backend="triton", seed=7)
    a, b = make(), make()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 4, 16, device=DEVICE).expand(2, 4, 16)
    ya, yb = a(x, task_ids=[1, 1]), b(x, task_ids=[1, 1])
    torch.testing.assert_close(ya, yb)  # same seed, same draws
    assert not torch.allclose(ya[0], ya[1])  # same task and input, each example its own noise


@pytest.mark.parametrize("combine", ["params", "outputs"])
def test_repeated_skills_in_a_row(combine):
    # a row may name one skill twice: the weights add up, each slot gets its own gradient
    g = torch.Generator().manual_seed(9)
    x = torch.randn(21, 16, generator=g).to(DEVICE)
    A = torch.randn(1, 4, 16, 3, generator=g).to(DEVICE)
    B = torch.randn(1, 4, 3, 8, generator=g).to(DEVICE)
    idx = torch.tensor([[[0, 0, 2]], [[1, 3, 1]], [[2, 2, 2]]]).to(DEVICE)
    w0 = torch.rand(3, 1, 3, generator=g).to(DEVICE)
    route_ids = torch.randint(0, 3, (21,), generator=g).to(DEVICE)
    outs = {}
    for backend in ("torch", "triton"):
        leaves = [t.clone().requires_grad_(True) for t in (x, A, B, w0)]
        y = routed_lora(leaves[0], leaves[1], leaves[2], idx, leaves[3], route_ids, combine=combine, backend=backend)
        outs[backend] = [y] + list(torch.autograd.grad(y.square().sum(), leaves))
    for name, ref, got in zip(["y", "dx", "dA", "dB", "dw"], outs["torch"], outs["triton"]):
        err = (got - ref).abs().max() / ref.abs().max()
        assert err <= TOL[torch.float32], f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("algo", ["rows", "tokens"])
@pytest.mark.parametrize("combine,h", [("params", 2), ("outputs", 1)])
def test_out_of_range_ids_poison_only_their_tokens(combine, h, algo):
    # validate=False hands the kernels ids nobody checked: they must never become addresses; the
    # tokens they touch come out NaN, every other token exact
    g = torch.Generator().manual_seed(5)
    N, d, o, r, m, R, K = 12, 8 * h, 6 * h, 3, 4, 4, 2
    x = torch.randn(N, d, generator=g).to(DEVICE)
    A = (torch.randn(h, m, d // h, r, generator=g) * 0.3).to(DEVICE)
    B = (torch.randn(h, m, r, o // h, generator=g) * 0.3).to(DEVICE)
    idx = torch.stack([torch.randperm(m, generator=g)[:K] for _ in range(R * h)]).view(R, h, K).to(DEVICE)
    w = torch.rand(R, h, K, generator=g).to(DEVICE)
    rid = (torch.arange(N) % R).to(DEVICE)
    rid[3] = R + 5  # token 3: routing row out of range
    rid[7] = -1  # token 7: negative row
    idx[2, 0, 1] = m + 3  # row 2 (tokens 2, 6, 10): a skill out of range
    bad = torch.zeros(N, dtype=torch.bool, device=DEVICE)
    bad[[3, 7, 2, 6, 10]] = True
    ok_rid, ok_idx = rid.clone(), idx.clone()
    ok_rid[3], ok_rid[7], ok_idx[2, 0, 1] = 0, 0, (idx[2, 0, 0] + 1) % m
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    with algorithm(algo):
        y = routed_lora(xs[0], A, B, idx, w, rid, scale=0.5, combine=combine, backend="triton", validate=False)
        y.sum().backward()
    ref = routed_lora(xs[1], A, B, ok_idx, w, ok_rid, scale=0.5, combine=combine, backend="torch")
    ref.sum().backward()
    assert torch.isnan(y[bad]).all()
    torch.testing.assert_close(y[~bad], ref[~bad], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(xs[0].grad[~bad], xs[1].grad[~bad], rtol=2e-5, atol=2e-5)


def test_out_of_range_task_ids_give_nan_weights_in_the_router_kernel():
    logits = torch.randn(3, 2, 4).to(DEVICE)
    rows_task = torch.tensor([0, 5, 2, -1]).to(DEVICE)  # rows 1 and 3 name no task
    for kind, kw in (("poly", {}), ("softmax", {}), ("topk", dict(k=2))):
        _, w = triton_backend.route(logits, rows_task, kind=kind, **kw)
        assert torch.isnan(w[[1, 3]]).all() and torch.isfinite(w[[0, 2]]).all(), kind


@pytest.mark.parametrize("combine,h", [("params", 2), ("outputs", 1)])
def test_a_non_finite_skill_nobody_selects_changes_nothing(combine, h):
    # the kernels read the selected skills only: a NaN or Inf elsewhere never reaches a token
    g = torch.Generator().manual_seed(6)
    N, d, o, r, m, R, K = 12, 8 * h, 6 * h, 3, 5, 4, 2
    x = torch.randn(N, d, generator=g).to(DEVICE)
    A = (torch.randn(h, m, d // h, r, generator=g) * 0.3).to(DEVICE)
    B = (torch.randn(h, m, r, o // h, generator=g) * 0.3).to(DEVICE)
    idx = torch.stack([torch.randperm(m - 1, generator=g)[:K] for _ in range(R * h)]).view(R, h, K).to(DEVICE)
    w = torch.rand(R, h, K, generator=g).to(DEVICE)
    rid = (torch.arange(N) % R).to(DEVICE)
    A2, B2 = A.clone(), B.clone()
    A2[:, m - 1] = float("nan")
    B2[:, m - 1] = float("inf")
    ref = routed_lora(x, A, B, idx, w, rid, scale=0.5, combine=combine, backend="triton")
    out = routed_lora(x, A2, B2, idx, w, rid, scale=0.5, combine=combine, backend="triton")
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
