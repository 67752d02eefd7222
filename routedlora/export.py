"""Export each task of a routed model as a plain PEFT LoRA adapter, for multi-LoRA serving engines.

Under evaluation routing (no Gumbel noise) the adapter of one task is a fixed low-rank delta
(DESIGN.md §1), so any engine that serves many PEFT LoRA adapters can serve the tasks:

* ``params`` combine (Poly, MHR with any number of heads, C-Poly, softmax): ``Δ = γ x Â B̂`` with
  ``Â = concat_q Σ_j w_qj A_qj`` (heads stacked along the input dim, ``d × r``) and
  ``B̂ = concat_q Σ_j w_qj B_qj`` (heads side by side along the output dim, ``r × o``). The product
  is the full ``Â B̂`` (head q's input slice reaches every output slice: the cross terms), so the
  task is a rank-``r`` LoRA with ``A = Â``, ``B = B̂``, whatever ``h``.
* ``outputs`` combine (``topk``, MTA stage 1): ``Δ = γ Σ_j w_j x A_j B_j`` over the row's K selected
  skills is one LoRA of rank ``K·r``: ``A = [A_1 … A_K]``, ``B = [w_1 B_1; …; w_K B_K]``. MTA's
  dense stage 1 selects all ``m`` skills: rank ``m·r``.

γ is folded into ``B`` and ``lora_alpha`` is set to the rank, so PEFT's (and vLLM's) scaling
``lora_alpha / r`` is exactly 1 and the delta carries one rounding of ``γ·B̂``.

Command line: ``python -m routedlora.export ADAPTER OUT_DIR --model MODEL [--tasks 0,3,5]``.
"""
from __future__ import annotations

import argparse
import json
import operator
import os
import shutil
import sys
from collections.abc import Iterable
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .durable import install, make_sibling_dir, write_durably
from .inject import routed_layers
from .layer import RoutedLoraLinear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT's key prefix for a LoRA saved from a PeftModel (adapter name stripped): PeftModel.from_pretrained
# re-inserts the adapter name when it loads
_PEFT_PREFIX = "base_model.model."
# PEFT's task-specific wrappers add these heads to modules_to_save and expect their weights in the
# adapter file (peft 0.21: PeftModelForSequenceClassification, ...ForTokenClassification, ...ForQuestionAnswering)
_PEFT_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
               "QUESTION_ANS": ("qa_outputs",)}


def _check_exportable(model: nn.Module) -> List[Tuple[str, RoutedLoraLinear]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    layers = routed_layers(model)
    if not layers or any(not name for name, _ in layers):
        raise ValueError("model: has no routed LoRA layers below it; call routedlora.inject or load_adapter first, "
                         "and pass the whole model (its module names become the PEFT target names)")
    for name, layer in layers:
        if layer.merged_task is not None:
            raise ValueError(f"model: task {layer.merged_task} is merged into the base weight of {name!r}; the "
                             "exported LoRA would be added on top of it. Call routedlora.unmerge first")
        if getattr(layer, "mta_stage", 1) != 1:
            raise ValueError(f"model: {name!r} is an MTA layer in stage 2, whose gate reads each sequence's input; "
                             "no fixed LoRA reproduces it. Export the stage-1 adapter instead")
        if layer.config.combine == "outputs" and layer.lora_A.shape[0] != 1:
            raise ValueError(f"model: {name!r} mixes outputs over {layer.lora_A.shape[0]} heads; expected one")
    # PEFT wraps a module under its first name only: any other name would keep the bare base layer
    names = {id(layer): name for name, layer in layers}
    aliases = [n for n, m in model.named_modules(remove_duplicate=False)
               if isinstance(m, RoutedLoraLinear) and names.get(id(m)) != n]
    if aliases:
        raise ValueError(f"model: routed layers are also registered under {aliases[:3]}; PEFT wraps a shared module "
                         "under one name only, so a LoRA export cannot reproduce this model")
    return layers


def _task_list(tasks, n_tasks: int) -> List[int]:
    if tasks is None:
        return list(range(n_tasks))
    if isinstance(tasks, (int, torch.Tensor)) and not isinstance(tasks, bool):
        tasks = [tasks] if isinstance(tasks, int) else tasks.reshape(-1).tolist()
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Iterable):
        raise TypeError(f"tasks: expected None or a sequence of task ids, got {type(tasks).__name__}")
    out: List[int] = []
    for t in tasks:
        try:
            if isinstance(t, bool):
                raise TypeError
            t = operator.index(t)
        except TypeError:
            raise TypeError(f"tasks: expected int task ids, got {type(t).__name__} {t!r}") from None
        if not 0 <= t < n_tasks:
            raise ValueError(f"tasks: task id {t} is out of range; the model has tasks [0, {n_tasks})")
        if t in out:
            raise ValueError(f"tasks: task id {t} is given twice")
        out.append(t)
    if not out:
        raise ValueError("tasks: expected at least one task id")
    return out


@torch.no_grad()
def task_lora(layer: RoutedLoraLinear, task_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """One task's delta on ``layer`` as a plain LoRA ``(A (d, r'), B (r', o))`` with ``γ`` folded into ``B``:
    ``x A B`` is what the layer adds for ``task_id`` under evaluation routing. Computed in float32
    (float64 for float64 adapters)."""
    if isinstance(task_id, bool) or not isinstance(task_id, int) or not 0 <= task_id < layer.n_tasks:
        raise ValueError(f"task_id: expected an int in [0, {layer.n_tasks}), got {task_id!r}")
    training = layer.training
    layer.eval()  # the layer's own evaluation routing: every router option, no noise
    try:
        routing = layer.route(torch.tensor([task_id], device=layer.router_logits.device))
    finally:
        layer.train(training)
    dtype = torch.float64 if layer.lora_A.dtype == torch.float64 else torch.float32
    A, B = layer.lora_A.to(dtype), layer.lora_B.to(dtype)
    h, m = A.shape[:2]
    idx, w = routing.idx[0].long(), routing.w[0].to(dtype)  # (h, K)
    if layer.config.combine == "params":
        dense = torch.zeros(h, m, dtype=dtype, device=w.device).scatter_add_(1, idx, w)  # duplicates add up
        A_hat = torch.einsum("qs,qsdr->qdr", dense, A).reshape(-1, A.shape[-1])  # heads along d
        B_hat = torch.einsum("qs,qsro->rqo", dense, B).reshape(B.shape[2], -1)  # heads along o
    else:
        sel = idx[0]
        A_hat = A[0, sel].permute(1, 0, 2).reshape(A.shape[2], -1)  # (d, K·r): skills side by side
        B_hat = (B[0, sel] * w[0, :, None, None]).reshape(-1, B.shape[-1])  # (K·r, o), weights folded in
    return A_hat, B_hat * layer.scale


_AUTO_MAPPINGS = (("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM"), ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
                                                                          "SEQ_2_SEQ_LM"),
                  ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "SEQ_CLS"),
                  ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "TOKEN_CLS"),
                  ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "QUESTION_ANS"))


def _task_type(model: nn.Module) -> Optional[str]:
    """PEFT's task type of a transformers model: by transformers' own auto-class tables (which know
    ``GPT2LMHeadModel`` is a causal LM), else by the class name's suffix."""
    from .peft_interop import _infer_task_type

    name = type(model).__name__
    auto = getattr(sys.modules.get("transformers"), "models", None)
    tables = getattr(getattr(auto, "auto", None), "modeling_auto", None)
    for table, task_type in _AUTO_MAPPINGS if tables is not None else ():
        for classes in getattr(tables, table, {}).values():
            if name == classes or (isinstance(classes, (tuple, list)) and name in classes):
                return task_type
    return _infer_task_type(model)


def _heads(model: nn.Module, task_type: Optional[str]) -> Tuple[List[str], Dict[str, torch.Tensor]]:
    """The head modules PEFT's wrapper for ``task_type`` keeps in ``modules_to_save``: their name suffixes
    and their state, keyed as PEFT saves them. The routed model's own head goes with every task."""
    suffixes = _PEFT_HEADS.get(task_type, ())
    found, tensors = [], {}
    for name, module in model.named_modules(remove_duplicate=False):
        hit = [s for s in suffixes if name.endswith(s)]  # PEFT's own match (_set_trainable): a plain endswith
        if not name or not hit:
            continue
        if any(isinstance(m, RoutedLoraLinear) for m in module.modules()):
            raise ValueError(f"model: {name!r} is a routed layer or holds one, but PEFT's {task_type} model keeps it "
                             "as a plain copy in modules_to_save; pass task_type=None to export the LoRA alone")
        found += [s for s in hit if s not in found]
        for key, value in module.state_dict().items():
            tensors[f"{_PEFT_PREFIX}{name}.{key}"] = value.detach().contiguous().cpu()
    return found, tensors


def _adapter_config(targets: Dict[str, int], fan_in_fan_out: bool, task_type: Optional[str],
                    base_model_name_or_path: Optional[str], modules_to_save: List[str]) -> dict:
    ranks = list(targets.values())
    r = max(set(ranks), key=lambda k: (ranks.count(k), -k))  # the most common rank; patterns for the rest
    # PEFT matches pattern keys as suffixes, first key first: the longest names go first so that
    # "a.lm_head" is not taken by a key "lm_head"
    others = sorted((n for n, k in targets.items() if k != r), key=lambda n: (-len(n), n))
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": r,  # γ is folded into lora_B: scaling lora_alpha / r = 1
        "target_modules": list(targets),
        "rank_pattern": {n: targets[n] for n in others},
        "alpha_pattern": {n: targets[n] for n in others},
        "lora_dropout": 0.0,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": modules_to_save or None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _write_folder(out_dir: str, name: str, config: dict, tensors: Dict[str, torch.Tensor], overwrite: bool) -> str:
    from safetensors.torch import save

    final = os.path.join(out_dir, name)
    tmp = make_sibling_dir(out_dir, f".{name}.tmp-")
    try:
        write_durably(os.path.join(tmp, ADAPTER_CONFIG), (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
        write_durably(os.path.join(tmp, ADAPTER_WEIGHTS), save(tensors, metadata={"format": "pt"}))
        if os.path.lexists(final) and not overwrite:  # appeared while we wrote
            raise FileExistsError(f"out_dir: {final} exists")
        install(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def export_task_loras(model: nn.Module, out_dir: Union[str, os.PathLike], tasks: Optional[Sequence[int]] = None, *,
                      overwrite: bool = False, task_type: Optional[str] = "auto",
                      base_model_name_or_path: Optional[str] = "auto") -> Dict[int, str]:
    """Write each task's adapter as a PEFT LoRA folder ``out_dir/task_<id>/`` (``adapter_config.json``,
    ``adapter_model.safetensors``); returns ``{task id: folder}``.

    ``peft.PeftModel.from_pretrained(base, out_dir / "task_3")`` on a fresh copy of the base model
    computes what ``model`` computes in eval mode under ``routing(model, 3)``. Ranks: ``r`` for
    ``params``-combine routers (Poly, MHR, C-Poly, softmax), ``K·r`` for ``topk`` and MTA stage 1
    with ``mta_routing="topk"`` (``K = top_k``), ``m·r`` for MTA's dense stage 1; ``γ`` is folded into
    ``lora_B`` and ``lora_alpha = r`` (per-module ranks that differ go to ``rank_pattern`` /
    ``alpha_pattern``). Tensors keep the adapter's dtype; targets are the routed modules' full names.
    For PEFT's ``SEQ_CLS`` / ``TOKEN_CLS`` / ``QUESTION_ANS`` task types the model's head (``classifier``,
    ``score``, ``qa_outputs``) is saved too, as ``modules_to_save``: PEFT's wrappers for those tasks load it.

    ``tasks``: task ids (default: all). ``task_type``: PEFT's (``"auto"``: from the model class, as
    :func:`routedlora.to_peft`). ``base_model_name_or_path``: recorded in the config (``"auto"``:
    ``model.config._name_or_path`` when set). ``overwrite``: allow a non-empty ``out_dir``; the
    ``task_<id>`` folders written replace existing ones, other entries are left alone.

    Refused (``ValueError``) before anything is written: MTA layers in stage 2 (the gate reads the
    input), a model with a merged task, task ids out of range or repeated, a module shared under
    several names, an unknown ``task_type``, and an ``out_dir`` that is a file or a non-empty
    directory without ``overwrite``. Tasks are computed and written one at a time, each folder to a
    temporary sibling renamed into place: a folder is whole or absent.
    """
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite: expected True or False, got {type(overwrite).__name__}")
    layers = _check_exportable(model)
    n_tasks = min(layer.n_tasks for _, layer in layers)
    ids = _task_list(tasks, n_tasks)
    try:
        out = os.fspath(out_dir)
    except TypeError:
        raise TypeError(f"out_dir: expected a path, got {type(out_dir).__name__}") from None
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ValueError(f"out_dir: {out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ValueError(f"out_dir: {out} exists and is not empty; pass overwrite=True to replace the task folders")
    if task_type == "auto":
        task_type = _task_type(model)
    if base_model_name_or_path == "auto":
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    for what, value in (("task_type", task_type), ("base_model_name_or_path", base_model_name_or_path)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{what}: expected None or a str, got {type(value).__name__}")
    if task_type is not None:
        try:
            import peft
        except ImportError:  # writing PEFT's format needs no peft; only the name check does
            peft = None
        if peft is not None:
            from .peft_interop import _check_task_type

            _check_task_type(peft, task_type)
    fan_in_fan_out = any(layer.fan_in_fan_out for _, layer in layers)
    heads, head_tensors = _heads(model, task_type)
    # Every refusal above comes before the first file. Tasks are then computed and written one at a
    # time (all of them at once could be many model-sized copies); each folder is whole or absent.
    os.makedirs(out, exist_ok=True)
    written = {}
    for t in ids:
        tensors, ranks = dict(head_tensors), {}
        for name, layer in layers:
            A, B = task_lora(layer, t)
            dtype = layer.lora_A.dtype
            # PEFT's lora_A is nn.Linear(in, r') and lora_B nn.Linear(r', out), whatever the base's layout
            tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = A.T.to(dtype).contiguous().cpu()
            tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = B.T.to(dtype).contiguous().cpu()
            ranks[name] = A.shape[1]
        config = _adapter_config(ranks, fan_in_fan_out, task_type, base_model_name_or_path, heads)
        written[t] = _write_folder(out, f"task_{t}", config, tensors, overwrite)
    return written


# --- command line ---------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m routedlora.export",
                                description="Write each task of a routed LoRA adapter as a PEFT LoRA folder "
                                            "(OUT_DIR/task_<id>/) for multi-LoRA serving.")
    p.add_argument("adapter", metavar="ADAPTER",
                   help="adapter file from routedlora.save_adapter (or a training checkpoint directory "
                        "holding adapter.safetensors)")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--model", required=True,
                   help="the base model: a Hugging Face name or path, or tiny-llama / tiny-t5 (the training CLI's)")
    p.add_argument("--tasks", default=None, help="comma-separated task ids (default: every task)")
    p.add_argument("--hidden", type=int, default=64, help="tiny models: width used in training")
    p.add_argument("--layers", type=int, default=2, help="tiny models: layers used in training")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the model, hence of the exported tensors")
    p.add_argument("--overwrite", action="store_true", help="replace task folders in a non-empty OUT_DIR")
    return p


def _parse_tasks(text: Optional[str]) -> Optional[List[int]]:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--tasks: expected comma-separated ints, got {text!r}") from None


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        tasks = _parse_tasks(args.tasks)
        path = args.adapter
        if os.path.isdir(path):
            path = os.path.join(path, "adapter.safetensors")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ADAPTER: {args.adapter}: no such file")
        if os.path.isdir(args.out_dir) and os.listdir(args.out_dir) and not args.overwrite:
            # before building (or downloading) the model
            raise ValueError(f"OUT_DIR: {args.out_dir} exists and is not empty; pass --overwrite")
        from .checkpoint import load_adapter
        from .training.data import CharTokenizer
        from .training.models import TINY, build_model

        vocab = CharTokenizer().vocab_size if args.model in TINY else None
        model = build_model(args.model, vocab_size=vocab, hidden=args.hidden, layers=args.layers)
        model.to(getattr(torch, args.dtype))
        load_adapter(model, path)
        model.eval()
        name = None if args.model in TINY else args.model
        written = export_task_loras(model, args.out_dir, tasks, overwrite=args.overwrite, base_model_name_or_path=name)
        for t, folder in written.items():
            print(f"task {t}: {folder}")
    except (ValueError, TypeError, OSError) as e:
        # a user's mistake (paths, ids, a stage-2 or mismatched adapter): one line, no traceback
        # (ROUTEDLORA_TRACEBACK=1 shows it), as the training CLI does
        if os.environ.get("ROUTEDLORA_TRACEBACK", "") not in ("", "0"):
            raise
        message = " ".join(line.strip() for line in str(e).strip().splitlines()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


__all__ = ["export_task_loras", "main", "parser", "task_lora"]

if __name__ == "__main__":
    sys.exit(main())
