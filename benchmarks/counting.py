"""Exact per-op counts of torch code at full size on a CPU: kernels, FLOPs, bytes, host syncs, saved memory.

:class:`CountingMode` is a ``TorchDispatchMode`` that sees every aten op a forward or backward
dispatches (autograd, custom autograd Functions and composite ops included) and records, per
op that is neither a view nor an allocation (a *kernel*):

* FLOPs, from ``torch.utils.flop_counter``'s formulas (in-place variants such as ``baddbmm_``
  priced as their out-of-place op);
* bytes, the input plus output bytes of the op, each tensor counted over its distinct
  elements (a stride-0 broadcast dimension counts once); an in-place update (``baddbmm_``)
  reads and writes its tensor, an ``out=`` buffer or a fill only writes it;
* host syncs: ops whose result the host must wait for (``_local_scalar_dense`` behind
  ``.item()``/``bool()``, and data-dependent shapes: ``nonzero``, ``unique`` …).

So that the design point (16k tokens × 4096 wide) is counted in seconds on a CPU, an op is only
*priced*, not computed, when any of its tensors is large (``> SMALL`` elements): its outputs
come from the op's meta kernel and are allocated, never written (their values are garbage, and
nothing downstream reads them as indices). Small ops (routers, index bookkeeping) and every op
whose output shape depends on values run for real.

:func:`saved_bytes` counts what autograd keeps for backward (``saved_tensors_hooks``): distinct
storages, module parameters excluded (they exist anyway).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import flop_registry

aten = torch.ops.aten
SMALL = 1 << 16
# metadata-only ops and allocations: not kernels
NOT_KERNELS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "_unsafe_view", "alias",
               "detach", "lift_fresh", "lift_fresh_copy", "view", "_reshape_alias", "set_", "resize_",
               "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size",
               "_has_compatible_shallow_copy_type"}
# the host waits for these: a scalar read, or an output whose shape depends on values
HOST_SYNCS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "nonzero_static", "unique", "_unique",
              "_unique2", "unique_consecutive", "unique_dim", "masked_select", "_assert_async", "equal",
              "_is_all_true", "_is_any_true"}
DATA_DEPENDENT = HOST_SYNCS | {"repeat_interleave"}  # repeat_interleave(counts) has a value-defined length
WRITE_ONLY = {"fill_", "zero_", "copy_", "uniform_", "normal_", "random_", "bernoulli_", "exponential_"}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements ``t`` addresses (stride-0 dimensions once)."""
    n = math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0) if t.dim() else 1
    return n * t.element_size() if t.numel() else 0


@dataclass
class Kernel:
    name: str
    flops: float
    bytes: float
    dtype: str
    sync: bool = False
    detail: Optional[dict] = None  # a custom kernel's formula: requested and distinct bytes per argument


@dataclass
class Counts:
    kernels: List[Kernel] = field(default_factory=list)

    @property
    def launches(self) -> int:
        return len(self.kernels)

    @property
    def flops(self) -> float:
        return sum(k.flops for k in self.kernels)

    @property
    def bytes(self) -> float:
        return sum(k.bytes for k in self.kernels)

    @property
    def host_syncs(self) -> int:
        return sum(k.sync for k in self.kernels)


def _flops(func, args, kwargs, out) -> float:
    packet = func.overloadpacket
    formula = flop_registry.get(packet)
    if formula is None and packet.__name__.endswith("_"):  # baddbmm_ → baddbmm
        formula = flop_registry.get(getattr(aten, packet.__name__[:-1], None))
    if formula is None:
        return 0.0
    return float(formula(*args, **kwargs, out_val=out))


def _written_arg(func, args, kwargs):
    """The argument an in-place or ``out=`` op writes and returns, else ``None``."""
    schema = func._schema
    if not schema.returns or schema.returns[0].alias_info is None or not schema.returns[0].alias_info.is_write:
        return None
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            return args[i] if i < len(args) else kwargs.get(arg.name)
    return None


class CountingMode(TorchDispatchMode):
    """Records a :class:`Kernel` per dispatched kernel; prices large ops without computing them.

    ``expand``: custom ops to count by their body instead of as one op: ``{op: fn}`` where
    ``fn(mode, *args, **kwargs)`` runs the body (its torch ops are counted as usual) and may add
    kernels of its own to ``mode.counts`` (the Triton launches it records rather than runs).
    """

    def __init__(self, small: int = SMALL, expand: Optional[Dict[object, Callable]] = None):
        super().__init__()
        self.small = small
        self.expand = expand or {}
        self.counts = Counts()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.expand:
            with self:
                return self.expand[func](self, *args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view or name in NOT_KERNELS:
            return func(*args, **kwargs)
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        # integer tensors are index metadata: cheap, and their values matter downstream
        big = any(t.numel() > self.small for t in tensors) and any(t.is_floating_point() for t in tensors)
        if big and name not in DATA_DEPENDENT:
            out = self._priced(func, args, kwargs)
        else:
            out = func(*args, **kwargs)
        outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        written = _written_arg(func, args, kwargs)
        # an in-place op reads what it updates (baddbmm_, add_); out= buffers and fills are only written
        read_written = written is not None and name.endswith("_") and name not in WRITE_ONLY
        ins = [t for t in tensors if t is not written or read_written]
        nbytes = sum(tensor_bytes(t) for t in ins) + sum(tensor_bytes(t) for t in outs)
        dtype = str((outs or tensors or [torch.empty(0)])[0].dtype).replace("torch.", "")
        self.counts.kernels.append(Kernel(name, _flops(func, args, kwargs, out), float(nbytes), dtype,
                                          name in HOST_SYNCS))
        return out

    @staticmethod
    def _priced(func, args, kwargs):
        """Outputs of ``func`` from its meta kernel, allocated on the real device, values unset."""
        device = next(t.device for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
        to_meta = (lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t)
        meta_out = func(*tree_map(to_meta, args), **tree_map(to_meta, kwargs))
        written = _written_arg(func, args, kwargs)
        if written is not None:
            return written

        def real(t):
            if not isinstance(t, torch.Tensor):
                return t
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
        return tree_map(real, meta_out)


def count(fn: Callable[[], object], small: int = SMALL, expand=None) -> Counts:
    """Counts of everything ``fn()`` dispatches."""
    with CountingMode(small, expand) as mode:
        fn()
    return mode.counts


def saved_bytes(fn: Callable[[], object], exclude: Optional[List[torch.Tensor]] = None) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs (``exclude``: parameters)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude or []}
    seen: Dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip and ptr:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
