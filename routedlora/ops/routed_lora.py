"""The routed LoRA op: ``y = base + scale * Δ(x)`` from sparse routing rows.

``params`` combine (Poly, MHR, C-Poly) mixes the skills' parameters per head and
then applies them; ``outputs`` combine (MTA, MoE-LoRA; one head) applies every
selected skill and mixes the outputs. See DESIGN.md §1 for the formulas.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backends import resolve_backend
from ..validation import check_index_range, check_same_device, check_tensor

COMBINES = ("params", "outputs")


class RoutedLoraFunction(torch.autograd.Function):
    """Autograd wrapper around one backend's forward and hand-written backward.

    Gradients flow to ``x``, ``lora_A``, ``lora_B`` and the routing weights ``w``
    (and through ``w`` to the logits and any gate). ``idx`` and ``route_ids``
    are integer metadata and get none.
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, idx, w, route_ids, base, scale, combine, impl):
        out, saved = impl.forward(x, lora_A, lora_B, idx, w, route_ids, scale, combine, base)
        ctx.save_for_backward(x, lora_A, lora_B, idx, w, route_ids, saved)
        ctx.scale, ctx.combine, ctx.impl = scale, combine, impl
        return out

    @staticmethod
    def backward(ctx, grad):
        x, A, B, idx, w, route_ids, saved = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2],
                 ctx.needs_input_grad[4])
        dx, dA, dB, dw = ctx.impl.backward(grad.contiguous(), x, A, B, idx, w, route_ids, ctx.scale,
                                           ctx.combine, saved, needs)
        dbase = grad if ctx.needs_input_grad[6] else None
        return dx, dA, dB, None, dw, None, dbase, None, None, None


def check_routed_lora_inputs(x, lora_A, lora_B, idx, w, route_ids, combine, base=None) -> None:
    """Validate shapes, dtypes and devices (metadata only) and, on CPU, index ranges."""
    check_tensor("x", x, ndim=2, floating=True)
    check_tensor("lora_A", lora_A, ndim=4, floating=True)
    check_tensor("lora_B", lora_B, ndim=4, floating=True)
    check_tensor("idx", idx, ndim=3, integer=True)
    check_tensor("w", w, ndim=3, floating=True)
    check_tensor("route_ids", route_ids, ndim=1, integer=True)
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
    if idx.shape[1] != h:
        raise ValueError(f"idx: expected {h} heads in dim 1, got shape {tuple(idx.shape)}")
    if w.shape != idx.shape:
        raise ValueError(f"w: expected the shape of idx {tuple(idx.shape)}, got {tuple(w.shape)}")
    if route_ids.shape[0] != x.shape[0]:
        raise ValueError(f"route_ids: expected one id per token ({x.shape[0]}), got {route_ids.shape[0]}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from x's {x.dtype}")
    named = [("x", x), ("lora_A", lora_A), ("lora_B", lora_B), ("idx", idx), ("w", w), ("route_ids", route_ids)]
    if base is not None:
        check_tensor("base", base, ndim=2, floating=True)
        if base.shape != (x.shape[0], h * lora_B.shape[3]):
            raise ValueError(f"base: expected shape {(x.shape[0], h * lora_B.shape[3])}, got {tuple(base.shape)}")
        if base.dtype != x.dtype:
            raise TypeError(f"base: dtype {base.dtype} differs from x's {x.dtype}")
        named.append(("base", base))
    check_same_device(named)
    check_index_range("idx", idx, m, "skill index")
    if idx.shape[0] == 0 and x.shape[0] > 0:
        raise ValueError("idx: no routing rows, but x has tokens to route")
    check_index_range("route_ids", route_ids, idx.shape[0], "routing row")


def routed_lora(x: Tensor, lora_A: Tensor, lora_B: Tensor, idx: Tensor, w: Tensor, route_ids: Tensor,
                *, scale: float = 1.0, combine: str = "params", base: Optional[Tensor] = None,
                backend: str = "auto", validate: bool = True) -> Tensor:
    """Routed LoRA delta, optionally added to a base output.

    Args:
        x: ``(N, d)`` input tokens (flatten any leading dims first).
        lora_A: ``(h, m, d/h, r)`` skills' down projections, PEFT Poly layout.
        lora_B: ``(h, m, r, o/h)`` skills' up projections.
        idx: ``(R, h, K)`` integer skill index per routing row, head and slot.
        w: ``(R, h, K)`` routing weights (any float dtype; differentiable).
        route_ids: ``(N,)`` integer routing row of each token.
        scale: γ, e.g. ``alpha / r`` (PEFT Poly uses ``1 / r``).
        combine: ``"params"`` (mix parameters per head, then apply) or ``"outputs"``
            (apply each selected skill, mix outputs; ``h == 1``).
        base: optional ``(N, o)`` base output ``x W^T + b``; the result is ``base + γΔ``.
        backend: ``"auto" | "torch" | "triton" | "cuda"``.
        validate: check shapes, dtypes, devices (and index ranges of CPU tensors).

    Returns:
        ``(N, o)`` tensor in ``x``'s dtype: ``γΔ`` or ``base + γΔ``.

    Memory (torch backend): saves ``N*r`` numbers for backward beyond its
    inputs; transient peak two ``h*N*m*r`` buffers. No per-token adapter.
    """
    if validate:
        check_routed_lora_inputs(x, lora_A, lora_B, idx, w, route_ids, combine, base)
    impl = resolve_backend(backend, x.device)
    return RoutedLoraFunction.apply(x, lora_A, lora_B, idx, w, route_ids, base, float(scale), combine, impl)
