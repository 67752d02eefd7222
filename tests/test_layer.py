"""RoutedLoraLinear on its own, and every bad input of the public entries."""
import pytest
import torch
from naive import naive_delta
from torch import nn

import routedlora
from routedlora import RoutedLoraLinear, routers
from routedlora.ops import routed_lora


def make_layer(d=12, o=8, router="poly", h=2, m=4, r=3, T=5, **kw):
    torch.manual_seed(0)
    base = nn.Linear(d, o)
    layer = RoutedLoraLinear(base, n_tasks=T, n_skills=m, r=r, n_heads=h, router=router, init_weights=False, **kw)
    return layer.eval()


def expected(layer, x, task_per_token):
    rt = layer.route(task_per_token)
    x2 = x.reshape(-1, layer.in_features)
    delta = naive_delta(x2.double(), layer.lora_A.double(), layer.lora_B.double(), rt.idx, rt.w.double(),
                        torch.arange(x2.shape[0]), layer.scale, layer.config.combine)
    return layer.base_layer(x) + delta.view(*x.shape[:-1], -1).to(x.dtype)


@pytest.mark.parametrize("router,h", [("poly", 2), ("softmax", 4), ("topk", 1), ("cpoly", 2)])
def test_mixed_task_batch(router, h):
    layer = make_layer(router=router, h=h)
    x = torch.randn(3, 4, 12)
    tasks = torch.tensor([4, 0, 2])
    out = layer(x, task_ids=tasks)
    torch.testing.assert_close(out, expected(layer, x, tasks.repeat_interleave(4)), rtol=1e-5, atol=1e-6)


def test_task_id_shapes_agree():
    layer = make_layer()
    x = torch.randn(2, 3, 12)
    per_seq = layer(x, task_ids=torch.tensor([1, 3]))
    per_tok = layer(x, task_ids=torch.tensor([[1, 1, 1], [3, 3, 3]]))
    torch.testing.assert_close(per_seq, per_tok)
    mixed = layer(x, task_ids=torch.tensor([[1, 2, 1], [3, 0, 3]]))
    torch.testing.assert_close(mixed, expected(layer, x, torch.tensor([1, 2, 1, 3, 0, 3])), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer(x, task_ids=2), layer(x, task_ids=torch.tensor([2, 2])))
    # 2-D input: every row its own sequence
    flat = x.reshape(6, 12)
    torch.testing.assert_close(layer(flat, task_ids=torch.tensor([1, 1, 1, 3, 3, 3])), per_seq.reshape(6, 8))


def test_empty_batch_and_one_token():
    layer = make_layer()
    assert layer(torch.randn(0, 5, 12), task_ids=torch.zeros(0, dtype=torch.long)).shape == (0, 5, 8)
    x = torch.randn(1, 1, 12)
    torch.testing.assert_close(layer(x, task_ids=[3]), expected(layer, x, torch.tensor([3])), rtol=1e-5, atol=1e-6)


def test_gradients_reach_adapters_not_base():
    layer = make_layer().train()
    x = torch.randn(2, 3, 12, requires_grad=True)
    layer(x, task_ids=[0, 1]).square().sum().backward()
    for p in (layer.lora_A, layer.lora_B, layer.router_logits, x):
        assert p.grad is not None and p.grad.abs().sum() > 0
    layer.base_layer.weight.requires_grad_(False)


def test_gumbel_noise_per_sequence_and_seeded():
    layer = make_layer(seed=11).train()
    x = torch.randn(1, 3, 12).expand(2, 3, 12)
    out = layer(x, task_ids=[2, 2])
    assert not torch.allclose(out[0], out[1])  # same task, same input, own noise draw
    again = make_layer(seed=11).train()
    torch.testing.assert_close(again(x, task_ids=[2, 2]), out)
    no_noise = make_layer(gumbel=False).train()
    y = no_noise(x, task_ids=[2, 2])
    torch.testing.assert_close(y[0], y[1])


def test_dropout_only_in_training():
    layer = make_layer(dropout=0.5)
    x = torch.randn(4, 12)
    torch.testing.assert_close(layer(x, task_ids=1), layer(x, task_ids=1))
    layer.train()
    torch.manual_seed(0)
    a = layer(x, task_ids=torch.ones(4, dtype=torch.long))
    assert torch.isfinite(a).all()


def test_half_precision_base_with_float32_adapter():
    layer = make_layer()
    layer.base_layer.to(torch.bfloat16)
    x = torch.randn(2, 3, 12, dtype=torch.bfloat16)
    out = layer(x, task_ids=[0, 4])
    assert out.dtype == torch.bfloat16


def test_merge_matches_routed_output():
    layer = make_layer()
    x = torch.randn(2, 3, 12)
    routed = layer(x, task_ids=3)
    routedlora.merge(layer, 3)
    torch.testing.assert_close(layer(x, task_ids=3), routed, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already merged"):
        routedlora.merge(layer, 3)
    with pytest.raises(ValueError, match="task_ids"):
        layer(x, task_ids=[3, 1])
    routedlora.unmerge(layer)
    torch.testing.assert_close(layer(x, task_ids=3), routed, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="task_id"):
        routedlora.merge(layer, 5)


# --- bad inputs ---------------------------------------------------------------------


def test_layer_errors():
    with pytest.raises(ValueError, match="n_heads"):
        RoutedLoraLinear(nn.Linear(10, 8), n_tasks=2, n_heads=4)
    with pytest.raises(TypeError, match="base_layer"):
        RoutedLoraLinear(nn.Conv1d(3, 3, 1), n_tasks=2)
    with pytest.raises(ValueError, match="n_heads"):
        RoutedLoraLinear(nn.Linear(8, 8), n_tasks=2, n_heads=2, router="topk")
    layer = make_layer()
    x = torch.randn(2, 3, 12)
    with pytest.raises(ValueError, match="task_ids"):
        layer(x, task_ids=[0, 5])
    with pytest.raises(ValueError, match="task_ids"):
        layer(x, task_ids=[0, -1])
    with pytest.raises(TypeError, match="task_ids"):
        layer(x, task_ids=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="task_ids"):
        layer(x, task_ids=[0, 1, 2])
    with pytest.raises(ValueError, match="routing"):
        layer(x)
    with pytest.raises(TypeError, match="x"):
        layer(x.double(), task_ids=[0, 1])
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(2, 3, 11), task_ids=[0, 1])
    with pytest.raises(ValueError, match="x"):
        layer(x.to("meta"), task_ids=[0, 1])
    with pytest.raises(TypeError, match="x"):
        layer(x.long(), task_ids=[0, 1])


def test_autocast_input_accepted():
    layer = make_layer()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(2, 3, 12).bfloat16(), task_ids=[0, 1])
    assert out.shape == (2, 3, 8)


@pytest.mark.parametrize("field,value", [
    ("n_tasks", 0), ("r", -1), ("n_heads", 1.5), ("router", "moe"), ("combine", "sum"), ("alpha", 0),
    ("dropout", 1.0), ("temperature", 0.0), ("backend", "tpu"), ("top_k", 9), ("target_modules", []),
])
def test_config_errors(field, value):
    kw = dict(target_modules=["q"], n_tasks=2, router="topk" if field == "top_k" else "poly")
    kw[field] = value
    with pytest.raises((ValueError, TypeError), match=field):
        routedlora.RoutedLoraConfig(**kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_backend_refuses_clearly_without_cuda():
    from routedlora.cuda_build import CudaBackendUnavailable

    layer = make_layer(backend="cuda")
    w0 = layer.lora_A.detach().clone()
    with pytest.raises(CudaBackendUnavailable, match="backend='cuda'"):
        layer(torch.randn(2, 12), task_ids=[0, 1])
    assert torch.equal(layer.lora_A, w0)


def op_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=g)
    A = torch.randn(2, 3, 4, 2, generator=g)
    B = torch.randn(2, 3, 2, 6, generator=g)
    rt = routers.softmax_route(torch.randn(4, 2, 3, generator=g))
    return dict(x=x, lora_A=A, lora_B=B, idx=rt.idx, w=rt.w, route_ids=torch.tensor([0, 1, 2, 3, 0]))


@pytest.mark.parametrize("name,bad,exc", [
    ("x", torch.randn(5, 9), ValueError),
    ("x", torch.randn(5, 8).long(), TypeError),
    ("x", torch.randn(5, 8, dtype=torch.float64), TypeError),
    ("lora_A", torch.randn(3, 4, 2), ValueError),
    ("lora_B", torch.randn(2, 3, 3, 6), ValueError),
    ("idx", torch.full((4, 2, 3), 3), ValueError),
    ("idx", torch.full((4, 2, 3), -1), ValueError),
    ("idx", torch.zeros(4, 2, 3), TypeError),
    ("idx", torch.zeros(4, 1, 3, dtype=torch.long), ValueError),
    ("w", torch.rand(4, 2, 2), ValueError),
    ("route_ids", torch.tensor([0, 1, 2, 3, 4]), ValueError),
    ("route_ids", torch.tensor([0, 1, 2]), ValueError),
    ("route_ids", torch.tensor([0.0, 1, 2, 3, 0]), TypeError),
    ("x", torch.randn(5, 8, device="meta"), ValueError),
])
def test_op_errors_name_the_argument(name, bad, exc):
    kw = op_inputs()
    kw[name] = bad
    with pytest.raises(exc, match=name):
        routed_lora(**kw)


def test_op_outputs_combine_needs_one_head():
    with pytest.raises(ValueError, match="combine"):
        routed_lora(**op_inputs(), combine="outputs")
    with pytest.raises(ValueError, match="combine"):
        routed_lora(**op_inputs(), combine="mix")
    kw = op_inputs()
    with pytest.raises(ValueError, match="base"):
        routed_lora(**kw, base=torch.randn(5, 7))


@pytest.mark.parametrize("router,h,tokens", [("poly", 1, 5), ("poly", 4, 5), ("poly", 4, 1), ("topk", 1, 5)])
def test_autocast_training_computes_in_bfloat16_with_float32_gradients(router, h, tokens):
    # the HF Trainer's bf16 mode: fp32 adapters under autocast. The op computes in bfloat16 as torch's
    # matmuls do there; every gradient comes back in float32, within bfloat16 rounding (5e-2 of the
    # largest magnitude) of the float32 computation
    layer = make_layer(router=router, h=h, gumbel=False).train()
    layer.base_layer.requires_grad_(False)
    x = torch.randn(3, tokens, 12)
    params = [layer.lora_A, layer.lora_B, layer.router_logits]

    def step(autocast):
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(xx, task_ids=[0, 4, 2])
        grads = torch.autograd.grad(y.float().square().sum(), [xx] + params)
        return y, grads

    y16, g16 = step(True)
    y32, g32 = step(False)
    assert y16.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in g16)
    for a, b in zip((y16,) + g16, (y32,) + g32):
        assert (a.float() - b).abs().max() <= 5e-2 * b.abs().max()


@pytest.mark.parametrize("router,h", [("poly", 2), ("topk", 1), ("cpoly", 2)])
def test_inference_routes_once_per_batch_until_the_logits_change(router, h, monkeypatch):
    # decode steps of a generate loop share one batch: at inference the routing weights are
    # computed once and reused, and any in-place change to the logits is seen at the next step
    layer = make_layer(router=router, h=h)
    x = torch.randn(3, 1, 12)
    tasks = torch.tensor([4, 0, 2])
    calls = []
    route = layer._route
    monkeypatch.setattr(layer, "_route", lambda *a, **k: calls.append(1) or route(*a, **k))
    with routedlora.routing(layer, tasks), torch.no_grad():
        first = layer(x)
        second = layer(x)
        assert len(calls) == 1
        torch.testing.assert_close(second, first, rtol=0, atol=0)
        layer.router_logits.mul_(-2.0)  # an optimizer step or a weight load: a new version
        third = layer(x)
        assert len(calls) == 2
        torch.testing.assert_close(third, expected(layer, x, tasks), rtol=1e-5, atol=1e-6)
    # with a gradient to the logits (or noise in training) nothing is kept
    layer.train()
    before = len(calls)
    with routedlora.routing(layer, tasks):
        layer(x).sum().backward()
        layer(x).sum().backward()
    assert len(calls) == before + 2 and layer.router_logits.grad is not None


@pytest.mark.parametrize("router", ["poly", "topk"])
def test_decode_steps_reuse_the_prefills_routing(router, monkeypatch):
    # per-sequence rows are the same for the prefill (B, S) and every decode step (B, 1): the
    # router runs once for the whole generate loop; per-token rows differ by shape and do not share
    layer = make_layer(router=router, h=1)
    tasks = torch.tensor([4, 0, 2])
    step = torch.randn(3, 1, 12)
    want = expected(layer, step, tasks)
    calls = []
    route = layer._route
    monkeypatch.setattr(layer, "_route", lambda *a, **k: calls.append(1) or route(*a, **k))
    with routedlora.routing(layer, tasks), torch.no_grad():
        layer(torch.randn(3, 5, 12))  # the prefill
        out = layer(step)
        assert len(calls) == 1
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer(step), out, rtol=0, atol=0)  # later steps too
        assert len(calls) == 1
    with routedlora.routing(layer, tasks[:, None].expand(3, 5)), torch.no_grad():
        layer(torch.randn(3, 5, 12))
        layer(torch.randn(3, 5, 12))
        assert len(calls) == 2  # per-token rows: one batch, routed once
