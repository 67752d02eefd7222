"""The routed layer traces as one graph under torch.compile(fullgraph=True).

``aot_eager`` captures with dynamo and traces forward and backward with AOT
autograd without generating code, so a graph break or host sync fails here
quickly on the CPU; inductor and CUDA graphs are exercised on a GPU.
"""
import pytest
import torch
from torch import nn

import routedlora


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
