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

import os
import sys
from typing import List, Optional, Tuple

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


def _shrink(X, M, idx, w, order, srows, mode, K, out, v=None):
    """MODE 0 -> out (N, r); 1 -> out (N, K, r); 2 -> out (N, h, K). ``M`` viewed as (h, m, dh, r)."""
    N = X.shape[0]
    h, m, dh, r = M.shape
    if N == 0:
        return out
    b = _blocks(N, dh, r, _interpret(), X.device)
    so = out.stride()
    if mode == 0:
        so = (so[0], 0, so[1])
    v_ = v if v is not None else out
    sv = (v.stride(0), v.stride(1)) if v is not None else (0, 0)
    grid = (triton_cdiv(N, b["BLOCK_N"]),)
    _k()._shrink_kernel[grid](
        X, M, idx, w, order, srows, out, v_, N, dh, r, K,
        X.stride(0), X.stride(1), *M.stride(), *idx.stride(), *so, *sv,
        H=h, MODE=mode, PREC=_prec(X.dtype), BLOCK_N=b["BLOCK_N"], BLOCK_D=b["BLOCK_D"], BLOCK_R=b["BLOCK_R"],
        num_warps=b["num_warps"], num_stages=b["num_stages"])
    return out


def _expand(U, M, idx, w, order, srows, K, scale, mix, y, base=None):
    """``y = base + scale * expand(U)``; ``M`` viewed as (h, m, r, oh)."""
    N = U.shape[0]
    h, m, r, oh = M.shape
    if N == 0:
        return y
    b = _blocks(N, oh, r, _interpret(), U.device)
    su = (U.stride(0), 0, U.stride(1)) if mix else U.stride()
    sb = (base.stride(0), base.stride(1)) if base is not None else (0, 0)
    grid = (triton_cdiv(N, b["BLOCK_N"]), h, triton_cdiv(oh, b["BLOCK_O"]))
    _k()._expand_kernel[grid](
        U, M, idx, w, order, srows, base if base is not None else y, y, N, oh, r, K, float(scale),
        *su, *M.stride(), *idx.stride(), *sb, y.stride(0), y.stride(1),
        MIX=mix, HAS_BASE=base is not None, PREC=_prec(M.dtype),
        BLOCK_N=b["BLOCK_N"], BLOCK_O=b["BLOCK_O"], BLOCK_R=b["BLOCK_R"], num_warps=b["num_warps"],
        num_stages=b["num_stages"])
    return y


def _weight_grad(wide, V, idx, w, route_ids, out, width, scale, shared_v, transposed):
    """out[q, s] = scale * Σ_n wide_q[n]ᵀ ⊗ coef·V[n]; ``transposed``: out is (h, m, r, width)."""
    N = wide.shape[0]
    h, m = out.shape[:2]
    r = V.shape[-1]
    K = idx.shape[-1]
    if N == 0:
        return out.zero_()
    b = _blocks(N, width, r, _interpret(), wide.device)
    so_q, so_s = out.stride(0), out.stride(1)
    so_w, so_r = (out.stride(3), out.stride(2)) if transposed else (out.stride(2), out.stride(3))
    sv = (V.stride(0), 0, V.stride(1)) if shared_v else V.stride()
    grid = (h * m, triton_cdiv(width, b["BLOCK_W"]))
    _k()._weight_grad_kernel[grid](
        wide, V, idx, w, route_ids, out, N, width, r, K, m, float(scale),
        wide.stride(0), wide.stride(1), *sv, *idx.stride(), so_q, so_s, so_w, so_r,
        SHARED_V=shared_v, PREC=_prec(wide.dtype), BLOCK_N=b["BLOCK_N"], BLOCK_W=b["BLOCK_W"],
        BLOCK_R=b["BLOCK_R"], num_warps=b["num_warps"], num_stages=b["num_stages"])
    return out


def _segment_sum(P, order, offs, R):
    """Per-row sums of per-token rows of ``P (N, C)`` -> ``(R, C)`` float32, deterministic."""
    C = P.shape[1]
    out = torch.zeros(R, C, dtype=torch.float32, device=P.device)
    if R == 0 or P.shape[0] == 0:
        return out
    _k()._segment_sum_kernel[(R,)](P, order, offs, out, C, P.stride(0), out.stride(0),
                                   BLOCK_T=16 if _interpret() else 64, BLOCK_C=_pow2(C, 2))
    return out


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
    if R:
        _rk()._router_forward_kernel[(R, h)](logits, rows_task, row_example, seed_t, idx, w, *scalars,
                                             *logits.stride(), *w.stride(), **consts)
    return idx, w


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
    if R:
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
