"""routedlora.from_peft / to_peft against PEFT's own Poly implementation.

Parity means what DESIGN.md §4 promises: the converted model holds the same parameter
values and computes the same outputs and gradients as the PEFT Poly model it came from
(or goes to). PEFT Poly (peft/tuners/poly) mixes the skills per example and head with
``sigmoid(z) / (Σ sigmoid(z) + 1e-12)`` in eval mode and with a Gumbel-sigmoid sample
(``RelaxedBernoulli(1.0, logits=z).rsample()``, one ``torch.rand((B, h, m))`` per layer,
in layer order) in train mode; routedlora's ``poly`` router draws the same numbers from
the global generator, so re-seeding it before each forward makes train mode comparable
too.

Models are tiny (Llama and T5 built from configs, float32). Tolerances are 1e-5
relative to the largest magnitude of the reference tensor (gradients of the routing
logits are ~1e-6 in absolute value, so an absolute 1e-5 would check nothing).
Task ids are mixed within a batch and repeat a task, so that routing is per example and
the Gumbel noise per sequence (not per task) is exercised.
"""
import copy
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModelForCausalLM, PeftModelForSeq2SeqLM, PolyConfig, get_peft_model  # noqa: E402
from peft.tuners.poly.layer import Linear as PolyLinear  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration  # noqa: E402

import routedlora  # noqa: E402
from routedlora import RoutedLoraConfig, RoutedLoraLinear  # noqa: E402

TOL = 1e-5
N_TASKS, N_SKILLS, RANK = 3, 4, 4
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]
LLAMA_LAYERS = 2
TASK_IDS = torch.tensor([0, 2, 1, 2])  # mixed, with a repeated task
SEED = 1234  # global seed right before every train-mode forward

# transformers warns about deprecated names when PEFT inspects the model; irrelevant here.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


# --------------------------------------------------------------------------- models


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=LLAMA_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, vocab_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(torch.float32)


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    # dropout_rate=0: train mode must draw no random numbers besides the routers' noise.
    cfg = T5Config(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=64,
                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).to(torch.float32)


def poly_config(n_splits: int, targets, task_type: str) -> PolyConfig:
    return PolyConfig(r=RANK, n_tasks=N_TASKS, n_skills=N_SKILLS, n_splits=n_splits, init_weights=False,
                      target_modules=list(targets), task_type=task_type)


def poly_llama(n_splits: int, seed: int = 0):
    return get_peft_model(tiny_llama(seed), poly_config(n_splits, LLAMA_TARGETS, "CAUSAL_LM"))


def llama_batch(seed: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (len(TASK_IDS), 6), generator=g)
    return dict(input_ids=ids, labels=ids.clone())


def t5_batch(seed: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(input_ids=torch.randint(2, 64, (len(TASK_IDS), 7), generator=g),
                labels=torch.randint(2, 64, (len(TASK_IDS), 5), generator=g))


# --------------------------------------------------------------------------- helpers


def assert_close(actual, expected, what: str, tol: float = TOL) -> None:
    """max |actual - expected| <= tol * max |expected| (exact equality when expected is 0)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= tol * scale, f"{what}: max abs error {err:.3e} > {tol:g} * scale {scale:.3e}"


def peft_forward(peft_model, batch, task_ids=TASK_IDS, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    return peft_model(**batch, task_ids=task_ids)


def routed_forward(model, batch, task_ids=TASK_IDS, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    with routedlora.routing(model, task_ids):
        return model(**batch)


def poly_layers(peft_model) -> dict:
    """{module name inside the HF model: PEFT Poly layer}."""
    return {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, PolyLinear)}


def poly_tensors(layer: PolyLinear, adapter: str = "default"):
    """(poly_lora_A, poly_lora_B, module_logits) of one PEFT Poly layer."""
    return (layer.poly_lora_A[adapter], layer.poly_lora_B[adapter], layer.poly_router[adapter].module_logits)


def routed_tensors(layer: RoutedLoraLinear):
    """(lora_A, lora_B, router_logits) of a routed layer, logits in PEFT's (T, h*m) layout."""
    T, h, m = layer.router_logits.shape
    return (layer.lora_A, layer.lora_B, layer.router_logits.reshape(T, h * m))


def routed_grads(layer: RoutedLoraLinear):
    T, h, m = layer.router_logits.shape
    return (layer.lora_A.grad, layer.lora_B.grad, layer.router_logits.grad.reshape(T, h * m))


PARAM_NAMES = ("A", "B", "logits")


def snapshot(model) -> dict:
    """{layer name: (A, B, logits (T, h*m))} cloned from a routed model."""
    return {n: tuple(t.detach().clone() for t in routed_tensors(layer)) for n, layer in routedlora.routed_layers(model)}


def assert_same_values(poly: dict, routed: dict) -> None:
    """Bit-for-bit equal adapter values: {name: PolyLinear} against {name: RoutedLoraLinear or tensors}."""
    assert set(poly) == set(routed)
    for name, player in poly.items():
        theirs = routed[name] if isinstance(routed[name], tuple) else routed_tensors(routed[name])
        for what, p, r in zip(PARAM_NAMES, poly_tensors(player), theirs):
            assert p.shape == r.shape, f"{name}.{what}: {tuple(p.shape)} != {tuple(r.shape)}"
            assert torch.equal(p.detach(), r.detach()), f"{name}.{what}: values differ"


def assert_same_grads(poly: dict, routed: dict) -> None:
    """Gradients of every adapter parameter agree (and are not all zero: the check means something)."""
    assert set(poly) == set(routed)
    for name, player in poly.items():
        for what, p, g in zip(PARAM_NAMES, poly_tensors(player), routed_grads(routed[name])):
            assert p.grad is not None and g is not None, f"{name}.{what}: no gradient"
            assert p.grad.abs().max() > 0, f"{name}.{what}: zero gradient in the reference"
            assert_close(g, p.grad, f"grad {name}.{what}")


def assert_parity(peft_model, model, batch, *, train: bool) -> None:
    """Same loss, logits (and, in train mode, adapter gradients) from PEFT and routedlora."""
    peft_model.train(train)
    model.train(train)
    seed = SEED if train else None
    if train:
        peft_model.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        ref = peft_forward(peft_model, batch, seed=seed)
        out = routed_forward(model, batch, seed=seed)
        ref.loss.backward()
        out.loss.backward()
    else:
        with torch.no_grad():
            ref = peft_forward(peft_model, batch)
            out = routed_forward(model, batch)
    mode = "train" if train else "eval"
    assert_close(out.logits, ref.logits, f"{mode} logits")
    assert_close(out.loss, ref.loss, f"{mode} loss")
    if train:
        assert_same_grads(poly_layers(peft_model), dict(routedlora.routed_layers(model)))
        # the frozen base gets no gradient
        for n, p in model.named_parameters():
            if not p.requires_grad:
                assert p.grad is None, f"{n}: frozen parameter got a gradient"


def trainable_names(model) -> set:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- 1. from_peft


@pytest.mark.parametrize("n_splits", [1, 2, 4])
def test_from_peft_matches_peft_poly(n_splits):
    pm = poly_llama(n_splits)
    ref = copy.deepcopy(pm)
    batch = llama_batch()

    model = routedlora.from_peft(pm)

    # The same HF model, its Poly layers replaced by routed layers holding the same values.
    assert isinstance(model, LlamaForCausalLM)
    assert not any(isinstance(m, PolyLinear) for m in model.modules())
    layers = dict(routedlora.routed_layers(model))
    assert len(layers) == LLAMA_LAYERS * len(LLAMA_TARGETS)
    for layer in layers.values():
        assert layer.router_logits.shape == (N_TASKS, n_splits, N_SKILLS)
        assert layer.lora_A.shape[:2] == (n_splits, N_SKILLS) and layer.lora_A.shape[3] == RANK
        assert layer.scale == pytest.approx(1.0 / RANK)
    assert_same_values(poly_layers(ref), layers)
    cfg = routedlora.model_config(model)
    assert (cfg.router, cfg.combine, cfg.n_tasks, cfg.n_skills, cfg.r, cfg.n_heads) == \
        ("poly", "params", N_TASKS, N_SKILLS, RANK, n_splits)
    # Only the adapter parameters train.
    assert trainable_names(model) == {f"{n}.{p}" for n in layers for p in ("lora_A", "lora_B", "router_logits")}

    assert_parity(ref, model, batch, train=False)
    assert_parity(ref, model, batch, train=True)

    # The comparisons were not vacuous: routing depends on the task, and train mode is noisy.
    model.eval()
    with torch.no_grad():
        mixed = routed_forward(model, batch).logits
        one_task = routed_forward(model, batch, task_ids=torch.zeros_like(TASK_IDS)).logits
    assert_close(mixed[0], one_task[0], "task-0 row")
    assert not torch.allclose(mixed[1], one_task[1])
    model.train()
    with torch.no_grad():
        a = routed_forward(model, batch, seed=SEED).logits
        b = routed_forward(model, batch, seed=SEED + 1).logits
    assert not torch.allclose(a, b)


def test_from_peft_backend_and_task_id_forms():
    """backend= is honoured; a scalar task id and a list route like the tensor PEFT takes."""
    pm = poly_llama(2)
    ref = copy.deepcopy(pm).eval()
    model = routedlora.from_peft(pm, backend="torch").eval()
    assert {layer.config.backend for _, layer in routedlora.routed_layers(model)} == {"torch"}
    batch = llama_batch()
    with torch.no_grad():
        expected = peft_forward(ref, batch, task_ids=torch.full_like(TASK_IDS, 1)).logits
        with routedlora.routing(model, 1):
            scalar = model(**batch).logits
        listed = routed_forward(model, batch, task_ids=TASK_IDS.tolist()).logits
        expected_mixed = peft_forward(ref, batch).logits
    assert_close(scalar, expected, "scalar task id")
    assert_close(listed, expected_mixed, "list of task ids")


def test_from_peft_keeps_eval_mode():
    pm = poly_llama(2).eval()
    ref = copy.deepcopy(pm)
    batch = llama_batch()
    model = routedlora.from_peft(pm)  # no .eval() afterwards: the mode must carry over
    with torch.no_grad():
        assert_close(routed_forward(model, batch, seed=SEED).logits, peft_forward(ref, batch).logits, "logits")
    assert not any(layer.training for _, layer in routedlora.routed_layers(model))


def test_from_peft_leaves_no_peft_config_behind():
    model = routedlora.from_peft(poly_llama(2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        back = routedlora.to_peft(model, adapter_name="other")
    assert set(back.peft_config) == {"other"}
    assert not [w for w in caught if "peft_config" in str(w.message)]
    assert not hasattr(routedlora.from_peft(back), "peft_config")


# --------------------------------------------------------------------------- 2. to_peft after training


def test_to_peft_after_training_and_round_trip():
    pm = poly_llama(2)
    initial = poly_layers(copy.deepcopy(pm))
    batch = llama_batch()
    model = routedlora.from_peft(pm)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        loss = routed_forward(model, batch, seed=step).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    trained = snapshot(model)
    # the steps moved every adapter tensor away from the PEFT values
    assert initial.keys() == trained.keys()
    for name, player in initial.items():
        for what, p, t in zip(PARAM_NAMES, poly_tensors(player), trained[name]):
            assert not torch.equal(p.detach(), t), f"{name}.{what} did not train"

    # Reference outputs and gradients from the trained routedlora model.
    model.eval()
    with torch.no_grad():
        eval_logits = routed_forward(model, batch).logits
    model.train()
    out = routed_forward(model, batch, seed=SEED)
    out.loss.backward()
    grads = {n: tuple(g.clone() for g in routed_grads(layer)) for n, layer in routedlora.routed_layers(model)}
    train_logits, train_loss = out.logits.detach(), out.loss.detach()

    peft_model = routedlora.to_peft(model)
    assert isinstance(peft_model, PeftModelForCausalLM)
    assert peft_model.peft_config["default"].peft_type == peft.PeftType.POLY
    pconf = peft_model.peft_config["default"]
    assert (pconf.r, pconf.n_tasks, pconf.n_skills, pconf.n_splits) == (RANK, N_TASKS, N_SKILLS, 2)
    # In place: the routed layers are gone from the model.
    assert routedlora.routed_layers(model) == [] and routedlora.model_config(model) is None
    polys = poly_layers(peft_model)
    assert_same_values(polys, trained)
    assert trainable_names(peft_model) == {
        n for n, _ in peft_model.named_parameters() if ".poly_lora_" in n or ".module_logits" in n}

    peft_model.eval()
    with torch.no_grad():
        assert_close(peft_forward(peft_model, batch).logits, eval_logits, "eval logits")
    peft_model.train()
    ref = peft_forward(peft_model, batch, seed=SEED)
    ref.loss.backward()
    assert_close(ref.logits, train_logits, "train logits")
    assert_close(ref.loss, train_loss, "train loss")
    for name, player in polys.items():
        for what, p, g in zip(PARAM_NAMES, poly_tensors(player), grads[name]):
            assert_close(p.grad, g, f"grad {name}.{what}")

    # from_peft(to_peft(x)) keeps every value bit for bit.
    back = routedlora.from_peft(peft_model)
    assert snapshot(back).keys() == trained.keys()
    for name, tensors in snapshot(back).items():
        for what, t, u in zip(PARAM_NAMES, tensors, trained[name]):
            assert torch.equal(t, u), f"round trip changed {name}.{what}"
    back.eval()
    with torch.no_grad():
        assert_close(routed_forward(back, batch).logits, eval_logits, "round-trip eval logits")


def test_to_peft_keeps_eval_mode():
    model = routedlora.from_peft(poly_llama(2)).eval()
    batch = llama_batch()
    with torch.no_grad():
        expected = routed_forward(model, batch).logits
    peft_model = routedlora.to_peft(model)  # no .eval() afterwards: the mode must carry over
    with torch.no_grad():
        assert_close(peft_forward(peft_model, batch, seed=SEED).logits, expected, "logits")
    assert not any(m.training for m in poly_layers(peft_model).values())


# --------------------------------------------------------------------------- 3. to_peft of an injected model


@pytest.mark.parametrize("n_heads", [1, 2])
def test_to_peft_of_injected_model(n_heads):
    model = tiny_llama()
    routedlora.inject(model, RoutedLoraConfig(target_modules=LLAMA_TARGETS, n_tasks=3, n_skills=4, r=4,
                                              n_heads=n_heads, init_weights=False))
    ref = copy.deepcopy(model)  # the routedlora model stays the reference
    values = snapshot(model)
    batch = llama_batch()

    peft_model = routedlora.to_peft(model)
    assert isinstance(peft_model, PeftModelForCausalLM)
    pconf = peft_model.peft_config["default"]
    assert (pconf.r, pconf.n_tasks, pconf.n_skills, pconf.n_splits) == (4, 3, 4, n_heads)
    polys = poly_layers(peft_model)
    assert len(polys) == LLAMA_LAYERS * len(LLAMA_TARGETS)
    assert_same_values(polys, values)

    # Eval mode: outputs equal.
    peft_model.eval()
    ref.eval()
    with torch.no_grad():
        expected = routed_forward(ref, batch)
        got = peft_forward(peft_model, batch)
    assert_close(got.logits, expected.logits, "eval logits")
    assert_close(got.loss, expected.loss, "eval loss")
    # Train mode: outputs and gradients equal (routedlora's layers are the reference here).
    assert_parity(peft_model, ref, batch, train=True)


# --------------------------------------------------------------------------- 4. T5 (seq2seq)


T5_TARGETS = [
    pytest.param(["q", "k", "v", "o"], id="attention"),
    pytest.param(["q", "v", "wo"], id="with-ffn-wo"),  # T5 reads wo.weight.dtype
]


@pytest.mark.parametrize("targets", T5_TARGETS)
def test_t5_from_peft_and_back(targets):
    pm = get_peft_model(tiny_t5(), poly_config(2, targets, "SEQ_2_SEQ_LM"))
    ref = copy.deepcopy(pm)
    batch = t5_batch()

    model = routedlora.from_peft(pm)
    assert isinstance(model, T5ForConditionalGeneration)
    layers = dict(routedlora.routed_layers(model))
    assert any(n.startswith("encoder.") for n in layers) and any(".EncDecAttention." in n for n in layers)
    assert_same_values(poly_layers(ref), layers)
    assert_parity(ref, model, batch, train=False)
    assert_parity(ref, model, batch, train=True)

    # And back: to_peft infers SEQ_2_SEQ_LM from the class and gives the same outputs.
    values = snapshot(model)
    model.eval()
    with torch.no_grad():
        expected = routed_forward(model, batch).logits
    back = routedlora.to_peft(model)
    assert isinstance(back, PeftModelForSeq2SeqLM)
    assert_same_values(poly_layers(back), values)
    back.eval()
    with torch.no_grad():
        assert_close(peft_forward(back, batch).logits, expected, "round-trip eval logits")


# --------------------------------------------------------------------------- 5. errors


def _eval_logits(model, batch):
    model.eval()
    with torch.no_grad():
        return routed_forward(model, batch).logits


@pytest.mark.parametrize("changes, field", [
    (dict(router="softmax"), "router"),
    (dict(alpha=2.0), "alpha"),
    (dict(dropout=0.1), "dropout"),
    (dict(router="topk", combine="outputs"), "router|combine"),
    (dict(router="poly", combine="outputs"), "combine"),
    (dict(temperature=0.5), "temperature"),
    (dict(gumbel=False), "gumbel"),
    (dict(router="cpoly"), "router"),
], ids=["softmax", "alpha", "dropout", "topk-outputs", "poly-outputs", "temperature", "no-gumbel", "cpoly"])
def test_to_peft_rejects_what_peft_cannot_express(changes, field):
    model = tiny_llama()
    config = RoutedLoraConfig(target_modules=LLAMA_TARGETS, n_tasks=3, n_skills=4, r=4, n_heads=1,
                              init_weights=False, **changes)
    routedlora.inject(model, config)
    batch = llama_batch()
    before_layers = routedlora.routed_layers(model)
    before_values = {n: p.detach().clone() for n, p in model.state_dict().items()}
    before = _eval_logits(model, batch)

    with pytest.raises(ValueError, match=rf"config\.({field})\b"):
        routedlora.to_peft(model)

    # Untouched: same layers (same objects), same config, same values, same output; no PEFT residue.
    after_layers = routedlora.routed_layers(model)
    assert [n for n, _ in after_layers] == [n for n, _ in before_layers]
    assert all(a is b for (_, a), (_, b) in zip(after_layers, before_layers))
    assert routedlora.model_config(model) is config
    assert not any(isinstance(m, PolyLinear) for m in model.modules())
    assert not hasattr(model, "peft_config")
    after_values = model.state_dict()
    assert after_values.keys() == before_values.keys()
    assert all(torch.equal(after_values[n], v) for n, v in before_values.items())
    assert torch.equal(_eval_logits(model, batch), before)


def test_to_peft_rejects_merged_model_untouched():
    model = tiny_llama()
    routedlora.inject(model, RoutedLoraConfig(target_modules=LLAMA_TARGETS, n_tasks=3, n_skills=4, r=4,
                                              init_weights=False))
    routedlora.merge(model, 1)
    batch = llama_batch()
    model.eval()
    with torch.no_grad(), routedlora.routing(model, 1):  # only the merged task may be routed
        before = model(**batch).logits
    with pytest.raises(ValueError, match="unmerge"):
        routedlora.to_peft(model)
    assert len(routedlora.routed_layers(model)) == LLAMA_LAYERS * len(LLAMA_TARGETS)
    with torch.no_grad(), routedlora.routing(model, 1):
        assert torch.equal(model(**batch).logits, before)


def test_to_peft_of_plain_model_raises():
    with pytest.raises(ValueError, match="routed"):
        routedlora.to_peft(tiny_llama())


def test_from_peft_of_non_peft_model_raises_type_error():
    with pytest.raises(TypeError, match="PeftModel"):
        routedlora.from_peft(tiny_llama())
    with pytest.raises(TypeError):
        routedlora.from_peft(torch.nn.Linear(4, 4))


def test_from_peft_of_lora_model_raises_value_error():
    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM"))
    names = [n for n, _ in lora.named_modules()]
    with pytest.raises(ValueError, match="POLY"):
        routedlora.from_peft(lora)
    # nothing was changed
    assert [n for n, _ in lora.named_modules()] == names
    assert not any(isinstance(m, RoutedLoraLinear) for m in lora.modules())


def test_from_peft_of_two_poly_adapters_raises_value_error():
    pm = poly_llama(1)
    pm.add_adapter("second", poly_config(1, LLAMA_TARGETS, "CAUSAL_LM"))
    with pytest.raises(ValueError, match="one Poly adapter"):
        routedlora.from_peft(pm)
    assert not any(isinstance(m, RoutedLoraLinear) for m in pm.modules())
    assert len(poly_layers(pm)) == LLAMA_LAYERS * len(LLAMA_TARGETS)
