import pytest
import torch
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from routedlora import routers


def logits(R=3, h=2, m=5, seed=0):
    return torch.randn(R, h, m, generator=torch.Generator().manual_seed(seed))


def test_poly_eval_is_normalised_sigmoid():
    z = logits()
    rt = routers.poly_route(z)
    s = torch.sigmoid(z)
    torch.testing.assert_close(rt.w, s / (s.sum(-1, keepdim=True) + 1e-12))
    assert torch.equal(rt.idx, torch.arange(5).expand(3, 2, 5))
    assert rt.idx.dtype == torch.int64


def test_poly_noise_matches_peft_relaxed_bernoulli():
    z = logits()
    torch.manual_seed(7)
    peft = RelaxedBernoulli(temperature=1.0, logits=z).rsample()
    peft = peft / (peft.sum(-1, keepdim=True) + 1e-12)
    torch.manual_seed(7)
    rt = routers.poly_route(z, noise=routers.gumbel_uniform(z.shape))
    torch.testing.assert_close(rt.w, peft, rtol=1e-6, atol=1e-7)


def test_poly_noise_is_reproducible_from_a_generator():
    z = logits()
    a = routers.poly_route(z, noise=routers.gumbel_uniform(z.shape, generator=torch.Generator().manual_seed(3)))
    b = routers.poly_route(z, noise=routers.gumbel_uniform(z.shape, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(a.w, b.w)
    assert not torch.allclose(a.w, routers.poly_route(z).w)


def test_poly_saturated_logits_stay_finite():
    z = torch.tensor([[[100.0, -100.0, 0.0]]])
    rt = routers.poly_route(z, noise=routers.gumbel_uniform(z.shape))
    assert torch.isfinite(rt.w).all()


def test_softmax_temperature():
    z = logits()
    torch.testing.assert_close(routers.softmax_route(z, temperature=0.5).w, torch.softmax(z / 0.5, -1))


@pytest.mark.parametrize("renormalize", [True, False])
def test_topk(renormalize):
    z = logits()
    rt = routers.topk_route(z, k=2, temperature=0.3, renormalize=renormalize)
    p = torch.softmax(z / 0.3, -1)
    top, idx = p.topk(2, -1)
    assert torch.equal(rt.idx, idx)
    torch.testing.assert_close(rt.w, top / top.sum(-1, keepdim=True) if renormalize else top)


def test_cpoly_common_poly_and_raw_specific():
    z = logits(m=6)
    rt = routers.cpoly_route(z, n_common=2)
    s = torch.sigmoid(z[..., :2])
    torch.testing.assert_close(rt.w[..., :2], s / (s.sum(-1, keepdim=True) + 1e-12))
    torch.testing.assert_close(rt.w[..., 2:], z[..., 2:])
    assert rt.idx.shape == (3, 2, 6)


def test_weights_are_differentiable():
    z = logits().double().requires_grad_(True)
    for f in (lambda z: routers.poly_route(z).w, lambda z: routers.softmax_route(z).w,
              lambda z: routers.topk_route(z, k=3).w, lambda z: routers.cpoly_route(z, n_common=3).w):
        assert torch.autograd.gradcheck(f, (z,))


@pytest.mark.parametrize("call,match", [
    (lambda z: routers.poly_route(z, temperature=0.0), "temperature"),
    (lambda z: routers.softmax_route(z, temperature=-1.0), "temperature"),
    (lambda z: routers.topk_route(z, k=0), "top_k"),
    (lambda z: routers.topk_route(z, k=6), "top_k"),
    (lambda z: routers.cpoly_route(z, n_common=9), "n_common"),
    (lambda z: routers.poly_route(z[0]), "logits"),
    (lambda z: routers.poly_route(z, noise=torch.rand(1, 2, 5)), "noise"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call(logits())


def test_integer_logits_rejected():
    with pytest.raises(TypeError, match="logits"):
        routers.softmax_route(torch.ones(2, 1, 3, dtype=torch.long))


def _peft_formula(z, u, tau):
    """PEFT Poly's training weights written with autograd-tracked ops (RelaxedBernoulli.rsample's chain)."""
    eps = torch.finfo(torch.float32).eps
    probs = torch.sigmoid(z).clamp(eps, 1 - eps)
    t = (probs.log() - (-probs).log1p() + u.log() - (-u).log1p()) / tau
    q = torch.sigmoid(t)
    return q / (q.sum(-1, keepdim=True) + 1e-12)


@pytest.mark.parametrize("tau", [1.0, 0.4])
def test_poly_router_node_matches_the_autograd_chain(tau):
    # the hand-written backward of the router against autograd through PEFT's op chain, float64,
    # with saturated logits (|z| > 16, where the probability clamp acts) and rows gathered from a table
    g = torch.Generator().manual_seed(0)
    table = (torch.randn(4, 2, 5, generator=g, dtype=torch.float64) * 6).requires_grad_(True)
    with torch.no_grad():
        table[0, 0, 0], table[1, 1, 3], table[2, 0, 1] = 40.0, -25.0, 17.0
    rows = torch.tensor([0, 2, 2, 1, 3])
    u = routers.gumbel_uniform((5, 2, 5), generator=g, dtype=torch.float64)
    ours = routers.poly_route(table, rows=rows, noise=u, temperature=tau).w
    ref = _peft_formula(table[rows], u, tau)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    cot = torch.randn(ours.shape, generator=g, dtype=torch.float64)
    (a,) = torch.autograd.grad((ours * cot).sum(), [table])
    (b,) = torch.autograd.grad((ref * cot).sum(), [table])
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: routers.poly_route(t, rows=rows, noise=u, temperature=tau).w, (table,))
    # no noise (evaluation, mttl's plain sigmoid): σ(z) normalised, gradient through the gather too
    (c,) = torch.autograd.grad((routers.poly_route(table, rows=rows).w * cot).sum(), [table])
    s = torch.sigmoid(table[rows])
    (d,) = torch.autograd.grad(((s / (s.sum(-1, keepdim=True) + 1e-12)) * cot).sum(), [table])
    torch.testing.assert_close(c, d, rtol=1e-10, atol=1e-12)


def test_poly_router_float32_matches_peft_within_rounding():
    z = logits(R=64, m=8) * 4
    torch.manual_seed(3)
    u = routers.gumbel_uniform(z.shape)
    torch.testing.assert_close(routers.poly_route(z, noise=u).w, _peft_formula(z, u, 1.0), rtol=1e-5, atol=1e-7)
