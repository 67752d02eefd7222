"""The ``cuda`` backend: the Triton kernels, fed the token grouping from the CUDA C++ kernel of ``csrc/``.

Same contract as :mod:`routedlora.ops.torch_backend`. What serves each part
(:func:`coverage` returns the same as a dict):

* **every forward and every backward**: the Triton kernels of
  :mod:`routedlora.ops.triton_backend` (float32/float16/bfloat16).
* **token grouping** (the tokens in a stable order by routing row and each row's offset,
  built once per batch for those kernels): ``routedlora_cuda::group_by_row``
  (``csrc/group_rows.cu``, one launch) for ``N <= GROUP_MAX_TOKENS`` tokens, torch's sort
  beyond. One row per sequence needs neither: its tokens are in row order already.
* **routers**: the Triton router kernels (``poly``, ``softmax``, ``topk``, MTA);
  ``cpoly`` in torch.

``GROUP_MAX_TOKENS`` is a guess until ``python -m benchmarks.run --only grouping`` has
measured the crossover against torch's sort on a GPU.

Requirements, checked before anything is built (:func:`routedlora.cuda_build.unavailable_reason`):
a CUDA build of torch, a device of compute capability 8.0 or newer, nvcc, ninja and
triton. ``backend="cuda"`` raises :class:`~routedlora.backends.CudaBackendUnavailable`
naming what is missing; it never falls back silently. ``backend="auto"`` picks it only
where ``python -m routedlora.selftest`` checked and timed it on this GPU with these versions
(see :mod:`routedlora.backends`).
"""
from __future__ import annotations

import contextlib
import sys
from typing import Optional

import torch
from torch import Tensor

from .. import cuda_build
from . import triton_backend

# the single-block grouping kernel walks N / 1024 chunks in 32 warp turns each: past this
# the torch sort (multi-block radix sort) is assumed faster (a guess until measured on a GPU)
GROUP_MAX_TOKENS = 4096

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
        "forward": "triton kernels",
        "backward": "triton kernels",
        "token grouping, N <= %d" % GROUP_MAX_TOKENS: "cuda: csrc/group_rows.cu (routedlora_cuda::group_by_row)",
        "token grouping, more tokens": "torch sort",
        "routers poly/softmax/topk/mta": "triton kernels",
        "router cpoly": "torch",
    }


# what RoutedLoraFunction hands the Triton kernels: every token's row and the tokens grouped
# by row; and the base linear's weight, computed in the expand's tiles
NEEDS_ROUTE_IDS = True
NEEDS_GROUPING = True
FUSES_LINEAR = True
_this_module = sys.modules[__name__]


def plan(x, A, B, idx, rows, combine, backward=True):
    return _this_module


def grouping(rows):
    """Tokens grouped by row once per batch: csrc's one-launch kernel for up to ``GROUP_MAX_TOKENS``."""
    sorter = _kernels.group_by_row if rows.n_tokens <= GROUP_MAX_TOKENS else None
    return rows.grouping(sorter)


def forward(x, A, B, idx, w, rows, scale, combine, base=None, inplace=False, linear=None):
    triton_backend._check_dtype(x, "cuda")  # the error names the backend the caller chose
    return triton_backend.forward(x, A, B, idx, w, rows, scale, combine, base, linear=linear)


backward = triton_backend.backward
route = triton_backend.route


# --- what a launch costs: the traffic formula of the csrc kernel -------------------------
#
# As for the Triton launchers (triton_backend.Traffic): per kernel argument, the bytes its
# threads request from global memory (every thread's access counted) and the distinct bytes
# they touch, checked exactly against the host emulator's count of RL_LD / RL_ST accesses
# (tests/test_csrc.py). The constants mirror csrc/group_rows.cu.
GROUP_THREADS = 1024
GROUP_SHARED_ROWS = 4096


def group_traffic(route_ids: Tensor, R: int):
    """:class:`~routedlora.ops.triton_backend.Traffic` of one ``group_by_row`` launch (one block).

    The row counters are in shared memory below ``GROUP_SHARED_ROWS`` rows (not global traffic),
    in the ``scratch`` argument above.
    """
    from .triton_backend import Traffic

    N = route_ids.shape[0]
    ids = route_ids.tolist()
    keys = [i if 0 <= i < R else R for i in ids]
    # leaders per warp of 32 consecutive tokens: one atomic (count) and one cursor move (scatter) per key
    leaders = sum(len(set(keys[w0:w0 + 32])) for w0 in range(0, N, 32))
    req = {"route_ids": 16 * N, "order": 8 * N, "srows": 8 * N, "offs": 8 * (R + 1)}
    dist = {"route_ids": 8 * N, "order": 8 * N, "srows": 8 * N, "offs": 8 * (R + 1)}
    if R >= GROUP_SHARED_ROWS:
        # zeroed, counted (an atomic reads and writes), scanned (two reads, one write), then read by
        # every token and moved by each warp's leader of a row
        req["scratch"] = 4 * ((R + 1) + 2 * leaders + 3 * (R + 1) + N + leaders)
        dist["scratch"] = 4 * (R + 1)
    return Traffic("group_by_row_kernel", (1,), req, dist, 0,
                   dict(SHARED=R < GROUP_SHARED_ROWS, threads=GROUP_THREADS))
