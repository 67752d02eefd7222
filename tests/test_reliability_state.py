"""Reliability: nothing lost, nobody in.

Every mutating public call either succeeds or leaves the model exactly as it was. Each
failure here is checked against a snapshot of the whole model taken before the call:
every ``state_dict()`` value, every parameter's ``requires_grad`` flag, the module type at
every name, the routedlora config (the same object), and each routed layer's config,
merged task, stage and trainable set.
"""
import json
import math
import os

import pytest
import torch
from torch import nn

import routedlora
from routedlora import MTALinear, RoutedLoraConfig, RoutedLoraLinear


class Tiny(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)
        self.head = nn.Linear(d, 3)  # never targeted

    def forward(self, x):
        return self.head(self.down(torch.relu(self.up(x))))


def tiny(init=0):
    torch.manual_seed(init)
    model = Tiny()
    model.head.bias.requires_grad_(False)  # a flag of the user's own that a rollback must keep
    return model


def config(**kw):
    kw = {**dict(target_modules=["up", "down"], n_tasks=3, n_skills=3, r=2, init_weights=False), **kw}
    return RoutedLoraConfig(**kw)


def injected(init=0, adapter=None, **kw):
    """``tiny(init)`` with adapters drawn from seed ``adapter`` (same base, other adapter values)."""
    model = tiny(init)
    torch.manual_seed(init + 100 if adapter is None else adapter)
    routedlora.inject(model, config(**kw))
    return model.eval()


def routed_out(model, tasks=(0, 2, 1), seed=5):
    x = torch.randn(len(tasks), 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), routedlora.routing(model, list(tasks)):
        return model(x)


def snapshot(model):
    return dict(
        state={k: v.detach().clone() for k, v in model.state_dict().items()},
        flags={n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)},
        types={n: type(m) for n, m in model.named_modules(remove_duplicate=False)},
        config=routedlora.model_config(model),
        layers=[(n, layer, layer.config, layer.merged_task, getattr(layer, "mta_stage", None),
                 layer.trainable_params, layer.training) for n, layer in routedlora.routed_layers(model)],
    )


def assert_untouched(model, snap):
    now = snapshot(model)
    assert now["types"] == snap["types"]
    assert now["flags"] == snap["flags"]
    assert now["state"].keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert now["state"][k].dtype == v.dtype and torch.equal(now["state"][k], v), k
    assert now["config"] is snap["config"]
    assert len(now["layers"]) == len(snap["layers"])
    for a, b in zip(now["layers"], snap["layers"]):
        assert a[0] == b[0] and a[1] is b[1] and a[2] is b[2] and a[3:] == b[3:], a[0]


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("field, value, exc", [
    ("alpha", math.inf, ValueError), ("alpha", math.nan, ValueError), ("alpha", True, TypeError),
    ("temperature", math.inf, ValueError), ("temperature", math.nan, ValueError),
    ("dropout", math.nan, ValueError), ("dropout", False, TypeError),
    ("gumbel", "no", TypeError), ("gumbel", 1, TypeError), ("renormalize", "yes", TypeError),
    ("init_weights", None, TypeError),
    ("seed", "abc", TypeError), ("seed", True, TypeError), ("seed", 1.5, TypeError),
    ("backend", 3, TypeError), ("router", ["poly"], TypeError),
    ("target_modules", "(", ValueError), ("target_modules", ["up", 3], TypeError),
    ("target_modules", ["up", ""], ValueError), ("target_modules", 5, ValueError),
    ("exclude_modules", "[a", ValueError), ("exclude_modules", [None], TypeError),
    ("n_shared", 0, ValueError), ("n_specific", 1.0, ValueError),
])
def test_config_rejects_bad_field(field, value, exc):
    with pytest.raises(exc, match=field):
        config(**{field: value})


def test_config_regex_error_is_explained():
    with pytest.raises(ValueError, match=r"target_modules: '\(' is not a valid regular expression"):
        config(target_modules="(")


def test_config_accepts_valid_forms():
    c = config(target_modules=("up", "down"), exclude_modules=set(), seed=0, dropout=0, alpha=2)
    assert c.target_modules == ["down", "up"] and c.exclude_modules == []
    assert RoutedLoraConfig.from_dict(json.loads(c.to_json())) == c
    assert config(target_modules=r".*(up|down)", seed=None).seed is None


def test_config_from_dict_errors_name_the_field():
    good = config().to_dict()
    with pytest.raises(ValueError, match=r"missing required fields \['n_tasks'\]"):
        RoutedLoraConfig.from_dict({k: v for k, v in good.items() if k != "n_tasks"})
    with pytest.raises(ValueError, match="unknown fields"):
        RoutedLoraConfig.from_dict({**good, "lr": 1})
    with pytest.raises(TypeError, match="seed"):
        RoutedLoraConfig.from_dict({**good, "seed": "abc"})
    with pytest.raises(TypeError, match="config"):
        RoutedLoraConfig.from_dict([("n_tasks", 2)])


# --------------------------------------------------------------------------- save


def test_save_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch

    model = injected()
    path = tmp_path / "adapter.safetensors"
    routedlora.save_adapter(model, path)
    before = path.read_bytes()
    real = safetensors.torch.save_file

    def dies_halfway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", dies_halfway)
    other = injected(init=1)
    with pytest.raises(OSError, match="disk full"):
        routedlora.save_adapter(other, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["adapter.safetensors"]  # no temporary file left behind
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    routedlora.save_adapter(other, path)  # a successful save replaces the file
    assert path.read_bytes() != before and os.listdir(tmp_path) == ["adapter.safetensors"]


def test_save_errors_name_the_path(tmp_path):
    model = injected()
    with pytest.raises(ValueError, match="directory"):
        routedlora.save_adapter(model, tmp_path)
    with pytest.raises(FileNotFoundError, match="nope"):
        routedlora.save_adapter(model, tmp_path / "nope" / "a.safetensors")
    with pytest.raises(ValueError, match="inject"):
        routedlora.save_adapter(tiny(), tmp_path / "a.safetensors")
    with pytest.raises(TypeError, match="path"):
        routedlora.save_adapter(model, 3)
    assert os.listdir(tmp_path) == []


def test_save_through_symlink_keeps_the_link(tmp_path):
    model = injected()
    real = tmp_path / "real.safetensors"
    link = tmp_path / "link.safetensors"
    routedlora.save_adapter(model, real)
    link.symlink_to(real)
    routedlora.save_adapter(injected(init=1), link)
    assert link.is_symlink()
    assert routedlora.model_config(routedlora.load_adapter(tiny(), real)) == routedlora.model_config(model)


# --------------------------------------------------------------------------- load: files


def _read(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def _write(path, meta, tensors):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.fixture
def saved(tmp_path):
    model = injected(init=3)
    path = tmp_path / "adapter.safetensors"
    routedlora.save_adapter(model, path)
    return model, path


def _targets():
    """A plain model and an injected one (of the saved layout), each with its snapshot."""
    fresh = tiny(init=7)
    inj = injected(init=3, adapter=8)
    return [(fresh, snapshot(fresh)), (inj, snapshot(inj))]


def test_load_rejects_missing_directory_and_non_safetensors(saved, tmp_path):
    _, good = saved
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-40])
    cases = [
        (tmp_path / "missing.safetensors", FileNotFoundError, "missing.safetensors"),
        (tmp_path, ValueError, "is a directory"),
        (garbage, ValueError, "garbage.safetensors.*not a readable safetensors file"),
        (truncated, ValueError, "truncated.safetensors"),
    ]
    for model, snap in _targets():
        for path, exc, pattern in cases:
            with pytest.raises(exc, match=pattern):
                routedlora.load_adapter(model, path)
            assert_untouched(model, snap)
        with pytest.raises(TypeError, match="path"):
            routedlora.load_adapter(model, None)
        assert_untouched(model, snap)


def _tampered(saved, tmp_path):
    model, path = saved
    meta, tensors = _read(path)
    cfg = json.loads(meta["config"])
    first = next(iter(tensors))
    bad = {
        "format": ({**meta, "format": "other/1"}, tensors, ValueError, "format tag"),
        "config-json": ({**meta, "config": "{not json"}, tensors, ValueError, "'config' is not valid JSON"),
        "config-missing": ({k: v for k, v in meta.items() if k != "config"}, tensors, ValueError,
                           "'config' is missing"),
        "config-list": ({**meta, "config": "[1, 2]"}, tensors, ValueError, "'config' must be a JSON object"),
        "config-alpha": ({**meta, "config": json.dumps({**cfg, "alpha": "x"})}, tensors, TypeError,
                         "saved config: alpha"),
        "config-unknown": ({**meta, "config": json.dumps({**cfg, "lr": 1})}, tensors, ValueError, "unknown fields"),
        "stages-json": ({**meta, "stages": "{"}, tensors, ValueError, "'stages' is not valid JSON"),
        "stages-value": ({**meta, "stages": json.dumps({"up": 3})}, tensors, ValueError, "expected 1 or 2"),
        "stages-bool": ({**meta, "stages": json.dumps({"up": True})}, tensors, ValueError, "expected 1 or 2"),
        "stages-not-mta": ({**meta, "stages": json.dumps({"up": 2})}, tensors, ValueError, "not an MTA layer"),
        "stages-unknown": ({**meta, "stages": json.dumps({"nope": 1})}, tensors, ValueError, "does not have"),
        "dtype": (meta, {**tensors, first: tensors[first].to(torch.int32)}, ValueError, "dtype torch.int32"),
        "shape": (meta, {**tensors, first: tensors[first][..., :1].contiguous()}, ValueError, "shape"),
        "extra": (meta, {**tensors, "down.extra": torch.zeros(2)}, ValueError, "unexpected"),
    }
    return {name: (_write(tmp_path / f"{name}.safetensors", m, t), exc, pattern)
            for name, (m, t, exc, pattern) in bad.items()}


def test_load_rejects_bad_metadata_and_tensors_before_any_change(saved, tmp_path):
    for name, (path, exc, pattern) in _tampered(saved, tmp_path).items():
        for model, snap in _targets():
            with pytest.raises(exc, match=pattern) as info:
                routedlora.load_adapter(model, path)
            assert str(path) in str(info.value), (name, str(info.value))
            assert_untouched(model, snap)


def test_load_rolls_back_if_a_late_step_fails(saved, monkeypatch):
    import routedlora.checkpoint as ckpt

    _, path = saved
    model = tiny(init=7)
    snap = snapshot(model)

    def boom(model):
        raise RuntimeError("late failure")

    monkeypatch.setattr(ckpt, "set_trainable", boom)
    with pytest.raises(RuntimeError, match="late failure"):
        routedlora.load_adapter(model, path)
    assert_untouched(model, snap)
    assert not hasattr(model, "_routedlora_config") and "generate" not in model.__dict__

    # the same for an injected model, configs and dropout modules included (use_saved changes them)
    model = injected(init=3, adapter=8, router="mta", top_k=2, alpha=3.0)
    source = injected(init=3, router="mta", top_k=2, dropout=0.2)
    routedlora.mta_stage2(source)
    routedlora.save_adapter(source, path)
    snap = snapshot(model)
    dropouts = [layer.dropout for _, layer in routedlora.routed_layers(model)]
    with pytest.raises(RuntimeError, match="late failure"):
        routedlora.load_adapter(model, path, config_mismatch="use_saved")
    assert_untouched(model, snap)
    assert [layer.dropout for _, layer in routedlora.routed_layers(model)] == dropouts


def test_load_refuses_while_a_task_is_merged(saved):
    _, path = saved
    model = injected(init=8)
    routedlora.merge(model, 1)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="unmerge"):
        routedlora.load_adapter(model, path)
    assert_untouched(model, snap)


# --------------------------------------------------------------------------- load: config


def test_load_config_mismatch(tmp_path):
    source = injected(init=3, alpha=2.0, temperature=0.5, dropout=0.1, seed=11)
    path = tmp_path / "a.safetensors"
    routedlora.save_adapter(source, path)
    source.eval()
    expected = routed_out(source)

    model = injected(init=3, adapter=8)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"alpha: saved 2\.0, model 1\.0") as info:
        routedlora.load_adapter(model, path)
    for field in ("temperature", "dropout", "seed"):
        assert f"{field}: saved" in str(info.value)
    assert "use_saved" in str(info.value)
    assert_untouched(model, snap)
    with pytest.raises(ValueError, match="config_mismatch"):
        routedlora.load_adapter(model, path, config_mismatch="saved")
    assert_untouched(model, snap)

    # keep_model: the values load, the model's own alpha/temperature/... stay
    keep = injected(init=3, adapter=8)
    routedlora.load_adapter(keep, path, config_mismatch="keep_model")
    assert routedlora.model_config(keep) == config()
    saved_values = routedlora.adapter_state_dict(source)
    for k, v in routedlora.adapter_state_dict(keep).items():
        assert torch.equal(v, saved_values[k]), k

    # use_saved: the model and every layer take the saved values and compute what the source computes
    use = injected(init=3, adapter=8)
    routedlora.load_adapter(use, path, config_mismatch="use_saved")
    assert routedlora.model_config(use) == routedlora.model_config(source)
    for _, layer in routedlora.routed_layers(use):
        assert layer.config == routedlora.model_config(source)
        assert isinstance(layer.dropout, nn.Dropout) and layer.dropout.p == 0.1 and not layer.dropout.training
    use.eval()
    torch.testing.assert_close(routed_out(use), expected, rtol=0, atol=0)
    use.train()
    assert all(layer.dropout.training for _, layer in routedlora.routed_layers(use))


def test_load_structural_mismatch_always_fails(tmp_path):
    source = injected(init=3, r=4)
    path = tmp_path / "a.safetensors"
    routedlora.save_adapter(source, path)
    for mode in ("error", "use_saved", "keep_model"):
        model = injected(init=3, adapter=8)
        snap = snapshot(model)
        with pytest.raises(ValueError, match=r"r: saved 4, model 2.*shape"):
            routedlora.load_adapter(model, path, config_mismatch=mode)
        assert_untouched(model, snap)
    # another set of routed layers: the names differ, whatever config_mismatch says
    source = injected(init=3, target_modules=["up"])
    routedlora.save_adapter(source, path)
    model = injected(init=3, adapter=8)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"names differ.*missing \['down\.lora_A'"):
        routedlora.load_adapter(model, path, config_mismatch="use_saved")
    assert_untouched(model, snap)


def test_load_mta_stage_into_fresh_and_injected(tmp_path):
    source = injected(init=3, router="mta", top_k=2)
    routedlora.mta_stage2(source)
    path = tmp_path / "mta.safetensors"
    routedlora.save_adapter(source, path)
    for model in (tiny(init=3), injected(init=3, adapter=8, router="mta", top_k=2)):
        routedlora.load_adapter(model, path)
        assert all(isinstance(layer, MTALinear) and layer.mta_stage == 2
                   for _, layer in routedlora.routed_layers(model))
        model.eval()
        torch.testing.assert_close(routed_out(model), routed_out(source.eval()), rtol=0, atol=0)


# --------------------------------------------------------------------------- merge


def tied_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                   intermediate_size=24, vocab_size=32, max_position_embeddings=32,
                                   tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    routedlora.inject(model, RoutedLoraConfig(target_modules=["lm_head", "q_proj"], n_tasks=3, n_skills=2, r=2,
                                              init_weights=False))
    return model.eval()


def llama_logits(model, task=None):
    ids = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if task is None:
            return model(input_ids=ids).logits
        with routedlora.routing(model, task):
            return model(input_ids=ids).logits


def test_merge_refuses_tied_weights_and_unties_on_request():
    model = tied_llama()
    embed = model.model.embed_tokens.weight
    snap = snapshot(model)
    routed = llama_logits(model, 1)
    with pytest.raises(ValueError, match=r"'lm_head'.*tied to 'model\.embed_tokens\.weight'.*untie=True"):
        routedlora.merge(model, 1)
    assert_untouched(model, snap)
    assert model.lm_head.base_layer.weight is embed

    routedlora.merge(model, 1, untie=True)
    assert model.model.embed_tokens.weight is embed
    assert torch.equal(embed, snap["state"]["model.embed_tokens.weight"])  # bit for bit
    own = model.lm_head.base_layer.weight
    assert own is not embed and not own.requires_grad and own.untyped_storage().data_ptr() != embed.data_ptr()
    torch.testing.assert_close(llama_logits(model), routed, rtol=1e-5, atol=1e-5)

    routedlora.unmerge(model)
    assert model.lm_head.base_layer.weight is embed  # the tie is whole again, exactly
    assert all(layer.merged_task is None for _, layer in routedlora.routed_layers(model))
    q = "model.layers.0.self_attn.q_proj.base_layer.weight"  # not tied: W + Δ − Δ, within rounding
    torch.testing.assert_close(model.state_dict()[q], snap["state"][q], rtol=0, atol=1e-6)
    torch.testing.assert_close(llama_logits(model, 1), routed, rtol=1e-5, atol=1e-5)


def test_merge_validates_everything_first():
    model = injected()
    snap = snapshot(model)
    for bad in (True, 1.0, -1, 3, "0", None):
        with pytest.raises(ValueError, match="task_id"):
            routedlora.merge(model, bad)
        assert_untouched(model, snap)
    with pytest.raises(TypeError, match="untie"):
        routedlora.merge(model, 0, untie="yes")
    assert_untouched(model, snap)
    mta = injected(router="mta", top_k=2)
    routedlora.mta_stage2(mta)
    snap = snapshot(mta)
    with pytest.raises(ValueError, match="merge"):
        routedlora.merge(mta, 0)
    assert_untouched(mta, snap)


# --------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("case", ["mhr_z-negative", "mhr_z-bool", "mhr_z-cpoly", "mhr_mu-mta", "stage2-poly",
                                  "merged-mhr_z", "merged-mhr_mu", "merged-stage2", "lr-nan", "lr-inf", "lr-str",
                                  "lr-negative", "router_lr-nan", "weight_decay-inf"])
def test_recipe_failures_leave_the_model_as_it_was(case):
    router = {"mhr_z-cpoly": "cpoly", "mhr_mu-mta": "mta", "merged-stage2": "mta"}.get(case, "poly")
    model = injected(router=router, top_k=2)
    if case.startswith("merged"):
        routedlora.merge(model, 0)
    snap = snapshot(model)
    call = {
        "mhr_z-negative": lambda: routedlora.mhr_z(model, n_new_tasks=-1),
        "mhr_z-bool": lambda: routedlora.mhr_z(model, n_new_tasks=True),
        "mhr_z-cpoly": lambda: routedlora.mhr_z(model, n_new_tasks=1),
        "mhr_mu-mta": lambda: routedlora.mhr_mu(model),
        "stage2-poly": lambda: routedlora.mta_stage2(model),
        "merged-mhr_z": lambda: routedlora.mhr_z(model, n_new_tasks=1),
        "merged-mhr_mu": lambda: routedlora.mhr_mu(model),
        "merged-stage2": lambda: routedlora.mta_stage2(model),
        "lr-nan": lambda: routedlora.param_groups(model, lr=math.nan),
        "lr-inf": lambda: routedlora.param_groups(model, lr=math.inf),
        "lr-str": lambda: routedlora.param_groups(model, lr="1e-3"),
        "lr-negative": lambda: routedlora.param_groups(model, lr=-1.0),
        "router_lr-nan": lambda: routedlora.param_groups(model, lr=1e-3, router_lr=math.nan),
        "weight_decay-inf": lambda: routedlora.param_groups(model, lr=1e-3, weight_decay=math.inf),
    }[case]
    field = case.split("-")[0] if case.split("-")[0] in ("lr", "router_lr", "weight_decay") else None
    with pytest.raises((ValueError, TypeError), match=field or "n_new_tasks|unmerge|MTA|mta"):
        call()
    assert_untouched(model, snap)


# --------------------------------------------------------------------------- PEFT


def peft_llama():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                   intermediate_size=24, vocab_size=32, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg)
    model.model.norm.weight.requires_grad_(True)
    routedlora.inject(model, RoutedLoraConfig(target_modules=["q_proj", "v_proj"], n_tasks=3, n_skills=2, r=2,
                                              init_weights=False))
    model.model.embed_tokens.weight.requires_grad_(True)  # a flag of the user's own
    return model.eval()


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("when", ["before", "after"])
def test_to_peft_rolls_back_when_peft_fails(monkeypatch, when):
    import peft

    model = peft_llama()
    snap = snapshot(model)
    generate = model.__dict__.get("generate")
    expected = llama_logits(model, [0, 2])
    real = peft.get_peft_model

    def failing(model, config, **kw):
        if when == "after":  # PEFT has wrapped the layers, set peft_config and frozen the model
            real(model, config, **kw)
        raise RuntimeError("PEFT failed")

    monkeypatch.setattr(peft, "get_peft_model", failing)
    with pytest.raises(RuntimeError, match="PEFT failed"):
        routedlora.to_peft(model)
    assert_untouched(model, snap)
    assert "peft_config" not in model.__dict__
    assert model.__dict__.get("generate") is generate
    torch.testing.assert_close(llama_logits(model, [0, 2]), expected, rtol=0, atol=0)
    monkeypatch.setattr(peft, "get_peft_model", real)
    assert isinstance(routedlora.to_peft(model), peft.PeftModel)  # and it still converts


@pytest.mark.parametrize("kw, exc, pattern", [
    (dict(adapter_name=""), ValueError, "adapter_name"),
    (dict(adapter_name="a.b"), ValueError, "adapter_name.*'\\.'"),
    (dict(adapter_name=3), TypeError, "adapter_name"),
    (dict(adapter_name="keys"), ValueError, "adapter_name.*attribute"),
    (dict(adapter_name="poly"), ValueError, "adapter_name.*prefix"),
    (dict(task_type="NOPE"), ValueError, "task_type"),
    (dict(task_type=5), TypeError, "task_type"),
])
def test_to_peft_validates_arguments_before_any_change(kw, exc, pattern):
    model = peft_llama()
    snap = snapshot(model)
    with pytest.raises(exc, match=pattern):
        routedlora.to_peft(model, **kw)
    assert_untouched(model, snap)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_from_peft_checks_every_layer_before_replacing_any():
    import peft
    from peft.tuners.poly.layer import Linear as PolyLinear

    model = peft_llama()
    peft_model = routedlora.to_peft(model)
    polys = [m for m in peft_model.modules() if isinstance(m, PolyLinear)]
    last = polys[-1]
    last.poly_lora_A["default"] = nn.Parameter(last.poly_lora_A["default"].detach()[:, :1].clone())
    types = {n: type(m) for n, m in peft_model.named_modules()}
    with pytest.raises(ValueError, match="poly_lora_A|lora_A"):
        routedlora.from_peft(peft_model)
    assert {n: type(m) for n, m in peft_model.named_modules()} == types
    assert not any(isinstance(m, RoutedLoraLinear) for m in peft_model.modules())
    assert isinstance(peft_model.base_model.model.peft_config, dict)
    with pytest.raises(ValueError, match="backend"):
        routedlora.from_peft(peft_model, backend="tpu")
    assert {n: type(m) for n, m in peft_model.named_modules()} == types
    assert isinstance(peft_model, peft.PeftModel)


def test_load_config_fields_that_select_the_same_layers(tmp_path):
    source = injected(init=3, target_modules=r"up|down", init_weights=True)
    path = tmp_path / "a.safetensors"
    routedlora.save_adapter(source, path)
    model = injected(init=3, adapter=8)  # the same two layers, named by a list; init_weights differs
    snap = snapshot(model)
    with pytest.raises(ValueError, match="target_modules: saved 'up|down'") as info:
        routedlora.load_adapter(model, path)
    assert "init_weights" not in str(info.value)  # the load overwrites what it describes
    assert_untouched(model, snap)
    routedlora.load_adapter(model, path, config_mismatch="use_saved")
    assert routedlora.model_config(model).target_modules == "up|down"
    assert routedlora.model_config(model).init_weights is False
