"""The ``triton`` backend: launchers for :mod:`routedlora.triton_kernels.routed_lora`.

Same contract as :mod:`routedlora.ops.torch_backend`. Forward and backward are each
registered as one ``torch.library`` custom op (``routedlora::triton_forward`` and
``routedlora::triton_backward``) with fake implementations, so ``torch.compile`` and
CUDA graphs see single opaque ops.

Routing metadata is built on the device with no host sync, once per batch (``TokenRows``):
a stable sort of ``route_ids`` (tokens grouped by routing row) and per-row offsets. The
skills' and routing gradients go by rows (per-row reductions, then the mixing) or by tokens
(every skill of a head in one product), priced per call by :func:`backward_algorithm`.
Every reduction has a fixed order (split partials summed in order): no atomics.

Routers: :func:`route` computes ``poly`` (Gumbel noise from a seed), ``softmax`` and
``topk`` rows in one kernel, with the logit gradients summed per task in another.

Tiles: :func:`tile_table` reads ``triton_kernels/configs/<gpu>.json`` (written by
``benchmarks/tune_triton.py``) or ``default.json``, one configuration per shape class.

Memory: forward keeps a float32 rank-space activation, ``N*r`` (``params``) or
``N*K*r`` (``outputs``) numbers. Backward adds one such buffer (and split-K partials
where the grid is split); by rows, the float32 reductions ``R*(d+o)*r'`` (chosen only
where they cost less than re-reading ``x`` and the gradient); by tokens, ``N*h*K``
routing-gradient partials. Nothing ``d x r`` is stored per token.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .rank_space import sparse_index
from .tile_order import H100_L2_BYTES, H100_SMS, TileOrder, best_group

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


_INTERPRETER_TILES = dict(BLOCK_N=16, BLOCK_D=16, BLOCK_O=16, BLOCK_W=16, BLOCK_K=16, num_warps=1, num_stages=1)
_DEFAULT_BLOCK_K = 64  # the base GEMM's step along its inner dimension, where a table does not give one
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
    cfg.setdefault("BLOCK_K", _DEFAULT_BLOCK_K)
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
    # the program order of a (token tile, column) grid and the arguments it streams: their HBM bytes
    # follow its wave rule (tile_order.py), not the distinct-or-every-request rule of the others
    order: Optional[TileOrder] = None


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


_FILL_PROGRAMS = H100_SMS  # one program per SM of an H100: a smaller grid is split (tokens, or d) to fill it
# partials of a full token tile the expand sums: beyond this the sum costs more than the fill gains;
# a tile of fewer tokens may have proportionally more (the same bytes summed per program)
_MAX_SPLITS = 32


def _narrow_to_fill(b: dict, key: str, floor: int, programs) -> None:
    """Halve the block ``b[key]`` (not below ``floor``) while the grid, ``programs(block)``
    programs, is too small to fill the GPU."""
    while programs(b[key]) < _FILL_PROGRAMS and b[key] > floor:
        b[key] //= 2


def _split_k(N: int, h: int, dh: int, b: dict) -> Tuple[int, int]:
    """``(splits, steps per split)`` of the shrink's (head, column block) walk: a grid of too few
    token tiles to fill the GPU is split along ``d`` (narrower column blocks first, down to 64: the
    bf16 variant at 32 spills registers on sm_90), into at most ``_MAX_SPLITS`` partials per full
    tile of tokens (``16×`` that for one token in a 16-token tile: the expand then sums the same
    bytes per program)."""
    tiles = triton_cdiv(N, b["BLOCK_N"])
    _narrow_to_fill(b, "BLOCK_D", 64, lambda bd: tiles * h * triton_cdiv(dh, bd))
    total = h * triton_cdiv(dh, b["BLOCK_D"])
    most = _MAX_SPLITS * b["BLOCK_N"] // max(1, min(N, b["BLOCK_N"]))
    steps = triton_cdiv(total, min(total, most, triton_cdiv(_FILL_PROGRAMS, tiles)))
    return triton_cdiv(total, steps), steps


def _shrink(X, M, idx, w, order, srows, mode, K, out, v=None, scale=1.0):
    """MODE 0 -> out (N, r); 1 -> out (N, K, r); 2 -> out (N, h, K). ``M`` viewed as (h, m, dh, r).
    Stores ``scale`` times the product and returns its split-K partials ``(S, *out.shape)`` (``out``
    itself as ``S = 1`` when the grid fills the GPU unsplit): :func:`_expand` or
    :func:`_segment_sum` sums them, or :func:`_summed`."""
    N = X.shape[0]
    h, m, dh, r = M.shape
    if N == 0:
        return out.unsqueeze(0)
    b = _blocks(N, dh, r, _tiles(N, _interpret()), X.device)
    b["BLOCK_M"] = _skill_block(m, r, b) if mode == 2 else 1
    splits, steps = _split_k(N, h if mode != 2 else 1, dh, b)  # MODE 2 splits each head's columns
    parts = out.unsqueeze(0) if splits == 1 else torch.empty((splits,) + tuple(out.shape), dtype=out.dtype,
                                                              device=out.device)
    so = parts.stride()[1:]
    if mode == 0:
        so = (so[0], 0, so[1])
    so_p = parts.stride(0)
    v_ = v if v is not None else out
    sv = (v.stride(0), v.stride(1)) if v is not None else (0, 0)
    grid = (triton_cdiv(N, b["BLOCK_N"]), splits)
    if _recorder is not None:
        _record(shrink_traffic, X, M, idx, w, srows, mode, K, parts, v, b, grid)
        return parts
    _k()._shrink_kernel[grid](
        X, M, idx, w, order, srows, parts, v_, N, idx.shape[0], dh, r, K, m, steps, float(scale),
        X.stride(0), X.stride(1), *M.stride(), *idx.stride(), so_p, *so, *sv,
        H=h, MODE=mode, PREC=_prec(X.dtype), BLOCK_N=b["BLOCK_N"], BLOCK_D=b["BLOCK_D"], BLOCK_R=b["BLOCK_R"],
        BLOCK_M=b["BLOCK_M"], num_warps=b["num_warps"], num_stages=b["num_stages"])
    return parts


def _summed(parts: Tensor, out: Tensor) -> Tensor:
    """The shrink's result from its partials, where no expand summed them into ``out``."""
    if parts.shape[0] > 1:
        torch.sum(parts, 0, out=out)
    return out


def shrink_traffic(X, M, idx, w, srows, mode, K, out, v, b, grid) -> Traffic:
    N = X.shape[0]
    h, m, dh, r = M.shape
    if mode == 2:
        return _all_skills_traffic(X, M, idx, srows, K, b, grid)
    BN, BD, BR = b["BLOCK_N"], b["BLOCK_D"], b["BLOCK_R"]
    ex, em, ew = X.element_size(), M.element_size(), w.element_size()
    S = grid[1]  # split-K partials: each program walks all of its tile's segments over its steps
    req = dict.fromkeys(("X", "M", "IDX", "WGT", "ORDER", "SROWS", "OUT", "V"), 0)
    flops, dblocks = 0, _blocks_of(dh, BD)
    for segs in _tile_runs(srows, N, BN):
        nv = sum(segs)
        req["ORDER"] += 8 * nv * S
        req["SROWS"] += 8 * nv * S
        for n in segs:
            # mode 0 reads the segment's x once per head and mixes the K skills' rows of M; mode 1
            # reads it again for every slot
            req["X"] += h * (1 if mode == 0 else K) * n * dh * ex
            req["M"] += h * K * dh * r * em
            req["IDX"] += 8 * K * (h * len(dblocks) if mode == 0 else S)
            if mode == 0:
                req["WGT"] += ew * h * K * len(dblocks)
            flops += 2 * BN * BD * BR * h * len(dblocks) * (1 if mode == 0 else K)
            if mode == 1:
                req["OUT"] += 4 * n * K * r * S
        if mode == 0:
            req["OUT"] += 4 * nv * r * S
    present = torch.unique(srows[:N])
    dist = {"X": N * h * dh * ex, "M": _skills_used(idx, present) * dh * r * em,
            "IDX": 8 * present.numel() * h * K, "WGT": ew * present.numel() * h * K if mode == 0 else 0,
            "ORDER": 8 * N, "SROWS": 8 * N, "OUT": 4 * N * (r, K * r)[mode] * S, "V": 0}
    variant = dict(H=h, MODE=mode, PREC=_prec(X.dtype), BLOCK_N=BN, BLOCK_D=BD, BLOCK_R=BR, BLOCK_M=1,
                   dtype=str(X.dtype), num_warps=b["num_warps"], num_stages=b["num_stages"])
    return Traffic("_shrink_kernel", grid, req, dist, flops, variant)


def _all_skills_traffic(X, M, idx, srows, K, b, grid) -> Traffic:
    """MODE 2: per tile, head and split, x once per skill block against every skill's columns; no
    segments; every split writes its partial."""
    N = X.shape[0]
    h, m, dh, r = M.shape
    BN, BD, BR, BM = b["BLOCK_N"], b["BLOCK_D"], b["BLOCK_R"], b["BLOCK_M"]
    ex, em = X.element_size(), M.element_size()
    tiles, S = grid
    sblocks = triton_cdiv(m, BM)
    req = {"X": h * sblocks * N * dh * ex, "M": tiles * h * m * dh * r * em, "IDX": 8 * h * sblocks * K * N * S,
           "ORDER": 8 * N * S, "SROWS": 8 * N * S, "V": 4 * N * r * S, "OUT": 4 * N * h * K * S}
    flops = 2 * BN * BD * BM * BR * tiles * h * sblocks * triton_cdiv(dh, BD)
    present = torch.unique(srows[:N])
    dist = {"X": N * h * dh * ex, "M": h * m * dh * r * em, "IDX": 8 * present.numel() * h * K, "ORDER": 8 * N,
            "SROWS": 8 * N, "V": 4 * N * r, "OUT": 4 * N * h * K * S}
    variant = dict(H=h, MODE=2, PREC=_prec(X.dtype), BLOCK_N=BN, BLOCK_D=BD, BLOCK_R=BR, BLOCK_M=BM,
                   dtype=str(X.dtype), num_warps=b["num_warps"], num_stages=b["num_stages"])
    return Traffic("_shrink_kernel", grid, req, dist, flops, variant)


def _expand_grid(N: int, h: int, oh: int, b: dict) -> tuple:
    """Programs (token tile, head, column block); column blocks narrow (down to 16) until the grid
    fills the GPU, so a decode-sized batch still streams the base weight from every SM."""
    tiles = triton_cdiv(N, b["BLOCK_N"])
    _narrow_to_fill(b, "BLOCK_O", 16, lambda bo: tiles * h * triton_cdiv(oh, bo))
    return (tiles * h * triton_cdiv(oh, b["BLOCK_O"]),)


def _gpu_cache(device) -> Tuple[int, int]:
    """(L2 bytes, SMs) of ``device``; an H100's off a GPU (the interpreter, the cost harness)."""
    if device is not None and torch.device(device).type == "cuda" and _recorder is None:
        return _cuda_cache(torch.device(device).index or 0)
    return H100_L2_BYTES, H100_SMS


@functools.lru_cache(maxsize=None)
def _cuda_cache(index: int) -> Tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    return getattr(props, "L2_cache_size", 0) or H100_L2_BYTES, props.multi_processor_count


def _expand_order(N: int, h: int, oh: int, b: dict, linear, group: int) -> Optional[TileOrder]:
    """The fused expand's program order with the x tiles and base-weight panels it streams."""
    if linear is None:
        return None
    X, WT, _ = linear
    BN, din = b["BLOCK_N"], X.shape[1]
    tiles = tuple(min(BN, N - t0) * din * X.element_size() for t0 in range(0, N, BN))
    cols = _weight_panels(din, WT.element_size(), h, oh, b["BLOCK_O"])
    return TileOrder(len(tiles), len(cols), group, {"X": tiles}, {"WT": cols})


def _weight_panels(din: int, ew: int, h: int, oh: int, BO: int) -> Tuple[int, ...]:
    """Bytes of the base weight's panel under each (head, column block) of the expand, in grid order."""
    return tuple(din * wo * ew for _ in range(h) for wo in _blocks_of(oh, BO))


def _expand_group(N: int, h: int, oh: int, skill_bytes: int, b: dict, linear, device) -> int:
    """Token tiles per group of the fused expand's program order: the one reading the least from
    HBM on this GPU's L2 (``tile_order.best_group``), the skills (``skill_bytes``, every program
    re-reads them) resident beside the streamed tiles; 1 without a base linear."""
    if linear is None:
        return 1
    X, WT, _ = linear
    l2, sms = _gpu_cache(device)
    tiles = triton_cdiv(N, b["BLOCK_N"])
    return _best_group(1 << max(tiles - 1, 0).bit_length(), b["BLOCK_N"], X.shape[1], X.element_size(),
                       WT.element_size(), h, oh, b["BLOCK_O"], skill_bytes, l2, sms)


@functools.lru_cache(maxsize=512)
def _best_group(tiles: int, BN: int, din: int, ex: int, ew: int, h: int, oh: int, BO: int, resident: int, l2: int,
                sms: int) -> int:
    # keyed on the token tiles rounded up to a power of two: a batch of a new length costs a
    # dictionary lookup, not a simulation (the best group barely moves within a factor of two)
    return best_group(tiles, (BN * din * ex,) * tiles, _weight_panels(din, ew, h, oh, BO), l2, sms, resident)


def _expand(U, M, idx, w, order, srows, K, scale, mix, y, base=None, linear=None, u_out=None):
    """``y = base + scale * expand(ΣU)``; ``U``: the shrink's partials ``(S, N, r)`` or ``(S, N, K, r)``,
    summed in split order; ``M`` viewed as (h, m, r, oh).

    ``linear = (X, WT, bias)``: instead of a base tensor, the base linear computed in the same
    tiles, ``y = X WT + bias + scale * expand(U)`` with ``WT[k, col]`` (any strides): the delta
    never goes to memory and the output is written once. ``u_out``: where the summed ``U`` is kept
    (written by one program per token tile)."""
    N = U.shape[1]
    h, m, r, oh = M.shape
    if N == 0:
        return y
    b = _blocks(N, oh, r, _tiles(N, _interpret()), U.device)
    grid = _expand_grid(N, h, oh, b)
    b.setdefault("GROUP", _expand_group(N, h, oh, M.numel() * M.element_size(), b, linear, U.device))
    su = (U.stride(1), 0, U.stride(2)) if mix else U.stride()[1:]
    sb = (base.stride(0), base.stride(1)) if base is not None else (0, 0)
    st = (u_out.stride(0), u_out.stride(1) if u_out.dim() == 3 else 0) if u_out is not None else (0, 0)
    if _recorder is not None:
        _record(expand_traffic, U, M, idx, w, srows, K, mix, y, base, linear, b, grid, u_out)
        return y
    X, WT, bias = linear if linear is not None else (y, y, None)
    _k()._expand_kernel[grid](
        U, M, idx, w, order, srows, base if base is not None else y, y, X, WT, bias if bias is not None else y,
        u_out if u_out is not None else y,
        N, idx.shape[0], m, oh, r, K, h, X.shape[1] if linear is not None else 0, U.shape[0], float(scale),
        U.stride(0), *su, *M.stride(), *idx.stride(), *sb, y.stride(0), y.stride(1),
        *((X.stride(0), X.stride(1), WT.stride(0), WT.stride(1)) if linear is not None else (0, 0, 0, 0)), *st,
        b["GROUP"],
        MIX=mix, HAS_BASE=base is not None, LINEAR=linear is not None, HAS_BIAS=bias is not None,
        STORE_U=u_out is not None, PREC=_prec(M.dtype), BLOCK_N=b["BLOCK_N"], BLOCK_O=b["BLOCK_O"],
        BLOCK_R=b["BLOCK_R"], BLOCK_K=b["BLOCK_K"], num_warps=b["num_warps"], num_stages=b["num_stages"])
    return y


def expand_traffic(U, M, idx, w, srows, K, mix, y, base, linear, b, grid, u_out=None) -> Traffic:
    S, N = U.shape[:2]
    h, m, r, oh = M.shape
    BN, BO, BR, BK = b["BLOCK_N"], b["BLOCK_O"], b["BLOCK_R"], b["BLOCK_K"]
    eu, em, ew, ey = U.element_size() * S, M.element_size(), w.element_size(), y.element_size()  # every partial
    req = dict.fromkeys(("U", "M", "IDX", "WGT", "ORDER", "SROWS", "BASE", "Y", "X", "WT", "BIAS", "UOUT"), 0)
    flops, oblocks = 0, _blocks_of(oh, BO)
    X, WT, bias = linear if linear is not None else (None, None, None)
    din = X.shape[1] if X is not None else 0
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
            if X is not None:
                req["X"] += h * nv * din * X.element_size()
                req["WT"] += h * din * wo * WT.element_size()
                flops += 2 * BN * BK * BO * h * triton_cdiv(din, BK)
                if bias is not None:
                    req["BIAS"] += h * wo * bias.element_size()
            req["Y"] += h * nv * wo * ey
    present = torch.unique(srows[:N])
    dist = {"U": N * r * eu * (1 if mix else K), "M": _skills_used(idx, present) * r * oh * em,
            "IDX": 8 * present.numel() * h * K, "WGT": ew * present.numel() * h * K, "ORDER": 8 * N,
            "SROWS": 8 * N, "BASE": N * h * oh * base.element_size() if base is not None else 0, "Y": N * h * oh * ey,
            "X": N * din * X.element_size() if X is not None else 0,
            "WT": din * h * oh * WT.element_size() if X is not None else 0,
            "BIAS": h * oh * bias.element_size() if bias is not None else 0,
            "UOUT": N * r * 4 * (1 if mix else K) if u_out is not None else 0}
    req["UOUT"] = dist["UOUT"]  # one program per token tile writes each token's summed rank vectors
    variant = dict(MIX=mix, HAS_BASE=base is not None, LINEAR=X is not None, HAS_BIAS=bias is not None,
                   STORE_U=u_out is not None, PREC=_prec(M.dtype), BLOCK_N=BN, BLOCK_O=BO, BLOCK_R=BR, BLOCK_K=BK,
                   dtype=str(M.dtype), num_warps=b["num_warps"], num_stages=b["num_stages"])
    order = _expand_order(N, h, oh, b, linear, b.get("GROUP", 1))
    return Traffic("_expand_kernel", grid, req, dist, flops, variant, order=order)


def _row_reduce(x, du, grad, u, order, offs, G, Hh, scale):
    """Per routing row: ``G[ρ] = x_ρᵀ du_ρ`` (``(R, d, r')``) and ``Hh[ρ] = scale · grad_ρᵀ u_ρ``
    (``(R, o, r')``), float32, each a fixed-order sum over the row's tokens. ``G`` or ``Hh`` may be
    None (not wanted): that side is not launched."""
    N, d = x.shape
    o = grad.shape[1]
    R = offs.shape[0] - 1
    rp = (du if du is not None else u).shape[1]
    b = _blocks(N, max(d, o), rp, _tiles(N, _interpret()), x.device)
    nx = triton_cdiv(d, b["BLOCK_W"]) if G is not None else 0
    ng = triton_cdiv(o, b["BLOCK_W"]) if Hh is not None else 0
    grid = (R, nx + ng)
    if R == 0 or nx + ng == 0:
        return
    if _recorder is not None:
        _record(row_reduce_traffic, x, du, grad, u, offs, G, Hh, b, grid)
        return
    Gp, Hp = (G if G is not None else Hh), (Hh if Hh is not None else G)
    dup, up = (du if du is not None else u), (u if u is not None else du)
    _k()._row_reduce_kernel[grid](
        x, dup, grad, up, order, offs, Gp, Hp, d, o, rp, nx, float(scale), x.stride(0), x.stride(1), *dup.stride(),
        grad.stride(0), grad.stride(1), *up.stride(), *Gp.stride(), *Hp.stride(),
        PREC=_prec(x.dtype), BLOCK_N=b["BLOCK_N"], BLOCK_W=b["BLOCK_W"], BLOCK_R=b["BLOCK_R"],
        num_warps=b["num_warps"], num_stages=b["num_stages"])


def row_reduce_traffic(x, du, grad, u, offs, G, Hh, b, grid) -> Traffic:
    N, d = x.shape
    o = grad.shape[1]
    R = offs.shape[0] - 1
    rp = (du if du is not None else u).shape[1]
    BN, BW, BR = b["BLOCK_N"], b["BLOCK_W"], b["BLOCK_R"]
    counts = (offs[1:] - offs[:-1]).tolist()
    req = dict.fromkeys(("X", "DU", "GRAD", "U", "ORDER", "OFFS", "G", "HH"), 0)
    dist = dict.fromkeys(req, 0)
    flops = 0
    sides = []
    if G is not None:
        sides.append(("X", x, "DU", "G", d))
    if Hh is not None:
        sides.append(("GRAD", grad, "U", "HH", o))
    for wide_name, wide, rank_name, out_name, width in sides:
        for wc in _blocks_of(width, BW):
            for n in counts:
                req["ORDER"] += 8 * n
                req["OFFS"] += 16
                req[wide_name] += n * wc * wide.element_size()
                req[rank_name] += n * rp * 4
                req[out_name] += wc * rp * 4
                flops += 2 * BW * BN * BR * triton_cdiv(n, BN)
        dist[wide_name] = N * width * wide.element_size()
        dist[rank_name] = N * rp * 4
        dist[out_name] = R * width * rp * 4
    dist["ORDER"], dist["OFFS"] = 8 * N, 8 * (R + 1)
    variant = dict(PREC=_prec(x.dtype), BLOCK_N=BN, BLOCK_W=BW, BLOCK_R=BR, dtype=str(x.dtype),
                   num_warps=b["num_warps"], num_stages=b["num_stages"])
    return Traffic("_row_reduce_kernel", grid, req, dist, flops, variant)


def _mix_tiles(r: int, m: int, K: int, interpret: bool) -> dict:
    BR = _pow2(r, 1)
    BF = 256 if interpret else 1024  # (column, rank) numbers per program step
    return dict(BLOCK_W=max(1, BF // BR), BLOCK_R=BR, BLOCK_M=_pow2(m, 1), BLOCK_K=_pow2(K, 1), num_warps=4,
                num_stages=1)


def _mix_grads(G, Hh, A, B, idx, w, dA, dB, slots, need_w):
    """From the per-row reductions: ``dA`` (from ``G``), ``dB`` (from ``Hh``) for every skill and,
    with ``need_w``, the routing-weight gradient ``(R, h, K)`` float32 (else None).

    ``params`` (``slots=False``): ``dA_qs = Σ_ρ W_ρqs G_ρq``, ``dB_qs = Σ_ρ W_ρqs H_ρqᵀ`` with
    ``W`` the dense row weights, and ``∂w_ρqj = ⟨A_q,idx, G_ρq⟩ + ⟨B_q,idx, H_ρqᵀ⟩``. ``outputs``
    (``slots=True``, one head, ``r' = K·r``): slot j's columns of ``G``/``Hh`` weighted by
    ``w_ρj`` into skill ``idx_ρj``, and ``∂w_ρj = ⟨B_idx, H_ρjᵀ⟩``. ``dA`` / ``dB`` None: not
    stored (``G`` / ``Hh`` are still read when ``need_w`` wants that side)."""
    h, m, dh, r = A.shape
    oh = B.shape[-1]
    R, _, K = idx.shape
    t = _mix_tiles(r, m, K, _tiles(R, _interpret()))
    BW = t["BLOCK_W"]
    dw_a = need_w and not slots
    run_a = G is not None and (dA is not None or dw_a)
    run_b = Hh is not None and (dB is not None or need_w)
    na = triton_cdiv(dh, BW) if run_a else 0
    nb = triton_cdiv(oh, BW) if run_b else 0
    NB = (na if dw_a else 0) + (nb if need_w else 0)
    dwp = torch.empty(R, h, K, NB, dtype=torch.float32, device=A.device) if need_w else None
    grid = (h, na + nb)
    if na + nb and R:
        if _recorder is not None:
            _record(mix_grads_traffic, G, Hh, A, B, idx, w, dA, dB, dwp, slots, na, nb, t, grid)
        else:
            Gp, Hp = (G if G is not None else Hh), (Hh if Hh is not None else G)
            dAp, dBp = (dA if dA is not None else A), (dB if dB is not None else B)
            _k()._mix_grads_kernel[grid](
                Gp, Hp, A, B, dAp, dBp, idx, w, dwp if dwp is not None else w, R, dh, oh, r, K, m, h, na,
                int(dA is not None), int(dB is not None), NB, *Gp.stride(), *Hp.stride(), *A.stride(), *B.stride(),
                *dAp.stride(), *dBp.stride(), *idx.stride(), SLOTS=slots, DW_A=dw_a, DW_B=need_w, **t)
    if R == 0:
        for grad in (dA, dB):
            if grad is not None:
                grad.zero_()
    return dwp.sum(-1) if need_w else None


def mix_grads_traffic(G, Hh, A, B, idx, w, dA, dB, dwp, slots, na, nb, t, grid) -> Traffic:
    h, m, dh, r = A.shape
    oh = B.shape[-1]
    R, _, K = idx.shape
    BW = t["BLOCK_W"]
    need_w = dwp is not None
    req = dict.fromkeys(("G", "HH", "A", "B", "DA", "DB", "IDX", "WGT", "DWP"), 0)
    dist = dict.fromkeys(req, 0)
    sides = []
    if na:
        sides.append(("G", "A", "DA", A, dA, dh, _blocks_of(dh, BW), need_w and not slots))
    if nb:
        sides.append(("HH", "B", "DB", B, dB, oh, _blocks_of(oh, BW), need_w))
    for p_name, m_name, d_name, M, DM, width, wblocks, dw in sides:
        em = M.element_size()
        for wc in wblocks:
            f = wc * r  # the tile's (column, rank) numbers
            per_row_idx, per_row_w = 8 * K, w.element_size() * K
            req["IDX"] += h * R * per_row_idx
            req["WGT"] += h * R * per_row_w
            req[p_name] += h * R * f * 4 * (K if slots else 1)
            if dw:
                req[m_name] += h * (R * K * f * em if slots else m * f * em)
                req["DWP"] += h * R * K * 4
            if DM is not None:
                req[d_name] += h * m * f * DM.element_size()
        dist[p_name] = R * h * width * r * (K if slots else 1) * 4
        if dw:
            dist[m_name] = (_skills_used(idx, torch.arange(R)) if slots else h * m) * width * r * em
        if DM is not None:
            dist[d_name] = h * m * width * r * DM.element_size()
        dist["IDX"], dist["WGT"] = 8 * R * h * K, w.element_size() * R * h * K
    if need_w:
        dist["DWP"] = dwp.numel() * 4
    variant = dict(SLOTS=slots, DW_A=need_w and not slots, DW_B=need_w, dtype=str(A.dtype), **t)
    return Traffic("_mix_grads_kernel", grid, req, dist, 0, variant)


_SKILL_COLUMNS = 512  # most skill x rank columns one program keeps: its float32 accumulator's width


def _skill_block(m: int, r: int, b: dict) -> int:
    """How many skills one program takes side by side (a power of two; all of them when m·r is small)."""
    return max(1, min(_pow2(m, 1), b.get("SKILL_COLUMNS", _SKILL_COLUMNS) // _pow2(r)))


def _token_chunks(N: int, programs: int, b: dict) -> Tuple[int, int]:
    """``(chunks, tokens per chunk)``: a grid of ``programs`` that streams all ``N`` tokens is split
    along the tokens until it fills the GPU, each chunk at least ``SPLIT_TILES`` token tiles long."""
    BN = b["BLOCK_N"]
    chunks = max(1, min(triton_cdiv(N, BN * b.get("SPLIT_TILES", 4)), triton_cdiv(_FILL_PROGRAMS, programs)))
    chunk = triton_cdiv(triton_cdiv(N, chunks), BN) * BN
    return triton_cdiv(N, chunk), chunk


def _weight_grad(wide, V, idx, w, route_ids, out, width, scale, shared_v, transposed):
    """out[q, s] = scale * Σ_n wide_q[n]ᵀ ⊗ coef·V[n]; ``transposed``: out is (h, m, r, width).
    Token chunks write float32 partials, summed in chunk order (deterministic, no atomics)."""
    N = wide.shape[0]
    h, m = out.shape[:2]
    r = V.shape[-1]
    K = idx.shape[-1]
    if N == 0:
        return out.zero_()
    b = _blocks(N, width, r, _tiles(N, _interpret()), wide.device)
    b["BLOCK_M"] = _skill_block(m, r, b)
    programs = h * triton_cdiv(m, b["BLOCK_M"]) * triton_cdiv(width, b["BLOCK_W"])
    chunks, chunk = _token_chunks(N, programs, b)
    dst = out if chunks == 1 else torch.empty((chunks,) + tuple(out.shape), dtype=torch.float32, device=out.device)
    so_p = dst.stride(0) if chunks > 1 else 0
    so = dst.stride()[-4:]
    so_w, so_r = (so[3], so[2]) if transposed else (so[2], so[3])
    sv = (V.stride(0), 0, V.stride(1)) if shared_v else V.stride()
    grid = (programs, chunks)
    if _recorder is not None:
        _record(weight_grad_traffic, wide, V, idx, w, route_ids, dst, width, shared_v, b, grid, chunk)
    else:
        _k()._weight_grad_kernel[grid](
            wide, V, idx, w, route_ids, dst, N, idx.shape[0], width, r, K, m, chunk, float(scale),
            wide.stride(0), wide.stride(1), *sv, *idx.stride(), so_p, so[0], so[1], so_w, so_r,
            SHARED_V=shared_v, PREC=_prec(wide.dtype), BLOCK_N=b["BLOCK_N"], BLOCK_W=b["BLOCK_W"],
            BLOCK_R=b["BLOCK_R"], BLOCK_M=b["BLOCK_M"], num_warps=b["num_warps"], num_stages=b["num_stages"])
    if chunks > 1:
        out.copy_(dst.sum(0))
    return out


def weight_grad_traffic(wide, V, idx, w, route_ids, out, width, shared_v, b, grid, chunk) -> Traffic:
    """``out``: what the kernel writes (``(chunks, h, m, ...)`` float32 partials when split)."""
    N = wide.shape[0]
    h, m = out.shape[-4:-2]
    r = V.shape[-1]
    K = idx.shape[-1]
    BN, BW, BR, BM = b["BLOCK_N"], b["BLOCK_W"], b["BLOCK_R"], b["BLOCK_M"]
    programs, chunks = grid
    cblocks = triton_cdiv(width, BW)
    sblocks = programs // (h * cblocks)
    ew, eo = wide.element_size(), out.element_size()
    vk = 1 if shared_v else K  # rank vectors read per token: one shared, or one per slot
    tiles = sum(triton_cdiv(min(N, c0 + chunk) - c0, BN) for c0 in range(0, N, chunk))
    req = {"WIDE": h * sblocks * N * width * ew, "VR": programs * N * r * 4 * vk, "IDX": programs * N * K * 8,
           "WGT": programs * N * K * w.element_size(), "RIDS": programs * N * 8, "OUT": chunks * h * m * width * r * eo}
    flops = 2 * BW * BN * BM * BR * programs * tiles
    present = torch.unique(route_ids)
    dist = {"WIDE": N * h * width * ew, "VR": N * r * 4 * vk, "IDX": 8 * present.numel() * h * K,
            "WGT": w.element_size() * present.numel() * h * K, "RIDS": 8 * N, "OUT": chunks * h * m * width * r * eo}
    variant = dict(SHARED_V=shared_v, PREC=_prec(wide.dtype), BLOCK_N=BN, BLOCK_W=BW, BLOCK_R=BR, BLOCK_M=BM,
                   dtype=str(wide.dtype), num_warps=b["num_warps"], num_stages=b["num_stages"])
    return Traffic("_weight_grad_kernel", grid, req, dist, flops, variant)


def _segment_sum(P, order, offs, R, Q=None):
    """Per-row sums of per-token rows of ``P`` (and ``Q``), each ``(N, C)`` or split-K partials
    ``(S, N, C)`` -> ``(R, C)`` float32, deterministic."""
    P = P if P.dim() == 3 else P.unsqueeze(0)
    Q = Q if Q is None or Q.dim() == 3 else Q.unsqueeze(0)
    C = P.shape[-1]
    if R == 0 or P.shape[1] == 0:
        return torch.zeros(R, C, dtype=torch.float32, device=P.device)
    out = torch.empty(R, C, dtype=torch.float32, device=P.device)  # every row's program writes it
    BT = 16 if _tiles(P.shape[1], _interpret()) else 64
    if _recorder is not None:
        _record(segment_sum_traffic, P, offs, R, BT, Q)
        return out
    _k()._segment_sum_kernel[(R,)](P, Q if Q is not None else P, order, offs, out, C, P.shape[0],
                                   Q.shape[0] if Q is not None else 0, P.stride(0), P.stride(1),
                                   *((Q.stride(0), Q.stride(1)) if Q is not None else (0, 0)), out.stride(0),
                                   BLOCK_T=BT, BLOCK_C=_pow2(C, 2))
    return out


def segment_sum_traffic(P, offs, R, BT, Q=None) -> Traffic:
    """``P``, ``Q``: ``(S, N, C)`` partials (``Q`` optional)."""
    C = P.shape[-1]
    counts = (offs[1:R + 1] - offs[:R]).tolist()
    n = sum(counts)
    req = {"P": 4 * n * C * P.shape[0], "Q": 4 * n * C * (Q.shape[0] if Q is not None else 0), "ORDER": 8 * n,
           "OFFS": 16 * R, "OUT": 4 * R * C}
    dist = {"P": 4 * n * C * P.shape[0], "Q": req["Q"], "ORDER": 8 * n, "OFFS": 8 * (R + 1), "OUT": 4 * R * C}
    variant = dict(BLOCK_T=BT, BLOCK_C=_pow2(C, 2), dtype=str(P.dtype), num_warps=4, num_stages=3)
    return Traffic("_segment_sum_kernel", (R,), req, dist, 0, variant)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# --- the two ops ------------------------------------------------------------------


def forward_impl(x, A, B, idx, w, route_ids, base, weight, bias, scale: float, combine: str,
                 meta) -> Tuple[Tensor, Tensor]:
    """The forward op's body; ``meta`` is ``(order, srows, offs)`` as :func:`_routing_meta` gives.
    With ``weight`` the base linear ``x Wᵀ + bias`` is computed in the expand's tiles."""
    N = x.shape[0]
    h, m, dh, r = A.shape
    K = idx.shape[2]
    order, srows, _ = meta
    params = combine == "params"
    idx_c, w_c = idx.contiguous(), w.contiguous()
    y = torch.empty(N, h * B.shape[-1], dtype=x.dtype, device=x.device)
    saved = torch.empty((N, r) if params else (N, K, r), dtype=torch.float32, device=x.device)
    parts = _shrink(x, A, idx_c, w_c, order, srows, 0 if params else 1, K, saved)
    linear = (x, weight.t(), bias) if weight is not None else None
    _expand(parts, B, idx_c, w_c, order, srows, K, scale, params, y, base, linear,
            u_out=saved if parts.shape[0] > 1 else None)
    return y, saved


@torch.library.custom_op("routedlora::triton_forward", mutates_args=())
def _forward_op(x: Tensor, A: Tensor, B: Tensor, idx: Tensor, w: Tensor, route_ids: Tensor, order: Tensor,
                srows: Tensor, offs: Tensor, base: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                scale: float, combine: str) -> Tuple[Tensor, Tensor]:
    return forward_impl(x, A, B, idx, w, route_ids, base, weight, bias, scale, combine, (order, srows, offs))


@_forward_op.register_fake
def forward_fake(x, A, B, idx, w, route_ids, order, srows, offs, base, weight, bias, scale, combine):
    """Output shapes of the forward (also the cuda backend's): ``y (N, o)``, float32 activation."""
    N, r, K = x.shape[0], A.shape[3], idx.shape[2]
    y = x.new_empty(N, A.shape[0] * B.shape[-1])
    saved = x.new_empty((N, r) if combine == "params" else (N, K, r), dtype=torch.float32)
    return y, saved


def _grads_by_rows(grad, x, A, B, idx, w, saved, du, scale, params, meta, dA, dB, need_w):
    """Skills' and routing gradients from per-row reductions: one more pass over ``x`` and one over
    the gradient, then the (small) mixing. For routing rows of many tokens."""
    N, d = x.shape
    R, _, K = idx.shape
    _, order, _, offs = meta
    rp = A.shape[3] * (1 if params else K)
    want_G, want_H = dA is not None or (need_w and params), dB is not None or need_w
    G = torch.empty(R, d, rp, dtype=torch.float32, device=x.device) if want_G else None
    Hh = torch.empty(R, grad.shape[1], rp, dtype=torch.float32, device=x.device) if want_H else None
    _row_reduce(x, du.view(N, rp) if want_G else None, grad, saved.view(N, rp) if want_H else None, order, offs, G,
                Hh, scale)
    return _mix_grads(G, Hh, A, B, idx, w, dA, dB, not params, need_w)


def _grads_by_tokens(grad, x, A, B, idx, w, saved, du, scale, params, meta, dA, dB, need_w):
    """Skills' and routing gradients token by token, every skill of a head in one product (``x`` and
    the gradient read once per skill block), per-token routing gradients summed per row. For
    routing rows of few tokens."""
    N = x.shape[0]
    h, m, dh, r = A.shape
    R, _, K = idx.shape
    route_ids, order, srows, offs = meta
    if dA is not None:
        _weight_grad(x, du, idx, w, route_ids, dA, dh, 1.0, params, False)
    if dB is not None:
        _weight_grad(grad, saved, idx, w, route_ids, dB, B.shape[-1], scale, params, True)
    if not need_w:
        return None
    if params:  # per token ⟨x A_s, du⟩ + γ⟨u, g B_sᵀ⟩, as split-K partials summed with the rows
        Bt = B.transpose(2, 3)
        p_a = _shrink(x, A, idx, w, order, srows, 2, K, torch.empty(N, h, K, dtype=torch.float32, device=x.device),
                      v=du)
        p_b = _shrink(grad, Bt, idx, w, order, srows, 2, K,
                      torch.empty(N, h, K, dtype=torch.float32, device=x.device), v=saved, scale=scale)
        return _segment_sum(p_a.view(-1, N, h * K), order, offs, R, p_b.view(-1, N, h * K)).view(R, h, K)
    per_token = (du * saved).sum(-1)  # (N, K): <γ g B_jᵀ, x A_j>
    return _segment_sum(per_token, order, offs, R).view(R, h, K)


GRADS = {"rows": _grads_by_rows, "tokens": _grads_by_tokens}


def backward_impl(grad, x, A, B, idx, w, saved, weight, scale: float, combine: str, meta, needs,
                  algorithm: str) -> List[Optional[Tensor]]:
    """The backward op's body: ``[dx, dA, dB, dw]``, None where ``needs`` says not needed;
    ``meta`` is ``(route_ids, order, srows, offs)``.

    With ``weight`` the base linear's ``dx = g W`` is computed in the adapter dx's tiles."""
    need_x, need_A, need_B, need_w = needs
    N, d = x.shape
    K = idx.shape[2]
    _, order, srows, offs = meta
    params = combine == "params"
    idx_c, w_c = idx.contiguous(), w.contiguous()
    du = None
    du_for_w = need_w and (params or algorithm == "tokens")  # outputs by rows: dw from the gradient side alone
    if need_x or need_A or du_for_w:
        # γ g B̂ᵀ (params), or γ g B_jᵀ per slot (outputs): one pass over the gradient
        shape = (N, A.shape[3]) if params else (N, K, A.shape[3])
        du = torch.empty(shape, dtype=torch.float32, device=x.device)
        parts = _shrink(grad, B.transpose(2, 3), idx_c, w_c, order, srows, 0 if params else 1, K, du, scale=scale)
        split, more = parts.shape[0] > 1, need_A or du_for_w  # more: du read beyond dx
    dx = dA = dB = dw = None
    if need_x:
        dx = torch.empty(N, d, dtype=x.dtype, device=x.device)
        linear = (grad, weight, None) if weight is not None else None
        _expand(parts, A.transpose(2, 3), idx_c, w_c, order, srows, K, 1.0, params, dx, None, linear,
                u_out=du if split and more else None)
    elif du is not None:
        _summed(parts, du)
    if need_A:
        dA = torch.empty_like(A)
    if need_B:
        dB = torch.empty_like(B)
    if N == 0:  # no token: every gradient is zero
        for t in (dA, dB):
            if t is not None:
                t.zero_()
        dw = torch.zeros(idx.shape, dtype=torch.float32, device=x.device) if need_w else None
    elif need_A or need_B or need_w:
        dw = GRADS[algorithm](grad, x, A, B, idx_c, w_c, saved, du, scale, params, meta, dA, dB, need_w)
    return [dx, dA, dB, None if dw is None else dw.to(w.dtype)]


@torch.library.custom_op("routedlora::triton_backward", mutates_args=())
def _backward_op(grad: Tensor, x: Tensor, A: Tensor, B: Tensor, idx: Tensor, w: Tensor, route_ids: Tensor,
                 order: Tensor, srows: Tensor, offs: Tensor, saved: Tensor, weight: Optional[Tensor], scale: float,
                 combine: str, needs: List[bool], algorithm: str) -> List[Tensor]:
    grads = backward_impl(grad, x, A, B, idx, w, saved, weight, scale, combine, (route_ids, order, srows, offs),
                          needs, algorithm)
    return [g if g is not None else x.new_empty(0) for g in grads]  # an op returns tensors: empty = not needed


@_backward_op.register_fake
def backward_fake(grad, x, A, B, idx, w, route_ids, order, srows, offs, saved, weight, scale, combine, needs,
                  algorithm):
    return [torch.empty_like(t) if n else x.new_empty(0) for t, n in zip((x, A, B, w), needs)]


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


_FLOPS_PER_BYTE = 295  # an H100's bf16 tensor-core peak over its HBM bandwidth (989e12 / 3.35e12)


def backward_algorithm(N: int, R: int, d: int, o: int, r: int, m: int, K: int, elem: int, params: bool) -> str:
    """``"rows"`` or ``"tokens"``: which way of computing the skills' and routing gradients costs less
    beyond the shared part of the backward (the gradient's shrink and dx), each priced as
    ``max(bytes, flops / _FLOPS_PER_BYTE)``.

    By rows: one more pass over ``x`` and the gradient, and ``R·rank·(d+o)`` float32 reductions
    written and read back (``rank = r``, or ``K·r`` for outputs combine). By tokens: ``x`` and the
    gradient once per skill block for the skills' gradients, and once more for the routing
    gradients of params combine, at ``m·r`` MMA columns (every skill of a head at once)."""
    rank = r if params else K * r
    sides = N * (d + o)
    rows_bytes = sides * elem + 2 * R * rank * (d + o) * 4
    rows_flops = 2 * sides * rank + 2 * R * (d + o) * rank * m
    passes = (2 if params else 1) * triton_cdiv(m, _skill_block(m, r, {}))
    tokens_bytes = passes * sides * elem
    tokens_flops = 2 * sides * m * r * (2 if params else 1)
    by_rows = max(rows_bytes, rows_flops / _FLOPS_PER_BYTE)
    by_tokens = max(tokens_bytes, tokens_flops / _FLOPS_PER_BYTE)
    return "rows" if by_rows <= by_tokens else "tokens"


class Algorithm:
    """The triton backend, with one way of computing the skills' and routing gradients
    (:data:`GRADS`); the forward is the same for both."""

    NEEDS_ROUTE_IDS = True  # RoutedLoraFunction hands the kernels every token's row ...
    NEEDS_GROUPING = True  # ... and the tokens grouped by row
    FUSES_LINEAR = True  # takes the base linear's weight and computes it in the expand's tiles

    def __init__(self, name: str):
        self.name = name

    def grouping(self, rows):
        return rows.grouping()

    def forward(self, x, A, B, idx, w, rows, scale, combine, base=None, inplace=False, linear=None):
        return forward(x, A, B, idx, w, rows, scale, combine, base, linear=linear)

    def backward(self, grad, x, A, B, idx, w, rows, scale, combine, saved, needs, dx=None, weight=None):
        return backward(grad, x, A, B, idx, w, rows, scale, combine, saved, needs, dx, weight, self.name)

    def __repr__(self):
        return f"triton_backend.Algorithm({self.name!r})"


ALGORITHMS = {name: Algorithm(name) for name in GRADS}
NEEDS_ROUTE_IDS = NEEDS_GROUPING = FUSES_LINEAR = True


def plan(x, A, B, idx, rows, combine, backward=True):
    """The fused kernels walk the tokens grouped by routing row; the gradients go by rows or by tokens."""
    h, m, _, r = A.shape
    K = m if idx is None else idx.shape[2]
    name = backward_algorithm(rows.n_tokens, rows.n_rows, x.shape[1], h * B.shape[-1], r, m, K, x.element_size(),
                              combine == "params")
    return ALGORITHMS[name]


def grouping(rows):
    return rows.grouping()


def _check_dtype(x, backend: str = "triton"):
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x: backend='{backend}' takes float16, bfloat16 or float32, got {x.dtype}")


def forward(x, A, B, idx, w, rows, scale, combine, base=None, inplace=False, linear=None):
    """``linear = (weight, bias)``: the op's own base linear, computed in the same kernel."""
    _check_dtype(x)
    weight, bias = linear if linear is not None else (None, None)
    meta = (sparse_index(idx, w), w, rows.route_ids, *rows.grouping())
    y, saved = _forward_op(x.contiguous(), A, B, *meta, base, weight, bias, float(scale), combine)
    return y, (saved,)


def backward(grad, x, A, B, idx, w, rows, scale, combine, saved, needs, dx=None, weight=None, algorithm=None):
    """A given ``dx`` (the base's) has the adapter's added to it; ``weight``: the base's ``g W`` is
    computed in the adapter dx's kernel instead."""
    if algorithm is None:
        algorithm = plan(x, A, B, idx, rows, combine).name
    meta = (sparse_index(idx, w), w, rows.route_ids, *rows.grouping())
    grads = _backward_op(grad, x.contiguous(), A, B, *meta, saved[0], weight, float(scale), combine,
                         [bool(n) for n in needs], algorithm)
    dx_a, dA, dB, dw = (g if n else None for g, n in zip(grads, needs))
    if dx is not None and dx_a is not None:
        dx_a = dx.add_(dx_a)
    return dx_a, dA, dB, dw


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
    # placeholders for pointers a variant never reads: any int64 tensor
    ptrs = (row_example if row_example is not None else rows_task, seed if seed is not None else rows_task)
    consts = dict(KIND=ROUTER_KINDS[kind], NOISE=seed is not None, RENORM=bool(renormalize), BLOCK_M=_pow2(m, 2),
                  ROW_IS_EXAMPLE=row_example is None)
    return R, h, m, K, ptrs, (T, h, m, K, int(ex_offset), 1.0 / float(temperature), eps, tiny), consts


@torch.library.custom_op("routedlora::triton_route", mutates_args=())
def _route_op(logits: Tensor, rows_task: Tensor, row_example: Optional[Tensor], seed: Optional[Tensor], kind: str,
              k: int, temperature: float, renormalize: bool, ex_offset: int) -> Tuple[Tensor, Tensor]:
    R, h, m, K, ptrs, scalars, consts = _router_args(logits, rows_task, row_example, seed, kind, k, temperature,
                                                     renormalize, ex_offset)
    idx = torch.empty(R, h, K, dtype=torch.int64, device=logits.device)
    w = torch.empty(R, h, K, dtype=torch.float32, device=logits.device)
    if R and _recorder is not None:
        _record(router_traffic, logits, rows_task, kind, K, seed is not None, renormalize, False, row_example)
        _recorded_route(logits, rows_task, kind, K, idx, w)
    elif R:
        _rk()._router_forward_kernel[(R, h)](logits, rows_task, *ptrs, idx, w, *scalars,
                                             *logits.stride(), *w.stride(), **consts)
    return idx, w


def _recorded_route(logits, rows_task, kind, K, idx, w) -> None:
    """While launches are recorded, the rows the kernel would write (noise-free), so that what the
    next launches' formulas read from them (which skills a row selects) is right."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        z = logits.detach().float()[rows_task]
        if kind == "topk":
            top = torch.softmax(z, -1).topk(K, dim=-1)
            idx.copy_(top.indices)
            w.copy_(top.values / top.values.sum(-1, keepdim=True))
        else:
            idx.copy_(torch.arange(K, device=idx.device).expand_as(idx))
            w.copy_(torch.sigmoid(z) if kind == "poly" else torch.softmax(z, -1))


def router_traffic(logits, rows_task, kind, K, noise, renormalize, backward, row_example=None) -> Traffic:
    """One program per (routing row, head): the row's logits in, its K (index, weight) slots out;
    in backward the slots' gradients in and the logits' gradient row out."""
    T, h, m = logits.shape
    R = rows_task.shape[0]
    el, P = logits.element_size(), R * h
    req = {"ROWS_TASK": 8 * P, "LOGITS": el * m * P}
    dist = {"ROWS_TASK": 8 * R, "LOGITS": el * int(torch.unique(rows_task).numel()) * h * m}
    if kind == "poly" and row_example is not None:
        req["ROW_EX"], dist["ROW_EX"] = 8 * P, 8 * R
    if kind == "poly" and noise:
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
                   ROW_IS_EXAMPLE=row_example is None, dtype=str(logits.dtype), num_warps=4, num_stages=3)
    return Traffic(name, (R, h), req, dist, 0, variant)


@_route_op.register_fake
def _(logits, rows_task, row_example, seed, kind, k, temperature, renormalize, ex_offset):
    R, (_, h, m) = rows_task.shape[0], logits.shape
    K = m if kind in ("poly", "softmax") else k
    return (logits.new_empty(R, h, K, dtype=torch.int64), logits.new_empty(R, h, K, dtype=torch.float32))


@torch.library.custom_op("routedlora::triton_route_backward", mutates_args=())
def _route_backward_op(dw: Tensor, logits: Tensor, rows_task: Tensor, row_example: Optional[Tensor],
                       seed: Optional[Tensor], idx: Tensor, task_order: Tensor, task_offs: Tensor, kind: str, k: int,
                       temperature: float, renormalize: bool, ex_offset: int) -> Tensor:
    R, h, m, K, ptrs, scalars, consts = _router_args(logits, rows_task, row_example, seed, kind, k, temperature,
                                                     renormalize, ex_offset)
    T = logits.shape[0]
    dz = torch.empty(R, h, m, dtype=torch.float32, device=logits.device)
    if R and _recorder is not None:
        _record(router_traffic, logits, rows_task, kind, K, seed is not None, renormalize, True, row_example)
    elif R:
        dw_c = dw.contiguous().float()
        _rk()._router_backward_kernel[(R, h)](logits, rows_task, *ptrs, idx, dw_c, dw_c, dz, *scalars,
                                              *logits.stride(), *dw_c.stride(), dz.stride(0), dz.stride(1), **consts)
    # rows of one task add up, summed per task in a fixed order (no atomics)
    return _segment_sum(dz.view(R, h * m), task_order, task_offs, T).view(T, h, m).to(logits.dtype)


@_route_backward_op.register_fake
def _(dw, logits, rows_task, row_example, seed, idx, task_order, task_offs, kind, k, temperature, renormalize,
      ex_offset):
    return torch.empty_like(logits)


class TritonRouterFunction(torch.autograd.Function):
    """Routing rows from the logits table in one kernel; logit gradients per task in another."""

    @staticmethod
    def forward(ctx, logits, rows_task, row_example, seed, task_order, task_offs, kind, k, temperature, renormalize,
                ex_offset):
        idx, w = _route_op(logits, rows_task, row_example, seed, kind, k, temperature, renormalize, ex_offset)
        ctx.save_for_backward(logits, rows_task, row_example, seed, idx, task_order, task_offs)
        ctx.args = (kind, k, temperature, renormalize, ex_offset)
        ctx.mark_non_differentiable(idx)
        ctx.set_materialize_grads(False)  # no zeros for idx's gradient: it has none
        return idx, w

    @staticmethod
    def backward(ctx, _didx, dw):
        if dw is None:
            return (None,) * 11
        logits, rows_task, row_example, seed, idx, task_order, task_offs = ctx.saved_tensors
        dlogits = _route_backward_op(dw, logits, rows_task, row_example, seed, idx, task_order, task_offs, *ctx.args)
        return (dlogits,) + (None,) * 10


def route(logits: Tensor, rows_task: Tensor, row_example: Optional[Tensor] = None, *, kind: str,
          seed: Optional[Tensor] = None, k: int = 1, temperature: float = 1.0, renormalize: bool = True,
          ex_offset: int = 0, by_task: Optional[Tuple[Tensor, Tensor, Tensor]] = None):
    """``(idx, w)`` rows of ``logits[rows_task]`` under router ``kind``, computed in a Triton kernel.

    ``seed`` (a one-element int64 device tensor) switches on Gumbel-sigmoid noise for
    ``poly``: the uniform draw of example ``row_example[r] + ex_offset`` (``None``: row r is
    example r), head q, skill s is Philox(seed, (example * h + q) * m + s), regenerated in
    backward, never stored. ``by_task``: the rows grouped by task, ``(order, sorted tasks,
    offsets)`` as :meth:`TokenRows.grouping` gives (once per batch); else sorted here.
    """
    if kind not in ROUTER_KINDS:
        raise ValueError(f"kind: the in-kernel routers are {tuple(ROUTER_KINDS)}, got {kind!r}")
    rows_task = rows_task.long()
    if by_task is None:
        by_task = _routing_meta(rows_task, logits.shape[0])
    return TritonRouterFunction.apply(logits, rows_task, None if row_example is None else row_example.long(), seed,
                                      by_task[0], by_task[2], kind, int(k), float(temperature), bool(renormalize),
                                      int(ex_offset))


@torch.library.custom_op("routedlora::triton_uniform", mutates_args=())
def uniform_draws(seed: Tensor, examples: int, heads: int, skills: int) -> Tensor:
    """The clamped uniforms :func:`route` draws for ``poly`` noise, ``(examples, heads, skills)`` (for tests)."""
    out = torch.empty(examples, heads, skills, dtype=torch.float32, device=seed.device)
    if examples:
        _rk()._uniform_kernel[(examples, heads)](seed, out, heads, skills, torch.finfo(torch.float32).eps,
                                                 BLOCK_M=_pow2(skills, 2))
    return out
