"""No silent wrong results: unselected skills contribute nothing, unchecked ids never wrap, shared modules
route under every name. Float64 where values are compared, so equalities are exact or at 1e-12."""
import math

import pytest
import torch
from torch import nn

import routedlora
from routedlora.ops import routed_lora


def _inputs(N, R, m=5, d=6, o=4, r=2, K=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g, dtype=torch.float64)
    A = torch.randn(1, m, d, r, generator=g, dtype=torch.float64)
    B = torch.randn(1, m, r, o, generator=g, dtype=torch.float64)
    # every row selects from skills 0..m-2: skill m-1 is selected by no token
    idx = torch.stack([torch.randperm(m - 1, generator=g)[:K] for _ in range(R)]).view(R, 1, K)
    w = torch.rand(R, 1, K, generator=g, dtype=torch.float64)
    return x, A, B, idx, w


def _run(x, A, B, idx, w, rows, combine, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, A, B, w)]
    out = routed_lora(leaves[0], leaves[1], leaves[2], idx, leaves[3], **rows, combine=combine, backend="torch",
                      **kw)
    grads = torch.autograd.grad(out.sin().sum(), leaves)
    return out, grads


# row_mixed (contiguous rows of several tokens) and rank_space (one token per row, any order)
ROWS = {"row_mixed": lambda R: dict(seq_len=3), "rank_space": lambda R: dict(route_ids=torch.arange(R).flip(0))}


@pytest.mark.parametrize("algorithm", sorted(ROWS))
@pytest.mark.parametrize("combine", ["params", "outputs"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_skill_nobody_selects_changes_nothing(algorithm, combine, bad):
    R = 4
    rows = ROWS[algorithm](R)
    N = 3 * R if "seq_len" in rows else R
    x, A, B, idx, w = _inputs(N, R)
    ref, ref_grads = _run(x, A, B, idx, w, rows, combine)
    A2, B2 = A.clone(), B.clone()
    A2[0, -1, 0, 0] = bad
    B2[0, -1, 1, 2] = bad
    out, grads = _run(x, A2, B2, idx, w, rows, combine)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for g, g_ref, name in zip(grads, ref_grads, ("x", "A", "B", "w")):
        if name in ("A", "B"):  # the unselected skill gets no gradient; every other skill the same
            assert torch.equal(g[0, -1], torch.zeros_like(g[0, -1]))
            g, g_ref = g[:, :-1], g_ref[:, :-1]
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("algorithm", sorted(ROWS))
@pytest.mark.parametrize("combine", ["params", "outputs"])
def test_a_non_finite_selected_skill_poisons_only_its_rows(algorithm, combine):
    R = 4
    rows = ROWS[algorithm](R)
    N = 3 * R if "seq_len" in rows else R
    x, A, B, idx, w = _inputs(N, R)
    idx[1, 0, 0] = 4  # only row 1 selects skill 4
    A2 = A.clone()
    A2[0, 4, 2, 1] = math.nan
    ref = routed_lora(x, A, B, idx, w, **rows, combine=combine, backend="torch")
    out = routed_lora(x, A2, B, idx, w, **rows, combine=combine, backend="torch")
    row_of = torch.arange(R).repeat_interleave(3) if "seq_len" in rows else rows["route_ids"]
    poisoned = row_of == 1
    assert torch.isnan(out[poisoned]).all()
    torch.testing.assert_close(out[~poisoned], ref[~poisoned], rtol=0, atol=0)


@pytest.mark.parametrize("algorithm", sorted(ROWS))
def test_unchecked_out_of_range_skill_index_poisons_only_its_rows(algorithm):
    R = 4
    rows = ROWS[algorithm](R)
    N = 3 * R if "seq_len" in rows else R
    x, A, B, idx, w = _inputs(N, R)
    ref = routed_lora(x, A, B, idx, w, **rows, combine="outputs", backend="torch")
    with pytest.raises(ValueError, match="idx"):
        routed_lora(x, A, B, torch.where(torch.arange(R).view(R, 1, 1) == 2, -1, idx), w, **rows, backend="torch")
    for wrong in (-1, 5, 1 << 40):
        bad = idx.clone()
        bad[2, 0, 1] = wrong
        out = routed_lora(x, A, B, bad, w, **rows, combine="outputs", backend="torch", validate=False)
        row_of = torch.arange(R).repeat_interleave(3) if "seq_len" in rows else rows["route_ids"]
        assert torch.isnan(out[row_of == 2]).all()
        torch.testing.assert_close(out[row_of != 2], ref[row_of != 2], rtol=0, atol=0)


def test_topk_layer_ignores_a_nan_in_a_skill_nobody_selects():
    torch.manual_seed(0)
    layer = routedlora.RoutedLoraLinear(nn.Linear(8, 6), n_tasks=3, n_skills=4, r=2, router="topk",
                                        init_weights=False).double().eval()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    ids = torch.tensor([0, 0])
    idx = layer.route(torch.tensor([0])).idx.flatten().tolist()
    unselected = next(j for j in range(4) if j not in idx)
    ref = layer(x, task_ids=ids)
    with torch.no_grad():
        layer.lora_A[:, unselected] = math.nan
    torch.testing.assert_close(layer(x, task_ids=ids), ref, rtol=0, atol=0)


@pytest.mark.parametrize("router", ["poly", "softmax", "topk", "cpoly", "mta"])
@pytest.mark.parametrize("wrong", [-1, -4, 4, 1000])
def test_unvalidated_out_of_range_task_ids_never_wrap(router, wrong):
    # validate=False skips the host-side range check: an out-of-range id (a negative one would
    # wrap around in indexing) must poison its own sequence, never route another task silently
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6))
    routedlora.inject(model, routedlora.RoutedLoraConfig(target_modules=["0", "2"], n_tasks=4, n_skills=4, r=2,
                                                         router=router, init_weights=False))
    model.eval()
    x = torch.randn(3, 2, 8)
    with torch.no_grad():
        with routedlora.routing(model, [1, 3, 2]):
            ref = model(x)
        with routedlora.routing(model, [1, wrong, 2], validate=False):
            out = model(x)
        with pytest.raises(ValueError, match="task_ids"):
            with routedlora.routing(model, [1, wrong, 2]):
                pass
    assert torch.isnan(out[1]).all()
    torch.testing.assert_close(out[[0, 2]], ref[[0, 2]], rtol=0, atol=0)


@pytest.mark.parametrize("scale", [None, "1", math.inf, math.nan, True])
def test_scale_must_be_a_finite_number(scale):
    x, A, B, idx, w = _inputs(6, 2)
    with pytest.raises(TypeError, match="scale"):
        routed_lora(x, A, B, idx, w, seq_len=3, scale=scale)


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = self.a  # one module under two names
        self.c = nn.Linear(8, 8)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def test_a_module_shared_under_two_names_is_routed_under_both():
    torch.manual_seed(0)
    model = _Shared()
    routedlora.inject(model, routedlora.RoutedLoraConfig(target_modules=["a", "b", "c"], n_tasks=2,
                                                         init_weights=False))
    model.eval()
    assert model.a is model.b and isinstance(model.b, routedlora.RoutedLoraLinear)
    assert [n for n, _ in routedlora.routed_layers(model)] == ["a", "c"]
    x = torch.randn(2, 8)
    with routedlora.routing(model, [0, 1]):
        y = model(x)
    with routedlora.routing(model, [0, 1]):
        expect = model.c(model.a(model.a(x)))
    torch.testing.assert_close(y, expect)
    routedlora.eject(model)
    assert model.a is model.b and type(model.a) is nn.Linear


def test_a_shared_module_targeted_under_one_name_only_is_refused():
    torch.manual_seed(0)
    model = _Shared()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="registered under"):
        routedlora.inject(model, routedlora.RoutedLoraConfig(target_modules=["a", "c"], n_tasks=2))
    assert type(model.a) is nn.Linear and model.a is model.b and type(model.c) is nn.Linear
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert routedlora.model_config(model) is None


def _tied_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    routedlora.inject(model, routedlora.RoutedLoraConfig(target_modules=["lm_head", "q_proj"], n_tasks=2,
                                                         init_weights=False))
    return model


def test_hf_tie_weights_reaches_a_routed_lm_head():
    model = _tied_llama()
    model.tie_weights()  # Hugging Face assigns lm_head.weight: the base layer takes it
    assert model.lm_head.weight is model.model.embed_tokens.weight
    routedlora.merge(model, 0, untie=True)
    with pytest.raises(ValueError, match="merged"):
        model.lm_head.weight = model.model.embed_tokens.weight  # would drop the merged delta
    routedlora.unmerge(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(ValueError, match="shape"):
        model.model.layers[0].self_attn.q_proj.weight = nn.Parameter(torch.zeros(3, 16))


def test_resizing_a_routed_module_is_a_clear_error():
    model = _tied_llama()
    model.resize_token_embeddings(40)
    with pytest.raises(ValueError, match="resize"):
        with routedlora.routing(model, [0]):
            model(torch.randint(0, 32, (1, 4)))
