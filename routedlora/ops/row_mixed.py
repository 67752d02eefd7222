"""Row-mixed algorithm of the torch backend: one mixed adapter per routing row, then batched GEMMs.

Same contract as :mod:`routedlora.ops.rank_space`, for rows laid out as contiguous runs of
``seq_len`` tokens (row ``ρ`` owns tokens ``[ρS, (ρ+1)S)``: one row per sequence, or per
token with ``S = 1``), so that ``x`` viewed as ``(R, S, d)`` feeds ``bmm`` directly.

``params`` (Poly, MHR, C-Poly): ``Â_ρ = concat_q Σ_s W[ρ,q,s] A[q,s]`` (d×r) and
``B̂_ρ = concat_q Σ_s W[ρ,q,s] B[q,s]`` (r×o), with ``W`` the routing rows made dense
over the m skills. ``outputs`` (MTA, MoE-LoRA; h = 1): the row's K selected skills
stacked, ``Â_ρ = [A_{i_1} … A_{i_K}]`` (d×Kr) and ``B̂_ρ = [w_1 B_{i_1}; …; w_K B_{i_K}]``
(Kr×o). Either way ``y = base + γ (x Â_ρ) B̂_ρ`` row by row: adapter work is plain-LoRA
flops per token plus ``R·m·r·(d+o)`` to mix, against m× plain-LoRA per token in rank
space (DESIGN.md §2). The result is accumulated into ``base`` by ``baddbmm`` with γ as its
``alpha`` (one read and one write of the output, no separate delta; in place when the op
owns the base output), and in backward the adapter's ``dx`` into the base's when given.

Saved for backward beyond the inputs: ``u = x Â`` (``N·r'``), the row adapters
(``R·r'·(d+o)``) and the dense row weights, ``r' = r`` or ``K·r``. Backward reads ``x``
and the output gradient once each: the per-row reductions ``dÂ_ρ = x_ρᵀ dU_ρ`` and
``dB̂_ρ = γ u_ρᵀ g_ρ`` then give ``dA``, ``dB`` and the routing gradients through the
(small) mixing.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .rank_space import dense_rows, sparse_index

NEEDS_ROUTE_IDS = False
NEEDS_GROUPING = False
READS_EVERY_SKILL = True  # the params mix is a dense GEMM over all skills (see rank_space.selected_only)


def _scaled_bmm(a: Tensor, b: Tensor, scale: float) -> Tensor:
    """``scale · a @ b`` as one batched GEMM (``baddbmm`` with ``beta = 0`` never reads its input)."""
    out = a.new_empty(a.shape[0], a.shape[1], b.shape[2])
    return torch.baddbmm(out, a, b, beta=0, alpha=scale)


def _mix_params(A: Tensor, B: Tensor, Wd: Tensor):
    """``Â (R, d, r)`` and ``B̂ (R, r, o)`` from dense row weights ``Wd (R, h, m)``."""
    h, m, dh, r = A.shape
    oh = B.shape[-1]
    R = Wd.shape[0]
    Wq = Wd.transpose(0, 1)  # (h, R, m)
    A_hat = torch.bmm(Wq, A.reshape(h, m, dh * r))  # (h, R, dh*r)
    B_hat = torch.bmm(Wq, B.reshape(h, m, r * oh))  # (h, R, r*oh)
    if h == 1:
        return A_hat.view(R, dh, r), B_hat.view(R, r, oh)
    # heads concatenate along d (for Â) and along o (for B̂)
    A_hat = A_hat.view(h, R, dh, r).transpose(0, 1).reshape(R, h * dh, r)
    B_hat = B_hat.view(h, R, r, oh).permute(1, 2, 0, 3).reshape(R, r, h * oh)
    return A_hat, B_hat


def _stack_outputs(A: Tensor, B: Tensor, idx: Tensor, w: Tensor):
    """``Â (R, d, K·r)`` and ``B̂ (R, K·r, o)`` (weighted): the row's selected skills side by side."""
    _, m, d, r = A.shape
    o = B.shape[-1]
    R, _, K = idx.shape
    sel = idx[:, 0, :]
    A_hat = A[0][sel].permute(0, 2, 1, 3).reshape(R, d, K * r)
    B_hat = (B[0][sel] * w[:, 0, :, None, None].to(B.dtype)).reshape(R, K * r, o)
    return A_hat, B_hat


def forward(x, A, B, idx, w, rows, scale, combine, base=None, inplace=False):
    N, d = x.shape
    R = w.shape[0]
    S = rows.seq_len
    o = A.shape[0] * B.shape[-1]
    if combine == "params":
        Wd = dense_rows(idx, w, A.shape[1], x.dtype)
        A_hat, B_hat = _mix_params(A, B, Wd)
    else:
        Wd = None
        A_hat, B_hat = _stack_outputs(A, B, sparse_index(idx, w), w)
    u = torch.bmm(x.view(R, S, d), A_hat)
    if base is None:
        y = _scaled_bmm(u, B_hat, scale)
    elif inplace:
        y = base.view(R, S, o).baddbmm_(u, B_hat, alpha=scale)
    else:
        y = torch.baddbmm(base.view(R, S, o), u, B_hat, alpha=scale)
    return y.view(N, o), (u, A_hat, B_hat, Wd)


def backward(grad, x, A, B, idx, w, rows, scale, combine, saved, needs, dx=None):
    need_x, need_A, need_B, need_w = needs
    u, A_hat, B_hat, Wd = saved
    N, d = x.shape
    h, m, dh, r = A.shape
    oh = B.shape[-1]
    R = w.shape[0]
    S = rows.seq_len
    g = grad.view(R, S, h * oh)
    dA = dB = dw = None
    dU = _scaled_bmm(g, B_hat.transpose(1, 2), scale) if (need_x or need_A or need_w) else None  # (R, S, r')
    if need_x:
        if dx is None:
            dx = torch.bmm(dU, A_hat.transpose(1, 2)).view(N, d)
        else:  # accumulate into the base linear's dx
            dx.view(R, S, d).baddbmm_(dU, A_hat.transpose(1, 2))
    if not (need_A or need_B or need_w):
        return dx, dA, dB, dw
    # per-row reductions: each reads x (resp. the gradient) once
    dA_hat = torch.bmm(x.view(R, S, d).transpose(1, 2), dU) if (need_A or need_w) else None  # (R, d, r')
    dB_hat = _scaled_bmm(u.transpose(1, 2), g, scale) if (need_B or need_w) else None  # (R, r', o)
    if combine == "params":
        dA, dB, dW = _params_grads(A, B, Wd, dA_hat, dB_hat, needs)
        if need_w:
            dw = (dW if idx is None else dW.gather(2, idx.long())).to(w.dtype)
    else:
        dA, dB, dw = _outputs_grads(A, B, sparse_index(idx, w), w, dA_hat, dB_hat, needs)
    return dx, dA, dB, dw


def _params_grads(A, B, Wd, dA_hat, dB_hat, needs):
    """Through ``Â_q = Σ_s W A_qs`` and ``B̂_q = Σ_s W B_qs``: ``dA``, ``dB`` and dense ``dW (R, h, m)``."""
    _, need_A, need_B, need_w = needs
    h, m, dh, r = A.shape
    oh = B.shape[-1]
    R = Wd.shape[0]
    WqT = Wd.permute(1, 2, 0)  # (h, m, R)
    dA = dB = dW = None
    if dA_hat is not None:
        dAq = dA_hat.view(R, h, dh * r).transpose(0, 1)  # (h, R, dh*r), strided: bmm reads it in place
        if need_A:
            dA = torch.bmm(WqT, dAq).view(h, m, dh, r)
        if need_w:
            dW = torch.bmm(dAq, A.reshape(h, m, dh * r).transpose(1, 2))  # (h, R, m)
    if dB_hat is not None:
        dBq = dB_hat.view(R, r, h, oh).permute(2, 0, 1, 3).reshape(h, R, r * oh)
        if need_B:
            dB = torch.bmm(WqT, dBq).view(h, m, r, oh)
        if need_w:
            Bq = B.reshape(h, m, r * oh).transpose(1, 2)
            dW = torch.bmm(dBq, Bq) if dW is None else torch.baddbmm(dW, dBq, Bq)
    return dA, dB, None if dW is None else dW.transpose(0, 1)


def _outputs_grads(A, B, idx, w, dA_hat, dB_hat, needs):
    """Through the stacked skills: ``dA``, ``dB`` as one-hot GEMMs (deterministic), ``dw (R, 1, K)``."""
    _, need_A, need_B, need_w = needs
    _, m, d, r = A.shape
    o = B.shape[-1]
    R, _, K = idx.shape
    sel = idx[:, 0, :].reshape(R * K)
    onehot = torch.nn.functional.one_hot(sel, m).to(A.dtype).T  # (m, R*K)
    dA = dB = dw = None
    if need_A:
        dA_sel = dA_hat.view(R, d, K, r).transpose(1, 2).reshape(R * K, d * r)
        dA = torch.mm(onehot, dA_sel).view(1, m, d, r)
    if need_B or need_w:
        dB_sel = dB_hat.view(R * K, r * o)
        if need_B:
            coef = onehot * w[:, 0, :].reshape(1, R * K).to(B.dtype)
            dB = torch.mm(coef, dB_sel).view(1, m, r, o)
        if need_w:
            per_skill = torch.mm(dB_sel, B.reshape(m, r * o).T)  # (R*K, m): <dB̂_ρk, B_s>
            dw = per_skill.gather(1, sel[:, None]).view(R, 1, K).to(w.dtype)
    return dA, dB, dw
