"""Router options against the peers' own code: mttl's Poly/MHR options and router granularity, PEFT PR
#1297's C-Poly variants (``tests/peers/mttl_poly.py``, ``tests/peers/cpoly.py``), and the dtype of the
Gumbel noise against PEFT's.

Every parity test gives the routedlora layer and the transcription the same parameter values and the
same torch seed, and compares outputs and the gradients of the input, skills and logits in float64.
"""
import pytest
import torch
from safetensors import safe_open
from torch import nn

import routedlora
from routedlora import RoutedLoraConfig, RoutedLoraLinear, routers
from peers import cpoly as pr_cpoly
from peers import mttl_poly as mttl

TOL = dict(rtol=1e-11, atol=1e-12)
D, O, R, S = 8, 6, 2, 3  # in, out, rank, tokens per sequence


def poly_layer(h=2, m=4, T=3, **kw):
    torch.manual_seed(0)
    layer = RoutedLoraLinear(nn.Linear(D, O, dtype=torch.float64), n_tasks=T, n_skills=m, r=R, n_heads=h,
                             init_weights=False, backend="torch", **kw)
    with torch.no_grad():
        layer.router_logits.normal_()
    return layer


def leaves(layer):
    """Detached copies of the layer's values, for the peer, requiring grad."""
    return {k: getattr(layer, k).detach().clone().requires_grad_(True) for k in ("lora_A", "lora_B", "router_logits")}


def run_ours(layer, x, ids, g, seed):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = layer(x, task_ids=ids)
    (y * g).sum().backward()
    grads = {k: getattr(layer, k).grad for k in ("lora_A", "lora_B", "router_logits")}
    return y.detach(), x.grad, grads


def compare(ours, theirs, skip=()):
    y, gx, grads = ours
    ty, tgx, tgrads = theirs
    torch.testing.assert_close(y, ty, **TOL)
    torch.testing.assert_close(gx, tgx, **TOL)
    for k, gr in grads.items():
        if k in skip:
            continue
        want = tgrads[k]
        if gr is None or want is None:
            assert gr is None and (want is None or not want.any()), k
            continue
        torch.testing.assert_close(gr, want, **TOL, msg=k)


def inputs(B=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, D, generator=gen, dtype=torch.float64)
    g = torch.randn(B, S, O, generator=gen, dtype=torch.float64)
    return x, g


# (routedlora options, mttl options, training) — mttl's default is relaxed_bernoulli=True
POLY_CASES = {
    "default-train": (dict(), dict(), True),
    "default-eval": (dict(), dict(), False),
    "sigmoid-train": (dict(gumbel=False), dict(relaxed_bernoulli=False), True),
    "straight-through-train": (dict(gumbel=False, router_straight_through=True),
                               dict(relaxed_bernoulli=False, straight_through=True), True),
    "straight-through-eval": (dict(router_straight_through=True), dict(relaxed_bernoulli=False, straight_through=True),
                              False),
    "straight-through-gumbel": (dict(router_straight_through=True), dict(straight_through_relaxed=True), True),
    "l2-norm": (dict(gumbel=False, router_l2_norm=True), dict(l2_norm=True), True),
    "dropout-gumbel": (dict(router_dropout=0.4), dict(dropout=0.4), True),
    "dropout-straight-through": (dict(gumbel=False, router_straight_through=True, router_dropout=0.3),
                                 dict(relaxed_bernoulli=False, straight_through=True, dropout=0.3), True),
    "shared-skill-train": (dict(router_shared_skill=True), dict(shared_skill=True), True),
    "shared-skill-eval": (dict(router_shared_skill=True), dict(shared_skill=True), False),
    "average-correction": (dict(router_average_correction=True), dict(average_correction=True), True),
    "all-of-mttl": (dict(gumbel=False, router_straight_through=True, router_dropout=0.25, router_shared_skill=True),
                    dict(relaxed_bernoulli=False, straight_through=True, dropout=0.25, shared_skill=True), True),
}


@pytest.mark.parametrize("h", [1, 2])
@pytest.mark.parametrize("case", sorted(POLY_CASES))
def test_poly_options_match_mttl(case, h):
    ours_kw, mttl_kw, training = POLY_CASES[case]
    m, T = 4, 3
    layer = poly_layer(h=h, m=m, T=T, **ours_kw).train(training)
    p = leaves(layer)
    x, g = inputs()
    ids = torch.tensor([2, 0, 2, 1])
    ours = run_ours(layer, x, ids, g, seed=11)

    xt = x.clone().requires_grad_(True)
    torch.manual_seed(11)
    w = mttl.selector_weights(p["router_logits"].view(T, h * m), ids, h, m, training=training, **mttl_kw)
    y = mttl.poly_lora_forward(xt, layer.base_layer.weight, layer.base_layer.bias, p["lora_A"], p["lora_B"], w, R)
    (y * g).sum().backward()
    compare(ours, (y.detach(), xt.grad, {k: v.grad for k, v in p.items()}))


@pytest.mark.parametrize("h", [1, 2])
def test_private_selector_matches_mttl(h):
    m, T = 4, 3
    layer = poly_layer(h=h, m=m, T=T, gumbel=False, router_selector="private").train()
    assert layer.trainable_names() == ("lora_A", "lora_B")  # the logits are not read, so not trained
    p = leaves(layer)
    x, g = inputs()
    ids = torch.tensor([2, 0, 2, 1])
    ours = run_ours(layer, x, ids, g, seed=3)
    xt = x.clone().requires_grad_(True)
    w = mttl.private_weights(ids, m)  # (bs, 1, m): mttl's einsum broadcasts it over the heads
    y = mttl.poly_lora_forward(xt, layer.base_layer.weight, layer.base_layer.bias, p["lora_A"], p["lora_B"], w, R)
    (y * g).sum().backward()
    compare(ours, (y.detach(), xt.grad, {k: v.grad for k, v in p.items()}))
    rt = layer.eval().route(ids)
    assert rt.idx.shape == (4, h, 1) and torch.equal(rt.idx[:, :, 0], ids[:, None].expand(4, h))


def test_dropout_only_in_training_where_mttl_drops_always():
    layer = poly_layer(gumbel=False, router_dropout=0.5).eval()
    ids = torch.tensor([0, 1, 2])
    plain = poly_layer(gumbel=False).eval()
    torch.testing.assert_close(layer.route(ids).w, plain.route(ids).w)  # routedlora: no dropout in evaluation
    torch.manual_seed(0)
    dropped = mttl.selector_weights(plain.router_logits.detach().view(3, 8), ids, 2, 4, training=False,
                                    relaxed_bernoulli=False, dropout=0.5)
    assert not torch.allclose(dropped, plain.route(ids).w)  # mttl's inline nn.Dropout drops in evaluation too


def test_seeded_dropout_is_a_function_of_the_seed():
    layer = poly_layer(gumbel=False, router_dropout=0.5, seed=4).train()
    ids = torch.arange(3).repeat(8)
    a = layer.route(ids).w
    b = layer.route(ids).w
    torch.testing.assert_close(a, b)  # same batch counter, same mask (a checkpointed re-run recomputes it)
    layer.advance_noise()
    assert not torch.equal(a, layer.route(ids).w)
    zero = (a == 0).double().mean().item()
    assert 0.3 < zero < 0.7


# --- C-Poly (PEFT PR #1297) -------------------------------------------------------


def cpoly_layer(h=2, mc=3, T=3, n_specific=1, **kw):
    torch.manual_seed(0)
    layer = RoutedLoraLinear(nn.Linear(D, O, dtype=torch.float64), n_tasks=T, n_skills=mc, r=R, n_heads=h,
                             router="cpoly", n_specific=n_specific, init_weights=False, backend="torch", **kw)
    with torch.no_grad():
        layer.router_logits[..., :mc].normal_()
        layer.router_logits[..., mc:] += 0.3 * torch.randn(T, 1, T * n_specific, dtype=torch.float64)
    return layer


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("h", [1, 2])
@pytest.mark.parametrize("variant", ["cpoly", "cpoly_simple"])
def test_cpoly_variants_match_the_pr(variant, h, training):
    mc, T = 3, 3
    simple = variant == "cpoly_simple"
    layer = cpoly_layer(h=h, mc=mc, T=T, **(dict(cpoly_fixed_specific=True) if simple else dict(cpoly_tied_heads=True)))
    layer.train(training)
    with torch.no_grad():  # heads other than 0 hold other task-specific values: tied heads never read them
        layer.router_logits[:, 1:, mc:] += 5.0
    p = leaves(layer)
    x, g = inputs()
    ids = torch.tensor([2, 0, 2, 1])
    ours = run_ours(layer, x, ids, g, seed=5)

    module_logits = p["router_logits"][:, :, :mc].reshape(T, h * mc)
    c_module_logits = p["router_logits"][:, 0, mc:]
    xt = x.clone().requires_grad_(True)
    torch.manual_seed(5)
    w = pr_cpoly.cpoly_router(module_logits, c_module_logits, ids, h, mc, training=training, simple=simple)
    y = pr_cpoly.cpoly_lora_forward(xt, layer.base_layer.weight, layer.base_layer.bias, p["lora_A"], p["lora_B"], w,
                                    R)
    (y * g).sum().backward()
    compare(ours, (y.detach(), xt.grad, {k: v.grad for k, v in p.items()}))
    spec_grad = layer.router_logits.grad[..., mc:]
    if simple:
        assert not spec_grad.any()  # fixed one-hot: no gradient to the task-specific logits
        assert layer.router_logits.grad[..., :mc].any()  # the common logits still train
    else:
        assert not spec_grad[:, 1:].any() and spec_grad[:, 0].any()


def test_cpoly_fixed_specific_with_several_private_skills():
    mc, T, ns = 2, 3, 2
    layer = cpoly_layer(h=2, mc=mc, T=T, n_specific=ns, cpoly_fixed_specific=True).eval()
    ids = torch.tensor([1, 2, 0])
    w = layer.route(ids).w
    torch.testing.assert_close(w[..., mc:], pr_cpoly.specific_owner(T, ns)[ids].double()[:, None].expand(3, 2, T * ns))
    pr = pr_cpoly.cpoly_router(layer.router_logits.detach()[:, :, :mc].reshape(T, 2 * mc), None, ids, 2, mc,
                               training=False, simple=True, n_specific=ns)
    torch.testing.assert_close(w, pr, **TOL)


def test_cpoly_default_keeps_per_head_specific_weights():
    layer = cpoly_layer(h=2)
    with torch.no_grad():
        layer.router_logits[:, 1, 3:] += 1.0
    w = layer.eval().route(torch.arange(3)).w
    torch.testing.assert_close(w[:, 1, 3:], w[:, 0, 3:] + 1.0)


# --- router granularity -----------------------------------------------------------


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(D, D, dtype=torch.float64)
        self.v = nn.Linear(D, D, dtype=torch.float64)

    def forward(self, x):
        return torch.tanh(self.v(torch.tanh(self.q(x))))


class Tiny(nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.block = nn.ModuleList(Block() for _ in range(n))  # T5's naming: mttl's "blockwise" finds it
        self.head = nn.Linear(D, O, dtype=torch.float64)

    def forward(self, x):
        for b in self.block:
            x = b(x)
        return self.head(x)


def tiny(granularity, h=2, m=4, T=3, **kw):
    torch.manual_seed(0)
    model = Tiny()
    cfg = RoutedLoraConfig(target_modules=["q", "v", "head"], n_tasks=T, n_skills=m, r=R, n_heads=h,
                           init_weights=False, backend="torch", router_granularity=granularity, **kw)
    routedlora.inject(model, cfg)
    with torch.no_grad():
        for _, layer in routedlora.routed_layers(model):
            layer.router_logits.normal_()
    return model


MTTL_GRANULARITY = {"layer": "finegrained", "block": "blockwise", "model": "coarsegrained"}


def test_router_group_names():
    g = routers.router_group
    assert g("model.layers.3.self_attn.q_proj", "block") == "model.layers.3"
    assert g("encoder.block.0.layer.1.EncDecAttention.q", "block") == "encoder.block.0"
    assert g("bert.encoder.layer.2.attention.self.query", "block") == "bert.encoder.layer.2"
    assert g("lm_head", "block") == "lm_head"
    assert g("lm_head", "model") == "" and g("lm_head", "layer") == "lm_head"
    for name in ("encoder.block.0.layer.0.SelfAttention.q", "decoder.block.11.layer.2.DenseReluDense.wo", "block.1.v"):
        for ours, theirs in MTTL_GRANULARITY.items():
            assert g(name, ours) == mttl.extract_identifier(name, theirs)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("granularity", ["layer", "block", "model"])
def test_granularity_matches_mttl(granularity, training):
    h, m, T = 2, 4, 3
    model = tiny(granularity, h=h, m=m, T=T).train(training)
    layers = routedlora.routed_layers(model)
    tables = {id(layer.router_logits) for _, layer in layers}
    assert len(tables) == {"layer": 7, "block": 4, "model": 1}[granularity]  # 3 blocks of 2, plus the head
    assert sum(p is layers[0][1].router_logits for p in model.parameters()) == 1  # deduplicated
    # the peer: one selector (logits table) per mttl identifier, each layer calling it itself
    selectors, peer = {}, {}
    for name, layer in layers:
        key = mttl.extract_identifier(name, MTTL_GRANULARITY[granularity]) if name != "head" else (
            "" if granularity == "model" else "head")
        if key not in selectors:
            selectors[key] = layer.router_logits.detach().clone().view(T, h * m).requires_grad_(True)
        peer[name] = (layer, selectors[key], layer.lora_A.detach().clone().requires_grad_(True),
                      layer.lora_B.detach().clone().requires_grad_(True))
    x, _ = inputs()
    g = torch.randn(4, S, O, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    ids = torch.tensor([1, 0, 2, 1])

    xo = x.clone().requires_grad_(True)
    torch.manual_seed(21)
    with routedlora.routing(model, ids):
        y = model(xo)
    (y * g).sum().backward()

    def peer_linear(name, inp):
        layer, logits, A, B = peer[name]
        w = mttl.selector_weights(logits, ids, h, m, training=training)
        return mttl.poly_lora_forward(inp, layer.base_layer.weight, layer.base_layer.bias, A, B, w, R)

    xt = x.clone().requires_grad_(True)
    torch.manual_seed(21)
    t = xt
    for i in range(3):
        t = torch.tanh(peer_linear(f"block.{i}.v", torch.tanh(peer_linear(f"block.{i}.q", t))))
    yt = peer_linear("head", t)
    (yt * g).sum().backward()

    torch.testing.assert_close(y, yt, **TOL)
    torch.testing.assert_close(xo.grad, xt.grad, **TOL)
    for name, layer in layers:
        _, logits, A, B = peer[name]
        torch.testing.assert_close(layer.lora_A.grad, A.grad, **TOL)
        torch.testing.assert_close(layer.router_logits.grad.view(T, h * m), logits.grad, **TOL)  # summed over the group


def test_shared_table_gradient_is_the_sum_of_its_layers():
    shared = tiny("model").eval()
    untied = tiny("layer").eval()
    with torch.no_grad():
        for (_, a), (_, b) in zip(routedlora.routed_layers(shared), routedlora.routed_layers(untied)):
            b.router_logits.copy_(a.router_logits)
    x, _ = inputs()
    for model in (shared, untied):
        with routedlora.routing(model, torch.tensor([0, 1, 2, 0])):
            model(x).square().sum().backward()
    total = sum(layer.router_logits.grad for _, layer in routedlora.routed_layers(untied))
    torch.testing.assert_close(routedlora.routed_layers(shared)[0][1].router_logits.grad, total, **TOL)


def test_shared_tables_save_once_and_load_tied(tmp_path):
    model = tiny("block", gumbel=False).eval()
    path = tmp_path / "a.safetensors"
    routedlora.save_adapter(model, path)
    with safe_open(str(path), "pt") as f:
        keys = sorted(k for k in f.keys() if k.endswith("router_logits"))
    assert keys == ["block.0.q.router_logits", "block.1.q.router_logits", "block.2.q.router_logits",
                    "head.router_logits"]
    x, _ = inputs()
    ids = torch.tensor([2, 1, 0, 2])
    with routedlora.routing(model, ids):
        want = model(x)
    torch.manual_seed(0)
    fresh = Tiny()  # the same base weights as tiny()'s
    routedlora.load_adapter(fresh, path)
    layers = dict(routedlora.routed_layers(fresh))
    assert layers["block.1.q"].router_logits is layers["block.1.v"].router_logits
    assert layers["block.1.q"].router_logits is not layers["block.2.q"].router_logits
    with routedlora.routing(fresh.eval(), ids):
        torch.testing.assert_close(fresh(x), want, **TOL)
    # again into the injected model: copies once per table, the ties stay
    with torch.no_grad():
        layers["block.0.v"].router_logits.zero_()
    routedlora.load_adapter(fresh, path)
    assert layers["block.0.q"].router_logits is layers["block.0.v"].router_logits
    with routedlora.routing(fresh, ids):
        torch.testing.assert_close(fresh(x), want, **TOL)
    # a file whose tables are grouped differently does not fit
    other = tiny("layer", gumbel=False)
    with pytest.raises(ValueError, match="router_granularity"):
        routedlora.load_adapter(other, path)


def test_mhr_z_new_rows_stay_shared_and_param_groups_hold_each_table_once():
    model = tiny("block")
    new = routedlora.mhr_z(model, n_new_tasks=2)
    assert new == [3, 4]
    layers = dict(routedlora.routed_layers(model))
    assert layers["block.0.q"].router_logits is layers["block.0.v"].router_logits
    assert layers["block.0.q"].router_logits.shape == (5, 2, 4)
    groups = routedlora.param_groups(model, lr=1e-3, router_lr=0.1)
    assert len(groups) == 1 and len(groups[0]["params"]) == 4 and groups[0]["lr"] == 0.1
    opt = torch.optim.SGD(groups)
    x, _ = inputs()
    before = layers["block.0.q"].router_logits.detach().clone()
    with routedlora.routing(model, torch.tensor([3, 4, 3, 0])):
        model(x).sum().backward()
    opt.step()
    assert not torch.equal(before, layers["block.0.v"].router_logits)
    model2 = tiny("model")
    groups = routedlora.param_groups(model2, lr=1e-3, router_lr=0.1)
    assert [len(gr["params"]) for gr in groups] == [14, 1]
    routedlora.mhr_mu(model2)
    tables = {id(layer.router_logits) for _, layer in routedlora.routed_layers(model2)}
    assert len(tables) == 1


def test_merge_with_a_shared_table_serves_the_task():
    model = tiny("model", gumbel=False).eval()
    x, _ = inputs()
    with routedlora.routing(model, 1):
        want = model(x)
    routedlora.merge(model, 1)
    with routedlora.routing(model, 1):
        torch.testing.assert_close(model(x), want, rtol=1e-6, atol=1e-7)  # merge folds in float32
    routedlora.unmerge(model)


def test_tables_shared_only_between_layers_that_fit():
    model = Tiny()
    model.block[0].v = nn.Linear(D, D, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = RoutedLoraConfig(target_modules=["q", "v"], n_tasks=3, router_granularity="block")
    with pytest.raises(ValueError, match="router_granularity: 'block.0.v' and 'block.0.q'"):
        routedlora.inject(model, cfg)
    assert not routedlora.routed_layers(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    routedlora.inject(model, cfg.replace(router_granularity="layer"))  # each layer its own table: fine


# --- where options are refused --------------------------------------------------------


@pytest.mark.parametrize("kw,match", [
    (dict(router_granularity="blocks"), "router_granularity"),
    (dict(router_granularity=1), "router_granularity"),
    (dict(router="mta", router_granularity="model"), "router_granularity"),
    (dict(router_selector="shared"), "router_selector"),
    (dict(router_selector="private"), "gumbel"),
    (dict(router_selector="private", gumbel=False, n_skills=2), "router_selector"),
    (dict(router_selector="private", gumbel=False, router_shared_skill=True), "router_selector"),
    (dict(router_l2_norm=True), "gumbel"),
    (dict(router_l2_norm=True, gumbel=False, router_straight_through=True), "router_l2_norm"),
    (dict(router_straight_through="yes"), "router_straight_through"),
    (dict(router_dropout=1.0), "router_dropout"),
    (dict(router_dropout=-0.1), "router_dropout"),
    (dict(router_dropout=float("nan")), "router_dropout"),
    (dict(router="softmax", router_straight_through=True), "router_straight_through"),
    (dict(router="cpoly", router_shared_skill=True), "router_shared_skill"),
    (dict(router="topk", router_dropout=0.1), "router_dropout"),
    (dict(cpoly_tied_heads=True), "cpoly_tied_heads"),
    (dict(router="softmax", cpoly_fixed_specific=True), "cpoly_fixed_specific"),
    (dict(router="cpoly", cpoly_fixed_specific=1), "cpoly_fixed_specific"),
])
def test_options_refused(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        RoutedLoraConfig(target_modules=["q"], n_tasks=3, **kw)


def test_defaults_are_todays_behaviour():
    cfg = RoutedLoraConfig(target_modules=["q"], n_tasks=3)
    assert (cfg.router_granularity, cfg.router_selector, cfg.router_straight_through, cfg.router_l2_norm,
            cfg.router_dropout, cfg.router_shared_skill, cfg.router_average_correction, cfg.cpoly_fixed_specific,
            cfg.cpoly_tied_heads) == ("layer", "learned", False, False, 0.0, False, False, False, False)
    assert RoutedLoraConfig.from_dict(cfg.to_dict()) == cfg


def test_kernel_routes_only_what_it_computes():
    plain = RoutedLoraLinear(nn.Linear(D, O), n_tasks=3, n_skills=4, backend="triton", router_granularity="model")
    assert plain._plain_router()
    for kw in (dict(router_straight_through=True), dict(router_dropout=0.1), dict(router_shared_skill=True),
               dict(router_average_correction=True), dict(gumbel=False, router_l2_norm=True),
               dict(gumbel=False, router_selector="private")):
        layer = RoutedLoraLinear(nn.Linear(D, O), n_tasks=3, n_skills=4, backend="triton", **kw)
        assert layer._kernel_route(torch.arange(3), None) is None, kw  # routed in torch instead
    for kw in (dict(cpoly_tied_heads=True), dict(cpoly_fixed_specific=True)):
        layer = RoutedLoraLinear(nn.Linear(D, O), n_tasks=3, n_skills=2, router="cpoly", backend="triton", **kw)
        assert layer._kernel_route(torch.arange(3), None) is None


def test_mhr_z_refuses_private_routing():
    model = tiny("layer", gumbel=False, router_selector="private")
    with pytest.raises(ValueError, match="private"):
        routedlora.mhr_z(model)


# --- the dtype of the Gumbel noise ------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_noise_is_drawn_in_the_logits_dtype_as_peft(dtype):
    from peft import PolyConfig
    from peft.tuners.poly.router import PolyRouter

    h, m, T = 2, 4, 3
    layer = RoutedLoraLinear(nn.Linear(D, O, dtype=dtype), n_tasks=T, n_skills=m, n_heads=h, backend="torch").train()
    with torch.no_grad():
        layer.router_logits.copy_(torch.randn(T, h, m, generator=torch.Generator().manual_seed(0)))
    ids = torch.tensor([0, 2, 1, 1, 2, 0, 0, 1] * 8)
    B = ids.shape[0]
    torch.manual_seed(3)
    u = layer._noise(B, None, h, m, torch.device("cpu"))
    torch.manual_seed(3)
    assert u.dtype == dtype and torch.equal(u, torch.rand(B, h, m, dtype=dtype))  # RelaxedBernoulli's draw
    torch.manual_seed(3)
    ours = layer.route(ids).w

    router = PolyRouter(PolyConfig(n_tasks=T, n_skills=m, n_splits=h)).to(dtype).train()
    with torch.no_grad():
        router.module_logits.copy_(layer.router_logits.view(T, h * m))
    torch.manual_seed(3)
    peft_w = router(task_ids=ids, input_ids=None)
    assert peft_w.dtype == dtype
    # the same uniforms, clamped at the dtype's ε as RelaxedBernoulli does; the router then computes in
    # float32 (float64) where PEFT computes in the logits' dtype: equal up to PEFT's rounding
    tol = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-6, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(ours, peft_w.to(ours.dtype), rtol=tol, atol=tol)
    eps = torch.finfo(dtype).eps
    exact = routers.poly_route(layer.router_logits.detach().to(ours.dtype)[ids],
                               noise=u.clamp(eps, 1 - eps)).w
    torch.testing.assert_close(ours, exact, rtol=0, atol=0)
    if dtype == torch.bfloat16:  # float32 draws would be other noise altogether (float16's happen to be close)
        torch.manual_seed(3)
        f32 = routers.poly_route(layer.router_logits.detach().float()[ids], noise=torch.rand(B, h, m)).w
        assert (f32 - peft_w.float()).abs().max() > 10 * tol


@pytest.mark.parametrize("seed", [None, 2])
def test_options_per_example_across_data_parallel_ranks(seed):
    """Each rank's rows of the global batch get the noise and dropout of a single-process run."""
    model = tiny("block", router_straight_through=True, router_dropout=0.3, seed=seed).train()
    x, _ = inputs(B=4)
    ids = torch.tensor([0, 2, 1, 1])
    torch.manual_seed(8)
    with routedlora.routing(model, ids):
        whole = model(x)
    for start in (0, 2):
        if seed is not None:
            for _, layer in routedlora.routed_layers(model):
                layer._noise_step.sub_(1)  # the rank's block is the same batch
        torch.manual_seed(8)
        with routedlora.routing(model, ids[start:start + 2], noise_rows=(start, 4)):
            torch.testing.assert_close(model(x[start:start + 2]), whole[start:start + 2], **TOL)


@pytest.mark.parametrize("seed", [None, 3])
def test_options_compile_to_the_eager_step(seed, monkeypatch):
    import torch._inductor.config as inductor_config

    # the unseeded dropout and noise draw torch's own RNG as eager does
    monkeypatch.setattr(inductor_config, "fallback_random", True)
    torch.manual_seed(0)
    layer = RoutedLoraLinear(nn.Linear(8, 6), n_tasks=3, n_skills=4, n_heads=2, r=2, init_weights=False,
                             backend="torch", router_straight_through=True, router_dropout=0.3,
                             router_shared_skill=True, seed=seed).train()
    x, ids = torch.randn(4, 3, 8), torch.tensor([0, 1, 2, 1])
    compiled = torch.compile(lambda x, ids: layer(x, task_ids=ids), fullgraph=True)
    for step in range(2):
        counter = layer._noise_step.clone()
        torch.manual_seed(step)
        y = layer(x, task_ids=ids)
        g = torch.autograd.grad(y.square().sum(), (layer.router_logits, layer.lora_A))
        layer._noise_step.copy_(counter)
        torch.manual_seed(step)
        yc = compiled(x, ids)
        gc = torch.autograd.grad(yc.square().sum(), (layer.router_logits, layer.lora_A))
        torch.testing.assert_close(yc, y)
        for a, b in zip(gc, g):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("option", [dict(router_straight_through=True), dict(router_granularity="model"),
                                    dict(router_shared_skill=True)])
def test_to_peft_refuses_options_peft_poly_lacks(option):
    pytest.importorskip("peft")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    routedlora.inject(model, routedlora.RoutedLoraConfig(target_modules=["0", "2"], n_tasks=3, **option))
    with pytest.raises(ValueError, match=next(iter(option))):
        routedlora.to_peft(model)
    assert isinstance(model[0], routedlora.RoutedLoraLinear)
