"""Routers: a row of routing logits per head -> sparse (skill index, weight) lists.

Every router returns a :class:`Routing` of ``idx (R, h, K)`` (int64) and
``w (R, h, K)``, the sparse form of DESIGN.md §1. Dense routers use ``K = m``
and ``idx = arange(m)``. All weights are differentiable functions of the
logits; indices never carry gradients.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .validation import check_positive, check_tensor

__all__ = [
    "Routing",
    "ROUTERS",
    "dense_index",
    "gumbel_uniform",
    "poly_route",
    "softmax_route",
    "topk_route",
    "cpoly_route",
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


def _poly_weights(logits: Tensor, noise: Optional[Tensor], temperature: float) -> Tensor:
    if noise is None:
        probs = torch.sigmoid(logits)
    else:
        # Gumbel-sigmoid on logit(pi): same as RelaxedBernoulli(tau, logits=z).rsample()
        # for |z| < ~16, with the clamp of DESIGN.md making it finite beyond.
        pi = torch.sigmoid(logits).clamp(_F32_EPS, 1 - _F32_EPS)
        z = (torch.logit(pi) + noise.log() - (-noise).log1p()) / temperature
        probs = torch.sigmoid(z).clamp(torch.finfo(z.dtype).tiny, 1 - torch.finfo(z.dtype).eps)
    return probs / (probs.sum(dim=-1, keepdim=True) + _POLY_EPS)


def poly_route(logits: Tensor, *, noise: Optional[Tensor] = None, temperature: float = 1.0) -> Routing:
    """Poly / MHR routing: ``sigmoid(z)`` normalised over skills, per head.

    ``noise`` (same shape as ``logits``, uniform in (0, 1), see :func:`gumbel_uniform`)
    switches on the Gumbel-sigmoid relaxation used in training; pass ``None`` for
    evaluation or for mttl's plain-sigmoid training.
    """
    check_tensor("logits", logits, ndim=3, floating=True)
    check_positive("temperature", temperature)
    if noise is not None and noise.shape != logits.shape:
        raise ValueError(f"noise: expected shape {tuple(logits.shape)}, got {tuple(noise.shape)}")
    R, h, m = logits.shape
    return Routing(dense_index(R, h, m, logits.device), _poly_weights(logits, noise, temperature))


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
                temperature: float = 1.0) -> Routing:
    """C-Poly routing over ``m = n_common + T * n_specific`` skills.

    The first ``n_common`` logits of a row are routed with :func:`poly_route`
    (noise, if given, has shape ``(R, h, n_common)``); the rest are the row of
    the task-specific allocation matrix, used as raw, unnormalised weights.
    """
    check_tensor("logits", logits, ndim=3, floating=True)
    m = logits.shape[-1]
    if not isinstance(n_common, int) or not 0 <= n_common <= m:
        raise ValueError(f"n_common: expected an int in [0, {m}], got {n_common!r}")
    common = logits[..., :n_common]
    if noise is not None and noise.shape != common.shape:
        raise ValueError(f"noise: expected shape {tuple(common.shape)}, got {tuple(noise.shape)}")
    check_positive("temperature", temperature)
    w_common = _poly_weights(common, noise, temperature) if n_common else common
    w = torch.cat([w_common, logits[..., n_common:]], dim=-1)
    R, h, _ = logits.shape
    return Routing(dense_index(R, h, m, logits.device), w)
