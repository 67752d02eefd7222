"""Fold one task's mixed adapter into the base weight for zero-overhead serving."""
from __future__ import annotations

from typing import Dict, List, Tuple, Union

import torch
from torch import nn

from .inject import _require_layers, routed_layers
from .layer import RoutedLoraLinear

# Where merge(untie=True) gave a layer its own copy of a tied weight, the shared Parameter it
# replaced, kept in a tuple (a bare Parameter attribute would register as a parameter of the
# layer) so that unmerge can put the very same Parameter back and the tie is whole again.
_UNTIED_ATTR = "_routedlora_untied_weight"


def _span(t: torch.Tensor) -> Tuple[int, int]:
    """``[first, last)`` byte addresses ``t`` can touch in its storage."""
    if t.numel() == 0:
        return 0, 0
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return start, start + extent * t.element_size()


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    if a.device != b.device or a.device.type == "meta" or a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    (s0, e0), (s1, e1) = _span(a), _span(b)
    return s0 < e1 and s1 < e0


def _ties(model: nn.Module) -> Dict[str, List[str]]:
    """``{routed layer name: [names of other parameters sharing its base weight's memory]}``."""
    params = list(model.named_parameters(remove_duplicate=False))
    ties = {}
    for name, layer in routed_layers(model):
        own = f"{name}.base_layer.weight" if name else "base_layer.weight"
        w = layer.base_layer.weight
        others = [n for n, p in params if n != own and _shares_memory(w, p)]
        if others:
            ties[name] = others
    return ties


def _base_delta(layer: RoutedLoraLinear, task_id: int) -> torch.Tensor:
    """The task's delta in the layout of the layer's base weight (a Conv1D's is ``(in, out)``)."""
    w = layer.base_layer.weight
    delta = layer.task_delta_weight(task_id)
    if layer.fan_in_fan_out:
        delta = delta.T
    return delta.to(device=w.device, dtype=w.dtype)


def _check_task_id(task_id, layers: List[RoutedLoraLinear]) -> None:
    n_tasks = min(layer.n_tasks for layer in layers)
    if isinstance(task_id, bool) or not isinstance(task_id, int):
        raise ValueError(f"task_id: expected an int in [0, {n_tasks}), got {type(task_id).__name__} {task_id!r}")
    if not 0 <= task_id < n_tasks:
        raise ValueError(f"task_id: expected an int in [0, {n_tasks}), got {task_id}")


@torch.no_grad()
def merge(target: Union[nn.Module, RoutedLoraLinear], task_id: int, *, untie: bool = False) -> nn.Module:
    """``W += γ (Â_t B̂_t)ᵀ`` in every routed layer of ``target`` (a layer or a model); a Conv1D base,
    whose ``W`` is stored ``(in, out)``, gets ``γ Â_t B̂_t``.

    Uses evaluation routing (no Gumbel noise). Afterwards the layers skip the
    adapter branch and serve task ``task_id`` only; :func:`routedlora.routing`
    refuses other tasks until :func:`unmerge`.

    Tied weights: a routed layer whose base weight is shared with another parameter
    of the model (``lm_head`` tied to the input embeddings, ``tie_word_embeddings=True``)
    would change that parameter too, so ``merge`` refuses it, naming both. Exclude
    the module from ``target_modules``, untie the weights yourself, or pass
    ``untie=True``: those layers then get their own copy of the weight (frozen) before
    the delta is added, the shared parameter stays bit for bit as it was, and
    :func:`unmerge` puts the shared parameter back (the tie is restored).
    Ties are looked for among the parameters of ``target`` only: called on a single
    layer (or a submodule without the embedding), ``merge`` cannot see the other end of
    a tie and does not detect it. Merge through the whole model.

    Everything (task id, ties, every layer's delta) is checked and computed before
    any weight changes, so a failure leaves the model as it was.
    """
    if not isinstance(untie, bool):
        raise TypeError(f"untie: expected True or False, got {type(untie).__name__} {untie!r}")
    layers: List[RoutedLoraLinear] = _require_layers(target)
    for layer in layers:
        if layer.merged_task is not None:
            raise ValueError(f"task_id: task {layer.merged_task} is already merged; unmerge first")
    _check_task_id(task_id, layers)
    ties = {} if isinstance(target, RoutedLoraLinear) else _ties(target)
    if ties and not untie:
        name, others = next(iter(ties.items()))
        more = f" (and {len(ties) - 1} more routed layers)" if len(ties) > 1 else ""
        raise ValueError(f"model: the base weight of routed layer {name!r} is tied to {others[0]!r}{more}; merging "
                         "would change that parameter too. Exclude the module from target_modules, untie the "
                         "weights, or call merge(model, task_id, untie=True) to give the layer its own copy")
    by_layer = dict(routed_layers(target)) if ties else {}
    tied_layers = {id(by_layer[name]) for name in ties}
    deltas = []
    for layer in layers:
        deltas.append(_base_delta(layer, task_id))
    for layer, delta in zip(layers, deltas):
        if id(layer) in tied_layers:
            shared = layer.base_layer.weight
            layer.base_layer.weight = nn.Parameter(shared.detach().clone(), requires_grad=False)
            setattr(layer, _UNTIED_ATTR, (shared,))
        layer.base_layer.weight.add_(delta)
        layer.merged_task = task_id
    return target


@torch.no_grad()
def unmerge(target: Union[nn.Module, RoutedLoraLinear]) -> nn.Module:
    """Undo :func:`merge` (within rounding of ``W + Δ − Δ``; exact where ``merge(untie=True)`` made a copy)."""
    layers = _require_layers(target)
    pending = []
    for layer in layers:
        if layer.merged_task is None:
            continue
        untied = getattr(layer, _UNTIED_ATTR, None)
        delta = None if untied else _base_delta(layer, layer.merged_task)
        pending.append((layer, untied, delta))
    for layer, untied, delta in pending:
        if untied:
            layer.base_layer.weight = untied[0]
            delattr(layer, _UNTIED_ATTR)
        else:
            layer.base_layer.weight.sub_(delta)
        layer.merged_task = None
    return target
