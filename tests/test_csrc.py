"""The CUDA kernel of csrc/ (token grouping) and the ``cuda`` backend.

Without a GPU the kernel runs in the host emulator (``csrc/emulate``: every CUDA thread a
host thread, real barriers, warp intrinsics through a slot exchange) and the backend's
Triton kernels in the Triton interpreter. On a GPU the same checks run on the real build.
The grouping is compared exactly with a stable argsort, the backend with the torch backend
(float32, relative error 2e-5 of the largest magnitude).
"""
import contextlib
import os

import pytest
import torch

import routedlora
from routedlora import cuda_build
from routedlora.backends import available_backends, resolve_backend
from routedlora.cuda_build import CudaBackendUnavailable
from routedlora.ops import cuda_backend, routed_lora, triton_backend

import csrc_emulator

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
EMU_REASON = csrc_emulator.unavailable_reason()
needs_emulator = pytest.mark.skipif(EMU_REASON is not None, reason=f"csrc emulator: {EMU_REASON}")
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")


def gpu_reason():
    return cuda_build.unavailable_reason(torch.device("cuda")) if ON_GPU else "no CUDA device"


@pytest.fixture(scope="module")
def kernels():
    """The routedlora_cuda ops: the real build on a GPU, the host emulator elsewhere."""
    if ON_GPU:
        reason = gpu_reason()
        if reason is not None:
            pytest.skip(reason)
        cuda_build.load(torch.device("cuda"))
        return torch.ops.routedlora_cuda
    if EMU_REASON is not None:
        pytest.skip(f"csrc emulator: {EMU_REASON}")
    csrc_emulator.library()
    return csrc_emulator


def rel_err(got, ref):
    if ref.numel() == 0:
        return 0.0
    scale = ref.double().abs().max().clamp_min(1e-6)
    return ((got.double() - ref.double()).abs().max() / scale).item()


def make(N, d, o, r, h, m, R, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g)
    A = torch.randn(h, m, d // h, r, generator=g) * d ** -0.5
    B = torch.randn(h, m, r, o // h, generator=g) * r ** -0.5
    idx = torch.randint(0, m, (R, h, K), generator=g)
    w = torch.rand(R, h, K, generator=g) + 0.1
    route_ids = torch.randint(0, R, (N,), generator=g)
    base = torch.randn(N, o, generator=g)
    cast = lambda t: t.to(DEVICE, dtype)
    return cast(x), cast(A), cast(B), idx.to(DEVICE), w.to(DEVICE), route_ids.to(DEVICE), cast(base)


@pytest.mark.skipif(EMU_REASON is not None, reason=f"csrc emulator: {EMU_REASON}")
def test_kernels_race_free_under_thread_sanitizer(tmp_path):
    """The emulator runs CUDA threads as host threads: ThreadSanitizer then finds accesses
    that no barrier orders (a missing __syncthreads or __syncwarp), as racecheck would."""
    import subprocess

    exe = tmp_path / "race_driver"
    build = subprocess.run(["g++", "-std=c++20", "-O1", "-g", "-fsanitize=thread", "-pthread", "-DRL_EMULATE",
                            f"-I{csrc_emulator.cuda_include()}", str(csrc_emulator.CSRC / "emulate" / "race_driver.cpp"),
                            "-o", str(exe)], capture_output=True, text=True)
    if build.returncode != 0 and "tsan" in build.stderr.lower():
        pytest.skip("this g++ has no ThreadSanitizer runtime")
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert "ThreadSanitizer" not in run.stderr, run.stderr[:4000]
    assert run.returncode == 0, run.stdout + run.stderr[:2000]


# --- token grouping ----------------------------------------------------------------------


def expected_groups(rid, R):
    rid = rid.cpu().long()
    key = torch.where((rid >= 0) & (rid < R), rid, torch.full_like(rid, R))
    order = torch.argsort(key, stable=True)
    offs = torch.searchsorted(key[order], torch.arange(R + 1))
    return order, rid[order], offs


@pytest.mark.parametrize("N,R,kind", [
    (0, 3, "random"), (1, 1, "random"), (37, 5, "random"), (1500, 7, "random"),   # > 1 chunk of 1024
    (2100, 3, "sorted"), (900, 1, "random"), (300, 4500, "random"),               # R >= 4096: global counters
    (64, 64, "each"), (50, 6, "invalid"), (40, 0, "invalid"),
])
def test_group_by_row(kernels, N, R, kind):
    g = torch.Generator().manual_seed(N + R)
    if kind == "sorted":
        rid = torch.sort(torch.randint(0, R, (N,), generator=g)).values
    elif kind == "each":
        rid = torch.randperm(N, generator=g)
    else:
        rid = torch.randint(0, max(R, 1), (N,), generator=g)
    if kind == "invalid" and N:
        rid[::7] = R + 3
        rid[3::11] = -2
    order, srows, offs = kernels.group_by_row(rid.to(DEVICE), R)
    e_order, e_srows, e_offs = expected_groups(rid, R)
    assert torch.equal(order.cpu(), e_order)
    assert torch.equal(srows.cpu(), e_srows)
    assert torch.equal(offs.cpu(), e_offs)


def test_group_by_row_matches_triton_metadata(kernels):
    rid = torch.randint(0, 9, (333,), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    got = kernels.group_by_row(rid, 9)
    want = triton_backend._routing_meta(rid, 9)
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b.cpu())


# --- the cuda backend, end to end --------------------------------------------------------


@pytest.fixture
def cuda_kernels(kernels):
    """routed_lora(backend='cuda') served by ``kernels`` (and the Triton interpreter off GPU)."""
    if not triton_backend.is_available(torch.device(DEVICE)):
        pytest.skip("triton not installed")
    if ON_GPU:
        yield kernels
    else:
        with cuda_backend.use_kernels(kernels):
            yield kernels


def run_op(backend, x, A, B, idx, w, rid, base, combine, cot):
    leaves = [t.clone().requires_grad_(True) for t in (x, A, B, w)]
    y = routed_lora(leaves[0], leaves[1], leaves[2], idx, leaves[3], rid, scale=0.5, combine=combine, base=base,
                    backend=backend)
    grads = torch.autograd.grad((y.float() * cot.float()).sum(), leaves)
    return [y] + list(grads)


@pytest.mark.parametrize("N", [9, 150])
@pytest.mark.parametrize("h,combine", [(1, "params"), (2, "params"), (1, "outputs")])
def test_backend_forward_and_gradients(cuda_kernels, N, h, combine):
    x, A, B, idx, w, rid, base = make(N, 24, 12, 3, h, 4, 5, 2, torch.float32, seed=N)
    cot = torch.randn(N, 12, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ref = run_op("torch", x, A, B, idx, w, rid, base, combine, cot)
    got = run_op("cuda", x, A, B, idx, w, rid, base, combine, cot)
    for name, a, b in zip(["y", "dx", "dA", "dB", "dw"], got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert rel_err(a.detach().cpu(), b.detach().cpu()) <= 2e-5, name


@pytest.mark.parametrize("N", [6, 80])
def test_backend_under_torch_compile(kernels, N):
    """The backend traces whole (fullgraph) through the ops' fake/meta implementations."""
    if not triton_backend.is_available(torch.device(DEVICE)):
        pytest.skip("triton not installed")
    x, A, B, idx, w, rid, base = make(N, 16, 8, 2, 2, 3, 3, 2, torch.float32)
    A.requires_grad_(True)
    f = lambda x, A: routed_lora(x, A, B, idx, w, rid, scale=0.5, base=base, backend="cuda", validate=False)
    with (contextlib.nullcontext() if ON_GPU else cuda_backend.use_kernels(csrc_emulator.ops)):
        eager = f(x, A)
        (g_eager,) = torch.autograd.grad(eager.square().sum(), A)
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")(x, A)
        (g_comp,) = torch.autograd.grad(compiled.square().sum(), A)
    assert rel_err(compiled.detach().cpu(), eager.detach().cpu()) <= 1e-5
    assert rel_err(g_comp.cpu(), g_eager.cpu()) <= 1e-5


def test_backend_coverage():
    cov = cuda_backend.coverage()
    assert cov["forward"] == cov["backward"] == "triton kernels"
    assert [v for v in cov.values() if v.startswith("cuda:")] == [
        "cuda: csrc/group_rows.cu (routedlora_cuda::group_by_row)"]


def test_backend_rejects_float64(cuda_kernels):
    x, A, B, idx, w, rid, base = make(3, 8, 4, 2, 1, 2, 2, 1, torch.float64)
    with pytest.raises(TypeError, match="x: backend='cuda'"):
        routed_lora(x, A, B, idx, w.double(), rid, backend="cuda")


@pytest.mark.parametrize("router", ["poly", "mta"])
def test_layers_on_cuda_match_torch(cuda_kernels, router):
    """A layer's forward and training step on the cuda backend, against torch."""
    torch.manual_seed(0)
    kw = dict(n_tasks=3, n_skills=4, r=2, router=router, dropout=0.0)
    if router == "mta":
        kw.update(n_specific=1, n_shared=1, top_k=1)
    layers = {}
    for backend in ("torch", "cuda"):
        torch.manual_seed(0)
        lin = torch.nn.Linear(16, 8).to(DEVICE)
        cls = routedlora.MTALinear if router == "mta" else routedlora.RoutedLoraLinear
        layers[backend] = cls(lin, routedlora.RoutedLoraConfig(target_modules=["x"], backend=backend, **kw)).to(DEVICE)
        with torch.no_grad():
            for p in layers[backend].parameters():
                if p.requires_grad:
                    p.normal_(generator=torch.Generator(device=DEVICE).manual_seed(p.numel()))
        layers[backend].eval()
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    tasks = torch.tensor([2, 0], device=DEVICE)
    outs, grads = {}, {}
    for backend, layer in layers.items():
        outs[backend] = layer(x, task_ids=tasks)
        outs[backend].square().sum().backward()
        grads[backend] = [p.grad for p in layer.parameters() if p.requires_grad]
    assert rel_err(outs["cuda"].detach().cpu(), outs["torch"].detach().cpu()) <= 2e-5
    assert any(g is not None for g in grads["cuda"])
    for a, b in zip(grads["cuda"], grads["torch"]):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel_err(a.cpu(), b.cpu()) <= 2e-5


# --- refusing clearly ---------------------------------------------------------------------


@pytest.mark.skipif(ON_GPU, reason="checks the refusal on a machine without CUDA")
def test_refuses_without_cuda_naming_the_reason():
    reason = cuda_build.unavailable_reason()
    assert reason is not None and "backend='cuda'" in reason
    assert not cuda_backend.is_available(torch.device("cpu"))
    assert "cuda" not in available_backends(torch.device("cpu"))
    with pytest.raises(CudaBackendUnavailable, match="backend='cuda'"):
        resolve_backend("cuda", torch.device("cpu"))
    x = torch.randn(2, 4)
    with pytest.raises(CudaBackendUnavailable):
        routed_lora(x, torch.randn(1, 2, 4, 2), torch.randn(1, 2, 2, 3), torch.zeros(1, 1, 1, dtype=torch.long),
                    torch.ones(1, 1, 1), torch.zeros(2, dtype=torch.long), backend="cuda")


def test_cpu_tensors_refused_even_with_cuda_torch(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    reason = cuda_build.unavailable_reason(torch.device("cpu"))
    assert reason is not None and "CUDA tensors" in reason


def test_cpu_torch_reason_names_the_build(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CUDA build of torch" in cuda_build.unavailable_reason()


def _pretend_cuda_machine(monkeypatch, capability=(9, 0)):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Old GPU")


def test_reason_names_a_missing_ninja(monkeypatch):
    from torch.utils import cpp_extension

    _pretend_cuda_machine(monkeypatch)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    assert "pip install ninja" in cuda_build.unavailable_reason(torch.device("cuda"))


def test_reason_names_a_missing_toolkit(monkeypatch):
    from torch.utils import cpp_extension

    _pretend_cuda_machine(monkeypatch)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setattr(cuda_build, "find_nvcc", lambda: None)
    reason = cuda_build.unavailable_reason(torch.device("cuda"))
    assert "nvcc" in reason and "CUDA_HOME" in reason


def test_reason_names_an_old_gpu(monkeypatch):
    _pretend_cuda_machine(monkeypatch, capability=(7, 5))
    assert "Old GPU is 7.5" in cuda_build.unavailable_reason(torch.device("cuda"))


def test_failed_build_is_reported_once_and_not_retried(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cuda_build, "unavailable_reason", lambda device=None: None)
    monkeypatch.setattr(cuda_build, "_archs", lambda: ["9.0"])
    monkeypatch.setattr(cuda_build, "_loaded", False)
    monkeypatch.setattr(cuda_build, "_failure", None)
    monkeypatch.setenv("ROUTEDLORA_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    calls = []

    def broken(**kw):
        calls.append(dict(kw, arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST")))
        raise RuntimeError("nvcc: error in group_rows.cu")

    monkeypatch.setattr(cpp_extension, "load", broken)
    for _ in range(2):
        with pytest.raises(CudaBackendUnavailable, match="building csrc/ failed.*group_rows.cu"):
            cuda_build.load()
    assert len(calls) == 1
    assert calls[0]["build_directory"].startswith(str(tmp_path)) and calls[0]["is_python_module"] is False
    assert calls[0]["arch_list"] == "9.0" and "TORCH_CUDA_ARCH_LIST" not in os.environ  # built for this GPU, restored


def test_build_key_names_versions_and_sources(monkeypatch):
    monkeypatch.setattr(cuda_build, "_archs", lambda: ["9.0"])
    key = cuda_build.build_key()
    assert torch.__version__.replace("+", "_") in key and "sm90" in key
    assert key.endswith(cuda_build._source_digest())


# --- compile check (CI runs this with the machine's nvcc) ------------------------------


@pytest.mark.skipif(cuda_build.find_nvcc() is None, reason="no nvcc on this machine")
def test_every_cu_file_compiles_clean_for_sm80_and_sm90a():
    results = cuda_build.compile_check()
    names = [what for what, _, _ in results]
    for src in cuda_build.kernel_sources():
        for arch in cuda_build.COMPILE_CHECK_ARCHS:
            assert f"{src.name} [{arch}]" in names
    failed = [(what, out) for what, bad, out in results if bad]
    assert not failed, "\n\n".join(f"{what}:\n{out}" for what, out in failed)


# --- on a GPU only ------------------------------------------------------------------------


@needs_gpu
def test_gpu_decode_under_compile_and_cuda_graphs(kernels):
    if gpu_reason() is not None:
        pytest.skip(gpu_reason())
    x, A, B, idx, w, rid, base = make(8, 64, 32, 4, 2, 4, 6, 2, torch.bfloat16)
    f = lambda x: routed_lora(x, A, B, idx, w, rid, scale=0.5, base=base, backend="cuda", validate=False)
    eager = f(x)
    compiled = torch.compile(f, fullgraph=True)(x)
    assert rel_err(compiled.float().cpu(), eager.float().cpu()) <= 1e-2
    static_x = x.clone()
    f(static_x)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = f(static_x)
    static_x.copy_(x * 2)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out.float().cpu(), f(x * 2).float().cpu()) <= 1e-2


def test_cpu_tensors_refused_after_a_build(monkeypatch):
    """Once built, CPU tensors are still refused by name, not by the dispatcher."""
    monkeypatch.setattr(cuda_build, "_loaded", True)
    monkeypatch.setattr(cuda_backend, "_stand_in", False)
    with pytest.raises(CudaBackendUnavailable, match="backend='cuda'"):
        resolve_backend("cuda", torch.device("cpu"))


# --- traffic formulas against the emulator's count of global-memory accesses --------------


def _check_traffic(launch_events, traffic, tensors, all_global=True):
    got = csrc_emulator.traffic(launch_events, tensors)
    for name, (requested, distinct) in got.items():
        assert requested == traffic.requested.get(name, 0), f"{traffic.kernel} {name} requested"
        assert distinct == traffic.distinct.get(name, 0), f"{traffic.kernel} {name} distinct"
    if all_global:  # no counted access falls outside the arguments
        assert sum(b for _, b, _ in launch_events) == sum(traffic.requested.values())


@needs_emulator
@pytest.mark.parametrize("N,R,pattern", [(37, 5, "random"), (3000, 17, "sorted"), (200, 5000, "random"),
                                         (64, 9, "out of range"), (1, 1, "sorted")])
def test_grouping_traffic_formula_matches_the_emulator(N, R, pattern):
    g = torch.Generator().manual_seed(N)
    rid = torch.randint(0, R, (N,), generator=g)
    if pattern == "sorted":
        rid = rid.sort().values
    elif pattern == "out of range":
        rid[::7] = R + 3
    with csrc_emulator.counting() as launches:
        order, srows, offs = csrc_emulator.group_by_row(rid, R)
    tensors = dict(route_ids=rid, order=order, srows=srows, offs=offs, scratch=csrc_emulator.last_scratch["scratch"])
    (events,) = launches
    # below GROUP_SHARED_ROWS the row counters live in shared memory: their accesses are not global
    _check_traffic(events, cuda_backend.group_traffic(rid, R), tensors, all_global=R >= cuda_backend.GROUP_SHARED_ROWS)


@pytest.mark.skipif(cuda_build.find_nvcc() is None, reason="no nvcc")
def test_kernel_resources_for_sm90a():
    # registers, spills and shared memory of every instantiation, from ptxas
    found = cuda_build.kernel_resources()
    assert sorted((f["kernel"], tuple(f["flags"])) for f in found) == [
        ("group_by_row_kernel", (False,)), ("group_by_row_kernel", (True,))]
    assert all(f["registers"] > 0 and f["spill_bytes"] == 0 for f in found)
