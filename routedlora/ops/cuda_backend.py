"""The ``cuda`` backend: the CUDA C++ kernels of ``csrc/`` where they are expected to beat Triton, Triton elsewhere.

"Expected": no GPU has run them yet. ``python -m benchmarks.run --only decode`` and
``--only grouping`` measure them against the Triton path; ``DECODE_MAX_TOKENS`` and
``GROUP_MAX_TOKENS`` are to be set from those crossovers.

Same contract as :mod:`routedlora.ops.torch_backend`. What serves each part
(:func:`coverage` returns the same as a dict):

* **forward, decode-sized** (``N <= DECODE_MAX_TOKENS`` tokens, rank ``r <= 256``, ``K``
  slots with ``K <= 256`` and ``K*r <= 4096``, float32/float16/bfloat16):
  ``routedlora_cuda::decode_forward`` from ``csrc/decode.cu``. Two launches (shrink,
  expand) with the routing weights mixed inside; tokens read their routing row
  directly, so no grouping metadata is built.
* **forward, larger N, and every backward**: the Triton kernels of
  :mod:`routedlora.ops.triton_backend`, fed the token grouping from
  ``routedlora_cuda::group_by_row`` (``csrc/group_rows.cu``, one launch) when
  ``N <= GROUP_MAX_TOKENS``, and from torch's sort beyond that.
* **routers**: the Triton router kernels (``poly``, ``softmax``, ``topk``, MTA);
  ``cpoly`` in torch.

The decode forward saves the same float32 rank-space activation as the Triton forward,
so either backward can follow either forward.

Requirements, checked before anything is built (:func:`routedlora.cuda_build.unavailable_reason`):
a CUDA build of torch, a device of compute capability 8.0 or newer, nvcc, ninja and
triton. ``backend="cuda"`` raises :class:`~routedlora.backends.CudaBackendUnavailable`
naming what is missing; it never falls back silently. ``backend="auto"`` does not pick
it until it has been validated and measured on a GPU.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Optional

import torch
from torch import Tensor

from .. import cuda_build
from . import triton_backend
from .rank_space import sparse_index

DECODE_MAX_TOKENS = 64
# the single-block grouping kernel walks N / 1024 chunks in 32 warp turns each: past this
# the torch sort (multi-block radix sort) is assumed faster (a guess until measured on a GPU)
GROUP_MAX_TOKENS = 4096
# limits of csrc/decode.cu (kDecodeMaxRank, kMaxSlots, kMaxCoef)
MAX_RANK = 256
MAX_SLOTS = 256
MAX_COEF = 4096
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_kernels = None  # torch.ops.routedlora_cuda once built, or a stand-in set by use_kernels()
_stand_in = False


def is_available(device: Optional[torch.device] = None) -> bool:
    """Everything the backend needs is here (it may still have to be built on first use)."""
    return _stand_in or cuda_build.unavailable_reason(device) is None


def require(device=None) -> None:
    """Build and load the kernels if needed; raise ``CudaBackendUnavailable`` saying why not."""
    global _kernels
    if _stand_in:
        return
    if device is not None and torch.device(device).type != "cuda":  # also once the build is loaded
        raise cuda_build.CudaBackendUnavailable(cuda_build.unavailable_reason(device))
    cuda_build.load(device)
    if _kernels is None:
        _kernels = torch.ops.routedlora_cuda


@contextlib.contextmanager
def use_kernels(kernels):
    """Serve the ``routedlora_cuda`` ops from ``kernels`` (tests: the host emulator of csrc/)."""
    global _kernels, _stand_in
    prev = (_kernels, _stand_in)
    _kernels, _stand_in = kernels, True
    try:
        yield
    finally:
        _kernels, _stand_in = prev


def coverage() -> dict:
    """Which implementation serves each part of this backend."""
    return {
        "forward, N <= %d tokens" % DECODE_MAX_TOKENS: "cuda: csrc/decode.cu (routedlora_cuda::decode_forward)",
        "forward, more tokens": "triton kernels",
        "backward": "triton kernels",
        "token grouping, N <= %d" % GROUP_MAX_TOKENS: "cuda: csrc/group_rows.cu (routedlora_cuda::group_by_row)",
        "token grouping, more tokens": "torch sort",
        "routers poly/softmax/topk/mta": "triton kernels",
        "router cpoly": "torch",
    }


def decode_eligible(N: int, A: Tensor, B: Tensor, idx: Tensor, dtype, combine: str) -> bool:
    h, m, dh, r = A.shape
    K = idx.shape[2]
    return (N <= DECODE_MAX_TOKENS and dtype in SUPPORTED_DTYPES and 1 <= r <= MAX_RANK and K <= MAX_SLOTS
            and K * r <= MAX_COEF and B.shape[3] >= 1 and (combine == "params" or h == 1))


# what RoutedLoraFunction hands the kernels: every token's row and the tokens grouped by row
NEEDS_ROUTE_IDS = True
NEEDS_GROUPING = True
_this_module = sys.modules[__name__]


def plan(x, A, B, idx, rows, combine, backward=True):
    return _this_module


def grouping(rows):
    """Tokens grouped by row once per batch: csrc's one-launch kernel for up to ``GROUP_MAX_TOKENS``."""
    sorter = _kernels.group_by_row if rows.n_tokens <= GROUP_MAX_TOKENS else None
    return rows.grouping(sorter)


def forward(x, A, B, idx, w, rows, scale, combine, base=None, inplace=False):
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x: backend='cuda' takes float16, bfloat16 or float32, got {x.dtype}")
    x = x.contiguous()
    idx = sparse_index(idx, w)
    if decode_eligible(x.shape[0], A, B, idx, x.dtype, combine):
        y, saved = _kernels.decode_forward(x, A, B, idx, w, rows.route_ids, base, float(scale), combine == "params")
        return y, (saved,)
    return triton_backend.forward(x, A, B, idx, w, rows, scale, combine, base)


def backward(grad, x, A, B, idx, w, rows, scale, combine, saved, needs, dx=None):
    return triton_backend.backward(grad, x, A, B, idx, w, rows, scale, combine, saved, needs, dx)


route = triton_backend.route
