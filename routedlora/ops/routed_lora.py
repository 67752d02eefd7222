"""The routed LoRA op: ``y = base + scale * Δ(x)`` from sparse routing rows.

``params`` combine (Poly, MHR, C-Poly) mixes the skills' parameters per head and
then applies them; ``outputs`` combine (MTA, MoE-LoRA; one head) applies every
selected skill and mixes the outputs. See DESIGN.md §1 for the formulas.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from ..backends import resolve_backend
from ..validation import check_index_range, check_same_device, check_tensor
from .rank_space import selected_only
from .rows import TokenRows

COMBINES = ("params", "outputs")


class RoutedLoraFunction(torch.autograd.Function):
    """Autograd wrapper around one algorithm's forward and hand-written backward.

    Gradients flow to ``x``, ``lora_A``, ``lora_B``, the routing weights ``w`` (and
    through ``w`` to the logits and any gate), ``base``, and the base linear's ``weight``
    and ``bias`` when given and trainable. ``idx`` and the token rows are integer metadata
    and get none. The token rows travel as ``seq_len`` plus the tensors the algorithm
    reads (``route_ids``, the token grouping), each ``None`` when it does not read them;
    they are built once per batch by :class:`TokenRows`.

    With ``weight`` the op owns the base linear: ``x Wᵀ + b`` is computed here and the
    delta accumulated into it in place, and in backward the adapter's ``dx`` is accumulated
    into the base's ``g W`` (no separate delta, no second ``dx`` summed by autograd).
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, idx, w, base, weight, bias, seq_len, route_ids, order, srows, offs, scale,
                combine, impl):
        rows = _rows(x, w.shape[0], seq_len, route_ids, order, srows, offs)
        out, saved = _forward(impl, x, lora_A, lora_B, idx, w, rows, base, weight, bias, scale, combine)
        ctx.save_for_backward(x, lora_A, lora_B, idx, w, weight, route_ids, order, srows, offs, *saved)
        ctx.seq_len, ctx.scale, ctx.combine, ctx.impl = seq_len, scale, combine, impl
        return out

    @staticmethod
    def backward(ctx, grad):
        x, A, B, idx, w, weight, route_ids, order, srows, offs, *saved = ctx.saved_tensors
        nig = ctx.needs_input_grad
        needs = (nig[0], nig[1], nig[2], nig[4])
        grad = grad.contiguous()
        dx = dA = dB = dw = None
        fused = weight is not None and _fuses_linear(ctx.impl)
        if weight is not None and nig[0] and not fused:
            dx = grad.mm(weight.to(grad.dtype))  # the base's; the adapter's is accumulated into it
        if any(needs):
            rows = _rows(x, w.shape[0], ctx.seq_len, route_ids, order, srows, offs)
            base_dx = dict(weight=weight) if fused else dict(dx=dx)  # fused: the kernel computes g W too
            A, B, idx, w, ok = _selected_only(ctx.impl, A, B, idx, w)
            dx, dA, dB, dw = ctx.impl.backward(grad, x, A, B, idx, w, rows, ctx.scale, ctx.combine, saved, needs,
                                               **base_dx)
            if ok is not None and dw is not None:  # a poisoned slot's weight did not reach the output
                dw = torch.where(ok, dw, 0)
        dweight = grad.t().mm(x).to(weight.dtype) if nig[6] else None
        dbias = grad.sum(0) if nig[7] else None
        return (dx, dA, dB, None, dw, grad if nig[5] else None, dweight, dbias) + (None,) * 8


def _fuses_linear(impl) -> bool:
    """Whether the algorithm computes the base linear in its own kernels (``linear=``/``weight=``)."""
    return getattr(impl, "FUSES_LINEAR", False)


def _selected_only(impl, A, B, idx, w):
    """What an algorithm whose GEMMs read every skill computes sparse routing from (see
    ``rank_space.selected_only``); ``ok`` is None where nothing changes."""
    if idx is None or not getattr(impl, "READS_EVERY_SKILL", False):
        return A, B, idx, w, None
    return selected_only(A, B, idx, w)


def _forward(impl, x, A, B, idx, w, rows, base, weight, bias, scale, combine):
    A, B, idx, w, _ = _selected_only(impl, A, B, idx, w)
    own_base = weight is not None
    if own_base and _fuses_linear(impl):
        return impl.forward(x, A, B, idx, w, rows, scale, combine, linear=(weight, bias))
    if own_base:
        base = torch.nn.functional.linear(x, weight, bias)
    return impl.forward(x, A, B, idx, w, rows, scale, combine, base, inplace=own_base)


def _rows(x, w_rows, seq_len, route_ids, order, srows, offs) -> TokenRows:
    grouping = None if order is None else (order, srows, offs)
    return TokenRows(w_rows, x.shape[0], x.device, seq_len=seq_len, route_ids=route_ids, grouping=grouping)


def check_routed_lora_inputs(x, lora_A, lora_B, idx, w, rows: TokenRows, combine, base=None,
                             route_ids: Optional[Tensor] = None) -> None:
    """Validate shapes, dtypes and devices (metadata only) and, on CPU, index ranges."""
    check_tensor("x", x, ndim=2, floating=True)
    check_tensor("lora_A", lora_A, ndim=4, floating=True)
    check_tensor("lora_B", lora_B, ndim=4, floating=True)
    check_tensor("w", w, ndim=3, floating=True)
    if idx is not None:
        check_tensor("idx", idx, ndim=3, integer=True)
    if combine not in COMBINES:
        raise ValueError(f"combine: expected one of {COMBINES}, got {combine!r}")
    h, m, dh, r = lora_A.shape
    if lora_B.shape[:3] != (h, m, r):
        raise ValueError(f"lora_B: expected shape ({h}, {m}, {r}, o/h) to match lora_A {tuple(lora_A.shape)}, "
                         f"got {tuple(lora_B.shape)}")
    if x.shape[1] != h * dh:
        raise ValueError(f"x: expected {h * dh} features (lora_A has {h} heads of {dh}), got {x.shape[1]}")
    if combine == "outputs" and h != 1:
        raise ValueError(f"lora_A: combine='outputs' takes one head, got h={h}")
    if idx is None:
        if w.shape[1:] != (h, m):
            raise ValueError(f"w: dense routing (idx=None) weights every skill: expected shape (R, {h}, {m}), "
                             f"got {tuple(w.shape)}")
    else:
        if idx.shape[1] != h:
            raise ValueError(f"idx: expected {h} heads in dim 1, got shape {tuple(idx.shape)}")
        if w.shape != idx.shape:
            raise ValueError(f"w: expected the shape of idx {tuple(idx.shape)}, got {tuple(w.shape)}")
    if rows.n_tokens != x.shape[0]:
        what = "one id per token" if route_ids is not None else f"{rows.n_rows} rows x seq_len={rows.seq_len}"
        raise ValueError(f"route_ids: expected {what} to cover the {x.shape[0]} tokens of x, got {rows.n_tokens}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from x's {x.dtype}")
    named = [("x", x), ("lora_A", lora_A), ("lora_B", lora_B), ("w", w)] + ([("idx", idx)] if idx is not None else [])
    if route_ids is not None:
        named.append(("route_ids", route_ids))
    if base is not None:
        check_tensor("base", base, ndim=2, floating=True)
        if base.shape != (x.shape[0], h * lora_B.shape[3]):
            raise ValueError(f"base: expected shape {(x.shape[0], h * lora_B.shape[3])}, got {tuple(base.shape)}")
        if base.dtype != x.dtype:
            raise TypeError(f"base: dtype {base.dtype} differs from x's {x.dtype}")
        named.append(("base", base))
    check_same_device(named)
    if idx is not None:
        check_index_range("idx", idx, m, "skill index")
    if w.shape[0] == 0 and x.shape[0] > 0:
        raise ValueError("w: no routing rows, but x has tokens to route")
    if route_ids is not None:
        check_index_range("route_ids", route_ids, w.shape[0], "routing row")


def autocasting(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta)
        return False


def compute_dtype(x: Tensor, adapter_dtype=None):
    """The dtype the op computes in for ``x``: autocast's where it is on, else the adapters' (``x``'s)."""
    if autocasting(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return adapter_dtype if adapter_dtype is not None else x.dtype


def check_base_linear(x, lora_A, lora_B, base, weight, bias) -> None:
    if weight is None:
        if bias is not None:
            raise ValueError("bias: given without weight")
        return
    if base is not None:
        raise ValueError("weight: pass the base output (base) or the base linear (weight, bias), not both")
    o = lora_A.shape[0] * lora_B.shape[3]
    check_tensor("weight", weight, ndim=2, floating=True)
    if tuple(weight.shape) != (o, x.shape[1]):
        raise ValueError(f"weight: expected shape {(o, x.shape[1])} (out, in), got {tuple(weight.shape)}")
    named = [("x", x), ("weight", weight)]
    if bias is not None:
        check_tensor("bias", bias, ndim=1, floating=True)
        if bias.shape[0] != o:
            raise ValueError(f"bias: expected shape ({o},), got {tuple(bias.shape)}")
        named.append(("bias", bias))
    for name, t in named[1:]:
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from x's {x.dtype}")
    check_same_device(named)


def token_rows(x: Tensor, w: Tensor, route_ids: Union[Tensor, TokenRows, None], seq_len: Optional[int]) -> TokenRows:
    """The op's token-to-row map from its ``route_ids`` / ``seq_len`` arguments."""
    if isinstance(route_ids, TokenRows):
        if seq_len is not None:
            raise ValueError("seq_len: route_ids is already a TokenRows; pass one or the other")
        return route_ids
    if route_ids is not None:
        check_tensor("route_ids", route_ids, ndim=1, integer=True)
        if seq_len is not None:
            raise ValueError("seq_len: pass route_ids or seq_len, not both")
        return TokenRows.of(route_ids, w.shape[0])
    if seq_len is None:
        raise ValueError("route_ids: pass the routing row of each token (route_ids) or, for contiguous rows of "
                         "equal length, seq_len")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len: expected a positive int, got {seq_len!r}")
    return TokenRows.contiguous(w.shape[0], seq_len, x.device)


def routed_lora(x: Tensor, lora_A: Tensor, lora_B: Tensor, idx: Optional[Tensor], w: Tensor,
                route_ids: Union[Tensor, TokenRows, None] = None, *, seq_len: Optional[int] = None,
                scale: float = 1.0, combine: str = "params", base: Optional[Tensor] = None,
                weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                backend: str = "auto", validate: bool = True) -> Tensor:
    """Routed LoRA delta, optionally added to a base output.

    Args:
        x: ``(N, d)`` input tokens (flatten any leading dims first).
        lora_A: ``(h, m, d/h, r)`` skills' down projections, PEFT Poly layout.
        lora_B: ``(h, m, r, o/h)`` skills' up projections.
        idx: ``(R, h, K)`` integer skill index per routing row, head and slot, or ``None``
            for dense routing (every skill in order, ``K = m``: Poly, MHR, C-Poly).
        w: ``(R, h, K)`` routing weights (any float dtype; differentiable).
        route_ids: ``(N,)`` integer routing row of each token, or a
            :class:`~routedlora.ops.TokenRows` built once per batch and shared by layers.
        seq_len: instead of ``route_ids``: row ``ρ`` owns tokens ``[ρ·seq_len, (ρ+1)·seq_len)``
            (one row per sequence of a ``(R, seq_len, d)`` batch), so ``N = R·seq_len``.
        scale: γ, e.g. ``alpha / r`` (PEFT Poly uses ``1 / r``).
        combine: ``"params"`` (mix parameters per head, then apply) or ``"outputs"``
            (apply each selected skill, mix outputs; ``h == 1``).
        base: optional ``(N, o)`` base output ``x W^T + b``; the result is ``base + γΔ``
            (accumulated as the delta is computed, not added afterwards; ``base`` itself is
            not modified).
        weight, bias: instead of ``base``, the base linear itself (``(o, d)`` and ``(o,)`` or
            ``None``): the op computes ``x Wᵀ + b + γΔ``, accumulating the delta into the base
            GEMM's output and, in backward, the adapter's ``dx`` into the base's.
        backend: ``"auto" | "torch" | "triton" | "cuda"``.
        validate: check shapes, dtypes, devices (and index ranges of CPU tensors);
            ``False`` skips every check.

    Under ``torch.autocast`` the op computes in the autocast dtype, as torch's matmuls do:
    ``x``, the skills and ``base``/``weight`` are cast to it (differentiably) first.

    Returns:
        ``(N, o)`` tensor in ``x``'s dtype: ``γΔ`` or ``base + γΔ``.

    The torch backend picks its algorithm per call from the shape
    (:func:`routedlora.ops.plan.choose`): row-mixed for long rows, rank space for short ones.
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale: expected a finite number (γ = alpha / r), got {scale!r}")
    if validate:  # what the token rows are built from, before they are
        check_tensor("x", x, ndim=2, floating=True)
        check_tensor("w", w, ndim=3, floating=True)
    rows = token_rows(x, w, route_ids, seq_len)
    if autocasting(x.device.type):
        # as torch's own matmuls do under autocast: compute in the autocast dtype (the casts
        # are differentiable, so fp32 adapters still get fp32 gradients); no casts inside
        dt = compute_dtype(x)
        x, lora_A, lora_B, base, weight, bias = (t if t is None else t.to(dt)
                                                 for t in (x, lora_A, lora_B, base, weight, bias))
        with torch.autocast(x.device.type, enabled=False):
            return routed_lora(x, lora_A, lora_B, idx, w, rows, scale=scale, combine=combine, base=base,
                               weight=weight, bias=bias, backend=backend, validate=validate)
    if validate:
        check_routed_lora_inputs(x, lora_A, lora_B, idx, w, rows, combine, base,
                                 route_ids if isinstance(route_ids, Tensor) else None)
        check_base_linear(x, lora_A, lora_B, base, weight, bias)
    backward = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, lora_A, lora_B, w, base, weight, bias))
    impl = resolve_backend(backend, x.device).plan(x, lora_A, lora_B, idx, rows, combine, backward)
    if not backward:  # inference (decode): no autograd node to build
        return _forward(impl, x, lora_A, lora_B, idx, w, rows, base, weight, bias, float(scale), combine)[0]
    rid = rows.route_ids if impl.NEEDS_ROUTE_IDS or rows.seq_len is None else None
    grouping = impl.grouping(rows) if impl.NEEDS_GROUPING else (None, None, None)
    return RoutedLoraFunction.apply(x, lora_A, lora_B, idx, w, base, weight, bias, rows.seq_len, rid, *grouping,
                                    float(scale), combine, impl)
