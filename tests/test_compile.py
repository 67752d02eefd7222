"""The routed layer under torch.compile(fullgraph=True): one graph, the same numbers as eager, in training too.

``aot_eager`` (dynamo + AOT autograd, no code generation) checks quickly that nothing breaks
the graph; the training tests then run inductor on the CPU, with
``torch._inductor.config.fallback_random = True`` so that torch's own random draws (the
unseeded Gumbel noise) equal eager's. Tolerances: torch.testing's float32 defaults
(1.3e-6 relative, 1e-5 absolute).
"""
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import routedlora


@pytest.fixture
def fallback_random(monkeypatch):
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("router,h", [("poly", 2), ("topk", 1), ("cpoly", 2)])
def test_fullgraph_matches_eager(router, h):
    torch.manual_seed(0)
    layer = routedlora.RoutedLoraLinear(nn.Linear(16, 8), n_tasks=3, n_skills=4, r=2, n_heads=h, router=router,
                                        init_weights=False).eval()
    x = torch.randn(2, 5, 16, requires_grad=True)
    tasks = torch.tensor([0, 2])
    eager = layer(x, task_ids=tasks)
    g_eager = torch.autograd.grad(eager.square().sum(), [x, layer.lora_A, layer.lora_B, layer.router_logits])
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(x, task_ids=tasks)
    g = torch.autograd.grad(out.square().sum(), [x, layer.lora_A, layer.lora_B, layer.router_logits])
    torch.testing.assert_close(out, eager)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b)


def test_fullgraph_inside_routing_context_in_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    routedlora.inject(model, routedlora.RoutedLoraConfig(target_modules=["0", "2"], n_tasks=3, n_heads=2))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with routedlora.routing(model, torch.tensor([1, 0, 2])):
        out = compiled(torch.randn(3, 4, 16))
    out.sum().backward()
    assert model[0].lora_B.grad is not None


def _train_step(fn, layer, x, tasks, step):
    """Output and every gradient of training step ``step``: torch's RNG and the noise counter set from it."""
    layer._noise_step.fill_(step)
    torch.manual_seed(step)
    out = fn(x, task_ids=tasks)
    params = [x] + [p for p in layer.parameters() if p.requires_grad]
    return (out,) + torch.autograd.grad(out.square().sum(), params)


# every router, h in {1, 4} where the router has heads, Gumbel noise seeded and unseeded
INDUCTOR_CASES = [("poly", 1, None), ("poly", 4, 3), ("cpoly", 4, None), ("cpoly", 1, 5), ("softmax", 4, None),
                  ("topk", 1, None), ("mta", 1, None)]


@pytest.mark.parametrize("router,h,seed", INDUCTOR_CASES)
def test_inductor_training_matches_eager(fallback_random, router, h, seed):
    torch.manual_seed(0)
    kw = dict(top_k=2) if router in ("topk", "mta") else {}
    layer = routedlora.RoutedLoraLinear(nn.Linear(16, 8), n_tasks=3, n_skills=4, r=2, n_heads=h, router=router,
                                        init_weights=False, seed=seed, **kw).train()
    layer.base_layer.requires_grad_(False)
    x = torch.randn(3, 5, 16, requires_grad=True)
    tasks = torch.tensor([0, 2, 2])
    compiled = torch.compile(layer, backend="inductor", fullgraph=True)
    for step in (1, 2):  # a second step reuses the graph with new noise
        eager = _train_step(layer, layer, x, tasks, step)
        got = _train_step(compiled, layer, x, tasks, step)
        for a, b in zip(got, eager):
            torch.testing.assert_close(a, b)
    if router in ("poly", "cpoly"):  # the noise is really on: two steps differ
        assert not torch.allclose(_train_step(layer, layer, x, tasks, 1)[0], _train_step(layer, layer, x, tasks, 2)[0])


def test_routing_inside_a_compiled_training_step_has_no_graph_break():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4)
    model = LlamaForCausalLM(cfg).train()
    routedlora.inject(model, routedlora.RoutedLoraConfig(target_modules=["q_proj", "v_proj"], n_tasks=3, n_heads=2,
                                                         seed=0))

    def step(ids, tasks):
        with routedlora.routing(model, tasks):
            return model(input_ids=ids, labels=ids).loss

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(torch.randint(0, 64, (3, 6)), torch.tensor([1, 0, 2]))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


class _Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 8)

    def forward(self, x, ckpt):
        def block(x):
            return torch.relu(self.a(x))
        return self.b(checkpoint(block, x, use_reentrant=False) if ckpt else block(x))


def test_inductor_step_with_routing_inside_and_checkpointing_matches_eager(fallback_random):
    # seeded noise is a pure function of (seed, batch counter, example): the recomputed
    # checkpointed region draws it again exactly, under inductor as in eager
    torch.manual_seed(0)
    model = _Checkpointed()
    routedlora.inject(model, routedlora.RoutedLoraConfig(target_modules=["a"], n_tasks=3, n_heads=2,
                                                         init_weights=False, seed=3))
    model.train()
    x, ids = torch.randn(3, 4, 16), torch.tensor([1, 0, 2])

    def step(x, ids, ckpt):
        with routedlora.routing(model, ids):
            return model(x, ckpt).square().mean()

    def grads(fn, ckpt):
        model.zero_grad()
        for _, layer in routedlora.routed_layers(model):
            layer._noise_step.zero_()
        fn(x, ids, ckpt).backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    ref = grads(step, False)
    compiled = torch.compile(step, backend="inductor", fullgraph=True)
    for a, b in zip(grads(compiled, True), ref):
        torch.testing.assert_close(a, b)
