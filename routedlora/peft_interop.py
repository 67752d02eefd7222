"""Convert PEFT Poly models (``PolyModel``, any ``n_splits``) to routedlora layers and back.

PEFT Poly keeps ``poly_lora_A (h, m, in/h, r)``, ``poly_lora_B (h, m, r, out/h)`` and a
router ``module_logits (T, h*m)`` per layer, scaled by ``1/r`` with Gumbel-sigmoid
(τ = 1) routing in training: exactly routedlora's ``router="poly"``, ``combine="params"``,
``alpha=1``. The conversion copies the values; outputs and gradients are the same.

PEFT Poly wraps ``nn.Linear`` only (peft 0.21: ``PolyModel._create_new_module`` and
``PolyLayer.__init__`` raise on anything else, and it has no ``fan_in_fan_out``), so a model
whose routed layers wrap Hugging Face ``Conv1D`` (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``)
has no PEFT Poly counterpart: :func:`to_peft` refuses it before changing anything.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import RoutedLoraConfig
from .inject import _CONFIG_ATTR, _install_generate, eject, model_config, routed_layers, set_trainable
from .layer import RoutedLoraLinear

_POLY_PREFIX = "poly_"  # PEFT's PolyModel.prefix


def _peft():
    try:
        import peft
        from peft.tuners.poly.layer import Linear as PolyLinear
    except ImportError as e:  # pragma: no cover - peft is a dev dependency
        raise ImportError("from_peft/to_peft need the `peft` package: pip install peft") from e
    return peft, PolyLinear


def from_peft(peft_model, *, backend: str = "auto") -> nn.Module:
    """The model under a PEFT Poly ``PeftModel``, with its Poly layers replaced by routedlora layers.

    Works in place on the wrapped model (the ``PeftModel`` wrapper must not be
    used afterwards) and returns it. Route it with :func:`routedlora.routing`
    where PEFT took ``task_ids=``. Every layer is checked and its replacement built
    before the first one is swapped in, so a failure leaves the PEFT model as it was.
    """
    peft, PolyLinear = _peft()
    if not isinstance(peft_model, peft.PeftModel):
        raise TypeError(f"peft_model: expected a peft.PeftModel, got {type(peft_model).__name__}")
    adapter = peft_model.active_adapter
    if not isinstance(adapter, str):
        raise ValueError(f"peft_model: has several active adapters {adapter!r}; convert a model with one Poly adapter")
    pconf = peft_model.peft_config[adapter]
    if pconf.peft_type != peft.PeftType.POLY:
        raise ValueError(f"peft_model: adapter {adapter!r} is {pconf.peft_type}, not POLY")
    model = peft_model.base_model.model
    if routed_layers(model):
        raise ValueError("peft_model: the wrapped model already has routedlora layers")
    names_of: dict = {}  # a module may be registered under several names: replace it under all
    for n, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, PolyLinear):
            names_of.setdefault(m, []).append(n)
    found = [(names[0], m) for m, names in names_of.items()]
    if not found:
        raise ValueError("peft_model: has no Poly layers")
    config = RoutedLoraConfig(target_modules=[n for names in names_of.values() for n in names], n_tasks=pconf.n_tasks,
                              n_skills=pconf.n_skills, r=pconf.r, n_heads=pconf.n_splits, router="poly",
                              combine="params", alpha=1.0, backend=backend)
    new = []
    for i, (name, poly) in enumerate(found):
        if list(poly.poly_lora_A.keys()) != [adapter]:
            raise ValueError(f"peft_model: {name} holds adapters {list(poly.poly_lora_A.keys())}; "
                             "convert a model with one Poly adapter")
        if getattr(poly, "merged", False):
            raise ValueError(f"peft_model: {name} has its adapter merged into the base weight; unmerge it first")
        base = poly.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"peft_model: {name} wraps a {type(base).__name__}; PEFT Poly layers convert over "
                            "nn.Linear only")
        layer = RoutedLoraLinear(base, config, layer_index=i)
        layer.train(poly.training)
        theirs = dict(lora_A=poly.poly_lora_A[adapter], lora_B=poly.poly_lora_B[adapter],
                      router_logits=poly.poly_router[adapter].module_logits)
        for what, t in theirs.items():
            ours = getattr(layer, what)
            if t.numel() != ours.numel() or (what != "router_logits" and t.shape != ours.shape):
                raise ValueError(f"peft_model: {name}.{what} has shape {tuple(t.shape)}, expected "
                                 f"{tuple(ours.shape)} from its PolyConfig")
        layer.lora_A = nn.Parameter(theirs["lora_A"].detach().clone())
        layer.lora_B = nn.Parameter(theirs["lora_B"].detach().clone())
        layer.router_logits = nn.Parameter(theirs["router_logits"].detach().clone().view(
            pconf.n_tasks, pconf.n_splits, pconf.n_skills))
        new.append((names_of[poly], layer))
    # nothing above touched the model; from here on every step is an attribute assignment
    for names, layer in new:
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, layer)
    if "peft_config" in model.__dict__:  # PEFT's own unload() drops it too
        del model.peft_config
    setattr(model, _CONFIG_ATTR, config)
    _install_generate(model, new[0][1])
    set_trainable(model)
    return model


_MTTL_OPTIONS = ("router_granularity", "router_selector", "router_straight_through", "router_l2_norm",
                 "router_dropout", "router_shared_skill", "router_average_correction")


def _check_convertible(config: RoutedLoraConfig) -> None:
    wanted = dict(router="poly", combine="params", alpha=1.0, dropout=0.0, temperature=1.0, gumbel=True)
    # the router options mttl has and PEFT Poly does not: only their defaults convert
    defaults = RoutedLoraConfig(target_modules=["_"], n_tasks=1)
    wanted.update({f: getattr(defaults, f) for f in _MTTL_OPTIONS})
    for field, value in wanted.items():
        if getattr(config, field) != value:
            raise ValueError(f"config.{field}: PEFT Poly only expresses {field}={value!r}, "
                             f"the model has {getattr(config, field)!r}")


def _infer_task_type(model: nn.Module):
    # PEFT passes task_ids to Poly layers only from its task-specific wrappers.
    name = type(model).__name__
    for suffix, task_type in (("ForCausalLM", "CAUSAL_LM"), ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
                              ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                              ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS")):
        if name.endswith(suffix):
            if task_type == "SEQ_2_SEQ_LM" and not getattr(getattr(model, "config", None), "is_encoder_decoder",
                                                               False):
                continue
            return task_type
    return None


def _check_adapter_name(adapter_name) -> None:
    if not isinstance(adapter_name, str):
        raise TypeError(f"adapter_name: expected a str, got {type(adapter_name).__name__} {adapter_name!r}")
    if not adapter_name:
        raise ValueError("adapter_name: expected a non-empty str")
    # PEFT keys each layer's ParameterDict/ModuleDict by the adapter name: torch refuses
    # dots and names of existing attributes there (after the model would have been unwrapped)
    if "." in adapter_name:
        raise ValueError(f"adapter_name: {adapter_name!r} contains '.', which torch module keys cannot")
    if hasattr(nn.ParameterDict(), adapter_name) or hasattr(nn.ModuleDict(), adapter_name):
        raise ValueError(f"adapter_name: {adapter_name!r} is an attribute name of torch's ParameterDict/ModuleDict "
                         "and cannot key an adapter")
    # PEFT tells adapters' keys from its own by the prefix "poly_"; a name inside the prefix is
    # re-initialised when the saved PEFT checkpoint is loaded (PEFT only warns)
    if adapter_name in _POLY_PREFIX:
        raise ValueError(f"adapter_name: {adapter_name!r} is part of PEFT Poly's key prefix {_POLY_PREFIX!r}; PEFT "
                         "would re-initialise the adapter when loading it. Choose another name")


def _check_task_type(peft, task_type) -> None:
    if task_type is None:
        return
    if not isinstance(task_type, str):
        raise TypeError(f"task_type: expected None or one of PEFT's TaskType names, got {type(task_type).__name__}")
    if task_type not in list(peft.TaskType):
        raise ValueError(f"task_type: expected None or one of {[t.value for t in peft.TaskType]}, got {task_type!r}")


class _Restore:
    """What :func:`to_peft` needs to put the model back as it was if PEFT fails after ``eject``."""

    def __init__(self, model: nn.Module):
        self.model = model
        # every name each routed layer object is registered under (a module may be shared)
        self.layers = [(n, m) for n, m in model.named_modules(remove_duplicate=False)
                       if isinstance(m, RoutedLoraLinear)]
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.modes = [(m, m.training) for m in model.modules()]
        self.hooks = [(m, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()]
        self.attrs = dict(model.__dict__)  # the config, the generate wrapper, no peft_config

    def __call__(self) -> None:
        model = self.model
        for name, layer in self.layers:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, layer)
        from peft.tuners.tuners_utils import BaseTunerLayer

        # any PEFT layer left elsewhere goes back to the module it wraps
        stray = [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
        for name, module in stray:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
        for key in [k for k in model.__dict__ if k not in self.attrs]:
            del model.__dict__[key]
        for key, value in self.attrs.items():
            if model.__dict__.get(key) is not value:
                model.__dict__[key] = value
        for m, fwd, pre in self.hooks:
            m._forward_hooks.clear()
            m._forward_hooks.update(fwd)
            m._forward_pre_hooks.clear()
            m._forward_pre_hooks.update(pre)
        for m, mode in self.modes:
            m.training = mode
        for p, flag in self.flags:
            p.requires_grad_(flag)


def to_peft(model: nn.Module, adapter_name: str = "default", task_type=None):
    """Wrap ``model`` (routedlora layers injected) as a PEFT Poly ``PeftModel`` with the same values.

    ``task_type`` (PEFT's, e.g. ``"CAUSAL_LM"``) is inferred from the model class
    when not given. Works in place: the routed layers are replaced by PEFT's. Only configurations
    PEFT Poly can express convert (poly router, params combine, ``alpha=1``, no
    dropout, τ = 1, ``nn.Linear`` bases: PEFT Poly does not wrap a transformers ``Conv1D``);
    anything else, and a bad ``adapter_name`` or ``task_type``, raises before the model is touched.
    Should PEFT fail anyway, the routed layers (the same objects), their config, the parameters'
    ``requires_grad`` flags and the modules' modes are put back before the error propagates: the
    adapters are never lost.
    """
    peft, PolyLinear = _peft()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    config = model_config(model)
    layers = routed_layers(model)
    if config is None or not layers or any(not name for name, _ in layers):
        raise ValueError("model: has no routed LoRA layers; call routedlora.inject or from_peft first")
    conv1d = [name for name, layer in layers if layer.fan_in_fan_out]
    if conv1d:
        raise ValueError(f"model: routed layers {conv1d[:3]}{' …' if len(conv1d) > 3 else ''} wrap transformers' "
                         "Conv1D (GPT-2 style); PEFT Poly does not wrap Conv1D (nn.Linear only), so this model "
                         "cannot convert. Keep it in routedlora (save_adapter / load_adapter)")
    for layer in [layer for _, layer in layers]:
        _check_convertible(layer.config)
        if layer.merged_task is not None:
            raise ValueError("model: a task is merged into the base weights; call routedlora.unmerge first")
    _check_adapter_name(adapter_name)
    _check_task_type(peft, task_type)
    if "peft_config" in model.__dict__:
        raise ValueError("model: already carries a PEFT config (peft_config); to_peft wraps a plain model")
    shared = [n for n, m in model.named_modules(remove_duplicate=False)
              if isinstance(m, RoutedLoraLinear) and n not in dict(layers)]
    if shared:
        # PEFT wraps a module under its first name only; the others would silently lose the adapter
        raise ValueError(f"model: routed layers are also registered under {shared[:3]}; PEFT wraps a shared "
                         "module under one name only, so this model cannot convert")
    h, m, r, T = config.n_heads, config.total_skills, config.r, config.n_tasks
    for name, layer in layers:
        if layer.lora_A.shape[:2] != (h, m) or layer.n_tasks != T:
            raise ValueError(f"model: {name} holds {tuple(layer.lora_A.shape[:2])} heads×skills and {layer.n_tasks} "
                             f"tasks, the model config ({h}, {m}) and {T}; PEFT Poly needs one layout for all layers")
    modes = {name: layer.training for name, layer in layers}
    state = {name: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone(),
                    layer.router_logits.detach().clone()) for name, layer in layers}
    pconf = peft.PolyConfig(r=r, n_tasks=T, n_skills=m, n_splits=h, target_modules=list(state),
                            task_type=task_type or _infer_task_type(model))
    restore = _Restore(model)
    eject(model)
    try:
        peft_model = peft.get_peft_model(model, pconf, adapter_name=adapter_name)
        with torch.no_grad():
            for name, poly in peft_model.base_model.model.named_modules():
                if name in state and isinstance(poly, PolyLinear):
                    A, B, logits = state.pop(name)
                    poly.train(modes[name])
                    poly.poly_lora_A[adapter_name].copy_(A)
                    poly.poly_lora_B[adapter_name].copy_(B)
                    poly.poly_router[adapter_name].module_logits.copy_(logits.reshape(T, h * m))
        if state:
            raise RuntimeError(f"to_peft: PEFT did not wrap {sorted(state)[:3]}")
    except BaseException:
        restore()
        raise
    return peft_model
