"""MHR-z, MHR-μ, C-Poly's init, ALTER's MTA layer and its two stages, parameter groups."""
import pytest
import torch
from naive import naive_delta
from torch import nn

import routedlora
from routedlora import MTALinear, RoutedLoraConfig


class Tiny(nn.Module):
    def __init__(self, d=12):
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def injected(router="poly", **kw):
    torch.manual_seed(0)
    model = Tiny()
    cfg = RoutedLoraConfig(target_modules=["up", "down"], n_tasks=4, n_skills=3, r=2, router=router,
                           init_weights=False, **kw)
    return routedlora.inject(model, cfg).eval()


def trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_mhr_z_trains_only_logits_and_adds_tasks():
    model = injected(n_heads=2)
    x = torch.randn(3, 12)
    with routedlora.routing(model, [0, 3, 1]):
        before = model(x)
    new = routedlora.mhr_z(model, n_new_tasks=2)
    assert new == [4, 5]
    assert trainable(model) == ["down.router_logits", "up.router_logits"]
    assert routedlora.model_config(model).n_tasks == 6
    with routedlora.routing(model, [0, 3, 1]):
        torch.testing.assert_close(model(x), before)
    with routedlora.routing(model, [5, 4, 5]):
        model(x).sum().backward()
    assert model.up.router_logits.grad[4:].abs().sum() > 0
    with pytest.raises(ValueError, match="n_new_tasks"):
        routedlora.mhr_z(model, n_new_tasks=-1)


def test_mhr_mu_averages_skills():
    model = injected(n_heads=2)
    A, B = model.up.lora_A.detach().clone(), model.up.lora_B.detach().clone()
    routedlora.mhr_mu(model)
    assert trainable(model) == ["down.lora_A", "down.lora_B", "up.lora_A", "up.lora_B"]
    assert model.up.lora_A.shape == (2, 1, 6, 2)
    x = torch.randn(5, 12)
    with routedlora.routing(model, [0, 1, 2, 3, 0]):
        out = model.up(x)
    mean_A, mean_B = A.mean(1, keepdim=True), B.mean(1, keepdim=True)
    # plain LoRA with the averaged skill, heads concatenated
    A_hat = torch.cat([mean_A[q, 0] for q in range(2)], 0)
    B_hat = torch.cat([mean_B[q, 0] for q in range(2)], 1)
    torch.testing.assert_close(out, model.up.base_layer(x) + 0.5 * x @ A_hat @ B_hat, rtol=1e-5, atol=1e-6)


def test_cpoly_owns_private_skills():
    model = injected(router="cpoly", n_specific=2)
    logits = model.up.router_logits
    assert logits.shape == (4, 1, 3 + 4 * 2)
    spec = logits[:, 0, 3:]
    expect = torch.zeros(4, 8)
    for t in range(4):
        expect[t, 2 * t:2 * t + 2] = 1.0
    assert torch.equal(spec, expect)
    x = torch.randn(2, 12)
    with routedlora.routing(model, [1, 2]):
        model(x).sum().backward()
    assert model.up.router_logits.grad[:, :, 3:].abs().sum() > 0  # off-diagonal borrowing can be learned


def test_param_groups_split_router_logits():
    model = injected()
    groups = routedlora.param_groups(model, lr=1e-3, router_lr=0.1)
    assert [g["lr"] for g in groups] == [1e-3, 0.1]
    assert {id(p) for p in groups[1]["params"]} == {id(model.up.router_logits), id(model.down.router_logits)}
    torch.optim.AdamW(groups)


# --- MTA ------------------------------------------------------------------------------


def mta_layer(**kw):
    torch.manual_seed(0)
    layer = MTALinear(nn.Linear(8, 6), n_tasks=3, n_skills=4, r=2, router="mta", n_shared=2, top_k=2,
                      init_weights=False, **kw)
    with torch.no_grad():
        layer.shared_B.normal_()
        layer.gate[-1].weight.normal_()
    return layer.eval()


def test_mta_prefers_own_pair_at_init():
    layer = mta_layer()  # ALTER's init: task t prefers skills t and t + 1, mildly
    w = layer.route(torch.arange(3)).w[:, 0]
    assert torch.topk(w, 2, dim=-1).indices.sort(-1).values.tolist() == [[0, 1], [1, 2], [2, 3]]
    assert float(w.min()) > 0.2


def test_mta_stage1_is_topk_outputs():
    layer = mta_layer()
    x = torch.randn(2, 5, 8)
    out = layer(x, task_ids=[2, 0])
    rt = layer.route(torch.tensor([2, 0]))
    delta = naive_delta(x.reshape(10, 8), layer.lora_A, layer.lora_B, rt.idx, rt.w,
                        torch.tensor([0] * 5 + [1] * 5), layer.scale, "outputs")
    torch.testing.assert_close(out, layer.base_layer(x) + delta.view(2, 5, 6), rtol=1e-5, atol=1e-6)


def test_mta_stage2_formula_and_gate_at_first_position():
    layer = mta_layer()
    layer.set_stage(2)
    x = torch.randn(2, 5, 8)
    out = layer(x, task_ids=[1, 2])
    s = layer.scale
    rt = layer.route(torch.tensor([1, 2]))
    for b in range(2):
        x0 = x[b, 0]
        task = lambda v: sum(rt.w[b, 0, j] * (v @ layer.lora_A[0, rt.idx[b, 0, j]] @ layer.lora_B[0, rt.idx[b, 0, j]])
                             for j in range(2)) * s
        shared = lambda v, j: (v @ layer.shared_A[0, j] @ layer.shared_B[0, j]) * s
        feats = torch.cat([task(x0), shared(x0, 0), shared(x0, 1)])
        alpha = torch.softmax(layer.gate(feats), -1)
        for t in range(5):
            v = x[b, t]
            want = layer.base_layer(v) + alpha[0] * task(v) + alpha[1] * shared(v, 0) + alpha[2] * shared(v, 1)
            torch.testing.assert_close(out[b, t], want, rtol=1e-5, atol=1e-5)


def test_mta_stage2_gradients_reach_gate_and_shared():
    layer = mta_layer().train()
    layer.set_stage(2)
    layer(torch.randn(2, 4, 8), task_ids=[0, 1]).square().sum().backward()
    for p in (layer.shared_A, layer.shared_B, layer.gate[0].weight, layer.gate[-1].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_mta_gate_cached_while_decoding():
    model = nn.Sequential(nn.Linear(8, 8))
    cfg = RoutedLoraConfig(target_modules=["0"], n_tasks=3, n_skills=4, r=2, router="mta", n_shared=2,
                           init_weights=False)
    routedlora.inject(model, cfg)
    layer = model[0]
    with torch.no_grad():
        layer.shared_B.normal_()
        layer.gate[-1].weight.normal_()
    routedlora.mta_stage2(model)
    assert trainable(model) == ["0.gate.0.weight", "0.gate.2.weight", "0.shared_A", "0.shared_B"]
    model.eval()
    x = torch.randn(2, 4, 8)
    with routedlora.routing(model, [0, 2], decoding=True):
        full = model(x)
        step = model(x[:, 3:4])  # a decode step reuses the gate of the prefill
    torch.testing.assert_close(step, full[:, 3:4], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="merge"):
        routedlora.merge(model, 0)


def test_mta_stage2_refuses_per_token_tasks():
    layer = mta_layer()
    layer.set_stage(2)
    with pytest.raises(ValueError, match="task_ids"):
        layer(torch.randn(2, 3, 8), task_ids=torch.tensor([[0, 1, 0], [1, 1, 1]]))
    with pytest.raises(ValueError, match="stage"):
        layer.set_stage(3)


def test_param_groups_weight_decay_per_group():
    model = injected()
    skills, logits = routedlora.param_groups(model, lr=1e-3, router_lr=0.1, weight_decay=0.05, router_weight_decay=0.01)
    assert (skills["weight_decay"], logits["weight_decay"]) == (0.05, 0.01)
    with pytest.raises(ValueError, match="router_weight_decay"):
        routedlora.param_groups(model, lr=1e-3, router_weight_decay=-1.0)
