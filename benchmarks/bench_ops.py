"""pytest-benchmark micro-benchmarks of the hot ops; outside the test suite's pass/fail path.

    python -m pytest benchmarks/bench_ops.py --benchmark-only
    python -m pytest benchmarks/bench_ops.py --benchmark-only --benchmark-json=out.json

Sizes follow the device: DESIGN.md's reference point on a GPU, small ones on the CPU.
"""
import pytest
import torch

from routedlora import routers
from routedlora.backends import available_backends

# On the CPU the triton backend is Triton's interpreter: not worth timing.
BACKENDS = [b for b in available_backends() if b == "torch" or torch.cuda.is_available()]
from routedlora.ops import routed_lora

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
N, D, R, M, T = (16384, 4096, 16, 8, 64) if GPU else (1024, 256, 8, 4, 8)


def _sync():
    if GPU:
        torch.cuda.synchronize()


def _inputs(h, combine):
    g = torch.Generator().manual_seed(0)
    heads = h if combine == "params" else 1
    x = torch.randn(N, D, generator=g).to(DEVICE, DTYPE)
    A = (torch.randn(heads, M, D // heads, R, generator=g) * 0.02).to(DEVICE, DTYPE)
    B = (torch.randn(heads, M, R, D // heads, generator=g) * 0.02).to(DEVICE, DTYPE)
    logits = torch.randn(T, heads, M, generator=g).to(DEVICE)
    rt = routers.poly_route(logits) if combine == "params" else routers.topk_route(logits, k=2)
    route_ids = torch.randint(0, T, (N,), generator=g).to(DEVICE)
    return x, A, B, rt, route_ids


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("combine,h", [("params", 1), ("params", 4), ("outputs", 1)])
def bench_routed_lora_forward(benchmark, backend, combine, h):
    x, A, B, rt, route_ids = _inputs(h, combine)

    def run():
        with torch.no_grad():
            routed_lora(x, A, B, rt.idx, rt.w, route_ids, combine=combine, backend=backend, validate=False)
        _sync()
    benchmark(run)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("combine,h", [("params", 4), ("outputs", 1)])
def bench_routed_lora_forward_backward(benchmark, backend, combine, h):
    x, A, B, rt, route_ids = _inputs(h, combine)
    x, A, B = (t.requires_grad_(True) for t in (x, A, B))
    w = rt.w.clone().requires_grad_(True)
    cot = torch.randn(N, D, device=DEVICE, dtype=DTYPE)

    def run():
        routed_lora(x, A, B, rt.idx, w, route_ids, combine=combine, backend=backend, validate=False).backward(cot)
        _sync()
    benchmark(run)


def bench_base_linear_floor(benchmark):
    x = torch.randn(N, D, device=DEVICE, dtype=DTYPE)
    lin = torch.nn.Linear(D, D, device=DEVICE, dtype=DTYPE)

    def run():
        with torch.no_grad():
            lin(x)
        _sync()
    benchmark(run)
