"""The files of a training checkpoint directory: written whole or not at all, verified before use.

A checkpoint is written into a hidden sibling directory, every file fsynced, a
``manifest.json`` (format, step, world size, configs, sha256 and size of every file) written
last, and the directory renamed into place; an existing checkpoint at the same path is
swapped out in one step where the OS allows (Linux ``renameat2(RENAME_EXCHANGE)``). Reading
checks the manifest and every file's hash against the bytes that are then parsed.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from typing import Callable, Dict, List, Optional

import torch

from ..checkpoint import STRUCTURAL_FIELDS
from .distributed import barrier, first_error

ADAPTER_FILE = "adapter.safetensors"
MANIFEST_FILE = "manifest.json"
CHECKPOINT_FORMAT = "routedlora-checkpoint/1"
_STATE_RE = re.compile(r"trainer_state\.rank(\d+)\.pt")
# Routed-config fields that decide which adapter parameters exist and what they mean:
# a checkpoint with other values cannot be loaded, override or not.
STRUCTURAL_ROUTED_FIELDS = frozenset(STRUCTURAL_FIELDS) | {"target_modules", "exclude_modules"}
# Not compared: the kernel backend computes the same function; init_weights is overwritten by the load.
FREE_ROUTED_FIELDS = frozenset({"backend", "init_weights"})
# Training options that change no step's computation (``steps`` does under a decaying schedule:
# it sets the remaining learning rates, so it is compared then).
FREE_TRAIN_FIELDS = frozenset({"steps", "log_every", "eval_every", "eval_batch_size", "save_every", "output_dir",
                                "progress"})
ABSENT = object()


def state_file(rank: int) -> str:
    return f"trainer_state.rank{rank}.pt"


def version() -> str:
    from .. import __version__

    return __version__


def read_manifest(path: str) -> dict:
    """The validated ``manifest.json`` of a checkpoint directory (``ValueError`` naming the problem)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise ValueError(f"resume_from: {path} is not a directory (a checkpoint is a step_<n>/ or final/ "
                             f"directory)")
        parent, name = os.path.split(os.path.normpath(path))
        aside = sorted(glob.glob(os.path.join(parent or ".", f".{glob.escape(name)}.old-*")))
        hint = (f" (an interrupted save left the previous checkpoint at {aside[-1]}: rename it to {path} to use it)"
                if aside else "")
        raise FileNotFoundError(f"resume_from: {path}: no such checkpoint directory{hint}")
    mpath = os.path.join(path, MANIFEST_FILE)
    if not os.path.isfile(mpath):
        raise ValueError(f"resume_from: {mpath}: missing, so {path} is not a complete checkpoint (an interrupted "
                         f"save, or one written before checkpoints had manifests)")
    try:
        with open(mpath, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"resume_from: {mpath}: not valid JSON ({e})") from None

    def bad(problem):
        return ValueError(f"resume_from: {mpath}: {problem}")

    if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise bad(f"format {fmt!r}, expected {CHECKPOINT_FORMAT!r}")
    for key, kind in (("step", int), ("world_size", int), ("task_names", list), ("routed_config", dict),
                      ("train_config", dict), ("files", dict)):
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise bad(f"{key!r} is missing or not a {kind.__name__}")
    if manifest["step"] < 0 or manifest["world_size"] < 1:
        raise bad(f"step {manifest['step']} / world size {manifest['world_size']} out of range")
    for name, entry in manifest["files"].items():
        if os.path.basename(name) != name or name in ("", ".", "..") or not (
                name in (ADAPTER_FILE, MANIFEST_FILE) or _STATE_RE.fullmatch(name)):
            raise bad(f"lists an unexpected file {name!r}")
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and
                isinstance(entry.get("size"), int) and not isinstance(entry.get("size"), bool)):
            raise bad(f"the entry of {name} lacks its sha256 and size")
    needed = [ADAPTER_FILE] + [state_file(r) for r in range(manifest["world_size"])]
    absent = [n for n in needed if n not in manifest["files"]]
    if absent:
        raise bad(f"lists no {absent}")
    return manifest


def verified_bytes(path: str, manifest: dict, name: str) -> bytes:
    """The file's bytes, once their size and sha256 match the manifest (what is checked is what is parsed)."""
    fpath = os.path.join(path, name)
    try:
        with open(fpath, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ValueError(f"resume_from: {fpath}: missing (the manifest lists it)") from None
    except OSError as e:
        raise ValueError(f"resume_from: {fpath}: cannot be read ({e})") from None
    entry = manifest["files"][name]
    if len(data) != entry["size"]:
        raise ValueError(f"resume_from: {fpath}: {len(data)} bytes, the manifest says {entry['size']} "
                         f"(truncated or replaced)")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(f"resume_from: {fpath}: sha256 differs from the manifest's (corrupted or modified)")
    return data


def safetensors_metadata(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    if len(data) < 8 or n > len(data) - 8:
        raise ValueError("header length out of range")
    meta = json.loads(data[8:8 + n].decode("utf-8")).get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("__metadata__ is not an object")
    return meta


def valid_generator_state(state: torch.Tensor) -> bool:
    try:  # a scratch generator: torch's global one is only set once everything has been checked
        torch.Generator().set_state(state)
    except (RuntimeError, TypeError):
        return False
    return True


def check_optimizer_state(saved, groups: List[List[torch.Tensor]], names: Dict[int, str], where: str) -> None:
    """Raise if ``optimizer.load_state_dict(saved)`` would fail or load mis-shaped state into ``groups``."""
    def bad(problem):
        return ValueError(f"resume_from: {where}: optimizer state: {problem}")

    if not isinstance(saved.get("state"), dict) or not isinstance(saved.get("param_groups"), list):
        raise bad("lacks 'state' and 'param_groups'")
    if len(saved["param_groups"]) != len(groups):
        raise bad(f"{len(saved['param_groups'])} parameter groups in the checkpoint, {len(groups)} now")
    index = {}
    for i, (sg, params) in enumerate(zip(saved["param_groups"], groups)):
        ids = sg.get("params") if isinstance(sg, dict) else None
        if not isinstance(ids, list) or len(ids) != len(params):
            raise bad(f"group {i} holds {len(ids) if isinstance(ids, list) else '?'} parameters in the checkpoint, "
                      f"{len(params)} now")
        for k, p in zip(ids, params):
            if isinstance(k, bool) or not isinstance(k, int) or k in index:
                raise bad(f"group {i} has a bad or repeated parameter index {k!r}")
            index[k] = p
    for k, st in saved["state"].items():
        if k not in index or not isinstance(st, dict):
            raise bad(f"state for an unknown parameter index {k!r}")
        p = index[k]
        for key, v in st.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) != tuple(p.shape):
                raise bad(f"{key} of {names.get(id(p), k)} has shape {tuple(v.shape)} in the checkpoint, the "
                          f"parameter {tuple(p.shape)}")


def check_replaceable(path: str) -> None:
    """Refuse to replace anything at ``path`` but a checkpoint directory (whose files are all replaced)."""
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isdir(path):
        raise ValueError(f"path: {path} exists and is not a checkpoint directory; refusing to replace it")
    foreign = [n for n in os.listdir(path)
               if not (n in (ADAPTER_FILE, MANIFEST_FILE) or _STATE_RE.fullmatch(n))]
    if foreign:
        raise ValueError(f"path: {path} holds files a checkpoint does not ({sorted(foreign)[:5]}); refusing to "
                         f"replace it (save elsewhere, or move them)")


def file_digest(path: str) -> dict:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return {"sha256": h.hexdigest(), "size": size}


def raise_on_any_rank(err: Optional[BaseException], path: str, cleanup: Optional[Callable[[], None]] = None) -> None:
    """Raise ``err`` here, and on every other rank an error saying which rank failed.

    ``cleanup`` runs first, and no rank raises before it is done: when any rank's
    ``save_checkpoint`` returns, no temporary directory is left.
    """
    msg = first_error(None if err is None else f"{type(err).__name__}: {err}")
    if msg is None:
        return
    if cleanup is not None:
        cleanup()
    barrier()
    if err is not None:
        raise err
    raise RuntimeError(f"save_checkpoint: {path}: {msg}")
