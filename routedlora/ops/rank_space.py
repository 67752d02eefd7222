"""Rank-space algorithm of the torch backend: every skill applied to every token, mixed per token.

Contract shared by every algorithm and backend (shapes as in DESIGN.md §1, ``dh = d/h``,
``oh = o/h``; ``rows`` a :class:`~routedlora.ops.rows.TokenRows`)::

    forward(x (N,d), A (h,m,dh,r), B (h,m,r,oh), idx (R,h,K), w (R,h,K), rows,
            scale, combine, base (N,o) or None, inplace) -> (base + delta or delta, saved tensors)
            # inplace: base is the op's own buffer and may be updated and returned
    backward(grad (N,o), x, A, B, idx, w, rows, scale, combine, saved, needs, dx (N,d) or None)
            -> (dx, dA, dB, dw)         # None where ``needs`` says not needed; a given dx
                                        # (the base linear's) is included, in place or not

m× plain-LoRA flops per token and no per-row adapter: the choice for few tokens per
routing row (decode, token-level routing); :mod:`routedlora.ops.row_mixed` serves long
rows (DESIGN.md §2; the choice is :func:`routedlora.ops.plan.choose`).

How it stays cheap: no d x r adapter is built per example or per token. The
sparse routing rows are scattered into dense per-row skill weights ``W (R,h,m)``
and gathered per token (``N*h*m`` numbers); the input is projected on every
skill at once (``Z = x_q [A_q1 .. A_qm]``, one batched GEMM over heads), mixed
in rank space, and expanded with one batched GEMM against the stacked B's.

Memory: the forward keeps only ``u (N, r)`` (the mixed rank-space activation,
``params`` mode) besides its inputs; its transient peak is two ``(h, N, m, r)``
buffers. The backward recomputes ``Z`` rather than storing it, at the cost of
one extra shrink GEMM, with the same transient peak.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


NEEDS_ROUTE_IDS = True
NEEDS_GROUPING = False
READS_EVERY_SKILL = True  # dense GEMMs over all skills: sparse routing goes through selected_only


def selected_only(A: Tensor, B: Tensor, idx: Tensor, w: Tensor):
    """``(A, B, idx, w, ok)`` for sparse routing such that a token reads only the skills its row selects.

    The torch algorithms run every skill through dense GEMMs and weight the unselected ones
    by zero, and ``0 × NaN`` is NaN: a NaN in a skill nobody selects would poison every
    token. So non-finite skills are zeroed, and a slot that selects one, or an index out of
    ``[0, m)``, gets a NaN weight instead (``ok`` is False there): exactly the tokens of that
    row come out NaN, the contract of the Triton and CUDA kernels. Transient: the op calls
    it in forward and again in backward rather than saving parameter-sized copies.
    """
    h, m = A.shape[:2]
    finite = (torch.linalg.vector_norm(A, ord=math.inf, dim=(2, 3)).isfinite()
              & torch.linalg.vector_norm(B, ord=math.inf, dim=(2, 3)).isfinite())  # (h, m)
    safe = idx.long().clamp(0, max(m - 1, 0))
    heads = torch.arange(h, device=idx.device).view(1, h, 1)
    ok = (idx >= 0) & (idx < m) & finite[heads, safe]
    A = torch.where(finite[:, :, None, None], A, 0)
    B = torch.where(finite[:, :, None, None], B, 0)
    return A, B, safe, torch.where(ok, w, math.nan), ok


def dense_rows(idx: Optional[Tensor], w: Tensor, n_skills: int, dtype) -> Tensor:
    """Dense per-row skill weights ``(R, h, m)``; duplicate indices in a row add up.

    ``idx=None`` is dense routing: ``w`` already weights every skill in order."""
    if idx is None:
        return w.to(dtype)
    R, h, _ = idx.shape
    rows = torch.zeros(R, h, n_skills, dtype=dtype, device=w.device)
    return rows.scatter_add_(2, idx.long(), w.to(dtype))


def sparse_index(idx: Optional[Tensor], w: Tensor) -> Tensor:
    """``idx``, or for dense routing (``None``) every skill in order, ``(R, h, m)``."""
    if idx is not None:
        return idx
    R, h, m = w.shape
    return torch.arange(m, device=w.device).expand(R, h, m)


def token_weights(idx: Optional[Tensor], w: Tensor, route_ids: Tensor, n_skills: int, dtype) -> Tensor:
    """Dense per-token skill weights ``(N, h, m)``."""
    return dense_rows(idx, w, n_skills, dtype)[route_ids.long()]


def _row_grad(dWn: Tensor, idx: Optional[Tensor], w: Tensor, route_ids: Tensor) -> Tensor:
    """Pull per-token skill-weight gradients back to the sparse ``(idx, w)`` rows."""
    R = w.shape[0]
    # accumulate over a row's tokens in at least float32, whatever x's dtype
    acc = torch.promote_types(dWn.dtype, torch.float32)
    rows = torch.zeros(R, *dWn.shape[1:], dtype=acc, device=dWn.device)
    rows.index_add_(0, route_ids.long(), dWn.to(acc))
    return (rows if idx is None else rows.gather(2, idx.long())).to(w.dtype)


def _flat_A(A: Tensor) -> Tensor:  # (h, m, dh, r) -> (h, dh, m*r)
    h, m, dh, r = A.shape
    return A.permute(0, 2, 1, 3).reshape(h, dh, m * r)


def _flat_B(B: Tensor) -> Tensor:  # (h, m, r, oh) -> (h, m*r, oh)
    h, m, r, oh = B.shape
    return B.reshape(h, m * r, oh)


def forward(x, A, B, idx, w, rows, scale, combine, base=None, inplace=False):
    route_ids = rows.route_ids
    N, d = x.shape
    h, m, dh, r = A.shape
    oh = B.shape[-1]
    Wn = token_weights(idx, w, route_ids, m, x.dtype).transpose(0, 1)  # (h, N, m)
    xq = x.view(N, h, dh).transpose(0, 1)  # (h, N, dh)
    Z = torch.bmm(xq, _flat_A(A)).view(h, N, m, r)
    if combine == "params":
        # x Â = sum over heads and skills of w * x_q A_qs (the heads concat along d)
        u = torch.einsum("qnm,qnmr->nr", Wn, Z)
        V = Wn.unsqueeze(-1) * (u * scale).unsqueeze(0).unsqueeze(2)
        ctx = u
    else:
        V = Wn.unsqueeze(-1) * Z * scale
        ctx = None
    delta = torch.bmm(V.reshape(h, N, m * r), _flat_B(B)).transpose(0, 1).reshape(N, h * oh)
    if base is None:
        return delta, (ctx,)
    return (base.add_(delta) if inplace else base + delta), (ctx,)


def backward(grad, x, A, B, idx, w, rows, scale, combine, saved, needs, dx=None):
    route_ids, (ctx,) = rows.route_ids, saved
    need_x, need_A, need_B, need_w = needs
    N, d = x.shape
    h, m, dh, r = A.shape
    oh = B.shape[-1]
    Wn = token_weights(idx, w, route_ids, m, x.dtype).transpose(0, 1)  # (h, N, m)
    xq = x.view(N, h, dh).transpose(0, 1)
    fA = _flat_A(A)
    gq = grad.reshape(N, h, oh).transpose(0, 1)  # (h, N, oh)
    G = torch.bmm(gq, _flat_B(B).transpose(1, 2)).view(h, N, m, r)  # dL/dV
    dA = dB = dw = None
    if combine == "params":
        us = ctx * scale
        V = Wn.unsqueeze(-1) * us.unsqueeze(0).unsqueeze(2)
        du = torch.einsum("qnm,qnmr->nr", Wn, G) * scale
        dZ = Wn.unsqueeze(-1) * du.unsqueeze(0).unsqueeze(2)
        if need_w:
            Z = torch.bmm(xq, fA).view(h, N, m, r)
            dWn = torch.einsum("qnmr,nr->nqm", G, us) + torch.einsum("qnmr,nr->nqm", Z, du)
    else:
        Z = torch.bmm(xq, fA).view(h, N, m, r)
        V = Wn.unsqueeze(-1) * Z * scale
        dZ = Wn.unsqueeze(-1) * G * scale
        if need_w:
            dWn = torch.einsum("qnmr,qnmr->nqm", G, Z) * scale
    if need_B:
        dB = torch.bmm(V.reshape(h, N, m * r).transpose(1, 2), gq).view(h, m, r, oh)
    dZf = dZ.reshape(h, N, m * r)
    if need_A:
        dA = torch.bmm(xq.transpose(1, 2), dZf).view(h, dh, m, r).permute(0, 2, 1, 3)
    if need_x:
        dx_ad = torch.bmm(dZf, fA.transpose(1, 2)).transpose(0, 1).reshape(N, d)
        dx = dx_ad if dx is None else dx.add_(dx_ad)
    if need_w:
        dw = _row_grad(dWn, idx, w, route_ids)
    return dx, dA, dB, dw
