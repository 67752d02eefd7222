"""Training recipes of the seed papers, each one call on an injected model.

* :func:`mhr_z` — MHR-z: tune only the routing logits (optionally of new tasks).
* :func:`mhr_mu` — MHR-μ: average the skills into one LoRA and tune that.
* :func:`mta_stage2` — ALTER's second stage: shared skills and gate on, the rest frozen.
* :func:`param_groups` — skills and routing logits as separate optimizer groups
  (mttl trains the logits with their own learning rate).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from .inject import _CONFIG_ATTR, _require_layers, model_config, set_trainable
from .mta import MTALinear


def _update_config(model: nn.Module, layers, **changes) -> None:
    for layer in layers:
        layer.config = layer.config.replace(**changes)
    config = model_config(model)
    if config is not None:
        setattr(model, _CONFIG_ATTR, config.replace(**changes))


def _check_not_merged(layers) -> None:
    for layer in layers:
        if layer.merged_task is not None:
            raise ValueError("model: a task is merged into the base weights; call routedlora.unmerge first")


def param_groups(model: nn.Module, lr: float, router_lr: Optional[float] = None,
                 weight_decay: float = 0.0) -> List[dict]:
    """Optimizer groups: trainable skill/gate parameters at ``lr``, routing logits at ``router_lr``."""
    layers = _require_layers(model)
    logits = {id(layer.router_logits) for layer in layers}
    skills, routers = [], []
    for p in model.parameters():
        if p.requires_grad:
            (routers if id(p) in logits else skills).append(p)
    groups = []
    if skills:
        groups.append({"params": skills, "lr": lr, "weight_decay": weight_decay})
    if routers:
        groups.append({"params": routers, "lr": lr if router_lr is None else router_lr, "weight_decay": 0.0})
    return groups


@torch.no_grad()
def mhr_z(model: nn.Module, n_new_tasks: int = 0) -> List[int]:
    """MHR-z: freeze the skills, train only ``router_logits``.

    With ``n_new_tasks > 0`` every layer gets that many new logit rows (PEFT
    Poly's init, U(±1e-3)) and their task ids are returned. Recreate the
    optimizer afterwards: the logits are new parameters.
    """
    layers = _require_layers(model)
    _check_not_merged(layers)
    if isinstance(n_new_tasks, bool) or not isinstance(n_new_tasks, int) or n_new_tasks < 0:
        raise ValueError(f"n_new_tasks: expected an int >= 0, got {n_new_tasks!r}")
    if n_new_tasks and any(layer.config.router in ("cpoly", "mta") for layer in layers):
        raise ValueError("n_new_tasks: new tasks need new task-private skills under cpoly/mta; "
                         "only poly, softmax and topk layers can add routing rows")
    old = layers[0].n_tasks
    for layer in layers:
        if n_new_tasks:
            rows = torch.empty(n_new_tasks, *layer.router_logits.shape[1:], device=layer.router_logits.device,
                               dtype=layer.router_logits.dtype).uniform_(-1e-3, 1e-3)
            layer.router_logits = nn.Parameter(torch.cat([layer.router_logits.data, rows]))
        layer.trainable_params = ("router_logits",)
    if n_new_tasks:
        _update_config(model, layers, n_tasks=old + n_new_tasks)
    set_trainable(model)
    return list(range(old, old + n_new_tasks))


@torch.no_grad()
def mhr_mu(model: nn.Module) -> nn.Module:
    """MHR-μ: replace each layer's skills by their mean (one LoRA per head) and train only that.

    Routing becomes trivial (one skill of weight 1 for every task). Recreate the
    optimizer afterwards: ``lora_A``/``lora_B`` are new parameters.
    """
    layers = _require_layers(model)
    _check_not_merged(layers)
    if any(isinstance(layer, MTALinear) for layer in layers):
        raise ValueError("model: MHR-μ averages Poly/MHR skills; MTA layers are not supported")
    for layer in layers:
        layer.lora_A = nn.Parameter(layer.lora_A.data.mean(dim=1, keepdim=True))
        layer.lora_B = nn.Parameter(layer.lora_B.data.mean(dim=1, keepdim=True))
        logits = layer.router_logits
        layer.router_logits = nn.Parameter(torch.zeros(logits.shape[0], logits.shape[1], 1, device=logits.device,
                                                       dtype=logits.dtype))
        layer.trainable_params = ("lora_A", "lora_B")
    # softmax over one skill is exactly 1; params combine of one skill is plain LoRA.
    _update_config(model, layers, router="softmax", combine="params", n_skills=1, temperature=1.0)
    set_trainable(model)
    return model


def mta_stage2(model: nn.Module) -> nn.Module:
    """ALTER stage 2: switch on shared skills and the gate; freeze everything else."""
    layers = _require_layers(model)
    _check_not_merged(layers)
    mta = [layer for layer in layers if isinstance(layer, MTALinear)]
    if not mta:
        raise ValueError("model: has no MTA layers (inject with router='mta')")
    for layer in mta:
        layer.set_stage(2)
    set_trainable(model)
    return model
