"""Convert PEFT Poly models (``PolyModel``, any ``n_splits``) to routedlora layers and back.

PEFT Poly keeps ``poly_lora_A (h, m, in/h, r)``, ``poly_lora_B (h, m, r, out/h)`` and a
router ``module_logits (T, h*m)`` per layer, scaled by ``1/r`` with Gumbel-sigmoid
(τ = 1) routing in training: exactly routedlora's ``router="poly"``, ``combine="params"``,
``alpha=1``. The conversion copies the values; outputs and gradients are the same.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import RoutedLoraConfig
from .inject import _CONFIG_ATTR, eject, model_config, routed_layers, set_trainable
from .layer import RoutedLoraLinear


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
    where PEFT took ``task_ids=``.
    """
    peft, PolyLinear = _peft()
    if not isinstance(peft_model, peft.PeftModel):
        raise TypeError(f"peft_model: expected a peft.PeftModel, got {type(peft_model).__name__}")
    adapter = peft_model.active_adapter
    pconf = peft_model.peft_config[adapter]
    if pconf.peft_type != peft.PeftType.POLY:
        raise ValueError(f"peft_model: adapter {adapter!r} is {pconf.peft_type}, not POLY")
    model = peft_model.base_model.model
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, PolyLinear)]
    if not found:
        raise ValueError("peft_model: has no Poly layers")
    config = RoutedLoraConfig(target_modules=[n for n, _ in found], n_tasks=pconf.n_tasks,
                              n_skills=pconf.n_skills, r=pconf.r, n_heads=pconf.n_splits, router="poly",
                              combine="params", alpha=1.0, backend=backend)
    new = []
    for i, (name, poly) in enumerate(found):
        if list(poly.poly_lora_A.keys()) != [adapter]:
            raise ValueError(f"peft_model: {name} holds adapters {list(poly.poly_lora_A.keys())}; "
                             "convert a model with one Poly adapter")
        layer = RoutedLoraLinear(poly.get_base_layer(), config, layer_index=i)
        layer.train(poly.training)
        logits = poly.poly_router[adapter].module_logits
        layer.lora_A = nn.Parameter(poly.poly_lora_A[adapter].detach().clone())
        layer.lora_B = nn.Parameter(poly.poly_lora_B[adapter].detach().clone())
        layer.router_logits = nn.Parameter(logits.detach().clone().view(pconf.n_tasks, pconf.n_splits,
                                                                        pconf.n_skills))
        new.append((name, layer))
    for name, layer in new:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
    if "peft_config" in model.__dict__:  # PEFT's own unload() drops it too
        del model.peft_config
    setattr(model, _CONFIG_ATTR, config)
    set_trainable(model)
    return model


def _check_convertible(config: RoutedLoraConfig) -> None:
    wanted = dict(router="poly", combine="params", alpha=1.0, dropout=0.0, temperature=1.0, gumbel=True)
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


def to_peft(model: nn.Module, adapter_name: str = "default", task_type=None):
    """Wrap ``model`` (routedlora layers injected) as a PEFT Poly ``PeftModel`` with the same values.

    ``task_type`` (PEFT's, e.g. ``"CAUSAL_LM"``) is inferred from the model class
    when not given. Works in place: the routed layers are replaced by PEFT's. Only configurations
    PEFT Poly can express convert (poly router, params combine, ``alpha=1``, no
    dropout, τ = 1); anything else raises before the model is touched.
    """
    peft, PolyLinear = _peft()
    config = model_config(model)
    layers = routed_layers(model)
    if config is None or not layers:
        raise ValueError("model: has no routed LoRA layers; call routedlora.inject or from_peft first")
    for layer in [layer for _, layer in layers]:
        _check_convertible(layer.config)
        if layer.merged_task is not None:
            raise ValueError("model: a task is merged into the base weights; call routedlora.unmerge first")
    h, m, r, T = config.n_heads, config.total_skills, config.r, config.n_tasks
    modes = {name: layer.training for name, layer in layers}
    state = {name: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone(),
                    layer.router_logits.detach().clone()) for name, layer in layers}
    pconf = peft.PolyConfig(r=r, n_tasks=T, n_skills=m, n_splits=h, target_modules=list(state),
                             task_type=task_type or _infer_task_type(model))
    eject(model)
    peft_model = peft.get_peft_model(model, pconf, adapter_name=adapter_name)
    with torch.no_grad():
        for name, poly in peft_model.base_model.model.named_modules():
            if name in state and isinstance(poly, PolyLinear):
                A, B, logits = state.pop(name)
                poly.train(modes[name])
                poly.poly_lora_A[adapter_name].copy_(A)
                poly.poly_lora_B[adapter_name].copy_(B)
                poly.poly_router[adapter_name].module_logits.copy_(logits.reshape(T, h * m))
    if state:  # pragma: no cover - PEFT matched fewer modules than it was given
        raise RuntimeError(f"to_peft: PEFT did not wrap {sorted(state)[:3]}")
    return peft_model
