"""The ``triton`` backend: launchers for :mod:`routedlora.triton_kernels.routed_lora`.

Same contract as :mod:`routedlora.ops.torch_backend`. Forward and backward are each
registered as one ``torch.library`` custom op (``routedlora::triton_forward`` and
``routedlora::triton_backward``) with fake implementations, so ``torch.compile`` and
CUDA graphs see single opaque ops.

Routing metadata is built on the device with no host sync: a stable sort of
``route_ids`` (tokens grouped by routing row), and per-row offsets for the
deterministic per-row reduction of routing gradients. Every weight gradient is a
per-(head, skill, block) reduction owned by one program: no atomics.

Routers: :func:`route` computes ``poly`` (Gumbel noise from a seed), ``softmax`` and
``topk`` rows in one kernel, with the logit gradients summed per task in another.

Tiles: :func:`tile_table` reads ``triton_kernels/configs/<gpu>.json`` (written by
``benchmarks/tune_triton.py``) or ``default.json``, one configuration per shape class.

Memory: forward keeps a float32 rank-space activation, ``N*r`` (``params``) or
``N*K*r`` (``outputs``) numbers; backward adds two such buffers and ``N*h*K``
routing-gradient partials. Nothing ``d x r`` is ever stored per token or row.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .rank_space import sparse_index

_kernels = None
_this_module = sys.modules[__name__]


def is_available(device: Optional[torch.device] = None) -> bool:
    """Triton importable, and either a CUDA device or the interpreter (``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device is not None and torch.device(device).type == "cuda":
        return True
    return _interpret()


def _k():
    global _kernels
    if _kernels is None:
        from routedlora.triton_kernels import routed_lora as kernels

        _kernels = kernels
    return _kernels


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, int(n) - 1).bit_length())


_INTERPRETER_TILES = dict(BLOCK_N=16, BLOCK_D=16, BLOCK_O=16, BLOCK_W=16, num_warps=1, num_stages=1)
_tile_tables: dict = {}
_override: Optional[dict] = None


def device_slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def _config_dir() -> str:
    # installed as routedlora.triton_kernels: the configs sit beside the kernels
    from routedlora import triton_kernels

    return os.path.join(os.path.dirname(triton_kernels.__file__), "configs")


def tile_table(device=None) -> dict:
    """The tile table for ``device``: ``configs/<gpu name>.json`` if tuned, else ``configs/default.json``."""
    import json

    name = torch.cuda.get_device_name(device) if device is not None and torch.device(device).type == "cuda" else ""
    key = device_slug(name) if name else "default"
    if key not in _tile_tables:
        path = os.path.join(_config_dir(), f"{key}.json")
        if not os.path.exists(path):
            path = os.path.join(_config_dir(), "default.json")
        with open(path) as f:
            _tile_tables[key] = json.load(f)
    return _tile_tables[key]


def shape_class(N: int, table: dict) -> str:
    """The first class (in file order) whose ``max_tokens`` bound holds ``N``."""
    for name, cfg in table["classes"].items():
        if cfg["max_tokens"] is None or N <= cfg["max_tokens"]:
            return name
    raise ValueError(f"tile table {table.get('device')!r} has no class for {N} tokens")


class tile_override:
    """Context manager forcing one tile configuration (used by the tuner)."""

    def __init__(self, cfg: dict):
        self.cfg = cfg

    def __enter__(self):
        global _override
        self.prev, _override = _override, dict(self.cfg)
        return self

    def __exit__(self, *exc):
        global _override
        _override = self.prev


def _blocks(N: int, width: int, r: int, interpret: bool, device=None) -> dict:
    """Tile sizes for ``N`` tokens: tuned data by shape class (decode / medium / train)."""
    if _override is not None:
        cfg = dict(_override)
    elif interpret:  # the interpreter is slow per element: smallest legal tiles
        cfg = dict(_INTERPRETER_TILES)
    else:
        table = tile_table(device)
        cfg = dict(table["classes"][shape_class(N, table)])
    cfg["BLOCK_R"] = _pow2(r)
    return cfg


def _prec(dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _routing_meta(route_ids: Tensor, R: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Tokens sorted by routing row (stable), their rows, and per-row offsets — all on device."""
    rids = route_ids.long()
    order = torch.argsort(rids, stable=True)
    srows = rids[order]
    offs = torch.searchsorted(srows, torch.arange(R + 1, device=rids.device))
    return order, srows, offs


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# --- what each launch costs: grids and traffic formulas beside the launchers -------------
#
# Each launcher below has a formula for its launch: the grid, the bytes its masked loads and
# stores request per tensor argument (a re-read counts again), the distinct bytes they touch,
# and the FLOPs of its tl.dot calls at the tile's shape. tests/test_triton_traffic.py checks
# every formula against the interpreter's count of the same launch; benchmarks/cost.py
# evaluates them at full size. Inside ``record_launches()`` the launchers record their
# formula instead of launching (the cost harness prices a GPU run from a CPU).


@dataclass
class Traffic:
    kernel: str
    grid: tuple
    requested: Dict[str, int]  # bytes per kernel argument, every request counted
    distinct: Dict[str, int]  # bytes per kernel argument, each address once
    flops: int
    variant: dict = field(default_factory=dict)  # the constexprs and dtypes the launch compiles with


_recorder: Optional[List[Traffic]] = None


@contextlib.contextmanager
def record_launches():
    """Launchers record their :class:`Traffic` (at the GPU tile table's sizes) instead of launching."""
    global _recorder
    prev, _recorder = _recorder, []
    try:
        yield _recorder
    finally:
        _recorder = prev


def _record(formula, *args) -> None:
    """Evaluate a launch's formula outside any dispatch mode (its own bookkeeping is not the launch's)."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        _recorder.append(formula(*args))


def _tiles(N: int, interpret: bool) -> bool:
    """Whether the tile sizes are the interpreter's (not while recording for a GPU)."""
    return interpret and _recorder is None


def _tile_runs(srows: Tensor, N: int, BN: int) -> List[List[int]]:
    """Per tile of ``BN`` sorted tokens, the token count of each routing-row segment it walks."""
    rows = srows[:N].tolist()
    runs = []
    for t0 in range(0, N, BN):
        chunk, counts = rows[t0:t0 + BN], []
        for i, row in enumerate(chunk):
            if i and row == chunk[i - 1]:
                counts[-1] += 1
            else:
                counts.append(1)
        runs.append(counts)
    return runs


def _skills_used(idx: Tensor, rows: Tensor) -> int:
    """Distinct (head, skill) pairs the given routing rows select."""
    if rows.numel() == 0:
        return 0
    sel = idx[rows.long()]  # (rows, h, K)
    return sum(int(torch.unique(sel[:, q]).numel()) for q in range(idx.shape[1]))


def _blocks_of(width: int, block: int) -> List[int]:
    return [min(block, width - w0) for w0 in range(0, width, block)]


def _shrink(X, M, idx, w, order, srows, mode, K, out, v=None):
    """MODE 0 -> out (N, r); 1 -> out (N, K, r); 2 -> out (N, h, K). ``M`` viewed as (h, m, dh, r)."""
    N = X.shape[0]
    h, m, dh, r = M.shape
    if N == 0:
        return out
    b = _blocks(N, dh, r, _tiles(N, _interpret()), X.device)
    so = out.stride()
    if mode == 0:
        so = (so[0], 0, so[1])
    v_ = v if v is not None else out
    sv = (v.stride(0), v.stride(1)) if v is not None else (0, 0)
    grid = (triton_cdiv(N, b["BLOCK_N"]),)
    if _recorder is not None:
        _record(shrink_traffic, X, M, idx, w, srows, mode, K, out, v, b, grid)
        return out
    _k()._shrink_kernel[grid](
        X, M, idx, w, order, srows, out, v_, N, dh, r, K,
        X.stride(0), X.stride(1), *M.stride(), *idx.stride(), *so, *sv,
        H=h, MODE=mode, PREC=_prec(X.dtype), BLOCK_N=b["BLOCK_N"], BLOCK_D=b["BLOCK_D"], BLOCK_R=b["BLOCK_R"],
        num_warps=b["num_warps"], num_stages=b["num_stages"])
    return out


def shrink_traffic(X, M, idx, w, srows, mode, K, out, v, b, grid) -> Traffic:
    N = X.shape[0]
    h, m, dh, r = M.shape
    BN, BD, BR = b["BLOCK_N"], b["BLOCK_D"], b["BLOCK_R"]
    ex, em, ew = X.element_size(), M.element_size(), w.element_size()
    req = dict.fromkeys(("X", "M", "IDX", "WGT", "ORDER", "SROWS", "OUT", "V"), 0)
    flops, dblocks = 0, _blocks_of(dh, BD)
    for segs in _tile_runs(srows, N, BN):
        nv = sum(segs)
        req["ORDER"] += 8 * nv
        req["SROWS"] += 8 * nv
        if mode == 2:
            req["V"] += 4 * nv * r
        for n in segs:
            # mode 0 reads the segment's x once per head and mixes the K skills' rows of M; modes 1
            # and 2 read x again for every slot
            req["X"] += h * (1 if mode == 0 else K) * n * dh * ex
            req["M"] += h * K * dh * r * em
            req["IDX"] += 8 * h * K * (len(dblocks) if mode == 0 else 1)
            if mode == 0:
                req["WGT"] += ew * h * K * len(dblocks)
            flops += 2 * BN * BD * BR * h * len(dblocks) * (1 if mode == 0 else K)
            if mode == 1:
                req["OUT"] += 4 * n * K * r
            elif mode == 2:
                req["OUT"] += 4 * n * h * K
        if mode == 0:
            req["OUT"] += 4 * nv * r
    present = torch.unique(srows[:N])
    dist = {"X": N * h * dh * ex, "M": _skills_used(idx, present) * dh * r * em,
            "IDX": 8 * present.numel() * h * K, "WGT": ew * present.numel() * h * K if mode == 0 else 0,
            "ORDER": 8 * N, "SROWS": 8 * N, "OUT": 4 * N * (r, K * r, h * K)[mode], "V": 4 * N * r if mode == 2 else 0}
    variant = dict(H=h, MODE=mode, PREC=_prec(X.dtype), BLOCK_N=BN, BLOCK_D=BD, BLOCK_R=BR, dtype=str(X.dtype),
                   num_warps=b["num_warps"], num_stages=b["num_stages"])
    return Traffic("_shrink_kernel", grid, req, dist, flops, variant)


def _expand(U, M, idx, w, order, srows, K, scale, mix, y, base=None):
    """``y = base + scale * expand(U)``; ``M`` viewed as (h, m, r, oh)."""
    N = U.shape[0]
    h, m, r, oh = M.shape
    if N == 0:
        return y
    b = _blocks(N, oh, r, _tiles(N, _interpret()), U.device)
    su = (U.stride(0), 0, U.stride(1)) if mix else U.stride()
    sb = (base.stride(0), base.stride(1)) if base is not None else (0, 0)
    grid = (triton_cdiv(N, b["BLOCK_N"]), h, triton_cdiv(oh, b["BLOCK_O"]))
    if _recorder is not None:
        _record(expand_traffic, U, M, idx, w, srows, K, mix, y, base, b, grid)
        return y
    _k()._expand_kernel[grid](
        U, M, idx, w, order, srows, base if base is not None else y, y, N, oh, r, K, float(scale),
        *su, *M.stride(), *idx.stride(), *sb, y.stride(0), y.stride(1),
        MIX=mix, HAS_BASE=base is not None, PREC=_prec(M.dtype),
        BLOCK_N=b["BLOCK_N"], BLOCK_O=b["BLOCK_O"], BLOCK_R=b["BLOCK_R"], num_warps=b["num_warps"],
        num_stages=b["num_stages"])
    return y


def expand_traffic(U, M, idx, w, srows, K, mix, y, base, b, grid) -> Traffic:
    N = U.shape[0]
    h, m, r, oh = M.shape
    BN, BO, BR = b["BLOCK_N"], b["BLOCK_O"], b["BLOCK_R"]
    eu, em, ew, ey = U.element_size(), M.element_size(), w.element_size(), y.element_size()
    req = dict.fromkeys(("U", "M", "IDX", "WGT", "ORDER", "SROWS", "BASE", "Y"), 0)
    flops, oblocks = 0, _blocks_of(oh, BO)
    for segs in _tile_runs(srows, N, BN):
        nv = sum(segs)
        for wo in oblocks:  # programs (tile, q, o-block), all h of them
            req["ORDER"] += 8 * nv * h
            req["SROWS"] += 8 * nv * h
            for n in segs:
                req["IDX"] += 8 * h * K
                req["WGT"] += ew * h * K
                req["M"] += h * K * r * wo * em
                req["U"] += h * n * r * eu * (1 if mix else K)
                flops += 2 * BN * BR * BO * h * (1 if mix else K)
            if base is not None:
                req["BASE"] += h * nv * wo * base.element_size()
            req["Y"] += h * nv * wo * ey
    present = torch.unique(srows[:N])
    dist = {"U": N * r * eu * (1 if mix else K), "M": _skills_used(idx, present) * r * oh * em,
            "IDX": 8 * present.numel() * h * K, "WGT": ew * present.numel() * h * K, "ORDER": 8 * N,
            "SROWS": 8 * N, "BASE": N * h * oh * base.element_size() if base is not None else 0, "Y": N * h * oh * ey}
    variant = dict(MIX=mix, HAS_BASE=base is not None, PREC=_prec(M.dtype), BLOCK_N=BN, BLOCK_O=BO, BLOCK_R=BR,
                   dtype=str(M.dtype), num_warps=b["num_warps"], num_stages=b["num_stages"])
    return Traffic("_expand_kernel", grid, req, dist, flops, variant)


def _weight_grad(wide, V, idx, w, route_ids, out, width, scale, shared_v, transposed):
    """out[q, s] = scale * Σ_n wide_q[n]ᵀ ⊗ coef·V[n]; ``transposed``: out is (h, m, r, width)."""
    N = wide.shape[0]
    h, m = out.shape[:2]
    r = V.shape[-1]
    K = idx.shape[-1]
    if N == 0:
        return out.zero_()
    b = _blocks(N, width, r, _tiles(N, _interpret()), wide.device)
    so_q, so_s = out.stride(0), out.stride(1)
    so_w, so_r = (out.stride(3), out.stride(2)) if transposed else (out.stride(2), out.stride(3))
    sv = (V.stride(0), 0, V.stride(1)) if shared_v else V.stride()
    grid = (h * m, triton_cdiv(width, b["BLOCK_W"]))
    if _recorder is not None:
        _record(weight_grad_traffic, wide, V, idx, w, route_ids, out, width, shared_v, b, grid)
        return out
    _k()._weight_grad_kernel[grid](
        wide, V, idx, w, route_ids, out, N, width, r, K, m, float(scale),
        wide.stride(0), wide.stride(1), *sv, *idx.stride(), so_q, so_s, so_w, so_r,
        SHARED_V=shared_v, PREC=_prec(wide.dtype), BLOCK_N=b["BLOCK_N"], BLOCK_W=b["BLOCK_W"],
        BLOCK_R=b["BLOCK_R"], num_warps=b["num_warps"], num_stages=b["num_stages"])
    return out


def weight_grad_traffic(wide, V, idx, w, route_ids, out, width, shared_v, b, grid) -> Traffic:
    N = wide.shape[0]
    h, m = out.shape[:2]
    r = V.shape[-1]
    K = idx.shape[-1]
    BN, BW, BR = b["BLOCK_N"], b["BLOCK_W"], b["BLOCK_R"]
    programs, wblocks = h * m, _blocks_of(width, BW)
    nblocks = [min(BN, N - n0) for n0 in range(0, N, BN)]
    ew = wide.element_size()
    vk = 1 if shared_v else K  # rank vectors read per token: one shared, or one per slot
    req = {"WIDE": programs * N * width * ew, "VR": programs * len(wblocks) * N * r * 4 * vk,
           "IDX": programs * len(wblocks) * N * K * 8, "WGT": programs * len(wblocks) * N * K * w.element_size(),
           "RIDS": programs * len(wblocks) * N * 8, "OUT": programs * width * r * out.element_size()}
    flops = 2 * BW * BN * BR * programs * len(wblocks) * len(nblocks)
    present = torch.unique(route_ids)
    dist = {"WIDE": N * h * width * ew, "VR": N * r * 4 * vk, "IDX": 8 * present.numel() * h * K,
            "WGT": w.element_size() * present.numel() * h * K, "RIDS": 8 * N,
            "OUT": programs * width * r * out.element_size()}
    variant = dict(SHARED_V=shared_v, PREC=_prec(wide.dtype), BLOCK_N=BN, BLOCK_W=BW, BLOCK_R=BR,
                   dtype=str(wide.dtype), num_warps=b["num_warps"], num_stages=b["num_stages"])
    return Traffic("_weight_grad_kernel", grid, req, dist, flops, variant)


def _segment_sum(P, order, offs, R):
    """Per-row sums of per-token rows of ``P (N, C)`` -> ``(R, C)`` float32, deterministic."""
    C = P.shape[1]
    out = torch.zeros(R, C, dtype=torch.float32, device=P.device)
    if R == 0 or P.shape[0] == 0:
        return out
    BT = 16 if _tiles(P.shape[0], _interpret()) else 64
    if _recorder is not None:
        _record(segment_sum_traffic, P, offs, R, BT)
        return out
    _k()._segment_sum_kernel[(R,)](P, order, offs, out, C, P.stride(0), out.stride(0),
                                   BLOCK_T=BT, BLOCK_C=_pow2(C, 2))
    return out


def segment_sum_traffic(P, offs, R, BT) -> Traffic:
    C = P.shape[1]
    counts = (offs[1:R + 1] - offs[:R]).tolist()
    n = sum(counts)
    req = {"P": 4 * n * C, "ORDER": 8 * n, "OFFS": 16 * R, "OUT": 4 * R * C}
    dist = {"P": 4 * n * C, "ORDER": 8 * n, "OFFS": 8 * (R + 1), "OUT": 4 * R * C}
    variant = dict(BLOCK_T=BT, BLOCK_C=_pow2(C, 2), dtype=str(P.dtype), num_warps=4, num_stages=3)
    return Traffic("_segment_sum_kernel", (R,), req, dist, 0, variant)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# --- the two ops ------------------------------------------------------------------


def forward_impl(x, A, B, idx, w, route_ids, base, scale: float, combine: str, meta) -> Tuple[Tensor, Tensor]:
    """The forward op's body; ``meta`` is ``(order, srows, offs)`` as :func:`_routing_meta` gives."""
    N = x.shape[0]
    h, m, dh, r = A.shape
    o = h * B.shape[-1]
    R, _, K = idx.shape
    order, srows, _ = meta
    idx_c, w_c = idx.contiguous(), w.contiguous()
    y = torch.empty(N, o, dtype=x.dtype, device=x.device)
    if combine == "params":
        saved = _shrink(x, A, idx_c, w_c, order, srows, 0, K, torch.empty(N, r, dtype=torch.float32, device=x.device))
        _expand(saved, B, idx_c, w_c, order, srows, K, scale, True, y, base)
    else:
        saved = _shrink(x, A, idx_c, w_c, order, srows, 1, K,
                        torch.empty(N, K, r, dtype=torch.float32, device=x.device))
        _expand(saved, B, idx_c, w_c, order, srows, K, scale, False, y, base)
    if N == 0 and base is not None:
        y = base.clone()
    return y, saved


@torch.library.custom_op("routedlora::triton_forward", mutates_args=())
def _forward_op(x: Tensor, A: Tensor, B: Tensor, idx: Tensor, w: Tensor, route_ids: Tensor, order: Tensor,
                srows: Tensor, offs: Tensor, base: Optional[Tensor], scale: float,
                combine: str) -> Tuple[Tensor, Tensor]:
    return forward_impl(x, A, B, idx, w, route_ids, base, scale, combine, (order, srows, offs))


@_forward_op.register_fake
def forward_fake(x, A, B, idx, w, route_ids, order, srows, offs, base, scale, combine):
    """Output shapes of the forward (also the cuda backend's): ``y (N, o)``, float32 activation."""
    N, r, K = x.shape[0], A.shape[3], idx.shape[2]
    y = x.new_empty(N, A.shape[0] * B.shape[-1])
    saved = x.new_empty((N, r) if combine == "params" else (N, K, r), dtype=torch.float32)
    return y, saved


def backward_impl(grad, x, A, B, idx, w, route_ids, saved, scale: float, combine: str, meta) -> List[Tensor]:
    """The backward op's body; ``meta`` is ``(order, srows, offs)`` as :func:`_routing_meta` gives."""
    N, d = x.shape
    h, m, dh, r = A.shape
    oh = B.shape[-1]
    R, _, K = idx.shape
    dev = x.device
    order, srows, offs = meta
    idx_c, w_c = idx.contiguous(), w.contiguous()
    Bt = B.transpose(2, 3)  # (h, m, oh, r): pulls gradients into rank space
    At = A.transpose(2, 3)  # (h, m, r, dh): rank space back to x
    dx = torch.empty(N, d, dtype=x.dtype, device=dev)
    dA = torch.empty_like(A)
    dB = torch.empty_like(B)
    if combine == "params":
        u = saved
        du = _shrink(grad, Bt, idx_c, w_c, order, srows, 0, K, torch.empty(N, r, dtype=torch.float32, device=dev))
        du.mul_(scale)
        us = u * scale
        _expand(du, At, idx_c, w_c, order, srows, K, 1.0, True, dx)
        _weight_grad(x, du, idx_c, w_c, route_ids, dA, dh, 1.0, True, False)
        _weight_grad(grad, us, idx_c, w_c, route_ids, dB, oh, 1.0, True, True)
        p_a = _shrink(x, A, idx_c, w_c, order, srows, 2, K, torch.empty(N, h, K, dtype=torch.float32, device=dev),
                      v=du)
        p_b = _shrink(grad, Bt, idx_c, w_c, order, srows, 2, K,
                      torch.empty(N, h, K, dtype=torch.float32, device=dev), v=us)
        per_token = (p_a + p_b).view(N, h * K)
    else:
        z = saved
        G = _shrink(grad, Bt, idx_c, w_c, order, srows, 1, K, torch.empty(N, K, r, dtype=torch.float32, device=dev))
        G.mul_(scale)
        _expand(G, At, idx_c, w_c, order, srows, K, 1.0, False, dx)
        _weight_grad(x, G, idx_c, w_c, route_ids, dA, dh, 1.0, False, False)
        _weight_grad(grad, z, idx_c, w_c, route_ids, dB, oh, scale, False, True)
        per_token = (G * z).sum(-1)  # (N, K): <g B_jᵀ, x A_j> * scale
    dw = _segment_sum(per_token, order, offs, R).view(R, h, K).to(w.dtype)
    if N == 0:
        dA.zero_()
        dB.zero_()
    return [dx, dA, dB, dw]


@torch.library.custom_op("routedlora::triton_backward", mutates_args=())
def _backward_op(grad: Tensor, x: Tensor, A: Tensor, B: Tensor, idx: Tensor, w: Tensor, route_ids: Tensor,
                 order: Tensor, srows: Tensor, offs: Tensor, saved: Tensor, scale: float, combine: str) -> List[Tensor]:
    return backward_impl(grad, x, A, B, idx, w, route_ids, saved, scale, combine, (order, srows, offs))


@_backward_op.register_fake
def backward_fake(grad, x, A, B, idx, w, route_ids, order, srows, offs, saved, scale, combine):
    return [torch.empty_like(x), torch.empty_like(A), torch.empty_like(B), torch.empty_like(w)]


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# what RoutedLoraFunction hands the kernels: every token's row and the tokens grouped by row
NEEDS_ROUTE_IDS = True
NEEDS_GROUPING = True


def plan(x, A, B, idx, rows, combine, backward=True):
    """One algorithm: the fused kernels walk the tokens grouped by routing row."""
    return _this_module


def grouping(rows):
    return rows.grouping()


def forward(x, A, B, idx, w, rows, scale, combine, base=None, inplace=False):
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x: backend='triton' takes float16, bfloat16 or float32, got {x.dtype}")
    meta = (sparse_index(idx, w), w, rows.route_ids, *rows.grouping())
    y, saved = _forward_op(x.contiguous(), A, B, *meta, base, float(scale), combine)
    return y, (saved,)


def backward(grad, x, A, B, idx, w, rows, scale, combine, saved, needs, dx=None):
    dx_base = dx
    meta = (sparse_index(idx, w), w, rows.route_ids, *rows.grouping())
    dx, dA, dB, dw = _backward_op(grad, x.contiguous(), A, B, *meta, saved[0], float(scale), combine)
    if dx_base is not None:
        dx = dx_base.add_(dx)
    need_x, need_A, need_B, need_w = needs
    return (dx if need_x else None, dA if need_A else None, dB if need_B else None, dw if need_w else None)


# --- routers in a kernel ------------------------------------------------------------

_router_kernels = None
ROUTER_KINDS = {"poly": 0, "softmax": 1, "topk": 2}


def _rk():
    global _router_kernels
    if _router_kernels is None:
        from routedlora.triton_kernels import routing

        _router_kernels = routing
    return _router_kernels


def _router_args(logits, rows_task, row_example, seed, kind, k, temperature, renormalize, ex_offset):
    T, h, m = logits.shape
    R = rows_task.shape[0]
    K = m if kind in ("poly", "softmax") else k
    eps = torch.finfo(torch.float32).eps
    tiny = torch.finfo(torch.float32).tiny
    seed_t = seed if seed is not None else torch.zeros(1, dtype=torch.int64, device=logits.device)
    consts = dict(KIND=ROUTER_KINDS[kind], NOISE=seed is not None, RENORM=bool(renormalize), BLOCK_M=_pow2(m, 2))
    return R, h, m, K, seed_t, (h, m, K, int(ex_offset), 1.0 / float(temperature), eps, tiny), consts


@torch.library.custom_op("routedlora::triton_route", mutates_args=())
def _route_op(logits: Tensor, rows_task: Tensor, row_example: Tensor, seed: Optional[Tensor], kind: str, k: int,
              temperature: float, renormalize: bool, ex_offset: int) -> Tuple[Tensor, Tensor]:
    R, h, m, K, seed_t, scalars, consts = _router_args(logits, rows_task, row_example, seed, kind, k, temperature,
                                                       renormalize, ex_offset)
    idx = torch.empty(R, h, K, dtype=torch.int64, device=logits.device)
    w = torch.empty(R, h, K, dtype=torch.float32, device=logits.device)
    if R and _recorder is not None:
        _record(router_traffic, logits, rows_task, kind, K, seed is not None, renormalize, False)
    elif R:
        _rk()._router_forward_kernel[(R, h)](logits, rows_task, row_example, seed_t, idx, w, *scalars,
                                             *logits.stride(), *w.stride(), **consts)
    return idx, w


def router_traffic(logits, rows_task, kind, K, noise, renormalize, backward) -> Traffic:
    """One program per (routing row, head): the row's logits in, its K (index, weight) slots out;
    in backward the slots' gradients in and the logits' gradient row out."""
    T, h, m = logits.shape
    R = rows_task.shape[0]
    el, P = logits.element_size(), R * h
    req = {"ROWS_TASK": 8 * P, "LOGITS": el * m * P}
    dist = {"ROWS_TASK": 8 * R, "LOGITS": el * int(torch.unique(rows_task).numel()) * h * m}
    if kind == "poly":
        req["ROW_EX"], dist["ROW_EX"] = 8 * P, 8 * R
        if noise:
            req["SEED"], dist["SEED"] = 8 * P, 8
    if not backward:
        req.update(W=4 * K * P, IDX=8 * K * P)
        dist.update(W=4 * K * P, IDX=8 * K * P)
    else:
        slot_reads = 0 if kind != "topk" else (3 if renormalize else 2)  # the kept indices, re-read per loop
        req.update(DW=4 * K * P, IDX=8 * K * P * slot_reads, DZ=4 * m * P)
        dist.update(DW=4 * K * P, IDX=8 * K * P if slot_reads else 0, DZ=4 * m * P)
    name = "_router_backward_kernel" if backward else "_router_forward_kernel"
    variant = dict(KIND=ROUTER_KINDS[kind], NOISE=noise, RENORM=bool(renormalize), BLOCK_M=_pow2(m, 2),
                   dtype=str(logits.dtype), num_warps=4, num_stages=3)
    return Traffic(name, (R, h), req, dist, 0, variant)


@_route_op.register_fake
def _(logits, rows_task, row_example, seed, kind, k, temperature, renormalize, ex_offset):
    R, (_, h, m) = rows_task.shape[0], logits.shape
    K = m if kind in ("poly", "softmax") else k
    return (logits.new_empty(R, h, K, dtype=torch.int64), logits.new_empty(R, h, K, dtype=torch.float32))


@torch.library.custom_op("routedlora::triton_route_backward", mutates_args=())
def _route_backward_op(dw: Tensor, logits: Tensor, rows_task: Tensor, row_example: Tensor, seed: Optional[Tensor],
                       idx: Tensor, kind: str, k: int, temperature: float, renormalize: bool,
                       ex_offset: int) -> Tensor:
    R, h, m, K, seed_t, scalars, consts = _router_args(logits, rows_task, row_example, seed, kind, k, temperature,
                                                       renormalize, ex_offset)
    T = logits.shape[0]
    dz = torch.zeros(R, h, m, dtype=torch.float32, device=logits.device)
    if R and _recorder is not None:
        _record(router_traffic, logits, rows_task, kind, K, seed is not None, renormalize, True)
    elif R:
        dw_c = dw.contiguous().float()
        _rk()._router_backward_kernel[(R, h)](logits, rows_task, row_example, seed_t, idx, dw_c, dw_c, dz, *scalars,
                                              *logits.stride(), *dw_c.stride(), dz.stride(0), dz.stride(1), **consts)
    # rows of one task add up, summed per task in a fixed order (no atomics)
    order, _, offs = _routing_meta(rows_task, T)
    return _segment_sum(dz.view(R, h * m), order, offs, T).view(T, h, m).to(logits.dtype)


@_route_backward_op.register_fake
def _(dw, logits, rows_task, row_example, seed, idx, kind, k, temperature, renormalize, ex_offset):
    return torch.empty_like(logits)


class TritonRouterFunction(torch.autograd.Function):
    """Routing rows from the logits table in one kernel; logit gradients per task in another."""

    @staticmethod
    def forward(ctx, logits, rows_task, row_example, seed, kind, k, temperature, renormalize, ex_offset):
        idx, w = _route_op(logits, rows_task, row_example, seed, kind, k, temperature, renormalize, ex_offset)
        ctx.save_for_backward(logits, rows_task, row_example, seed, idx)
        ctx.args = (kind, k, temperature, renormalize, ex_offset)
        ctx.mark_non_differentiable(idx)
        return idx, w

    @staticmethod
    def backward(ctx, _didx, dw):
        logits, rows_task, row_example, seed, idx = ctx.saved_tensors
        dlogits = _route_backward_op(dw, logits, rows_task, row_example, seed, idx, *ctx.args)
        return dlogits, None, None, None, None, None, None, None, None


def route(logits: Tensor, rows_task: Tensor, row_example: Tensor, *, kind: str, seed: Optional[Tensor] = None,
          k: int = 1, temperature: float = 1.0, renormalize: bool = True, ex_offset: int = 0):
    """``(idx, w)`` rows of ``logits[rows_task]`` under router ``kind``, computed in a Triton kernel.

    ``seed`` (a one-element int64 device tensor) switches on Gumbel-sigmoid noise for
    ``poly``: the uniform draw of example ``row_example[r] + ex_offset``, head q, skill s
    is Philox(seed, (example * h + q) * m + s), regenerated in backward, never stored.
    """
    if kind not in ROUTER_KINDS:
        raise ValueError(f"kind: the in-kernel routers are {tuple(ROUTER_KINDS)}, got {kind!r}")
    return TritonRouterFunction.apply(logits, rows_task.long(), row_example.long(), seed, kind, int(k),
                                      float(temperature), bool(renormalize), int(ex_offset))


@torch.library.custom_op("routedlora::triton_uniform", mutates_args=())
def uniform_draws(seed: Tensor, examples: int, heads: int, skills: int) -> Tensor:
    """The clamped uniforms :func:`route` draws for ``poly`` noise, ``(examples, heads, skills)`` (for tests)."""
    out = torch.empty(examples, heads, skills, dtype=torch.float32, device=seed.device)
    if examples:
        _rk()._uniform_kernel[(examples, heads)](seed, out, heads, skills, torch.finfo(torch.float32).eps,
                                                 BLOCK_M=_pow2(skills, 2))
    return out
