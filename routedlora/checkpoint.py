"""Save and load only the adapter state (safetensors), config included.

Both calls change nothing until everything has been checked: :func:`save_adapter`
writes a temporary file next to the target and renames it over the target only once
it is complete, and :func:`load_adapter` reads and checks the whole file (format,
metadata, config, names, shapes, dtypes, MTA stages) against the model before it
injects or copies anything.
"""
from __future__ import annotations

import dataclasses
import json
import os
import stat
import uuid
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from .config import RoutedLoraConfig
from .durable import fsync_dir
from .inject import _CONFIG_ATTR, _layer_class, _matches, eject, inject, model_config, routed_layers, set_trainable
from .layer import SUPPORTED_BASES, RoutedLoraLinear, base_features, is_supported_base
from .mta import MTALinear
from .routers import router_group

_FORMAT = "routedlora/1"

# Fields that decide which parameters a layer has and their shapes: a file that differs
# in one of them cannot be loaded into the model at all. Every other field only changes
# how the same parameters are used, and `config_mismatch` decides whose value wins.
STRUCTURAL_FIELDS = ("router", "combine", "n_tasks", "n_skills", "r", "n_heads", "n_specific", "n_shared",
                     "gate_hidden", "mta_gate", "router_granularity", "router_selector")
CONFIG_MISMATCH = ("error", "use_saved", "keep_model")
_MTA_BEFORE_OPTIONS = {"mta_init": "own_skill", "mta_routing": "topk", "mta_stage2": "topk", "mta_gate": "tanh"}
# Says only how the values were first drawn; loading overwrites every one of them.
_IGNORED_FIELDS = ("init_weights",)

_Layout = Dict[str, Tuple[torch.Size, torch.dtype, torch.device]]


def adapter_state_dict(model: nn.Module) -> dict:
    """``{"<layer name>.<param>": tensor}`` of every routed layer's adapter parameters.

    A parameter several layers share (a routing table under ``router_granularity="block"`` or
    ``"model"``) appears once, under the name of its first layer in module order: safetensors
    refuses tensors that share memory, and :func:`load_adapter` re-ties the table through ``inject``.
    """
    out, seen = {}, set()
    for name, layer in routed_layers(model):
        for p, t in layer.adapter_state().items():
            if id(t) not in seen:
                seen.add(id(t))
                out[f"{name}.{p}"] = t
    return out


def _fspath(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    p = os.fspath(path)
    return os.fsdecode(p) if isinstance(p, bytes) else p


def save_adapter(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write the adapter parameters and the config to one ``.safetensors`` file.

    Atomic: the file is written under a temporary name in the same directory, flushed
    to disk and renamed over ``path``, so a failure (a full disk, an interrupt) leaves
    an existing file at ``path`` as it was and no partial file behind.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    target = _fspath(path)
    config = model_config(model)
    layers = routed_layers(model)
    if config is None or not layers:
        raise ValueError("model: has no routed LoRA layers to save; call routedlora.inject first")
    if os.path.islink(target):  # replace the file the link points to, not the link
        target = os.path.realpath(target)
    if os.path.isdir(target):
        raise ValueError(f"path: {target} is a directory; pass the path of the file to write")
    directory = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"path: the directory {directory} of {target} does not exist")
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    stages = {name: getattr(layer, "mta_stage", 1) for name, layer in layers}
    meta = {"format": _FORMAT, "config": config.to_json(), "stages": json.dumps(stages)}

    tmp = os.path.join(directory, f".{os.path.basename(target)}.{uuid.uuid4().hex}.tmp")
    # os.open with 0o666 applies the umask, as a plain create would (mkstemp would give 0o600)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        if os.path.exists(target):
            os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
        save_file(tensors, tmp, metadata=meta)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data is on disk before the rename makes it visible
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(directory)  # the rename itself survives a crash only once the directory entry is flushed


# --------------------------------------------------------------------------- reading


def _read(path) -> Tuple[str, RoutedLoraConfig, dict, Dict[str, torch.Tensor]]:
    """``(file, config, stages, tensors)`` of an adapter file, every part checked."""
    from safetensors import SafetensorError, safe_open

    file = _fspath(path)
    if not os.path.exists(file):
        raise FileNotFoundError(f"path: no adapter file at {file}")
    if os.path.isdir(file):
        raise ValueError(f"path: {file} is a directory, not an adapter file (pass the .safetensors file in it)")
    if not os.path.isfile(file):
        raise ValueError(f"path: {file} is not a regular file")
    try:
        with safe_open(file, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise _NotAdapter(meta.get("format"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except _NotAdapter as e:
        raise ValueError(f"path: {file} is not a routedlora adapter file (format tag {e.args[0]!r}, "
                         f"expected {_FORMAT!r})") from None
    except SafetensorError as e:
        raise ValueError(f"path: {file} is not a readable safetensors file: {e}") from e
    except OSError as e:
        raise type(e)(f"path: cannot read {file}: {e}") from e

    def field(name: str, default: Optional[str] = None):
        text = meta.get(name, default)
        if text is None:
            raise ValueError(f"path: {file}: metadata field {name!r} is missing")
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"path: {file}: metadata field {name!r} is not valid JSON: {e}") from None

    raw = field("config")
    if not isinstance(raw, dict):
        raise ValueError(f"path: {file}: metadata field 'config' must be a JSON object, got {type(raw).__name__}")
    if raw.get("router") == "mta":
        # files written before the MTA options existed ran the behaviour they now name
        for name, value in _MTA_BEFORE_OPTIONS.items():
            raw.setdefault(name, value)
    try:
        config = RoutedLoraConfig.from_dict(raw)
    except (ValueError, TypeError) as e:
        raise type(e)(f"path: {file}: saved config: {e}") from e
    stages = field("stages", "{}")
    if not isinstance(stages, dict):
        raise ValueError(f"path: {file}: metadata field 'stages' must be a JSON object, got {type(stages).__name__}")
    for name, stage in stages.items():
        if isinstance(stage, bool) or stage not in (1, 2):
            raise ValueError(f"path: {file}: metadata field 'stages': {name!r} has stage {stage!r}, expected 1 or 2")
    return file, config, stages, tensors


class _NotAdapter(Exception):
    pass


# --------------------------------------------------------------------------- checking


def _planned_layout(model: nn.Module, config: RoutedLoraConfig, file: str) -> Tuple[_Layout, dict]:
    """The adapter names, shapes, dtypes and devices (and layer classes) ``inject(model, config)`` would create.

    Layers are built around shape-only ``meta`` stand-ins of the target linears, so nothing is
    allocated and the model is not touched.
    """
    # Grouped by module object, in first-name order, as inject does (a module may be registered
    # under several names); inject itself refuses a module matched under some names only.
    names_of: dict = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name:
            names_of.setdefault(module, []).append(name)
    targets = []
    for module, names in names_of.items():
        hit = [n for n in names if _matches(n, config.target_modules) and not _matches(n, config.exclude_modules)]
        if not hit:
            continue
        name = names[0]  # the name routed_layers (and so the adapter file) uses
        if not is_supported_base(module):
            raise TypeError(f"path: {file}: the saved config targets {hit[0]!r}, a {type(module).__name__} "
                            f"in this model, not one of {SUPPORTED_BASES}")
        try:
            RoutedLoraLinear.check_compatible(module, config, name=name)
        except ValueError as e:
            raise ValueError(f"path: {file}: the saved config does not fit this model: {e}") from e
        targets.append((name, module))
    if not targets:
        raise ValueError(f"path: {file}: no module of the model matches the saved target_modules "
                         f"{config.target_modules!r}")
    cls = _layer_class(config)
    layout: _Layout = {}
    classes = {}
    tables = set()  # routing tables already laid out (router_granularity): inject ties the others to them
    for i, (name, module) in enumerate(targets):
        w = module.weight
        stand_in = nn.Linear(*base_features(module), bias=module.bias is not None, device="meta", dtype=w.dtype)
        layer = cls(stand_in, config, layer_index=i)
        classes[name] = cls
        group = router_group(name, config.router_granularity)
        for p, t in layer.adapter_state().items():
            if p == "router_logits" and config.router_granularity != "layer":
                if group in tables:
                    continue
                tables.add(group)
            layout[f"{name}.{p}"] = (t.shape, t.dtype, w.device)
    return layout, classes


def _current_layout(model: nn.Module) -> Tuple[_Layout, dict]:
    layout = {k: (t.shape, t.dtype, t.device) for k, t in adapter_state_dict(model).items()}
    return layout, {name: type(layer) for name, layer in routed_layers(model)}


def _check_tensors(tensors: Dict[str, torch.Tensor], layout: _Layout, file: str) -> None:
    missing, unexpected = sorted(set(layout) - set(tensors)), sorted(set(tensors) - set(layout))
    if missing or unexpected:
        raise ValueError(f"path: {file}: adapter names differ from the model's: missing {missing[:5]}"
                         f"{' …' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{' …' if len(unexpected) > 5 else ''}")
    for k, t in tensors.items():
        shape, dtype, _ = layout[k]
        if t.shape != shape:
            raise ValueError(f"path: {file}: {k} has shape {tuple(t.shape)} in the file, {tuple(shape)} in the model")
        # float → float (e.g. a float32 file into a bfloat16 model) is a rounding; an integer,
        # bool or complex tensor in place of a float parameter is a corrupt file
        if t.dtype != dtype and (not t.is_floating_point() or not torch.empty((), dtype=dtype).is_floating_point()):
            raise ValueError(f"path: {file}: {k} has dtype {t.dtype} in the file; the model's {dtype} "
                             "parameter cannot take it")


def _check_stages(stages: dict, classes: dict, file: str) -> None:
    unknown = sorted(set(stages) - set(classes))
    if unknown:
        raise ValueError(f"path: {file}: metadata field 'stages' names layers the adapter does not have: "
                         f"{unknown[:5]}")
    for name, stage in stages.items():
        if stage == 2 and not issubclass(classes[name], MTALinear):
            raise ValueError(f"path: {file}: metadata field 'stages' puts {name!r} in stage 2, but it is not an "
                             "MTA layer")


def _same(field: str, a, b) -> bool:
    if field == "exclude_modules":  # no exclusions either way
        a, b = a or None, b or None
    return a == b


def _config_changes(saved: RoutedLoraConfig, current: RoutedLoraConfig, file: str, mode: str) -> dict:
    """The fields to set on the model so that it runs the saved config (empty unless ``use_saved``)."""
    diffs = [f.name for f in dataclasses.fields(RoutedLoraConfig) if f.name not in _IGNORED_FIELDS
             and not _same(f.name, getattr(saved, f.name), getattr(current, f.name))]
    structural = [f for f in diffs if f in STRUCTURAL_FIELDS]
    describe = lambda fields: "; ".join(f"{f}: saved {getattr(saved, f)!r}, model {getattr(current, f)!r}"
                                        for f in fields)
    if structural:
        raise ValueError(f"path: {file}: the saved adapter's layout differs from the model's: {describe(structural)} "
                         "(these fields set the parameters' shapes and must match)")
    if not diffs or mode == "keep_model":
        return {}
    if mode == "error":
        raise ValueError(f"path: {file}: the saved config differs from the model's: {describe(diffs)}; pass "
                         "config_mismatch='use_saved' to apply the saved values or 'keep_model' to keep the model's")
    return {f: getattr(saved, f) for f in diffs}


# --------------------------------------------------------------------------- loading


def load_adapter(model: nn.Module, path: Union[str, os.PathLike], *, config_mismatch: str = "error") -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` into ``model``.

    A model without routed layers is injected with the saved config. A model that
    has them must match the saved config: fields that set parameter shapes
    (:data:`STRUCTURAL_FIELDS`, and the set of routed layers) always; the others
    (``alpha``, ``temperature``, ``dropout``, ``gumbel``, ``top_k``, ``renormalize``, ``seed``,
    ``backend``, and ``target_modules``/``exclude_modules`` where they select the same layers)
    too, unless ``config_mismatch="use_saved"`` (the model config and every layer's take the
    saved values) or ``"keep_model"`` (the model keeps its own). ``init_weights`` is not
    compared: the load overwrites every value it describes. A model with a merged task is refused:
    new values under a merged task would make :func:`routedlora.unmerge` subtract a
    delta that was never added.

    Everything (the file, its metadata and config, every name, shape and dtype, the MTA
    stages) is checked before the first change, so a failed call leaves ``model`` exactly
    as it was: modules, values and ``requires_grad`` flags.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if config_mismatch not in CONFIG_MISMATCH:
        raise ValueError(f"config_mismatch: expected one of {CONFIG_MISMATCH}, got {config_mismatch!r}")
    file, saved, stages, tensors = _read(path)
    layers = routed_layers(model)
    if layers:
        current = model_config(model)
        if current is None:
            raise ValueError("model: has routed layers but no routedlora config (it was not set up by "
                             "routedlora.inject or from_peft); load into the plain model instead")
        merged = [(name, layer.merged_task) for name, layer in layers if layer.merged_task is not None]
        if merged:
            raise ValueError(f"model: task {merged[0][1]} is merged into {merged[0][0]!r}; call "
                             "routedlora.unmerge(model) before loading an adapter (unmerge subtracts the delta "
                             "of the values it finds, and new values would leave the base weight corrupted)")
        changes = _config_changes(saved, current, file, config_mismatch)
        layout, classes = _current_layout(model)
    else:
        changes = {}
        layout, classes = _planned_layout(model, saved, file)
    _check_tensors(tensors, layout, file)
    _check_stages(stages, classes, file)
    # New configs are built (and validated by RoutedLoraConfig) before anything changes.
    new_configs = [(layer, layer.config.replace(**changes)) for _, layer in layers] if changes else []
    new_model_config = model_config(model).replace(**changes) if changes else None
    # Converting to the parameters' device and dtype is where memory could run out: done
    # before the first change, so that the copies below cannot fail halfway.
    values = {k: t.to(device=layout[k][2], dtype=layout[k][1]) for k, t in tensors.items()}

    if not layers:
        flags = {p: p.requires_grad for p in model.parameters()}
        inject(model, saved)
        try:
            own = adapter_state_dict(model)
            _check_tensors(values, {k: (t.shape, t.dtype, t.device) for k, t in own.items()}, file)
            _copy_in(model, own, values, stages)
        except BaseException:
            eject(model)
            for p, flag in flags.items():
                p.requires_grad_(flag)
            raise
        return model

    # Nothing below can fail on a checked file, but should it (an interrupt), the model goes
    # back to what it was: the adapter is small next to the model, so keeping a copy is cheap.
    own = adapter_state_dict(model)
    backup = dict(
        values={k: t.detach().clone() for k, t in own.items()},
        layers=[(layer, layer.config, layer.dropout, getattr(layer, "mta_stage", None), layer.trainable_params)
                for _, layer in layers],
        config=model_config(model),
        flags=[(p, p.requires_grad) for p in model.parameters()],
    )
    try:
        for layer, cfg in new_configs:
            _set_layer_config(layer, cfg)
        if new_model_config is not None:
            setattr(model, _CONFIG_ATTR, new_model_config)
        _copy_in(model, own, values, stages)
    except BaseException:
        with torch.no_grad():
            for k, t in backup["values"].items():
                own[k].copy_(t)
        for layer, cfg, dropout, stage, trainable in backup["layers"]:
            layer.config, layer.dropout, layer.trainable_params = cfg, dropout, trainable
            if stage is not None:
                layer.mta_stage = stage
        setattr(model, _CONFIG_ATTR, backup["config"])
        for p, flag in backup["flags"]:
            p.requires_grad_(flag)
        raise
    return model


def _set_layer_config(layer: RoutedLoraLinear, config: RoutedLoraConfig) -> None:
    layer.config = config
    # the dropout module is built from the config once; keep it in step with the new rate
    layer.dropout = (nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()).train(layer.training)


def _copy_in(model: nn.Module, own: dict, values: dict, stages: dict) -> None:
    with torch.no_grad():
        for k, t in values.items():
            own[k].copy_(t)
    for name, layer in routed_layers(model):
        if isinstance(layer, MTALinear):
            layer.set_stage(int(stages.get(name, 1)))
    set_trainable(model)


__all__ = ["CONFIG_MISMATCH", "STRUCTURAL_FIELDS", "adapter_state_dict", "load_adapter", "save_adapter"]
