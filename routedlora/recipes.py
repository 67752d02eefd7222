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
from .validation import check_number


def _updated_configs(model: nn.Module, layers, **changes):
    """The configs after ``changes``, built (and so validated) before anything is assigned."""
    new = [(layer, layer.config.replace(**changes)) for layer in layers]
    config = model_config(model)
    return new, (config.replace(**changes) if config is not None else None)


def _assign_configs(model: nn.Module, updated) -> None:
    new, config = updated
    for layer, cfg in new:
        layer.config = cfg
    if config is not None:
        setattr(model, _CONFIG_ATTR, config)


def _check_not_merged(layers) -> None:
    for layer in layers:
        if layer.merged_task is not None:
            raise ValueError("model: a task is merged into the base weights; call routedlora.unmerge first")


def param_groups(model: nn.Module, lr: float, router_lr: Optional[float] = None,
                 weight_decay: float = 0.0, router_weight_decay: float = 0.0) -> List[dict]:
    """Optimizer groups: trainable skill/gate parameters at ``lr`` and ``weight_decay``, routing
    logits at ``router_lr`` and ``router_weight_decay`` (mttl's per-group ``module_logits`` learning
    rate; its logits group takes the optimizer's default weight decay, pass that to match).

    Changes nothing; every argument must be a finite number >= 0.
    """
    check_number("lr", lr, nonnegative=True)
    if router_lr is not None:
        check_number("router_lr", router_lr, nonnegative=True)
    check_number("weight_decay", weight_decay, nonnegative=True)
    check_number("router_weight_decay", router_weight_decay, nonnegative=True)
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
        groups.append({"params": routers, "lr": lr if router_lr is None else router_lr,
                       "weight_decay": router_weight_decay})
    return groups


@torch.no_grad()
def mhr_z(model: nn.Module, n_new_tasks: int = 0) -> List[int]:
    """MHR-z: freeze the skills, train only ``router_logits``.

    With ``n_new_tasks > 0`` every layer gets that many new logit rows (PEFT
    Poly's init, U(±1e-3)) and their task ids are returned. Recreate the
    optimizer afterwards: the logits are new parameters.
    """
    if isinstance(n_new_tasks, bool) or not isinstance(n_new_tasks, int) or n_new_tasks < 0:
        raise ValueError(f"n_new_tasks: expected an int >= 0, got {n_new_tasks!r}")
    layers = _require_layers(model)
    _check_not_merged(layers)
    if n_new_tasks and any(layer.config.router in ("cpoly", "mta") for layer in layers):
        raise ValueError("n_new_tasks: new tasks need new task-private skills under cpoly/mta; "
                         "only poly, softmax and topk layers can add routing rows")
    if any(layer.config.router_selector == "private" for layer in layers):
        raise ValueError("model: router_selector='private' routes each task to its own skill and has no routing "
                         "logits to tune")
    counts = sorted({layer.n_tasks for layer in layers})
    if n_new_tasks and len(counts) > 1:
        raise ValueError(f"model: its routed layers route different numbers of tasks {counts}; new task ids "
                         "would not mean the same rows in every layer")
    old = counts[0]
    updated = _updated_configs(model, layers, n_tasks=old + n_new_tasks) if n_new_tasks else None
    # One new table per table: layers sharing a routing table (router_granularity) keep sharing it.
    new_logits = {}
    for layer in layers:
        table = layer.router_logits
        if n_new_tasks and id(table) not in new_logits:
            rows = torch.empty(n_new_tasks, *table.shape[1:], device=table.device,
                               dtype=table.dtype).uniform_(-1e-3, 1e-3)
            new_logits[id(table)] = nn.Parameter(torch.cat([table.data, rows]))
    new_logits = [new_logits.get(id(layer.router_logits)) for layer in layers]
    # everything is built: assign
    for i, layer in enumerate(layers):
        if n_new_tasks:
            layer.router_logits = new_logits[i]
        layer.trainable_params = ("router_logits",)
    if updated is not None:
        _assign_configs(model, updated)
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
    # softmax over one skill is exactly 1; params combine of one skill is plain LoRA. The Poly /
    # C-Poly router options go with the routing they modify (the config would refuse them).
    updated = _updated_configs(model, layers, router="softmax", combine="params", n_skills=1, temperature=1.0,
                               router_selector="learned", router_straight_through=False, router_l2_norm=False,
                               router_dropout=0.0, router_shared_skill=False, router_average_correction=False,
                               cpoly_fixed_specific=False, cpoly_tied_heads=False)
    new = []
    tables = {}  # layers sharing a routing table (router_granularity) share the new one
    for layer in layers:
        logits = layer.router_logits
        if id(logits) not in tables:
            tables[id(logits)] = nn.Parameter(torch.zeros(logits.shape[0], logits.shape[1], 1, device=logits.device,
                                                          dtype=logits.dtype))
        new.append((nn.Parameter(layer.lora_A.data.mean(dim=1, keepdim=True)),
                    nn.Parameter(layer.lora_B.data.mean(dim=1, keepdim=True)),
                    tables[id(logits)]))
    for layer, (A, B, logits) in zip(layers, new):
        layer.lora_A, layer.lora_B, layer.router_logits = A, B, logits
        layer.trainable_params = ("lora_A", "lora_B")
    _assign_configs(model, updated)
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
