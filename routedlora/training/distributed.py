"""Data parallel on PyTorch's own engine: DDP and FSDP2 (``fully_shard``), launched by ``torchrun``.

How routed LoRA is split across processes:

* **DDP** replicates everything; the routing logits and skills are ordinary trainable
  parameters whose gradients DDP all-reduces (averages). Only trainable parameters are
  registered, so the frozen base costs no communication.
* **FSDP2** shards every parameter (base weights, ``lora_A``/``lora_B`` and
  ``router_logits``) along dim 0 (``router_logits`` along the task dimension) and
  all-gathers a block's parameters for its forward and backward; gradients are
  reduce-scattered (averaged). Inside a forward a routed layer sees the whole logits
  table, so any task id can appear on any rank.
* **Gumbel noise.** Each rank holds a contiguous slice of the global batch and draws the
  noise of the *global* batch from the same generator state, keeping its own rows
  (``routing(..., noise_rows=(start, total))``), so every example gets the noise it would
  get in a single-process run and gradients equal the single-process ones.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ..inject import routed_layers

PARALLEL = ("none", "ddp", "fsdp")


def rank_world() -> Tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(backend: Optional[str] = None) -> Tuple[int, int]:
    """Initialise the default process group from ``torchrun``'s environment (a no-op otherwise).

    ``backend`` defaults to ``nccl`` when CUDA is available, else ``gloo``. Under NCCL
    each process takes GPU ``LOCAL_RANK``. Returns ``(rank, world_size)``.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return rank_world()


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself without a process group of several ranks)."""
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def first_error(message: Optional[str]) -> Optional[str]:
    """Every rank learns the lowest rank's error message (``None`` when no rank had one).

    A collective, so that when one rank fails a multi-rank step the others raise too
    instead of waiting forever at the next barrier.
    """
    rank, world = rank_world()
    if world == 1:
        return message
    messages = [None] * world
    dist.all_gather_object(messages, message)
    for r, m in enumerate(messages):
        if m is not None:
            return m if r == rank else f"rank {r}: {m}"
    return None


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def wrap_ddp(model: nn.Module, **ddp_kwargs) -> nn.Module:
    """``DistributedDataParallel(model)`` (GPU: on the current device). Route on ``model``, call the wrapper."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not dist.is_initialized():
        raise ValueError("parallel: DDP needs an initialised process group (launch with torchrun)")
    if not routed_layers(model):
        raise ValueError("model: has no routed LoRA layers; call routedlora.inject first")
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [dev.index])
    return DDP(model, **ddp_kwargs)


def _blocks(model: nn.Module):
    """Transformer blocks to shard one by one: HF's ``_no_split_modules`` classes, else the routed layers."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names] if names else []
    return blocks or [layer for _, layer in routed_layers(model)]


def shard_fsdp2(model: nn.Module, *, reshard_after_forward: bool = True, mp_policy=None) -> nn.Module:
    """Apply FSDP2's ``fully_shard`` to each transformer block, then to the root (in place).

    ``mp_policy``: an optional ``torch.distributed.fsdp.MixedPrecisionPolicy`` (e.g. bf16
    parameters with fp32 gradient reduction on GPUs).
    """
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise ValueError("parallel: FSDP2 needs an initialised process group (launch with torchrun)")
    if not routed_layers(model):
        raise ValueError("model: has no routed LoRA layers; call routedlora.inject first")
    kw = {"reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    blocks = _blocks(model)
    _check_tables_within_blocks(model, blocks)
    for block in blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def _check_tables_within_blocks(model: nn.Module, blocks) -> None:
    """A routing table shared by layers of several FSDP units (``router_granularity``) cannot be
    sharded by either: refuse before anything is sharded."""
    owner = {}
    for i, block in enumerate(blocks):
        for layer in block.modules():
            if hasattr(layer, "router_logits"):
                owner.setdefault(id(layer), i)
    units = {}
    for name, layer in routed_layers(model):
        units.setdefault(id(layer.router_logits), set()).add(owner.get(id(layer)))
    spread = [u for u in units.values() if len(u) > 1]
    if spread:
        raise ValueError("parallel: FSDP2 shards each transformer block on its own, but a routing table is "
                         "shared by layers of several blocks (router_granularity); use router_granularity='layer' "
                         "or 'block' with blocks that are the model's own, or parallel='ddp'")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a (possibly FSDP2-sharded DTensor) parameter; a collective for DTensors."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def copy_full_(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole value into a (possibly sharded) parameter, in place."""
    with torch.no_grad():
        if hasattr(param, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            local = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
            param.to_local().copy_(local.to_local())
        else:
            param.copy_(value.to(param.device, param.dtype))


__all__ = ["PARALLEL", "barrier", "broadcast_object", "copy_full_", "first_error", "full_tensor",
           "init_distributed", "rank_world", "shard_fsdp2", "wrap_ddp"]
