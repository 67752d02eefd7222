"""Routers: a row of routing logits per head -> sparse (skill index, weight) lists.

Every router returns a :class:`Routing` of ``idx (R, h, K)`` (int64) and
``w (R, h, K)``, the sparse form of DESIGN.md §1. Dense routers use ``K = m``
and ``idx = arange(m)``. All weights are differentiable functions of the
logits; indices never carry gradients.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .validation import check_positive, check_tensor

__all__ = [
    "Routing",
    "ROUTERS",
    "dense_index",
    "gumbel_uniform",
    "poly_weights",
    "hashed_bits",
    "hashed_uniform",
    "poly_route",
    "softmax_route",
    "topk_route",
    "cpoly_route",
    "cpoly_fixed_specific",
    "poly_option_weights",
    "private_route",
    "router_group",
    "GRANULARITIES",
]

ROUTERS = ("poly", "softmax", "topk", "cpoly")

# PEFT Poly's normaliser epsilon and clamp, kept identical so that routing
# weights match bit for bit (see DESIGN.md §1, `poly`).
_POLY_EPS = 1e-12
_F32_EPS = torch.finfo(torch.float32).eps


class Routing(NamedTuple):
    idx: Tensor  # (R, h, K) int64, skill index per routing row, head and slot
    w: Tensor  # (R, h, K) float, weight of that skill


def dense_index(rows: int, heads: int, skills: int, device=None) -> Tensor:
    return torch.arange(skills, device=device).expand(rows, heads, skills)


def gumbel_uniform(shape, *, generator: Optional[torch.Generator] = None, device=None,
                   dtype=torch.float32) -> Tensor:
    """The uniform draws behind Gumbel-sigmoid noise, clamped to (eps, 1-eps).

    Drawn with ``torch.rand`` exactly as ``torch.distributions.RelaxedBernoulli``
    does, so a run seeded like a PEFT Poly run draws the same noise.
    """
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    eps = torch.finfo(dtype).eps
    return u.clamp(min=eps, max=1 - eps)


_MASK32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (xorshift-multiply, 0x45d9f3b) on int64 lanes holding values < 2**32.

    The multiplier is below 2**27, so products stay below 2**59: no int64 overflow, the same
    bits in eager, in inductor's generated code and on every device.
    """
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


@torch.library.custom_op("routedlora::hashed_bits", mutates_args=())
def _hashed_bits_op(seed: int, step: Tensor, n: int, first: int) -> Tensor:
    k = _mix32(_mix32((seed >> 32) & _MASK32) ^ _mix32(seed & _MASK32 ^ _mix32(step & _MASK32 ^ _mix32(step >> 32))))
    counter = torch.arange(first, first + n, dtype=torch.int64, device=step.device)
    return _mix32(_mix32((counter & _MASK32) ^ k) ^ ((counter >> 32) + 0x9E3779B9 & _MASK32))


@_hashed_bits_op.register_fake
def _(seed, step, n, first):
    return step.new_empty(n, dtype=torch.int64)


def hashed_bits(seed: int, step: Tensor, n: int, *, first: int = 0, device=None) -> Tensor:
    """``n`` hashed 32-bit values (int64) for counters ``first … first + n - 1`` of stream (seed, step).

    One opaque op (``routedlora::hashed_bits``) rather than the chain of integer ops it runs:
    ``torch.compile``'s partitioner may recompute cheap ops in backward from the forward's
    inputs, and the batch counter ``step`` is an input that a compiled step also advances in
    place, so a recomputed hash would read the advanced counter. An opaque op's output is
    saved instead.
    """
    return _hashed_bits_op(int(seed), step.to(device=device, dtype=torch.int64), int(n), int(first))


def hashed_uniform(seed: int, step: Tensor, shape, *, first_row: int = 0, device=None) -> Tensor:
    """Counter-based uniforms for seeded Gumbel noise: a pure function of (seed, step, element).

    ``u[b, ...]`` hashes (seed, step, the element's flat index counted from row
    ``first_row``), in ``(eps, 1 - eps)``, float32. ``step`` is a 0-d int64 tensor (a layer's
    batch counter), so a new step needs no recompilation under ``torch.compile``, a re-run
    (activation checkpointing) redraws the same values, and a data-parallel rank draws only
    its own rows ``[first_row, first_row + shape[0])`` of the global batch.
    """
    n = math.prod(shape)
    per_row = n // shape[0] if shape[0] else 0
    bits = hashed_bits(seed, step, n, first=first_row * per_row, device=device)
    u = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return u.view(shape).clamp(_F32_EPS, 1 - _F32_EPS)


# logit(clamp(σ(z), ε, 1 − ε)) = clamp(z, −L, L): PEFT's clamp of the probabilities, taken on the logits
_LOGIT_BOUND = math.log((1 - _F32_EPS) / _F32_EPS)


def _noise_logit(noise: Tensor, dtype: torch.dtype) -> Tensor:
    """``logit(u)`` of Gumbel-sigmoid uniforms in the router's ``dtype``, ``u`` first clamped to
    ``[ε, 1 − ε]`` with ``ε`` of the dtype ``u`` was drawn in, as ``RelaxedBernoulli`` clamps its
    draws: bfloat16 uniforms (drawn in the logits' dtype, as PEFT does) are clamped at bfloat16's
    ε, then widened exactly."""
    eps = torch.finfo(noise.dtype).eps
    return torch.logit(noise.clamp(eps, 1 - eps).to(dtype))


def _poly_forward(table, rows, noise, temperature):
    """``(w, Σq + ε, what backward needs)``; see :class:`_PolyWeights`."""
    z = table if rows is None else table[rows]
    if z.dtype != torch.float64:
        z = z.float()
    if noise is None:
        q = torch.sigmoid(z)
        saved = (q,)
    else:
        t = z.clamp(-_LOGIT_BOUND, _LOGIT_BOUND) + _noise_logit(noise, z.dtype)
        if temperature != 1.0:
            t = t / temperature
        q = torch.sigmoid(t)
        saved = (z, q)
    total = q.sum(dim=-1, keepdim=True) + _POLY_EPS
    return q / total, total, saved


class _PolyWeights(torch.autograd.Function):
    """Poly weights of logit rows in one autograd node: the router runs in every layer of every
    step, and on small layers the chain of ops autograd would record (clamps, logits, sigmoid,
    the normalisation, the gather's scatter) costs more than the arithmetic.

    Forward is PEFT's ``RelaxedBernoulli(τ, logits=z).rsample()`` then the normalisation,
    ``q = σ((logit(clamp(σ(z), ε, 1 − ε)) + logit(u)) / τ)``, ``w = q / (Σq + ε)``, with
    ``logit(clamp(σ(z)))`` taken as ``clamp(z, ±logit(1 − ε))`` and without PEFT's final clamp of
    ``q`` to ``[tiny, 1 − ε]`` (it moves a weight by at most ε relative; the ``+ ε`` of the
    normalisation already keeps it finite). Backward is written out:
    ``dq = (dw − Σ dw·w) / (Σq + ε)``, ``dz = dq · q(1 − q) / τ`` where ``|z| ≤ logit(1 − ε)``
    and 0 where the clamp acted, as ``torch.clamp``'s gradient is.
    """

    @staticmethod
    def forward(ctx, table, rows, noise, temperature):
        w, total, saved = _poly_forward(table, rows, noise, temperature)
        ctx.save_for_backward(rows, w, total, *saved)
        ctx.table_shape, ctx.table_dtype, ctx.temperature = table.shape, table.dtype, temperature
        return w

    @staticmethod
    def backward(ctx, dw):
        rows, w, total, *saved = ctx.saved_tensors
        dq = (dw - (dw * w).sum(dim=-1, keepdim=True)) / total
        if len(saved) == 1:
            (q,) = saved
            dz = dq * (q * (1 - q))
        else:
            z, q = saved
            dz = dq * (q * (1 - q)) * (z.abs() <= _LOGIT_BOUND)  # where the clamp acted: no gradient
            if ctx.temperature != 1.0:
                dz = dz / ctx.temperature
        if rows is None:
            return dz.to(ctx.table_dtype), None, None, None
        dtable = torch.zeros(ctx.table_shape, dtype=dz.dtype, device=dz.device).index_add_(0, rows, dz)
        return dtable.to(ctx.table_dtype), None, None, None


def poly_weights(logits: Tensor, noise: Optional[Tensor], temperature: float, rows: Optional[Tensor] = None) -> Tensor:
    """:func:`poly_route`'s weights without its checks (callers that validated their config)."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return _PolyWeights.apply(logits, rows, noise, float(temperature))
    return _poly_forward(logits, rows, noise, float(temperature))[0]


def _rows_of(logits: Tensor, rows: Optional[Tensor]) -> int:
    if rows is None:
        return logits.shape[0]
    check_tensor("rows", rows, ndim=1, integer=True)
    return rows.shape[0]


def poly_route(logits: Tensor, *, noise: Optional[Tensor] = None, temperature: float = 1.0,
               rows: Optional[Tensor] = None) -> Routing:
    """Poly / MHR routing: ``sigmoid(z)`` normalised over skills, per head.

    ``noise`` (the shape of the routed logits, uniform in (0, 1), see :func:`gumbel_uniform`)
    switches on the Gumbel-sigmoid relaxation used in training; pass ``None`` for
    evaluation or for mttl's plain-sigmoid training. ``rows``: route ``logits[rows]``
    (a routing table and the rows of a batch; the gather's gradient is summed per table row).
    Weights are float32 (float64 for float64 logits).
    """
    check_tensor("logits", logits, ndim=3, floating=True)
    check_positive("temperature", temperature)
    R, (_, h, m) = _rows_of(logits, rows), logits.shape
    if noise is not None and noise.shape != (R, h, m):
        raise ValueError(f"noise: expected shape {(R, h, m)}, got {tuple(noise.shape)}")
    return Routing(dense_index(R, h, m, logits.device), poly_weights(logits, noise, temperature, rows))


def softmax_route(logits: Tensor, *, temperature: float = 1.0) -> Routing:
    """Dense softmax routing ``softmax(z / temperature)`` over the skills of each head."""
    check_tensor("logits", logits, ndim=3, floating=True)
    check_positive("temperature", temperature)
    R, h, m = logits.shape
    return Routing(dense_index(R, h, m, logits.device), torch.softmax(logits / temperature, dim=-1))


def topk_route(logits: Tensor, *, k: int, temperature: float = 1.0, renormalize: bool = True) -> Routing:
    """Softmax-T then keep the ``k`` largest weights (optionally renormalised over them)."""
    check_tensor("logits", logits, ndim=3, floating=True)
    check_positive("temperature", temperature)
    m = logits.shape[-1]
    if not isinstance(k, int) or not 1 <= k <= m:
        raise ValueError(f"top_k: expected an int in [1, n_skills={m}], got {k!r}")
    p = torch.softmax(logits / temperature, dim=-1)
    w, idx = torch.topk(p, k, dim=-1)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return Routing(idx, w)


def cpoly_route(logits: Tensor, *, n_common: int, noise: Optional[Tensor] = None,
                temperature: float = 1.0, tied_heads: bool = False, specific: Optional[Tensor] = None) -> Routing:
    """C-Poly routing over ``m = n_common + T * n_specific`` skills.

    The first ``n_common`` logits of a row are routed with :func:`poly_route`
    (noise, if given, has shape ``(R, h, n_common)``); the rest are the row of
    the task-specific allocation matrix, used as raw, unnormalised weights.

    ``tied_heads``: head 0's task-specific weights serve every head (PEFT PR #1297's
    ``c_module_logits (T, T)``, one weight per task-private skill for all heads); the other
    heads' task-specific logits are unused. ``specific`` ``(R, 1 or h, m - n_common)``: fixed
    task-specific weights used instead of the logits' (PR #1297's ``cpoly_simple``, see
    :func:`cpoly_fixed_specific`); the logits' task-specific part then gets no gradient.
    """
    check_tensor("logits", logits, ndim=3, floating=True)
    R, h, m = logits.shape
    if not isinstance(n_common, int) or not 0 <= n_common <= m:
        raise ValueError(f"n_common: expected an int in [0, {m}], got {n_common!r}")
    common = logits[..., :n_common]
    if noise is not None and noise.shape != common.shape:
        raise ValueError(f"noise: expected shape {tuple(common.shape)}, got {tuple(noise.shape)}")
    check_positive("temperature", temperature)
    w_common = poly_weights(common, noise, temperature) if n_common else common
    if specific is None:
        spec = logits[..., n_common:]
    else:
        check_tensor("specific", specific, ndim=3, floating=True)
        if specific.shape[0] != R or specific.shape[1] not in (1, h) or specific.shape[2] != m - n_common:
            raise ValueError(f"specific: expected shape ({R}, 1 or {h}, {m - n_common}), got {tuple(specific.shape)}")
        spec = specific.to(w_common.dtype)
    if tied_heads or spec.shape[1] != h:
        spec = spec[:, :1].expand(R, h, m - n_common)
    w = torch.cat([w_common, spec], dim=-1)
    return Routing(dense_index(R, h, m, logits.device), w)


def cpoly_fixed_specific(task_ids: Tensor, n_tasks: int, n_specific: int, dtype=torch.float32) -> Tensor:
    """PEFT PR #1297's ``cpoly_simple`` task-specific weights: ``(R, 1, T·n_specific)``, 1 on the
    ``n_specific`` private skills of each row's task and 0 elsewhere (a constant, never trained)."""
    check_tensor("task_ids", task_ids, ndim=1, integer=True)
    owner = torch.arange(n_tasks * n_specific, device=task_ids.device) // n_specific
    return (owner == task_ids[:, None]).to(dtype).unsqueeze(1)


def private_route(task_ids: Tensor, heads: int, n_skills: int, dtype=torch.float32) -> Routing:
    """mttl's ``PrivateSelector``: each task routed to its own skill, ``one_hot(task, m)`` in every head.

    Sparse: ``idx (R, h, 1)`` is the row's task, ``w`` is 1. Needs ``task < n_skills``.
    """
    check_tensor("task_ids", task_ids, ndim=1, integer=True)
    check_positive("heads", heads, integer=True)
    check_positive("n_skills", n_skills, integer=True)
    idx = task_ids.to(torch.int64).view(-1, 1, 1).expand(-1, heads, 1)
    return Routing(idx, torch.ones(idx.shape, dtype=dtype, device=task_ids.device))


def poly_option_weights(table: Tensor, rows: Optional[Tensor], noise: Optional[Tensor], temperature: float, *,
                        straight_through: bool = False, l2_norm: bool = False, dropout_mask: Optional[Tensor] = None,
                        shared_skill: bool = False, average_correction: bool = False) -> Tensor:
    """Poly / MHR weights with mttl's router options, in mttl's order (``PolytroponSelector.forward``).

    ``z = table[rows]``; ``l2_norm``: ``w = z / max(‖z‖₂, 1e-12)`` over the skills of a head, and
    nothing else applies. Otherwise ``q = σ(z)``, or with ``noise`` the Gumbel-sigmoid sample of
    :func:`poly_weights`; ``straight_through``: ``q`` rounded to {0, 1} in the forward, the gradient
    of ``q`` in the backward; ``dropout_mask`` (0 or ``1/(1-p)``, shaped like ``q``) multiplies ``q``;
    ``shared_skill``: the last skill's ``q`` is 1 (always on, no gradient); then
    ``w = q / (Σq + 1e-12)``, or ``average_correction``: ``w = q · √h / √m`` (no normalisation).
    Plain autograd (the default path's single node, :func:`poly_weights`, has none of these).
    Weights are float32 (float64 for float64 logits).
    """
    z = table if rows is None else table[rows]
    if z.dtype != torch.float64:
        z = z.float()
    if l2_norm:
        return F.normalize(z, p=2.0, dim=-1)
    if noise is None:
        q = torch.sigmoid(z)
    else:
        t = z.clamp(-_LOGIT_BOUND, _LOGIT_BOUND) + _noise_logit(noise, z.dtype)
        if temperature != 1.0:
            t = t / temperature
        q = torch.sigmoid(t)
    if straight_through:
        q = q + (torch.round(q) - q).detach()
    if dropout_mask is not None:
        q = q * dropout_mask.to(q.dtype)
    if shared_skill:
        q = torch.cat([q[..., :-1], torch.ones_like(q[..., -1:])], dim=-1)
    if average_correction:
        h, m = q.shape[-2:]
        return q * (math.sqrt(h) / math.sqrt(m))
    return q / (q.sum(dim=-1, keepdim=True) + _POLY_EPS)


GRANULARITIES = ("layer", "block", "model")


def router_group(name: str, granularity: str) -> str:
    """Which routing table a routed layer named ``name`` uses under ``router_granularity``.

    ``"layer"``: its own (the key is its name). ``"model"``: one table for every routed layer
    (key ``""``). ``"block"``: one per transformer block, the block named by the module name up
    to and including its first all-digit component — ``model.layers.3.self_attn.q_proj`` →
    ``model.layers.3``, ``encoder.block.0.layer.1.EncDecAttention.q`` → ``encoder.block.0`` (mttl's
    ``blockwise`` grouping for T5), ``bert.encoder.layer.2.attention.self.query`` →
    ``bert.encoder.layer.2``. A name without a numeric component (``lm_head``) is a block of its own.
    """
    if granularity == "layer":
        return name
    if granularity == "model":
        return ""
    if granularity != "block":
        raise ValueError(f"router_granularity: expected one of {GRANULARITIES}, got {granularity!r}")
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isascii() and part.isdigit():
            return ".".join(parts[:i + 1])
    return name
