"""Put routed LoRA layers into any model, and route a batch through them."""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator, List, Optional, Tuple

import torch
from torch import nn

from . import context
from .batch import RoutingState, as_task_ids
from .config import RoutedLoraConfig
from .layer import SUPPORTED_BASES, RoutedLoraLinear, is_supported_base
from .mta import MTALinear
from .routers import router_group

_CONFIG_ATTR = "_routedlora_config"


def routed_layers(model: nn.Module) -> List[Tuple[str, RoutedLoraLinear]]:
    """``(name, layer)`` of every routed layer in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, RoutedLoraLinear)]


def model_config(model: nn.Module) -> Optional[RoutedLoraConfig]:
    """The config ``inject`` (or a recipe since) left on ``model``; ``None`` if not injected."""
    return getattr(model, _CONFIG_ATTR, None)


def _matches(name: str, spec) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith("." + key) for key in spec)


def _names_by_module(model: nn.Module) -> dict:
    """Every submodule with all the names it is registered under (a module may be shared)."""
    names: dict = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name:
            names.setdefault(module, []).append(name)
    return names


def _replace(model: nn.Module, names: List[str], module: nn.Module) -> None:
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module)


def _layer_class(config: RoutedLoraConfig):
    return MTALinear if config.router == "mta" else RoutedLoraLinear


def set_trainable(model: nn.Module) -> None:
    """Freeze everything but the adapter parameters each routed layer trains in its current stage."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in routed_layers(model):
        for name, p in layer.named_parameters():
            if name.split(".")[0] in layer.trainable_names():
                p.requires_grad_(True)


def inject(model: nn.Module, config: RoutedLoraConfig) -> nn.Module:
    """Replace the ``nn.Linear`` modules named by ``config.target_modules`` in place.

    Hugging Face's ``Conv1D`` (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``: ``x @ W + b`` with ``W``
    stored ``(in, out)``) is a linear layer too and is wrapped the same way.

    The base model is frozen; only adapter parameters train. Everything is checked
    and every new layer built before the first module is replaced, so a failed
    call leaves ``model`` as it was. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(config, RoutedLoraConfig):
        raise TypeError(f"config: expected a RoutedLoraConfig, got {type(config).__name__}")
    if routed_layers(model):
        raise ValueError("model: already has routed LoRA layers (inject once per model)")
    targets = []
    for module, names in _names_by_module(model).items():
        hit = [n for n in names if _matches(n, config.target_modules) and not _matches(n, config.exclude_modules)]
        if not hit:
            continue
        if len(hit) < len(names):
            # one module object under several names: replacing it under some would leave the
            # others silently plain
            raise ValueError(f"target_modules: {type(module).__name__} is registered under {names}, but only "
                             f"{hit} match target_modules/exclude_modules; target all of its names or none")
        if not is_supported_base(module):
            raise TypeError(f"target_modules: {hit[0]!r} is a {type(module).__name__}, not an {SUPPORTED_BASES}")
        RoutedLoraLinear.check_compatible(module, config, name=hit[0])
        targets.append((names, module))
    if not targets:
        raise ValueError(f"target_modules: no module of the model matches {config.target_modules!r}")
    cls = _layer_class(config)
    new = [(names, cls(module, config, layer_index=i).train(module.training))
           for i, (names, module) in enumerate(targets)]
    share_router_logits([(names[0], layer) for names, layer in new], config.router_granularity)
    for names, layer in new:
        _replace(model, names, layer)
    setattr(model, _CONFIG_ATTR, config)
    _install_generate(model, new[0][1])
    set_trainable(model)
    return model


def share_router_logits(named_layers: List[Tuple[str, RoutedLoraLinear]], granularity: str) -> None:
    """Tie the ``router_logits`` of layers that share a routing table under ``granularity``
    (``config.router_granularity``, grouped by :func:`routedlora.routers.router_group` of each layer's
    name): every layer of a group gets its first layer's ``nn.Parameter``, so the model holds one
    table per group and autograd sums the group's gradients into it. All-or-nothing: every group is
    checked (same tasks, heads, skills, dtype and device) before the first layer is changed.
    """
    if granularity == "layer":
        return
    groups: dict = {}
    for name, layer in named_layers:
        groups.setdefault(router_group(name, granularity), []).append((name, layer))
    for members in groups.values():
        first_name, first = members[0]
        table = first.router_logits
        for name, layer in members[1:]:
            other = layer.router_logits
            if (other.shape, other.dtype, other.device) != (table.shape, table.dtype, table.device):
                raise ValueError(f"router_granularity: {name!r} and {first_name!r} share one routing table "
                                 f"({granularity!r}), but would hold (tasks, heads, skills) {tuple(other.shape)} "
                                 f"{other.dtype} on {other.device} and {tuple(table.shape)} {table.dtype} on "
                                 f"{table.device}; they need the same tasks, heads, skills, dtype and device")
    for members in groups.values():
        table = members[0][1].router_logits
        for _, layer in members[1:]:
            layer.router_logits = table


def eject(model: nn.Module) -> nn.Module:
    """Put the wrapped base ``nn.Linear`` back in place of every routed layer (adapters dropped).

    Parameters' ``requires_grad`` flags are left as they are.
    """
    for name, layer in routed_layers(model):
        if layer.merged_task is not None:
            raise ValueError(f"model: {name} has task {layer.merged_task} merged; call routedlora.unmerge first")
    for layer, names in _names_by_module(model).items():
        if isinstance(layer, RoutedLoraLinear):
            _replace(model, names, layer.base_layer)
    if _CONFIG_ATTR in model.__dict__:
        delattr(model, _CONFIG_ATTR)
    _remove_generate(model)
    return model


def _require_layers(model: nn.Module) -> List[RoutedLoraLinear]:
    if isinstance(model, RoutedLoraLinear):
        return [model]
    layers = [layer for _, layer in routed_layers(model)]
    if not layers:
        raise ValueError("model: has no routed LoRA layers; call routedlora.inject(model, config) first")
    return layers


class RoutedGenerate:
    """``model.generate`` of an injected model: inside a :func:`routing` block, the block's task ids
    stand for their sequences' beams (``num_beams``) or returned samples, and one-position calls
    continue a KV cache (the MTA gate is reused). Installed once by :func:`inject` and removed by
    :func:`eject`, so that a routing block changes no attribute of the model (threads and
    ``torch.compile`` see the same model inside and outside it)."""

    def __init__(self, model: nn.Module, layer: RoutedLoraLinear, own: Optional[object]):
        self.model, self.layer, self.own = model, layer, own  # own: a generate the instance already had

    @property
    def __wrapped__(self):  # inspect.signature and help() show the model's own generate
        return self.own if self.own is not None else type(self.model).generate.__get__(self.model)

    def __call__(self, *args, **kwargs):
        generate = self.__wrapped__
        state = self.layer._block_state()
        if state is None:
            return generate(*args, **kwargs)
        saved = state.expand, state.decoding
        state.expand, state.decoding = _expand_factor(self.model, kwargs), True
        state.clear()
        try:
            return generate(*args, **kwargs)
        finally:
            state.expand, state.decoding = saved
            state.clear()


def _install_generate(model: nn.Module, layer: RoutedLoraLinear) -> None:
    if callable(getattr(model, "generate", None)) and not isinstance(model.__dict__.get("generate"), RoutedGenerate):
        model.generate = RoutedGenerate(model, layer, model.__dict__.get("generate"))


def _remove_generate(model: nn.Module) -> None:
    wrapper = model.__dict__.get("generate")
    if isinstance(wrapper, RoutedGenerate):
        if wrapper.own is None:
            del model.generate
        else:
            model.generate = wrapper.own


def _expand_factor(model: nn.Module, kwargs: dict) -> int:
    gc = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams") or getattr(gc, "num_beams", None) or 1
    returns = kwargs.get("num_return_sequences") or getattr(gc, "num_return_sequences", None) or 1
    return max(int(beams), int(returns))


@contextmanager
def routing(model: nn.Module, task_ids, *, validate: bool = True, decoding: bool = False,
            noise_rows: Optional[Tuple[int, int]] = None) -> Iterator[RoutingState]:
    """Route every forward (and ``generate``) of ``model`` inside the block by ``task_ids``.

    ``task_ids``: an int, a ``(B,)`` tensor/list (one task per sequence) or
    ``(B, S)`` (one per token). Inside ``model.generate(...)`` a batch of
    ``B * num_beams`` (or ``num_return_sequences``) sequences is accepted, each
    id repeated for its sequence's beams (see :class:`RoutedGenerate`). ``validate``
    checks the ids' range once here (one host sync if they are on a GPU; skipped while
    ``torch.compile`` traces). The routing rows of the batch are built once, on the first
    layer's call, and shared by every layer and its backward.

    Values computed at a sequence's first position (the MTA gate) are cached at
    prefill and reused by one-position calls inside ``generate()``; set
    ``decoding=True`` for a hand-written KV-cache decode loop inside the block.

    ``noise_rows=(start, total)`` (data parallel): this process's sequences are rows
    ``[start, start + B)`` of a global batch of ``total``; training noise is drawn for
    the global batch and sliced, so every rank matches a single-process run.
    """
    if noise_rows is not None:
        ok = (isinstance(noise_rows, (tuple, list)) and len(noise_rows) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) for v in noise_rows)
              and 0 <= noise_rows[0] <= noise_rows[1] and noise_rows[1] > 0)
        if not ok:
            raise ValueError(f"noise_rows: expected (start, total) ints with 0 <= start <= total, total > 0, "
                             f"got {noise_rows!r}")
        noise_rows = (int(noise_rows[0]), int(noise_rows[1]))
    layers = _require_layers(model)
    n_tasks = min(layer.n_tasks for layer in layers)
    ids = as_task_ids(task_ids, n_tasks, layers[0].router_logits.device, validate)
    merged = {layer.merged_task for layer in layers if layer.merged_task is not None}
    if merged:
        host = ids.detach().cpu()
        if len(merged) > 1 or host.numel() == 0 or bool((host != next(iter(merged))).any()):
            raise ValueError(f"task_ids: the model has task {sorted(merged)} merged into its weights; "
                             "route only that task or call routedlora.unmerge(model) first")
    checked = validate and not torch.compiler.is_compiling()
    state = RoutingState(ids, decoding, unchecked=None if checked else n_tasks)
    state.noise_rows = noise_rows
    seeded = [layer._noise_step for layer in layers if layer.training and layer.config.seed is not None]
    if seeded:
        with torch.no_grad():
            torch._foreach_add_(seeded, 1)  # a new batch of seeded Gumbel noise
    with context.activate(layers, state):
        yield state
