"""Save and load only the adapter state (safetensors), config included."""
from __future__ import annotations

import json
import os
from typing import Union

import torch
from torch import nn

from .config import RoutedLoraConfig
from .inject import eject, inject, model_config, routed_layers, set_trainable

_FORMAT = "routedlora/1"


def adapter_state_dict(model: nn.Module) -> dict:
    """``{"<layer name>.<param>": tensor}`` of every routed layer's adapter parameters."""
    return {f"{name}.{p}": t for name, layer in routed_layers(model) for p, t in layer.adapter_state().items()}


def save_adapter(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write the adapter parameters and the config to one ``.safetensors`` file."""
    from safetensors.torch import save_file

    config = model_config(model)
    if config is None:
        raise ValueError("model: has no routed LoRA layers to save; call routedlora.inject first")
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    stages = {name: getattr(layer, "mta_stage", 1) for name, layer in routed_layers(model)}
    meta = {"format": _FORMAT, "config": config.to_json(), "stages": json.dumps(stages)}
    save_file(tensors, os.fspath(path), metadata=meta)


def load_adapter(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` into ``model``.

    A model without routed layers is injected with the saved config first. Every
    name and shape is checked before the first value is copied, so a mismatched
    file leaves the model as it was.
    """
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"path: {path} is not a routedlora adapter file (format {meta.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    saved = RoutedLoraConfig.from_dict(json.loads(meta["config"]))
    stages = json.loads(meta.get("stages", "{}"))
    current = model_config(model)
    if current is not None and (current.router != saved.router or current.combine != saved.combine):
        raise ValueError(f"path: saved adapter uses router={saved.router!r}/combine={saved.combine!r}, "
                         f"model has router={current.router!r}/combine={current.combine!r}")
    flags = {p: p.requires_grad for p in model.parameters()}
    if current is None:
        inject(model, saved)
    try:
        own = adapter_state_dict(model)
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise ValueError(f"path: adapter names differ from the model's: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        for k, t in tensors.items():
            if own[k].shape != t.shape:
                raise ValueError(f"path: {k} has shape {tuple(t.shape)} in the file, "
                                 f"{tuple(own[k].shape)} in the model")
    except ValueError:
        if current is None:  # leave the model as it came
            eject(model)
            for p, flag in flags.items():
                p.requires_grad_(flag)
        raise
    with torch.no_grad():
        for k, t in tensors.items():
            own[k].copy_(t)
    for name, layer in routed_layers(model):
        if hasattr(layer, "set_stage"):
            layer.set_stage(int(stages.get(name, 1)))
    set_trainable(model)
    return model
