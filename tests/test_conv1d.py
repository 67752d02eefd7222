"""Hugging Face ``Conv1D`` bases (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``: ``x @ W + b`` with ``W``
stored ``(in, out)``, the transpose of ``nn.Linear``'s).

Covers the routed layer against a hand-written reference (poly with one and two heads, topk
with outputs combine; outputs and gradients in float64), inject / train / merge / save / load /
generate on a tiny GPT-2 built from a config, and to_peft's refusal (PEFT Poly wraps
``nn.Linear`` only). Everything runs on the CPU, no downloads.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import routedlora

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB = 64
TARGETS = ["c_attn", "c_proj", "c_fc"]
ADAPTER_PARAMS = ("lora_A", "lora_B", "router_logits")
# every Conv1D of a 2-block GPT-2: attention in/out projections and the MLP's two
ROUTED = {f"transformer.h.{i}.{leaf}" for i in range(2)
          for leaf in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}


def make_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    model = GPT2LMHeadModel(cfg).float().eval()
    model.generation_config.eos_token_id = None  # fixed-length generations
    return model


def gpt2_config(**kw) -> routedlora.RoutedLoraConfig:
    kw = dict(dict(target_modules=TARGETS, n_tasks=3, n_skills=4, r=4, n_heads=2, seed=0), **kw)
    return routedlora.RoutedLoraConfig(**kw)


def injected(seed: int = 0, spread: bool = True, **kw) -> GPT2LMHeadModel:
    model = make_gpt2(seed)
    routedlora.inject(model, gpt2_config(init_weights=False, **kw))
    model.eval()
    if spread:  # every task a clearly different mixture (the default init is almost uniform)
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            for _, layer in routedlora.routed_layers(model):
                layer.router_logits.copy_(torch.randn(layer.router_logits.shape, generator=g) * 2)
    return model


def token_ids(B: int = 3, S: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))


def logits(model, ids, task_ids) -> torch.Tensor:
    with torch.no_grad(), routedlora.routing(model, task_ids):
        return model(input_ids=ids).logits


# ---------------------------------------------------------------------------------------
# the layer against a reference
# ---------------------------------------------------------------------------------------

def reference(x, W, b, A, B, logits_, tasks, scale, router, k=2, tau=1.0):
    """``x @ W + b + γΔ(x)`` written out: DESIGN.md §1 with W stored (in, out)."""
    out = x @ W + b
    z = logits_[tasks].to(x.dtype)  # (B, h, m)
    if router == "poly":
        s = torch.sigmoid(z)
        w = s / (s.sum(-1, keepdim=True) + 1e-12)
        A_hat = torch.cat([torch.einsum("bm,mdr->bdr", w[:, q], A[q]) for q in range(A.shape[0])], dim=1)
        B_hat = torch.cat([torch.einsum("bm,mro->bro", w[:, q], B[q]) for q in range(B.shape[0])], dim=2)
        return out + scale * torch.einsum("bsd,bdr,bro->bso", x, A_hat, B_hat)
    p = torch.softmax(z[:, 0] / tau, dim=-1)  # topk, one head, outputs combine
    top, idx = p.topk(k, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    delta = 0
    for j in range(k):
        Aj, Bj = A[0, idx[:, j]], B[0, idx[:, j]]  # (B, d, r), (B, r, o)
        delta = delta + top[:, j, None, None] * torch.einsum("bsd,bdr,bro->bso", x, Aj, Bj)
    return out + scale * delta


@pytest.mark.parametrize("router,heads", [("poly", 1), ("poly", 2), ("topk", 1)])
def test_layer_matches_reference_outputs_and_gradients(router, heads):
    torch.manual_seed(0)
    d, o = 8, 12
    conv = Conv1D(o, d).double()
    with torch.no_grad():
        conv.bias.normal_()
    layer = routedlora.RoutedLoraLinear(conv, n_tasks=3, n_skills=4, r=3, n_heads=heads, router=router,
                                        init_weights=False, alpha=2.0).eval()
    assert (layer.in_features, layer.out_features) == (d, o) and layer.fan_in_fan_out
    assert layer.weight is conv.weight and layer.bias is conv.bias  # model code reads the base's own
    assert layer.lora_A.shape == (heads, 4, d // heads, 3) and layer.lora_B.shape == (heads, 4, 3, o // heads)
    with torch.no_grad():
        layer.router_logits.normal_()
    x = torch.randn(3, 5, d, dtype=torch.float64, requires_grad=True)
    tasks = torch.tensor([2, 0, 2])
    y = layer(x, task_ids=tasks)
    params = [x, layer.lora_A, layer.lora_B, layer.router_logits]
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, params, gy)
    want = reference(x, conv.weight, conv.bias, layer.lora_A, layer.lora_B, layer.router_logits, tasks,
                     layer.scale, router, k=layer.config.top_k, tau=layer.config.temperature)
    want_grads = torch.autograd.grad(want, params, gy)
    torch.testing.assert_close(y, want)
    for name, g, w in zip(["x", "lora_A", "lora_B", "router_logits"], grads, want_grads):
        torch.testing.assert_close(g, w, msg=name)


def test_layer_base_weight_checks_use_conv1d_layout():
    layer = routedlora.RoutedLoraLinear(Conv1D(12, 8), n_tasks=2, r=2)
    x = torch.randn(2, 3, 8)
    # an (in, out) replacement fits; the nn.Linear layout (out, in) does not
    layer.weight = nn.Parameter(torch.randn(8, 12), requires_grad=False)
    assert layer.base_layer.weight is layer.weight
    layer(x, task_ids=0)
    with pytest.raises(ValueError, match=r"of shape \(8, 12\), got \(12, 8\)"):
        layer.weight = nn.Parameter(torch.randn(12, 8))
    # resized behind the layer's back: forward names both shapes
    layer.base_layer.weight = nn.Parameter(torch.randn(8, 16))
    with pytest.raises(ValueError, match=r"weight has shape \(8, 16\), but the adapter was built for \(8, 12\)"):
        layer(x, task_ids=0)


def test_layer_under_autocast():
    torch.manual_seed(0)
    layer = routedlora.RoutedLoraLinear(Conv1D(12, 8), n_tasks=2, r=2, init_weights=False).eval()
    x = torch.randn(2, 3, 8)
    want = layer(x, task_ids=[0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x, task_ids=[0, 1])
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)


def test_import_does_not_need_transformers():
    code = "import sys, routedlora; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------------------------
# GPT-2: inject, train, merge, save / load, generate
# ---------------------------------------------------------------------------------------

def test_inject_gpt2_targets_every_conv1d_and_refuses_other_types():
    model = make_gpt2()
    routedlora.inject(model, gpt2_config())
    layers = dict(routedlora.routed_layers(model))
    assert set(layers) == ROUTED
    for layer in layers.values():
        assert isinstance(layer.base_layer, Conv1D)
        assert (layer.in_features, layer.out_features) == tuple(layer.base_layer.weight.shape)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"{n}.{p}" for n in ROUTED for p in ADAPTER_PARAMS}
    # anything else is refused, naming both accepted types
    with pytest.raises(TypeError, match=r"'transformer\.wte' is a Embedding, not an nn\.Linear or .*Conv1D"):
        routedlora.inject(make_gpt2(), gpt2_config(target_modules=["wte"]))
    with pytest.raises(TypeError, match=r"nn\.Linear or .*Conv1D"):
        routedlora.RoutedLoraLinear(nn.Embedding(4, 4), n_tasks=2)


def test_gpt2_trains_only_adapters():
    model = make_gpt2()
    routedlora.inject(model, gpt2_config())
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    ids, tasks = token_ids(B=4, S=8), torch.tensor([0, 1, 2, 1])
    losses = []
    for _ in range(6):
        with routedlora.routing(model, tasks):
            loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
        else:
            assert not torch.equal(p, adapters[n]), n


def test_gpt2_merge_matches_routed_eval_and_unmerge_restores():
    model = injected()
    ids = token_ids()
    base = {n: layer.base_layer.weight.detach().clone() for n, layer in routedlora.routed_layers(model)}
    want = logits(model, ids, 1)
    assert (want - logits(model, ids, 0)).abs().max() > 1e-3  # tasks differ: the merge has something to show
    routedlora.merge(model, 1)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(model, ids, 1), want, atol=1e-5, rtol=1e-5)
    routedlora.unmerge(model)
    for n, layer in routedlora.routed_layers(model):
        torch.testing.assert_close(layer.base_layer.weight, base[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, ids, 1), want, atol=1e-5, rtol=1e-5)


def test_gpt2_tied_lm_head_still_detected():
    # lm_head is an nn.Linear tied to the input embeddings, next to the Conv1D layers
    model = make_gpt2()
    routedlora.inject(model, gpt2_config(target_modules=["c_attn", "lm_head"], init_weights=False))
    model.eval()
    wte = model.transformer.wte.weight.detach().clone()
    ids = token_ids()
    want = logits(model, ids, 2)
    with pytest.raises(ValueError, match="'lm_head' is tied to 'transformer.wte.weight'"):
        routedlora.merge(model, 2)
    routedlora.merge(model, 2, untie=True)
    assert torch.equal(model.transformer.wte.weight, wte)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    routedlora.unmerge(model)
    assert model.lm_head.weight is model.transformer.wte.weight


def _saved(tmp_path):
    """Routed outputs of an injected GPT-2 and the path of its saved adapter."""
    model = injected()
    ids, tasks = token_ids(), [2, 0, 1]
    want = logits(model, ids, tasks)
    path = tmp_path / "adapter.safetensors"
    routedlora.save_adapter(model, str(path))
    return ids, tasks, want, path


def test_gpt2_save_load_roundtrip(tmp_path):
    ids, tasks, want, path = _saved(tmp_path)
    fresh = make_gpt2()  # same base weights, fresh adapters
    routedlora.inject(fresh, gpt2_config(init_weights=False))
    fresh.eval()
    assert (logits(fresh, ids, tasks) - want).abs().max() > 1e-3
    routedlora.load_adapter(fresh, str(path))
    assert torch.equal(logits(fresh, ids, tasks), want)


def test_gpt2_load_adapter_injects_a_plain_model(tmp_path):
    ids, tasks, want, path = _saved(tmp_path)
    fresh = make_gpt2()
    routedlora.load_adapter(fresh, str(path))
    assert {n for n, _ in routedlora.routed_layers(fresh)} == ROUTED
    fresh.eval()
    assert torch.equal(logits(fresh, ids, tasks), want)


def test_gpt2_generate_inside_routing():
    model = injected()
    prompt = token_ids(B=2, S=4, seed=3)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with routedlora.routing(model, [1, 1]):
        greedy = model.generate(prompt, **kw)
        beams = model.generate(prompt, num_beams=2, **kw)
    assert greedy.shape == beams.shape == (2, 9)
    assert torch.equal(greedy[:, :4], prompt)
    with routedlora.routing(model, [0, 2]):  # mixed tasks, beams repeated per sequence
        assert model.generate(prompt, num_beams=2, **kw).shape == (2, 9)
    # the routed KV-cache decode agrees with task 1 merged into the weights
    routedlora.merge(model, 1)
    assert torch.equal(model.generate(prompt, **kw), greedy)
    assert torch.equal(model.generate(prompt, num_beams=2, **kw), beams)
    routedlora.unmerge(model)


def test_gpt2_mta_layers_run():
    model = injected(router="mta", spread=False, n_heads=1)
    ids = token_ids()
    out = logits(model, ids, [0, 1, 2])
    assert out.shape == (3, 7, VOCAB) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------
# PEFT: Poly wraps nn.Linear only
# ---------------------------------------------------------------------------------------

def test_to_peft_refuses_conv1d_before_touching_the_model():
    peft = pytest.importorskip("peft")
    # PEFT's own Poly tuner refuses GPT-2's Conv1D, so there is nothing to convert to
    with pytest.raises(TypeError, match="only the following modules are supported"):
        peft.get_peft_model(make_gpt2(), peft.PolyConfig(r=4, n_tasks=3, n_skills=4, target_modules=["c_attn"],
                                                         task_type="CAUSAL_LM"))
    model = injected()
    layers = routedlora.routed_layers(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = token_ids()
    want = logits(model, ids, [0, 1, 2])
    with pytest.raises(ValueError, match="PEFT Poly does not wrap Conv1D"):
        routedlora.to_peft(model)
    assert routedlora.routed_layers(model) == layers
    assert "peft_config" not in model.__dict__
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(logits(model, ids, [0, 1, 2]), want)
    # a model mixing nn.Linear and Conv1D routed layers is refused as a whole
    mixed = make_gpt2()
    routedlora.inject(mixed, gpt2_config(target_modules=["c_attn", "lm_head"]))
    with pytest.raises(ValueError, match="PEFT Poly does not wrap Conv1D"):
        routedlora.to_peft(mixed)
    assert len(routedlora.routed_layers(mixed)) == 3


def test_training_targets_find_gpt2s_conv1d_layers():
    from routedlora.training.models import default_targets, ffn_targets

    model = make_gpt2()
    assert default_targets(model) == ["c_attn", "c_fc", "c_proj"]
    assert ffn_targets(model) == ["transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
