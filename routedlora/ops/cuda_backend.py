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


# what RoutedLoraFunction hands the kernels: every token's row and the tokens grouped by row;
# and the base linear's weight, computed in the kernels' tiles beyond decode size
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
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x: backend='cuda' takes float16, bfloat16 or float32, got {x.dtype}")
    x = x.contiguous()
    idx = sparse_index(idx, w)
    if decode_eligible(x.shape[0], A, B, idx, x.dtype, combine):
        if linear is not None:
            base = torch.nn.functional.linear(x, *linear)
        y, saved = _kernels.decode_forward(x, A, B, idx, w, rows.route_ids, base, float(scale), combine == "params")
        return y, (saved,)
    return triton_backend.forward(x, A, B, idx, w, rows, scale, combine, base, linear=linear)


def backward(grad, x, A, B, idx, w, rows, scale, combine, saved, needs, dx=None, weight=None):
    return triton_backend.backward(grad, x, A, B, idx, w, rows, scale, combine, saved, needs, dx, weight)


route = triton_backend.route


# --- what each launch costs: traffic formulas of the csrc kernels -----------------------
#
# As for the Triton launchers (triton_backend.Traffic): per kernel argument, the bytes its
# threads request from global memory (every thread's access counted) and the distinct bytes
# they touch, checked exactly against the host emulator's count of RL_LD / RL_ST accesses
# (tests/test_csrc.py). Thread counts and limits mirror csrc/decode.cu and csrc/group_rows.cu.
SHRINK_THREADS = EXPAND_THREADS = 256
EXPAND_WARPS = EXPAND_THREADS // 32
TOKENS_PER_BLOCK = 8
GROUP_THREADS = 1024
GROUP_SHARED_ROWS = 4096


def decode_tokens_per_block(N: int) -> int:
    return N if N < TOKENS_PER_BLOCK else TOKENS_PER_BLOCK


MAX_CHUNK = 1024  # csrc/decode.cu's kMaxChunk: rows of d/h one shrink block stages


def decode_splits(N: int, h: int, dh: int, sm_count: int) -> int:
    """How many blocks split d/h in the decode shrink (csrc/decode.cu's decode_splits, in Python)."""
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    fewest = cdiv(dh, MAX_CHUNK)
    most = max(fewest, cdiv(dh, 32))
    blocks = max(cdiv(N, decode_tokens_per_block(N)) * h, 1)
    return max(1, min(max(cdiv(2 * max(sm_count, 1), blocks), fewest), most))


def decode_traffic(x, A, B, idx, w, route_ids, base, params: bool, splits: int):
    """``(shrink, expand)`` :class:`~routedlora.ops.triton_backend.Traffic` of one decode forward.

    Valid routing rows and skill indices assumed (an invalid one skips its reads).
    """
    from .triton_backend import Traffic

    N = x.shape[0]
    h, m, dh, r = A.shape
    oh = B.shape[-1]
    R, _, K = idx.shape
    J = 1 if params else K
    G = decode_tokens_per_block(N)
    groups = -(-N // G)
    chunk = -(-dh // splits)
    ex, eA, eB = x.element_size(), A.element_size(), B.element_size()
    present = torch.unique(route_ids)
    pairs = sum(int(torch.unique(idx[present, q]).numel()) for q in range(h))  # (head, skill) pairs read
    rows_read = present.numel() * h * K
    # shrink: grid (groups, h, splits); per token, every thread reads its row id, index and weight
    width = sum(max(0, min(chunk, dh - s * chunk)) for s in range(splits))  # = dh: the splits cover d/h once
    shrink = {"route_ids": 8 * SHRINK_THREADS * N * h * splits, "x": ex * N * h * width,
              "idx": 8 * SHRINK_THREADS * N * h * splits * K, "A": eA * N * h * K * width * r,
              "w": 4 * SHRINK_THREADS * N * h * splits * K if params else 0,
              "part": 4 * N * h * splits * J * r}
    shrink_d = {"route_ids": 8 * N, "x": ex * N * h * dh, "idx": 8 * rows_read, "A": eA * pairs * dh * r,
                "w": 4 * rows_read if params else 0, "part": 4 * N * h * splits * J * r}
    # expand: grid (groups, h, cdiv(oh, 32)); per token a block sums the partials, reads the
    # slots' indices and weights, and its 32 columns of every selected skill's B rows
    Z = -(-oh // 32)
    sources = splits * h if params else splits
    expand = {"route_ids": 8 * EXPAND_THREADS * N * h * Z, "part": 4 * N * h * Z * J * r * sources,
              "saved": 4 * N * J * r, "idx": 8 * N * h * Z * K, "w": 4 * N * h * Z * K * r,
              "B": eB * N * h * oh * K * r, "y": eB * N * h * oh, "base": eB * N * h * oh if base is not None else 0}
    expand_d = {"route_ids": 8 * N, "part": 4 * N * h * splits * J * r, "saved": 4 * N * J * r,
                "idx": 8 * rows_read, "w": 4 * rows_read, "B": eB * pairs * r * oh, "y": eB * N * h * oh,
                "base": eB * N * h * oh if base is not None else 0}
    dtype = str(x.dtype)
    return (Traffic("decode_shrink_kernel", (groups, h, splits), shrink, shrink_d, 2 * N * h * K * dh * r,
                    dict(PARAMS=params, dtype=dtype, threads=SHRINK_THREADS)),
            Traffic("decode_expand_kernel", (groups, h, Z), expand, expand_d, 2 * N * h * oh * K * r,
                    dict(PARAMS=params, HAS_BASE=base is not None, dtype=dtype, threads=EXPAND_THREADS)))


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
