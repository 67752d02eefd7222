"""Fold one task's mixed adapter into the base weight for zero-overhead serving."""
from __future__ import annotations

from typing import List, Union

import torch
from torch import nn

from .inject import _require_layers
from .layer import RoutedLoraLinear


@torch.no_grad()
def merge(target: Union[nn.Module, RoutedLoraLinear], task_id: int) -> nn.Module:
    """``W += γ (Â_t B̂_t)ᵀ`` in every routed layer of ``target`` (a layer or a model).

    Uses evaluation routing (no Gumbel noise). Afterwards the layers skip the
    adapter branch and serve task ``task_id`` only; :func:`routedlora.routing`
    refuses other tasks until :func:`unmerge`. All deltas are computed before
    any weight changes, so a failure leaves the model as it was.
    """
    layers: List[RoutedLoraLinear] = _require_layers(target)
    for layer in layers:
        if layer.merged_task is not None:
            raise ValueError(f"task_id: task {layer.merged_task} is already merged; unmerge first")
    deltas = [layer.task_delta_weight(task_id) for layer in layers]
    for layer, delta in zip(layers, deltas):
        w = layer.base_layer.weight
        w.add_(delta.to(device=w.device, dtype=w.dtype))
        layer.merged_task = task_id
    return target


@torch.no_grad()
def unmerge(target: Union[nn.Module, RoutedLoraLinear]) -> nn.Module:
    """Undo :func:`merge` (exact in float32; within rounding in half precision)."""
    for layer in _require_layers(target):
        if layer.merged_task is None:
            continue
        delta = layer.task_delta_weight(layer.merged_task)
        w = layer.base_layer.weight
        w.sub_(delta.to(device=w.device, dtype=w.dtype))
        layer.merged_task = None
    return target
