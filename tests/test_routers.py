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
