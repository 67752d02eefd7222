"""MTALinear against ALTER's MTA (alibaba/EasyNLP examples/mta), restated in tests/peers/alter_mta.py.

Every option (stage 1 dense / topk, stage 2 fixed pair / topk, gate alter / tanh) with equal
parameter values: outputs and gradients in float64. Plus ALTER's initialisation (never
saturated), the options' checks, and the recipe that places experts on the FFN as ALTER did.
"""
import itertools

import pytest
import torch
from torch import nn

import routedlora
from layer_compare import assert_layers_agree
from peers import alter_mta as alter
from routedlora import MTALinear, RoutedLoraConfig

pytestmark = pytest.mark.usefixtures("one_thread")

D, O, R, M, T, N_SH = 8, 6, 2, 4, 5, 2  # T > M: tasks 3 and 4 wrap around to pairs (3, 0) and (0, 1)
TOL = dict(rtol=1e-10, atol=1e-12)


def make_layer(*, stage=1, init_alter=False, seed=0, **options):
    """A float64 layer whose every parameter matters (non-zero B, shared B, gate)."""
    torch.manual_seed(seed)
    layer = MTALinear(nn.Linear(D, O).double(), n_tasks=T, n_skills=M, r=R, router="mta", n_shared=N_SH,
                      top_k=2, alpha=3.0, init_weights=False, backend="torch", **options)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        if not init_alter:  # distinct logits: top-k picks are clear, and not the fixed pair
            layer.router_logits.copy_(torch.randn(layer.router_logits.shape, generator=g, dtype=torch.float64) * 0.2)
        layer.shared_B.copy_(torch.randn(layer.shared_B.shape, generator=g, dtype=torch.float64))
        for p in layer.gate.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    layer.set_stage(stage)
    return layer


def expert_outputs(layer, x):
    """ALTER's experts as routedlora holds them: each skill's LoRA delta γ x A_e B_e, (B, S, o) each."""
    s = layer.scale
    task = [s * x @ layer.lora_A[0, e] @ layer.lora_B[0, e] for e in range(layer.lora_A.shape[1])]
    shared = [s * x @ layer.shared_A[0, j] @ layer.shared_B[0, j] for j in range(layer.shared_A.shape[1])]
    return task, shared


def peer_gate(layer):
    g = layer.gate
    if layer.config.mta_gate == "alter":
        return alter.alter_gate(g[0].weight, g[2].weight)
    return alter.tanh_gate(g[0].weight, g[0].bias, g[2].weight, g[2].bias)


def peer_forward(layer, x, tasks):
    """The transcription's output, base linear added: what the layer should compute."""
    cfg = layer.config
    task, shared = expert_outputs(layer, x)
    z = layer.router_logits[:, 0, :]
    tau = cfg.temperature
    if layer.mta_stage == 1:
        if cfg.mta_routing == "dense":
            delta = alter.stage1_dense(task, z, tasks, tau)
        else:
            delta = alter.stage1_topk(task, z, tasks, cfg.top_k, cfg.renormalize, tau)
    else:
        if cfg.mta_stage2 == "fixed_pair":
            mix = alter.stage2_pair_mixture(task, z, tasks, tau)
        else:
            mix = alter.stage2_topk_mixture(task, z, tasks, cfg.top_k, cfg.renormalize, tau)
        delta = alter.stage2(mix, shared, peer_gate(layer))
    return layer.base_layer(x) + delta


def assert_matches_peer(layer, tasks, S=5):
    torch.manual_seed(11)
    x = torch.randn(len(tasks), S, D, dtype=torch.float64, requires_grad=True)
    out = layer(x, task_ids=torch.tensor(tasks))
    want = peer_forward(layer, x, tasks)
    torch.testing.assert_close(out, want, **TOL)
    cot = torch.randn(out.shape, dtype=torch.float64)
    leaves = [x] + [p for _, p in layer.adapter_state().items()]
    names = ["x"] + list(layer.adapter_state())
    got = torch.autograd.grad((out * cot).sum(), leaves, allow_unused=True)
    ref = torch.autograd.grad((want * cot).sum(), leaves, allow_unused=True)
    checked = 0
    for name, a, b in zip(names, got, ref):
        if b is None:  # the transcription does not read it (e.g. shared skills in stage 1)
            assert a is None or not a.abs().any(), name
            continue
        torch.testing.assert_close(a, b, **TOL, msg=name)
        checked += 1
    return checked


TASKS = [0, 3, 4, 1, 3]  # a repeated task; the wrapping pairs (3, 0) and (0, 1)


@pytest.mark.parametrize("routing,renormalize", [("dense", True), ("topk", True), ("topk", False)])
def test_stage1_matches_alter(routing, renormalize):
    layer = make_layer(mta_routing=routing, renormalize=renormalize)
    # x, lora_A, lora_B, router_logits
    assert assert_matches_peer(layer, TASKS) == 4


@pytest.mark.parametrize("stage2,gate,renormalize", [
    ("fixed_pair", "alter", True), ("fixed_pair", "tanh", True), ("topk", "alter", True), ("topk", "tanh", True),
    ("topk", "alter", False)])
def test_stage2_matches_alter(stage2, gate, renormalize):
    layer = make_layer(stage=2, mta_stage2=stage2, mta_gate=gate, renormalize=renormalize)
    # x, lora_A, lora_B, router_logits, shared_A, shared_B and the gate's 2 (alter) or 4 (tanh) tensors
    assert assert_matches_peer(layer, TASKS) == (8 if gate == "alter" else 10)


def test_stage2_ignores_stage1_routing_and_stage1_ignores_stage2_options():
    for routing, stage2 in itertools.product(("dense", "topk"), ("fixed_pair", "topk")):
        layer = make_layer(stage=2, mta_routing=routing, mta_stage2=stage2)
        assert_matches_peer(layer, [2, 0])
        layer.set_stage(1)
        assert_matches_peer(layer, [2, 0])


def test_from_alter_init_the_layer_matches_alter():
    """At ALTER's initial logits (ties!): dense stage 1 and the fixed pair of stage 2."""
    layer = make_layer(init_alter=True)
    torch.testing.assert_close(layer.router_logits[:, 0], alter.alter_task_logits(T, M, torch.float64), rtol=0, atol=0)
    assert_matches_peer(layer, TASKS)
    layer.set_stage(2)
    assert_matches_peer(layer, TASKS)


def test_fixed_pair_is_by_index_and_not_renormalised():
    layer = make_layer(stage=2)
    with torch.no_grad():  # task 1 prefers skills 3 and 0 by value; the pair is still (1, 2)
        layer.router_logits[1, 0] = torch.tensor([0.5, 0.0, 0.1, 0.6], dtype=torch.float64)
    rt = layer.route(torch.tensor([1, 3]))
    assert rt.idx.tolist() == [[[1, 2]], [[3, 0]]]
    p = torch.softmax(layer.router_logits[1, 0] / 0.1, -1)
    torch.testing.assert_close(rt.w[0, 0], p[[1, 2]], **TOL)
    assert float(rt.w[0, 0].detach().sum()) < 0.1  # as Softmax-T gives them: far from summing to one
    assert_matches_peer(layer, [1, 3])


# --- ALTER's initialisation --------------------------------------------------------------


def test_fresh_layer_is_not_saturated():
    """Defaults: ALTER's logits; at τ = 0.1 the top-2 weights are equal, the smaller ≥ 0.1 (was 5e-5)."""
    torch.manual_seed(0)
    layer = MTALinear(nn.Linear(D, O), n_tasks=3, n_skills=4, r=R, router="mta")
    assert layer.config.temperature == 0.1
    torch.testing.assert_close(layer.router_logits[:, 0], alter.alter_task_logits(3, 4), rtol=0, atol=0)
    with torch.no_grad():
        rt = layer.route(torch.arange(3))
    assert rt.idx.shape == (3, 1, 4)  # dense stage 1: every skill
    top2 = torch.topk(rt.w[:, 0], 2, dim=-1).values
    assert float(top2[:, 1].min()) >= 0.1, top2
    torch.testing.assert_close(top2[:, 0], top2[:, 1])  # the pair is preferred equally
    assert torch.topk(rt.w[:, 0], 2, dim=-1).indices.sort(-1).values.tolist() == [[0, 1], [1, 2], [2, 3]]
    layer.set_stage(2)
    rt = layer.route(torch.arange(3))
    assert rt.idx[:, 0].tolist() == [[0, 1], [1, 2], [2, 3]] and float(rt.w.detach().min()) >= 0.1
    # the old initialisation, still an option, saturates: e^10 between the first and second skill
    torch.manual_seed(0)
    old = MTALinear(nn.Linear(D, O), n_tasks=3, n_skills=4, r=R, router="mta", mta_init="own_skill",
                    mta_routing="topk")
    w = old.route(torch.arange(3)).w[:, 0].detach()
    assert float(w[:, 1].max()) < 1e-4 and old.route(torch.arange(3)).idx[:, 0, 0].tolist() == [0, 1, 2]


def test_gate_architectures():
    layer = make_layer(mta_gate="alter")
    g = layer.gate
    assert [type(mod) for mod in g] == [nn.Linear, nn.ReLU, nn.Linear]
    assert g[0].bias is None and g[2].bias is None
    assert tuple(g[0].weight.shape) == ((1 + N_SH) * O, min(D, O))[::-1] and tuple(g[2].weight.shape) == (1 + N_SH, min(D, O))
    tanh = make_layer(mta_gate="tanh", gate_hidden=5).gate
    assert [type(mod) for mod in tanh] == [nn.Linear, nn.Tanh, nn.Linear] and tuple(tanh[0].weight.shape) == (5, 18)
    # ALTER's gate is randomly initialised (not zero); the tanh gate starts at a 0.9 task share
    torch.manual_seed(0)
    fresh = MTALinear(nn.Linear(D, O), n_tasks=2, n_skills=2, r=R, router="mta", n_shared=1)
    assert fresh.gate[2].weight.abs().min() > 0
    fresh = MTALinear(nn.Linear(D, O), n_tasks=2, n_skills=2, r=R, router="mta", n_shared=1, mta_gate="tanh")
    fresh.set_stage(2)
    alpha = fresh._gate_weights(torch.randn(2, 3, D), torch.randn(6, D), fresh.route(torch.arange(2)), 2)
    torch.testing.assert_close(alpha, torch.tensor([[0.9, 0.1]] * 2))


@pytest.mark.parametrize("field,bad,err", [
    ("mta_init", "saturated", ValueError), ("mta_routing", "sparse", ValueError), ("mta_stage2", "pair", ValueError),
    ("mta_gate", "relu", ValueError), ("mta_gate", None, TypeError), ("mta_routing", 1, TypeError)])
def test_options_are_checked(field, bad, err):
    with pytest.raises(err, match=field):
        RoutedLoraConfig(target_modules=["x"], n_tasks=2, router="mta", **{field: bad})


def test_option_defaults_follow_alter_and_fixed_pair_needs_two_skills():
    cfg = RoutedLoraConfig(target_modules=["x"], n_tasks=2, router="mta")
    assert (cfg.mta_init, cfg.mta_routing, cfg.mta_stage2, cfg.mta_gate) == ("alter", "dense", "fixed_pair", "alter")
    assert RoutedLoraConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="mta_stage2"):
        RoutedLoraConfig(target_modules=["x"], n_tasks=2, router="mta", n_skills=1, top_k=1)
    RoutedLoraConfig(target_modules=["x"], n_tasks=2, router="mta", n_skills=1, top_k=1, mta_stage2="topk")


# --- what else the layer does, under the new options -------------------------------------


@pytest.mark.parametrize("routing", ["dense", "topk"])
def test_stage1_merges_and_stage2_refuses(routing):
    model = nn.Sequential(nn.Linear(D, O))
    routedlora.inject(model, RoutedLoraConfig(target_modules=["0"], n_tasks=3, n_skills=M, r=R, router="mta",
                                              mta_routing=routing, init_weights=False))
    model.eval()
    x = torch.randn(2, 3, D)
    with routedlora.routing(model, [1, 1]), torch.no_grad():
        want = model(x)
    routedlora.merge(model, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    routedlora.unmerge(model)
    routedlora.mta_stage2(model)
    with pytest.raises(ValueError, match="merge"):
        routedlora.merge(model, 1)


@pytest.mark.parametrize("stage2,gate", [("fixed_pair", "alter"), ("topk", "tanh")])
def test_gate_cached_while_decoding(stage2, gate):
    model = nn.Sequential(nn.Linear(D, D))
    routedlora.inject(model, RoutedLoraConfig(target_modules=["0"], n_tasks=3, n_skills=M, r=R, router="mta",
                                              n_shared=2, mta_stage2=stage2, mta_gate=gate, init_weights=False))
    layer = model[0]
    with torch.no_grad():
        layer.shared_B.normal_()
        for p in layer.gate.parameters():
            p.normal_()
    routedlora.mta_stage2(model)
    assert {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad} == {"gate", "shared_A",
                                                                                          "shared_B"}
    model.eval()
    x = torch.randn(2, 4, D)
    with routedlora.routing(model, [0, 2], decoding=True):
        full = model(x)
        step = model(x[:, 3:4])  # a decode step reuses the gate of the prefill
    torch.testing.assert_close(step, full[:, 3:4], rtol=1e-5, atol=1e-6)


def test_dense_stage1_on_the_triton_kernels_matches_torch():
    from routedlora.ops import triton_backend

    if not triton_backend.is_available(torch.device("cuda" if torch.cuda.is_available() else "cpu")):
        pytest.skip("triton not installed")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    base = nn.Linear(16, 12).to(dev)
    kw = dict(n_tasks=4, n_skills=3, r=2, router="mta", init_weights=False)
    ref = MTALinear(base, backend="torch", **kw).eval()
    fast = MTALinear(base, backend="triton", **kw).eval()
    fast.load_state_dict(ref.state_dict())
    with torch.no_grad():
        ref.router_logits.normal_(0, 0.2)
        fast.router_logits.copy_(ref.router_logits)
    x = torch.randn(3, 5, 16, device=dev)
    tasks = torch.tensor([3, 0, 3], device=dev)
    assert fast.route(tasks).idx.tolist() == [[[0, 1, 2]]] * 3
    assert_layers_agree(ref, fast, x, tasks)


# --- the recipe: experts on the FFN of the last blocks, as ALTER placed them ---------------


def test_mta_alter_recipe_places_experts_on_the_ffn_of_the_last_blocks():
    from routedlora.training import apply_recipe
    from routedlora.training.models import default_targets, ffn_targets, tiny_llama, tiny_t5

    llama = tiny_llama(40, hidden=16, layers=3)
    over = apply_recipe(llama, "mta-alter", n_tasks=3, target_modules=default_targets(llama), n_skills=3, r=2,
                        mta_stage2_at=4)
    assert over == {"task_routing": "task", "mta_stage2_at": 4}
    names = [n for n, _ in routedlora.routed_layers(llama)]
    assert names == [f"model.layers.2.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    assert all(type(layer) is MTALinear for _, layer in routedlora.routed_layers(llama))
    t5 = tiny_t5(40, hidden=16, layers=3)
    apply_recipe(t5, "mta-alter", n_tasks=3, target_modules=None, n_skills=3, r=2, mta_blocks=2,
                 mta_options=dict(mta_gate="tanh", mta_routing="topk"))
    names = sorted(n for n, _ in routedlora.routed_layers(t5))
    assert names == sorted(f"{stack}.block.{b}.layer.{i}.DenseReluDense.{p}"
                           for stack, i in (("encoder", 1), ("decoder", 2)) for b in (1, 2) for p in ("wi", "wo"))
    assert routedlora.model_config(t5).mta_gate == "tanh" and routedlora.model_config(t5).mta_routing == "topk"
    assert ffn_targets(tiny_t5(40, hidden=16, layers=3), within=["wo"]) == [
        "encoder.block.2.layer.1.DenseReluDense.wo", "decoder.block.2.layer.2.DenseReluDense.wo"]
    for kwargs, match in [(dict(recipe="poly", mta_blocks=1), "mta_blocks"),
                          (dict(recipe="mta", mta_blocks=1), "mta_blocks"),
                          (dict(recipe="poly", mta_options=dict(mta_gate="tanh")), "mta_options"),
                          (dict(recipe="mta", mta_options=dict(gate="tanh")), "mta_options"),
                          (dict(recipe="mta-alter", mta_blocks=0), "last_blocks"),
                          (dict(recipe="mta-alter", target_modules=["q_proj"]), "no feed-forward")]:
        kwargs.setdefault("target_modules", ["q_proj", "down_proj"])
        with pytest.raises(ValueError, match=match):
            apply_recipe(tiny_llama(40, hidden=16, layers=1), n_tasks=2, **kwargs)


def test_cli_mta_flags_reach_the_config():
    from routedlora.training.cli import build, parser

    args = parser().parse_args(["--recipe", "mta-alter", "--layers", "2", "--hidden", "16", "--steps", "1",
                                "--train-size", "8", "--eval-size", "4", "--threads", "1", "--no-progress",
                                "--mta-routing", "topk", "--mta-stage2", "topk", "--mta-gate", "tanh",
                                "--mta-init", "own_skill", "--mta-blocks", "2"])
    trainer = build(args, log=lambda s: None)
    cfg = routedlora.model_config(trainer.model)
    assert (cfg.mta_init, cfg.mta_routing, cfg.mta_stage2, cfg.mta_gate) == ("own_skill", "topk", "topk", "tanh")
    assert len(routedlora.routed_layers(trainer.model)) == 6  # gate/up/down of both blocks
    with pytest.raises(SystemExit):
        parser().parse_args(["--mta-gate", "relu"])


def test_an_adapter_saved_before_the_mta_options_loads_with_the_behaviour_it_had(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    torch.manual_seed(0)
    old = routedlora.RoutedLoraConfig(target_modules=["0"], n_tasks=3, n_skills=4, r=2, router="mta",
                                      mta_init="own_skill", mta_routing="topk", mta_stage2="topk", mta_gate="tanh")
    model = nn.Sequential(nn.Linear(8, 8))
    routedlora.inject(model, old)
    path = str(tmp_path / "a.safetensors")
    routedlora.save_adapter(model, path)
    with safe_open(path, "pt") as f:  # strip the fields, as a file of the previous release has none
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["config"])
    for name in ("mta_init", "mta_routing", "mta_stage2", "mta_gate"):
        cfg.pop(name)
    save_file(tensors, path, metadata={**meta, "config": json.dumps(cfg)})
    fresh = nn.Sequential(nn.Linear(8, 8))
    routedlora.load_adapter(fresh, path)
    got = routedlora.model_config(fresh)
    assert (got.mta_init, got.mta_routing, got.mta_stage2, got.mta_gate) == ("own_skill", "topk", "topk", "tanh")


@pytest.mark.parametrize("init,gate", [("alter", "alter"), ("own_skill", "tanh")])
def test_reset_parameters_gives_the_mta_init_again(init, gate):
    torch.manual_seed(0)
    layer = MTALinear(nn.Linear(8, 6), n_tasks=3, n_skills=4, r=2, router="mta", mta_init=init, mta_gate=gate)
    fresh = {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(1.0)
    layer.reset_parameters()
    w = layer.route(torch.arange(3)).w[:, 0]
    assert float(torch.topk(w, 2, dim=-1).values[:, 1].min()) >= (0.1 if init == "alter" else 0.0)
    assert torch.equal(layer.shared_B, torch.zeros_like(layer.shared_B))
    if init == "alter":  # deterministic pattern: exactly as built
        assert torch.equal(layer.router_logits, fresh["router_logits"])
    if gate == "tanh":
        assert torch.equal(layer.gate[-1].bias, fresh["gate.2.bias"])


def test_top_k_is_checked_only_where_top_k_routes():
    RoutedLoraConfig(target_modules=["q"], n_tasks=2, n_skills=2, router="mta", top_k=3)  # dense + fixed pair
    with pytest.raises(ValueError, match="top_k"):
        RoutedLoraConfig(target_modules=["q"], n_tasks=2, n_skills=2, router="mta", top_k=3, mta_routing="topk")
